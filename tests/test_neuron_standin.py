"""The Neuron path (torch.neuron.trace at compile time, the neuron backend at run time) against a stand-in
torch_neuron (tests/standin) that checks every call against AWS's documented torch-neuron API.

No Inferentia here: the stand-in compiles with torch.jit.trace, so outputs are real, and a faked
/dev/neuron* list stands for the device. What these tests prove is the calls and their order: keyword
arguments and neuron-cc flags as documented, `import torch_neuron` before torch.jit.load,
NEURON_RT_VISIBLE_CORES pinned before the first load, groups placed relative to the pinned range.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL_CONFIG
from neuronserve.artifact import FUSED_STAGE, MANIFEST_HASH_KEY, load_manifest, manifest_hash
from neuronserve.contract import TICK_BLOCK
from neuronserve.backends.base import FusedRunner
from neuronserve.backends import core_span, make_backend
from neuronserve.backends import neuron as neuron_backend
from neuronserve.config import CoreGroup, Placement
from neuronserve.errors import ArtifactError, BackendUnavailable, ConfigError, CoreFault, InvalidInput

pytestmark = [pytest.mark.neuron_standin, pytest.mark.timeout(120)]

STANDIN_DIR = Path(__file__).parent / "standin"
STANDIN_MODULES = ("torch_neuron", "torch_neuron.experimental", "torch.neuron")
ENV = neuron_backend.VISIBLE_CORES_ENV
FAST_MATH = "fp32-cast-matmult no-fast-relayout"


def _forget_standin() -> None:
    for name in STANDIN_MODULES:
        sys.modules.pop(name, None)
    if hasattr(torch, "neuron"):
        delattr(torch, "neuron")


@pytest.fixture
def standin(monkeypatch):
    """Makes `import torch_neuron` find the stand-in for one test; a fresh import each time (fresh records)."""
    _forget_standin()
    monkeypatch.syspath_prepend(str(STANDIN_DIR))
    yield
    _forget_standin()


@pytest.fixture
def no_torch_neuron(monkeypatch):
    """`import torch_neuron` fails, whatever is installed."""
    _forget_standin()
    monkeypatch.setitem(sys.modules, "torch_neuron", None)


@pytest.fixture
def device(monkeypatch):
    """A host with one Inferentia chip; the process's Neuron runtime not yet initialised."""
    monkeypatch.setattr(neuron_backend, "neuron_devices", lambda: ["/dev/neuron0"])
    monkeypatch.setattr(neuron_backend, "_PROCESS", neuron_backend._ProcessCores())
    monkeypatch.delenv(ENV, raising=False)


@pytest.fixture(scope="module")
def neuron_artifact(tmp_path_factory):
    """compile_artifact(target="neuron", pipeline_cores=2, fast_math=...) through the stand-in, plus its trace calls."""
    from neuronserve.compile import compile_artifact

    _forget_standin()
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(STANDIN_DIR))
        manifest = compile_artifact(
            tmp_path_factory.mktemp("neuron") / "artifact",
            config=SMALL_CONFIG,
            batch_sizes=(1, 4),
            seed=3,
            target="neuron",
            pipeline_cores=2,
            fast_math=FAST_MATH,
        )
        import torch_neuron

        calls = list(torch_neuron.trace_calls)
        version = torch_neuron.__version__
    _forget_standin()
    return manifest, calls, version


def record_loads(monkeypatch):
    """Wrap torch.jit.load: record, per call, whether torch_neuron was imported, the env var and the placement."""
    seen = []
    real_load = torch.jit.load

    def load(path, *args, **kwargs):
        standin = sys.modules.get("torch_neuron")
        seen.append(
            {
                "torch_neuron_imported": standin is not None,
                "visible_cores": os.environ.get(ENV),
                "placement": getattr(standin, "current_placement", None),
                "path": str(getattr(path, "name", path)),  # the backend loads the checked bytes: a stream named after its file
            }
        )
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", load)
    return seen


def pair_inputs(manifest, batch: int, seed: int = 0):
    cfg = manifest.model_config
    rng = np.random.default_rng(seed)
    shape = (batch, cfg.num_labels, cfg.label_dim)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


# --- compile side: trace_neuron ---------------------------------------------------------------


def test_trace_neuron_one_core_passes_documented_keywords_and_no_flag(standin):
    from neuronserve.compile.neuron import trace_neuron

    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    x = torch.randn(2, 8)
    traced, args = trace_neuron(module, (x,))
    import torch_neuron

    (call,) = torch_neuron.trace_calls
    assert args == ()
    assert call["model"] is module
    assert call["kwargs"]["compiler_args"] == []
    assert call["kwargs"]["fallback"] is False and call["kwargs"]["dynamic_batch_size"] is False
    assert set(call["kwargs"]) <= torch_neuron.TRACE_KEYWORDS
    assert isinstance(traced, torch.jit.ScriptModule)
    torch.testing.assert_close(traced(x), module(x))


def test_trace_neuron_pipeline_cores_and_fast_math_flags(standin, tmp_path):
    from neuronserve.compile.neuron import trace_neuron

    module = torch.nn.Linear(8, 4)
    _, args = trace_neuron(module, (torch.randn(1, 8),), pipeline_cores=4, fast_math="none", workdir=str(tmp_path))
    assert args == ("--neuroncore-pipeline-cores", "4", "--fast-math", "none")
    _, args = trace_neuron(module, (torch.randn(1, 8),), fast_math=FAST_MATH)
    assert args == ("--fast-math", "fp32-cast-matmult", "no-fast-relayout")
    import torch_neuron

    first, second = torch_neuron.trace_calls
    assert first["kwargs"]["compiler_args"] == ["--neuroncore-pipeline-cores", "4", "--fast-math", "none"]
    assert first["kwargs"]["compiler_workdir"] == str(tmp_path)
    assert second["kwargs"]["compiler_args"] == ["--fast-math", "fp32-cast-matmult", "no-fast-relayout"]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"pipeline_cores": 0}, "--pipeline-cores"),
        ({"pipeline_cores": 65}, "--pipeline-cores"),
        ({"fast_math": "fastest"}, "fastest"),
        ({"fast_math": "all none"}, "mutually exclusive"),
        ({"fast_math": "fp32-cast-all fp32-cast-matmult"}, "mutually exclusive"),
        ({"fast_math": " "}, "empty"),
    ],
)
def test_trace_neuron_rejects_bad_settings_before_compiling(standin, kwargs, needle):
    from neuronserve.compile.neuron import trace_neuron

    with pytest.raises(ConfigError, match=needle):
        trace_neuron(torch.nn.Linear(2, 2), (torch.randn(1, 2),), **kwargs)
    assert "torch_neuron" not in sys.modules  # validated before torch-neuron is even imported


def test_trace_neuron_turns_a_compiler_failure_into_an_artifact_error(standin, monkeypatch):
    from neuronserve.compile.neuron import trace_neuron

    import torch_neuron

    def failing_trace(model, example_inputs, **kwargs):
        raise AttributeError("Neuron does not support aten::foo")

    monkeypatch.setattr(torch_neuron, "trace", failing_trace)
    with pytest.raises(ArtifactError, match="aten::foo"):
        trace_neuron(torch.nn.Linear(2, 2), (torch.randn(1, 2),))


def test_missing_torch_neuron_says_what_to_do(no_torch_neuron):
    from neuronserve.compile.neuron import torch_neuron_version, trace_neuron

    with pytest.raises(BackendUnavailable) as info:
        trace_neuron(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    message = str(info.value)
    assert "\n" not in message
    assert "pip install torch-neuron" in message and "https://pip.repos.neuron.amazonaws.com" in message
    assert "--target cpu" in message
    assert torch_neuron_version() is None


# --- the stand-in's own checks: they must be able to fail --------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"compiler_args": "--neuroncore-pipeline-cores 4"}, TypeError),  # a string, not a list
        ({"compiler_args": ["--neuroncore-pipeline-cores", 4]}, TypeError),  # an int in the list
        ({"compiler_args": ["--neuroncore-pipeline-cores", "four"]}, ValueError),
        ({"compiler_args": ["--neuroncore-pipeline-cores"]}, ValueError),
        ({"compiler_args": ["--pipeline-cores", "4"]}, ValueError),  # not a neuron-cc flag
        ({"compiler_args": ["--fast-math", "fast"]}, ValueError),
        ({"compile_args": []}, TypeError),  # misspelt keyword
        ({"fallback": "no"}, TypeError),
        ({"compiler_timeout": "60"}, TypeError),
    ],
)
def test_standin_rejects_undocumented_calls(standin, kwargs, error):
    import torch_neuron

    with pytest.raises(error):
        torch.neuron.trace(torch.nn.Linear(2, 2), (torch.randn(1, 2),), **kwargs)
    assert torch_neuron.trace_calls == []


def test_standin_accepts_documented_calls_and_forwards_jit_keywords(standin):
    import torch_neuron

    assert torch.neuron is torch_neuron
    module = torch.nn.Linear(2, 2)
    traced = torch.neuron.trace(
        module,
        torch.randn(1, 2),  # a single tensor is documented as allowed
        compiler_args=["--neuroncore-pipeline-cores", "2", "--fast-math", "fp32-cast-matmult", "no-fast-relayout"],
        compiler_timeout=600,
        minimum_segment_size=2,
        optimizations=[],
        check_trace=False,  # a torch.jit.trace keyword: forwarded
    )
    assert isinstance(traced, torch.jit.ScriptModule)
    assert len(torch_neuron.trace_calls) == 1


# --- compile_artifact(target="neuron") end to end ------------------------------------------------


def test_compile_artifact_neuron_target_records_the_neuron_build(neuron_artifact):
    manifest, calls, version = neuron_artifact
    assert manifest.target == "neuron"
    assert manifest.pipeline_cores == 2
    assert manifest.compiler_args == ("--neuroncore-pipeline-cores", "2", "--fast-math", "fp32-cast-matmult", "no-fast-relayout")
    assert manifest.torch_neuron_version == version
    # every stage at every bucket, the fused graph at every (B, U) pair, the tick graph per label space
    assert len(calls) == 3 * 2 + 3 + 2
    tick_calls = [c for c in calls if len(c["example_inputs"]) == 4]
    assert [tuple(c["example_inputs"][0].shape) for c in tick_calls] == [(TICK_BLOCK[0], manifest.model_config.num_labels, manifest.model_config.label_dim)] * 2
    assert all(c["kwargs"]["compiler_args"] == ["--fast-math", "fp32-cast-matmult", "no-fast-relayout"] for c in tick_calls)  # one core: not pipelined
    assert sorted(manifest.tick_graphs) == ["logit", "probability"] and manifest.tick_block == TICK_BLOCK
    for call in (c for c in calls if c not in tick_calls):
        assert call["kwargs"]["compiler_args"] == list(manifest.compiler_args)
        assert call["kwargs"]["fallback"] is False and call["kwargs"]["dynamic_batch_size"] is False
    pair_call = [c for c in calls if len(c["example_inputs"]) == 2]
    assert {c["example_inputs"][0].shape[0] for c in pair_call} == {1, 4}
    fused_calls = [c for c in calls if len(c["example_inputs"]) == 3]
    shapes = sorted((c["example_inputs"][1].shape[0], c["example_inputs"][0].shape[0]) for c in fused_calls)
    assert shapes == [(1, 1), (4, 1), (4, 4)]  # (B, U): one fixed-shape graph per compiled pair
    for call in fused_calls:
        users, peers, index = call["example_inputs"]
        assert users.dtype == peers.dtype == torch.float32 and index.dtype == torch.int64 and index.shape == (peers.shape[0],)
        assert 0 <= int(index.min()) and int(index.max()) < users.shape[0]
    fused = manifest.stage(FUSED_STAGE)
    assert [(b.batch_size, b.user_batch_size) for b in fused.buckets] == [(1, 1), (4, 1), (4, 4)]
    assert len({b.file for b in fused.buckets}) == 3 and all(b.file in manifest.files for b in fused.buckets)
    assert load_manifest(manifest.directory, verify=True).target == "neuron"
    assert manifest.max_parity_error() <= manifest.parity_tolerance


# --- run side: the neuron backend ------------------------------------------------------------------


def test_neuron_backend_pins_cores_imports_torch_neuron_first_and_runs_buckets(standin, device, monkeypatch, neuron_artifact):
    manifest = neuron_artifact[0]
    loads = record_loads(monkeypatch)
    backend = neuron_backend.NeuronBackend(manifest)
    runner = backend.load("pair_scorer", CoreGroup(1, 2))

    import torch_neuron

    assert os.environ[ENV] == "1-2"
    assert torch_neuron.runtime_visible_cores == "1-2"  # set before the runtime initialised
    assert len(loads) == len(manifest.stage("pair_scorer").buckets)
    assert all(load["torch_neuron_imported"] for load in loads)
    assert all(load["visible_cores"] == "1-2" for load in loads)
    assert all(load["placement"] == (0, 2) for load in loads)  # relative to the pinned range
    assert runner.batch_sizes == (1, 4)
    assert runner.max_in_flight == 4  # two executions per core of the group
    cfg = manifest.model_config
    assert runner.input_shapes() == ((cfg.num_labels, cfg.label_dim), (cfg.num_labels, cfg.label_dim))

    u, p = pair_inputs(manifest, 4)
    out = runner.run([u, p])
    assert out.dtype == np.float32 and out.shape == (4, cfg.num_labels)
    expected = (u * p).sum(-1) + np.asarray(manifest.label_bias, dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    runner.warmup()


def test_neuron_runner_rejects_uncompiled_shapes(standin, device, neuron_artifact):
    manifest = neuron_artifact[0]
    runner = neuron_backend.NeuronBackend(manifest).load("user_tower", CoreGroup(0, 2))
    features = np.zeros((3, manifest.model_config.user_features), dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"B in \[1, 4\]"):
        runner.run([features])
    with pytest.raises(InvalidInput, match="float32"):
        runner.run([np.zeros((4, manifest.model_config.user_features), dtype=np.float64)])
    with pytest.raises(InvalidInput, match="takes 1 input"):
        runner.run([features, features])
    assert runner.run([np.zeros((1, manifest.model_config.user_features), dtype=np.float32)]).shape == (
        1,
        manifest.model_config.num_labels,
        manifest.model_config.label_dim,
    )


def test_neuron_backend_places_several_groups_inside_the_pinned_span(standin, device, monkeypatch, neuron_artifact):
    manifest = neuron_artifact[0]
    loads = record_loads(monkeypatch)
    backend = neuron_backend.NeuronBackend(manifest, visible_cores=CoreGroup(0, 4))
    backend.load("user_tower", CoreGroup(2, 2))
    backend.load("peer_tower", CoreGroup(0, 2))

    import torch_neuron

    assert os.environ[ENV] == "0-3"
    assert torch_neuron.runtime_visible_cores == "0-3"
    assert [load["placement"] for load in loads] == [(2, 2), (2, 2), (0, 2), (0, 2)]


def test_neuron_backend_refuses_cores_outside_the_range_its_process_pinned(standin, device, neuron_artifact):
    manifest = neuron_artifact[0]
    backend = neuron_backend.NeuronBackend(manifest)
    backend.load("user_tower", CoreGroup(0, 2))
    with pytest.raises(ConfigError, match="holds only cores 0-1"):
        backend.load("peer_tower", CoreGroup(2, 2))
    with pytest.raises(ConfigError, match="multiple of 2"):
        backend.load("peer_tower", CoreGroup(0, 1))


def test_neuron_backend_keeps_a_range_the_operator_set(standin, device, monkeypatch, neuron_artifact):
    manifest = neuron_artifact[0]
    monkeypatch.setenv(ENV, "4,5,6,7")
    loads = record_loads(monkeypatch)
    neuron_backend.NeuronBackend(manifest).load("pair_scorer", CoreGroup(6, 2))
    assert os.environ[ENV] == "4-7"
    assert {load["placement"] for load in loads} == {(2, 2)}
    with pytest.raises(ConfigError, match="holds only cores 4-7"):
        neuron_backend.NeuronBackend(manifest).load("pair_scorer", CoreGroup(0, 2))


def test_runtime_error_during_run_is_a_core_fault_naming_the_cores(standin, device, neuron_artifact):
    manifest = neuron_artifact[0]
    runner = neuron_backend.NeuronBackend(manifest).load("pair_scorer", CoreGroup(0, 2))

    def failing(*tensors):
        raise RuntimeError("nrt_execute status=1002\nmore detail")

    runner._modules[4] = failing
    with pytest.raises(CoreFault, match="NeuronCores 0-1 failed running pair_scorer at batch 4: nrt_execute status=1002$"):
        runner.run(list(pair_inputs(manifest, 4)))


def test_neuron_backend_refuses_a_cpu_artifact(standin, device, neuron_artifact):
    cpu_manifest = dataclasses.replace(neuron_artifact[0], target="cpu")
    with pytest.raises(BackendUnavailable, match="recompile with --target neuron"):
        neuron_backend.NeuronBackend(cpu_manifest)


def test_neuron_backend_without_torch_neuron_says_what_to_do(no_torch_neuron, device, neuron_artifact):
    with pytest.raises(BackendUnavailable, match="needs torch-neuron.*pip install torch-neuron"):
        neuron_backend.NeuronBackend(neuron_artifact[0])


def test_neuron_backend_without_a_neuroncore_says_what_to_do(standin, monkeypatch, neuron_artifact):
    monkeypatch.setattr(neuron_backend, "neuron_devices", lambda: [])
    with pytest.raises(BackendUnavailable, match="no NeuronCore.*/dev/neuron"):
        neuron_backend.NeuronBackend(neuron_artifact[0])


def test_available_needs_torch_neuron_and_a_device(standin, monkeypatch):
    if not glob.glob("/dev/neuron*"):
        assert neuron_backend.available() is False  # this host: the stand-in imports, but there is no device
    monkeypatch.setattr(neuron_backend, "neuron_devices", lambda: ["/dev/neuron0"])
    assert neuron_backend.available() is True
    monkeypatch.setattr(neuron_backend, "neuron_devices", lambda: [])
    assert neuron_backend.available() is False


def test_available_is_false_without_torch_neuron_and_never_raises(no_torch_neuron, monkeypatch):
    monkeypatch.setattr(neuron_backend, "neuron_devices", lambda: ["/dev/neuron0"])
    assert neuron_backend.available() is False

    def broken():
        raise PermissionError("/dev")

    monkeypatch.setattr(neuron_backend, "neuron_devices", broken)
    assert neuron_backend.available() is False


def test_the_server_serves_the_core_range_the_operator_set(monkeypatch):
    """NEURON_RT_VISIBLE_CORES set for the process (operator, Kubernetes device plugin) is the span the
    server serves and places its groups in; a --cores that disagrees is a clear error."""
    monkeypatch.setenv(ENV, "4-5")
    assert core_span("neuron", None) == CoreGroup(4, 2)
    assert core_span("neuron", 2) == CoreGroup(4, 2)
    with pytest.raises(ConfigError, match="--cores 4 disagrees with NEURON_RT_VISIBLE_CORES=4-5"):
        core_span("neuron", 4)
    assert core_span("sim", 3) == CoreGroup(0, 3)  # only the neuron runtime reads the variable
    assert Placement.data_parallel(2, first=4).all_groups() == (CoreGroup(4), CoreGroup(5))
    assert Placement.parse("user_tower=4,peer_tower=5,pair_scorer=5", 2, first=4).groups["user_tower"] == (CoreGroup(4),)
    with pytest.raises(ConfigError, match="lists user_tower=4 twice"):
        Placement.parse("user_tower=4,user_tower=4,peer_tower=5,pair_scorer=5", 2, first=4)
    with pytest.raises(ConfigError, match="user_tower on cores 0, but this server has only cores 4-5"):
        Placement.parse("user_tower=0,peer_tower=5,pair_scorer=5", 2, first=4)
    monkeypatch.delenv(ENV)
    assert core_span("neuron", None) == CoreGroup(0, 4)  # one Inferentia chip


def test_auto_backend_picks_neuron_for_a_neuron_artifact_on_an_inf1_host(standin, device, neuron_artifact):
    backend = make_backend("auto", neuron_artifact[0])
    assert isinstance(backend, neuron_backend.NeuronBackend)
    assert backend.name == "neuron"


# --- the fused stage on NeuronCores --------------------------------------------------------------


def fused_inputs(manifest, users: int, peers: int, seed: int = 0):
    cfg = manifest.model_config
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((users, cfg.user_features)).astype(np.float32),
        rng.standard_normal((peers, cfg.peer_features)).astype(np.float32),
        rng.permutation(np.arange(peers, dtype=np.int64) % users),
    ]


def test_neuron_backend_loads_the_fused_graph_per_pair_and_scores_like_the_three_stages(standin, device, monkeypatch, neuron_artifact):
    manifest = neuron_artifact[0]
    loads = record_loads(monkeypatch)
    backend = neuron_backend.NeuronBackend(manifest)
    runner = backend.load(FUSED_STAGE, CoreGroup(1, 2))
    assert isinstance(runner, FusedRunner) and runner.stage == "twotower"
    assert [load["path"].rsplit("/", 1)[1] for load in loads] == [b.file for b in manifest.stage(FUSED_STAGE).buckets]
    assert all(load["torch_neuron_imported"] and load["visible_cores"] == "1-2" and load["placement"] == (0, 2) for load in loads)
    assert runner.batch_sizes == (1, 4) and runner.user_batch_sizes(4) == (1, 4) and runner.user_batch_sizes(1) == (1,)
    assert runner.max_in_flight == 4 and runner.latency_s(4, 1) is None  # two per core
    cfg = manifest.model_config
    assert runner.input_shapes() == ((cfg.user_features,), (cfg.peer_features,))

    stages = {stage: backend.load(stage, CoreGroup(1, 2)) for stage in ("user_tower", "peer_tower", "pair_scorer")}
    for users, peers in ((1, 1), (1, 4), (4, 4)):
        inputs = fused_inputs(manifest, users, peers, seed=users + peers)
        out = runner.run(inputs)
        assert out.dtype == np.float32 and out.shape == (peers, cfg.num_labels)
        user = stages["user_tower"].run([np.ascontiguousarray(np.take(inputs[0], inputs[2], axis=0))])
        expected = stages["pair_scorer"].run([user, stages["peer_tower"].run([inputs[1]])])
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    runner.warmup()
    runner.close()


def test_neuron_fused_runner_refuses_uncompiled_pairs_and_reports_core_faults(standin, device, neuron_artifact):
    manifest = neuron_artifact[0]
    runner = neuron_backend.NeuronBackend(manifest).load(FUSED_STAGE, CoreGroup(0, 2))
    users, peers, index = fused_inputs(manifest, 4, 4)
    with pytest.raises(InvalidInput, match=r"\(B, U\) in \[\(1, 1\), \(4, 1\), \(4, 4\)\]"):
        runner.run([np.zeros((4, users.shape[1]), np.float32), peers[:1], index[:1]])  # U=4 > B=1
    with pytest.raises(InvalidInput, match="int64"):
        runner.run([users, peers, index.astype(np.int32)])
    with pytest.raises(InvalidInput, match=r"user_index values must be in \[0, 1\)"):
        runner.run([users[:1], peers, index])

    def failing(*tensors):
        raise RuntimeError("nrt_execute status=1002\nmore detail")

    runner._modules[(4, 4)] = failing
    with pytest.raises(CoreFault, match=r"NeuronCores 0-1 failed running twotower at batch 4 \(users 4\): nrt_execute status=1002$"):
        runner.run([users, peers, index])


def test_a_neuron_artifact_whose_fused_pairs_share_a_graph_is_refused(standin, neuron_artifact, tmp_path):
    """A neuron graph has fixed shapes: a manifest mapping two (B, U) pairs to one file is wrong."""
    out = tmp_path / "artifact"
    shutil.copytree(neuron_artifact[0].directory, out)
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    buckets = data["stages"][FUSED_STAGE]["buckets"]
    buckets[1]["file"] = buckets[2]["file"]
    data[MANIFEST_HASH_KEY] = manifest_hash(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="every twotower pair needs its own file"):
        load_manifest(out, verify=False)


def test_the_tick_runs_on_the_neuron_graphs_over_the_whole_range_and_equals_the_host_tick(standin, device, monkeypatch, neuron_artifact):
    from neuronserve import tick

    manifest = neuron_artifact[0]
    loads = record_loads(monkeypatch)
    backend = neuron_backend.NeuronBackend(manifest, visible_cores=CoreGroup(0, 4))
    backend.load("pair_scorer", CoreGroup(0, 2))
    device = backend.tick_device()
    assert device is not None and (device.rows, device.columns) == TICK_BLOCK and device.executions == 8
    tick_loads = [load for load in loads if "tick_" in load["path"]]
    assert len(tick_loads) == 2 and all(load["placement"] == (0, 4) for load in tick_loads)  # replicas on every core
    cfg, rng = manifest.model_config, np.random.default_rng(5)
    ids = rng.choice(10_000, 600, replace=False).astype(np.int64)  # more than one block each way
    users, peers = (rng.standard_normal((600, cfg.num_labels, cfg.label_dim)).astype(np.float32) * 0.3 for _ in range(2))
    order = np.argsort(ids)
    for space, mutual in ((tick.PROBABILITY, tick.PRODUCT), (tick.LOGIT, tick.MINIMUM)):
        spec = tick.make_spec(10, [0.5, 1.0, 0.25][: cfg.num_labels], cfg.num_labels, 599, label_space=space, mutual=mutual)
        excluded = tick.exclusions(ids, ids[order], exclude_self=True, blocked_rows=None, blocked_cols=None, symmetric=True)
        args = (ids, ids[order], users, peers[order], np.asarray(manifest.label_bias, np.float32), spec)
        extra = dict(rows_peer=peers, cols_user=users[order], excluded=excluded, pool=True)
        on_device, on_host = tick.score_tick(*args, **extra, device=device), tick.score_tick(*args, **extra)
        np.testing.assert_allclose(on_device.values, on_host.values, rtol=1e-5, atol=1e-5)
        agree = (on_device.ids == on_host.ids).mean()
        assert agree > 0.99, agree  # the graph sums the labels in another order: near-ties may swap



def test_the_pipeline_loads_the_tick_graphs_at_start_so_no_request_loads_them(standin, device, monkeypatch, neuron_artifact):
    from neuronserve.pipeline import Pipeline

    manifest = neuron_artifact[0]
    loads = record_loads(monkeypatch)
    backend = neuron_backend.NeuronBackend(manifest, visible_cores=CoreGroup(0, 2))
    pipeline = Pipeline(backend, Placement.data_parallel(2, group_size=2))
    pipeline.start()
    try:
        started = len(loads)
        assert sorted(load["path"].rsplit("/", 1)[-1] for load in loads if "tick_" in load["path"]) == sorted(manifest.tick_graphs.values())
        device = backend.tick_device()
        assert device is not None and device is backend.tick_device()
        assert len(loads) == started  # the request path only looks it up
    finally:
        pipeline.close()
