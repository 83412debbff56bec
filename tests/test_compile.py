"""The compilation stage and its artifact: `neuronserve compile`, `neuronserve inspect`, verification, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from neuronserve.artifact import REFERENCE_NAME, ModelConfig, load_manifest
from neuronserve.backends.cpu import CpuBackend
from neuronserve.compile import compile_artifact
from neuronserve.compile.model import random_model
from neuronserve.config import CoreGroup
from neuronserve.errors import ArtifactError, ConfigError

from conftest import SMALL_CONFIG


def neuronserve(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "neuronserve", *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def one_line_error(result) -> str:
    """A failed command: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "model.json"
    path.write_text(json.dumps(SMALL_CONFIG.to_dict()))
    return path


def test_compile_cli_writes_a_verified_artifact(tmp_path):
    out = tmp_path / "artifact"
    result = neuronserve("compile", "--target", "cpu", "--out", out, "--seed", "0")
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "manifest.json").read_text())
    assert sorted(data["stages"]) == ["pair_scorer", "peer_tower", "user_tower"]
    for stage in data["stages"].values():
        buckets = stage["buckets"]
        assert [b["batch_size"] for b in buckets] == [1, 8, 32, 128, 512, 1024]
        assert all(0 <= b["parity_max_abs_err"] < 1e-5 for b in buckets)
        assert all(len(data["files"][b["file"]]) == 64 for b in buckets)  # a sha256 per stage file
    assert len(data["files"]) == 3 * 6 + 1  # 18 graphs + reference.npz
    assert data["model_config"]["num_labels"] == 4 and data["label_names"] == ["like", "chat", "match", "report"]
    assert "parity" in result.stdout and "twotower-demo" in result.stdout
    assert "user_tower" in result.stderr  # the progress bar names the graph being traced


def test_traced_stages_reproduce_the_eager_model(small_artifact):
    """The artifact's graphs, run by the cpu backend, give the eager model's scores (reference.npz)."""
    reference = np.load(small_artifact.path(REFERENCE_NAME))
    backend = CpuBackend(small_artifact)
    rows = reference["user_features"].shape[0]
    bucket = min(b for b in small_artifact.stage("user_tower").batch_sizes if b >= rows)

    def run(stage, *arrays):
        padded = [np.concatenate([a, np.zeros((bucket - rows,) + a.shape[1:], np.float32)]) for a in arrays]
        return backend.load(stage, CoreGroup(0)).run(padded)[:rows]

    user = run("user_tower", reference["user_features"])
    peer = run("peer_tower", reference["peer_features"])
    np.testing.assert_allclose(run("pair_scorer", user, peer), reference["scores"], atol=1e-5)
    # the same model, by construction in the test: w_k * <u_k, p_k> + b_k
    model = random_model(SMALL_CONFIG, seed=7)
    with torch.no_grad():
        u = model.user_tower(torch.from_numpy(reference["user_features"]))
        p = model.peer_tower(torch.from_numpy(reference["peer_features"]))
        expected = model.label_weight * (u * p).sum(-1) + model.label_bias
    np.testing.assert_allclose(reference["scores"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(small_artifact.label_bias, model.label_bias.detach().numpy(), atol=1e-7)


def test_one_changed_byte_is_refused_naming_the_file(tmp_path, small_config_file):
    out = tmp_path / "artifact"
    assert neuronserve("compile", "--out", out, "--model-config", small_config_file, "--batch-sizes", "1,4", "--quiet").returncode == 0
    assert neuronserve("inspect", out).returncode == 0
    victim = out / "peer_tower_b4.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    line = one_line_error(neuronserve("inspect", out))
    assert "peer_tower_b4.pt" in line and "checksum" in line
    with pytest.raises(ArtifactError, match="peer_tower_b4.pt"):
        load_manifest(out)


@pytest.mark.parametrize("field, value", [("label_bias", [5.0, -5.0, 0.0]), ("parity_tolerance", 1.0)])
def test_an_edited_manifest_is_refused(tmp_path, field, value):
    """The manifest's own values are served (label_bias scores cached embeddings): editing one is tampering."""
    out = tmp_path / "artifact"
    compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[field] = value
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    line = one_line_error(neuronserve("inspect", out))
    assert "manifest.json" in line and "edited after compilation" in line
    with pytest.raises(ArtifactError, match="manifest.json fails its content hash"):
        load_manifest(out)


@pytest.mark.parametrize("value", ["8", 8.5, 2.0, True, 10**9, 0])
def test_a_model_config_value_that_is_not_a_positive_integer_is_refused(value):
    with pytest.raises(ArtifactError, match=f"num_labels must be a positive integer, got {value!r}"):
        ModelConfig.from_dict({**SMALL_CONFIG.to_dict(), "num_labels": value})


def test_truncated_missing_and_incompatible_artifacts_are_refused(tmp_path):
    out = tmp_path / "artifact"
    compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1)
    (out / "user_tower_b1.pt").write_bytes((out / "user_tower_b1.pt").read_bytes()[:100])
    with pytest.raises(ArtifactError, match="user_tower_b1.pt"):
        load_manifest(out)
    (out / "user_tower_b1.pt").unlink()
    with pytest.raises(ArtifactError, match="user_tower_b1.pt.*missing"):
        load_manifest(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema_version 99"):
        load_manifest(out)
    with pytest.raises(ArtifactError, match="not a neuronserve artifact"):
        load_manifest(tmp_path)


def test_a_checkpoint_compiles_to_its_own_weights(tmp_path):
    model = random_model(SMALL_CONFIG, seed=123)
    checkpoint = tmp_path / "model.pt"
    torch.save(model.state_dict(), checkpoint)
    manifest = compile_artifact(tmp_path / "a", config=SMALL_CONFIG, batch_sizes=(4,), checkpoint=checkpoint)
    reference = np.load(manifest.path(REFERENCE_NAME))
    with torch.no_grad():
        expected = model(torch.from_numpy(reference["user_features"]), torch.from_numpy(reference["peer_features"]))
    np.testing.assert_allclose(reference["scores"], expected.numpy(), atol=1e-6)
    again = compile_artifact(tmp_path / "b", config=SMALL_CONFIG, batch_sizes=(4,), checkpoint=checkpoint)
    assert again.model_version == manifest.model_version  # content-addressed: same weights, same version
    other = compile_artifact(tmp_path / "c", config=SMALL_CONFIG, batch_sizes=(4,), seed=5)
    assert other.model_version != manifest.model_version


def test_bad_input_gets_one_line_and_a_non_zero_exit(tmp_path, small_config_file):
    out = tmp_path / "out"
    cases = {
        "does not exist": ["--checkpoint", tmp_path / "nope.pt"],
        "not a readable torch state_dict": ["--checkpoint", small_config_file],
        "batch sizes must be": ["--batch-sizes", ""],
        "positive integers": ["--batch-sizes", "0,4"],
        "comma-separated": ["--batch-sizes", "1,x"],
    }
    for expected, extra in cases.items():
        line = one_line_error(neuronserve("compile", "--out", out, "--model-config", small_config_file, "--quiet", *extra))
        assert expected in line, (extra, line)
    # a checkpoint of another shape than the config
    mismatched = tmp_path / "big.pt"
    torch.save(random_model(SMALL_CONFIG.__class__(), seed=0).state_dict(), mismatched)
    line = one_line_error(neuronserve("compile", "--out", out, "--model-config", small_config_file, "--checkpoint", mismatched, "--quiet"))
    assert "does not match the model config" in line
    # broken weights: a NaN would pass a `>` tolerance check and ship; a non-tensor entry would crash
    state = random_model(SMALL_CONFIG, seed=0).state_dict()
    name = next(iter(state))
    for problem, value in (("holds NaN or Inf", state[name].clone().fill_(float("nan"))), ("is not a tensor", "oops")):
        broken = tmp_path / "broken.pt"
        torch.save({**state, name: value}, broken)
        line = one_line_error(neuronserve("compile", "--out", out, "--model-config", small_config_file, "--checkpoint", broken, "--quiet"))
        assert name in line and problem in line, line
    # --target neuron without torch-neuron (not installable here)
    line = one_line_error(neuronserve("compile", "--out", out, "--target", "neuron", "--model-config", small_config_file, "--quiet"))
    assert "torch-neuron" in line
    assert not out.exists()  # no half-written artifact


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_a_clear_error(tmp_path, small_config_file):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_line_error(neuronserve("compile", "--out", locked / "a", "--model-config", small_config_file, "--quiet"))
    assert "writable" in line


def test_existing_out_dir_needs_force(tmp_path):
    out = tmp_path / "a"
    compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1)
    with pytest.raises(ConfigError, match="--force"):
        compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=2)
    assert compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=2, force=True).model_version


def test_force_replaces_only_an_artifact(tmp_path, monkeypatch):
    """--force never deletes a directory that is not an artifact, nor the current directory or its parents."""
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        compile_artifact(notes, config=SMALL_CONFIG, batch_sizes=(1,), seed=1, force=True)
    monkeypatch.chdir(notes)
    for out in (".", ".."):
        with pytest.raises(ConfigError, match="current directory or one of its parents"):
            compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1, force=True)
    assert (notes / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary directories left behind


def test_out_dir_under_a_file_is_a_clear_error(tmp_path, small_config_file):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = one_line_error(neuronserve("compile", "--out", blocker / "a", "--model-config", small_config_file, "--quiet"))
    assert "choose a writable --out" in line


def test_the_demo_cache_entry_is_recompiled_when_broken(tmp_path):
    """`neuronserve serve` with no artifact: a cache entry that is not a valid artifact is rebuilt, not fatal."""
    from neuronserve.compile.demo import ensure_demo_artifact

    entry = ensure_demo_artifact(tmp_path, progress=False)
    version = load_manifest(entry).model_version
    (entry / "manifest.json").unlink()  # e.g. a compile killed half-way by an older version
    (entry / "junk").write_text("x")
    assert ensure_demo_artifact(tmp_path, progress=False) == entry
    assert load_manifest(entry).model_version == version and not (entry / "junk").exists()
