"""The compilation stage and its artifact: `neuronserve compile`, `neuronserve inspect`, verification, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronserve.artifact import FUSED_STAGE, MANIFEST_HASH_KEY, REFERENCE_NAME, ModelConfig, load_manifest, manifest_hash
from neuronserve.backends.base import FusedRunner
from neuronserve.backends.cpu import CpuBackend
from neuronserve.compile import compile_artifact
from neuronserve.compile.model import random_model
from neuronserve.config import CoreGroup
from neuronserve.errors import ArtifactError, ConfigError, InvalidInput

from conftest import SMALL_CONFIG
from support import wait_until


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
    assert sorted(data["stages"]) == ["pair_scorer", "peer_tower", "twotower", "user_tower"]
    for name, stage in data["stages"].items():
        buckets = stage["buckets"]
        assert all(0 <= b["parity_max_abs_err"] < 1e-5 for b in buckets)
        assert all(len(data["files"][b["file"]]) == 64 for b in buckets)  # a sha256 per stage file
        if name != FUSED_STAGE:
            assert [b["batch_size"] for b in buckets] == [1, 8, 32, 128, 512, 1024]
            assert all("user_batch_size" not in b for b in buckets)  # the three stages' entries as before
    fused = data["stages"][FUSED_STAGE]["buckets"]
    sizes = [1, 8, 32, 128, 512, 1024]
    assert [(b["batch_size"], b["user_batch_size"]) for b in fused] == [(b, u) for b in sizes for u in sizes if u <= b]
    assert {b["file"] for b in fused} == {"twotower.pt"}  # cpu: one shape-generic graph, checked at all 21 pairs
    assert [t["dtype"] for t in data["stages"][FUSED_STAGE]["inputs"]] == ["float32", "float32", "int64"]
    for stage in ("user_tower", "peer_tower", "pair_scorer"):  # cpu: one shape-generic graph per stage
        assert {b["file"] for b in data["stages"][stage]["buckets"]} == {f"{stage}.pt"}
    assert len(data["files"]) == 3 + 1 + 1  # 3 stage graphs + the fused graph + reference.npz
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
    inspected = neuronserve("inspect", out)
    assert inspected.returncode == 0
    lines = inspected.stdout.splitlines()
    (header,) = [line for line in lines if line.startswith("stage      twotower")]
    assert "user_index[-1]" in header and "scores[-1, 3]" in header
    assert any("batch     4  users 1,4" in line and "twotower.pt" in line for line in lines), inspected.stdout
    victim = out / "peer_tower.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    line = one_line_error(neuronserve("inspect", out))
    assert "peer_tower.pt" in line and "checksum" in line
    with pytest.raises(ArtifactError, match="peer_tower.pt"):
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
    (out / "user_tower.pt").write_bytes((out / "user_tower.pt").read_bytes()[:100])
    with pytest.raises(ArtifactError, match="user_tower.pt"):
        load_manifest(out)
    (out / "user_tower.pt").unlink()
    with pytest.raises(ArtifactError, match="user_tower.pt.*missing"):
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
        "at most 1048576 rows": ["--batch-sizes", "1,100000000"],
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
    with pytest.raises(ConfigError, match="holds no neuronserve manifest.json"):
        compile_artifact(notes, config=SMALL_CONFIG, batch_sizes=(1,), seed=1, force=True)
    (notes / "manifest.json").write_text('{"name": "a browser extension", "manifest_version": 3}')
    with pytest.raises(ConfigError, match="holds no neuronserve manifest.json"):  # someone else's manifest.json
        compile_artifact(notes, config=SMALL_CONFIG, batch_sizes=(1,), seed=1, force=True)
    monkeypatch.chdir(notes)
    for out in (".", ".."):
        with pytest.raises(ConfigError, match="current directory or one of its parents"):
            compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1, force=True)
    assert (notes / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # no temporary directories left behind


@pytest.mark.parametrize("flag, value", [("--model-version", "x" * 257), ("--model-version", "1\nready"), ("--model-name", "")])
def test_a_name_or_version_serve_would_refuse_is_refused_before_compiling(tmp_path, small_config_file, flag, value):
    line = one_line_error(neuronserve("compile", "--out", tmp_path / "a", "--model-config", small_config_file, "--quiet", flag, value))
    assert flag in line and "printable" in line and not (tmp_path / "a").exists()


def test_a_stop_between_the_two_renames_puts_the_old_artifact_back(tmp_path, monkeypatch):
    out = tmp_path / "a"
    old_version = compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=1).model_version
    replace = os.replace

    def stopped_before_the_new_one_lands(src, dst):
        if Path(dst) == out and ".tmp-" in str(src) and not str(src).endswith("-old"):
            raise KeyboardInterrupt  # the old artifact is aside, the new one not yet in place
        replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_before_the_new_one_lands)
    with pytest.raises(KeyboardInterrupt):
        compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), seed=2, force=True)
    monkeypatch.setattr(os, "replace", replace)
    assert load_manifest(out, verify=True).model_version == old_version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_compile_removes_its_temporary_directory(tmp_path, small_config_file, signum):
    argv = [sys.executable, "-m", "neuronserve", "compile", "--out", str(tmp_path / "a"), "--model-config", str(small_config_file), "--quiet"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(".tmp-" in p.name for p in tmp_path.iterdir()) or process.poll() is not None, 120)
        assert process.poll() is None, "the compile ended before the signal; the test needs a longer one"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []  # neither a half artifact nor its temporary directory


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
    # an entry an older neuronserve compiled (valid, but without the fused graph) is rebuilt with it
    strip_fused_stage(entry)
    assert not load_manifest(entry).has_fused_stage
    assert ensure_demo_artifact(tmp_path, progress=False) == entry
    rebuilt = load_manifest(entry)
    assert rebuilt.has_fused_stage and rebuilt.model_version == version


# --- the fused stage: the three stages as one graph ------------------------------------------------


def rewrite_manifest(directory, mutate) -> None:
    """Change manifest.json as a compiler would have written it (content hash recomputed)."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    data[MANIFEST_HASH_KEY] = manifest_hash(data)
    path.write_text(json.dumps(data, indent=2))


def strip_fused_stage(directory) -> None:
    """Make `directory` what the compiler before the fused stage wrote: three stages, their files."""

    def strip(data):
        for bucket in data["stages"].pop(FUSED_STAGE)["buckets"]:
            data["files"].pop(bucket["file"], None)
            (directory / bucket["file"]).unlink(missing_ok=True)

    rewrite_manifest(directory, strip)


def stage_path_scores(backend, users, peers, user_index):
    """user_tower -> take(user_index) -> pair_scorer, each stage at the smallest bucket that fits (zero padding)."""

    def run(stage, *arrays):
        runner = backend.load(stage, CoreGroup(0))
        rows = arrays[0].shape[0]
        bucket = min(b for b in runner.batch_sizes if b >= rows)
        padded = [np.concatenate([a, np.zeros((bucket - rows,) + a.shape[1:], np.float32)]) for a in arrays]
        return runner.run(padded)[:rows]

    return run("pair_scorer", np.ascontiguousarray(np.take(run("user_tower", users), user_index, axis=0)), run("peer_tower", peers))


def eager_scores(users, peers, user_index):
    """The eager model the small artifact was compiled from, on the gathered rows."""
    model = random_model(SMALL_CONFIG, seed=7)
    with torch.no_grad():
        return model(torch.from_numpy(users[user_index]), torch.from_numpy(peers)).numpy()


def pad_fused(users, peers, user_index, user_bucket, peer_bucket):
    """Zero user rows up to U, zero peer rows up to B scored against user 0: the pipeline's padding."""
    cfg = SMALL_CONFIG
    return [
        np.concatenate([users, np.zeros((user_bucket - len(users), cfg.user_features), np.float32)]),
        np.concatenate([peers, np.zeros((peer_bucket - len(peers), cfg.peer_features), np.float32)]),
        np.concatenate([user_index, np.zeros(peer_bucket - len(peers), np.int64)]),
    ]


@pytest.fixture(scope="module")
def fused_runner(small_artifact) -> FusedRunner:
    return CpuBackend(small_artifact).load(FUSED_STAGE, CoreGroup(0))


def test_the_fused_runner_describes_its_compiled_pairs(small_artifact, fused_runner):
    assert isinstance(fused_runner, FusedRunner) and fused_runner.stage == FUSED_STAGE == "twotower"
    assert fused_runner.batch_sizes == (1, 4, 16)
    assert [fused_runner.user_batch_sizes(b) for b in (1, 4, 16)] == [(1,), (1, 4), (1, 4, 16)]
    assert fused_runner.user_batch_sizes(3) == ()
    assert fused_runner.input_shapes() == ((SMALL_CONFIG.user_features,), (SMALL_CONFIG.peer_features,))
    assert fused_runner.latency_s(16, 4) is None
    assert (fused_runner.max_in_flight, fused_runner.threads) == (2, 1)  # the next batch queued behind the running one, one thread
    assert fused_runner.healthy()
    spec = small_artifact.stage(FUSED_STAGE)
    assert spec.batch_sizes == (1, 4, 16) and spec.user_batch_sizes(16) == (1, 4, 16)
    assert spec.bucket(16, 4).user_batch_size == 4
    with pytest.raises(ArtifactError, match="no bucket of batch size 4 with user batch 16"):
        spec.bucket(4, 16)


@pytest.mark.parametrize(
    "users, peers, user_bucket, peer_bucket",
    [(1, 1, 1, 1), (4, 4, 4, 4), (1, 16, 1, 16), (16, 16, 16, 16), (3, 10, 4, 16), (1, 3, 1, 4), (2, 2, 4, 4), (4, 13, 16, 16)],
)
def test_fused_scores_equal_the_three_stages_and_the_eager_model(small_artifact, fused_runner, users, peers, user_bucket, peer_bucket):
    """Random inputs at several (U, B), padded as the pipeline pads: the padding never changes a real row."""
    rng = np.random.default_rng(users * 100 + peers)
    user_features = rng.standard_normal((users, SMALL_CONFIG.user_features)).astype(np.float32)
    peer_features = rng.standard_normal((peers, SMALL_CONFIG.peer_features)).astype(np.float32)
    user_index = rng.permutation(np.arange(peers, dtype=np.int64) % users)  # every user scored, in random order
    out = fused_runner.run(pad_fused(user_features, peer_features, user_index, user_bucket, peer_bucket))
    assert out.dtype == np.float32 and out.shape == (peer_bucket, SMALL_CONFIG.num_labels)
    three = stage_path_scores(CpuBackend(small_artifact), user_features, peer_features, user_index)
    np.testing.assert_allclose(out[:peers], three, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[:peers], eager_scores(user_features, peer_features, user_index), rtol=0, atol=1e-5)
    if users > 1:  # the index matters: scoring every peer against user 0 gives other scores
        assert not np.allclose(out[:peers], eager_scores(user_features, peer_features, np.zeros_like(user_index)), atol=1e-4)


def test_fused_scores_match_the_reference_file(small_artifact, fused_runner):
    reference = np.load(small_artifact.path(REFERENCE_NAME))
    users = reference["user_features"][: int(reference["user_index"].max()) + 1]
    peers, index = reference["peer_features"], reference["user_index"]
    out = fused_runner.run(pad_fused(users, peers, index, 4, 16))[: len(peers)]
    np.testing.assert_allclose(out, reference["indexed_scores"], atol=1e-5)
    np.testing.assert_allclose(reference["indexed_scores"], eager_scores(reference["user_features"], peers, index), atol=1e-5)


def test_the_fused_graph_gathers_with_index_select(small_artifact):
    """The user rows are gathered inside the graph by aten::index_select (torch-neuron compiles it for
    the NeuronCore), not copied per peer on the host."""
    graph = torch.jit.load(str(small_artifact.path(small_artifact.stage(FUSED_STAGE).bucket(16, 4).file)))
    kinds = {node.kind() for node in graph.inlined_graph.nodes()}
    assert "aten::index_select" in kinds
    assert not {"aten::index", "aten::gather", "aten::repeat_interleave"} & kinds


def _fused_inputs(users=4, peers=16, features=None, index_dtype=np.int64, index=None):
    cfg = SMALL_CONFIG
    return [
        np.zeros((users, features or cfg.user_features), np.float32),
        np.zeros((peers, cfg.peer_features), np.float32),
        np.zeros(peers, index_dtype) if index is None else np.asarray(index, index_dtype),
    ]


@pytest.mark.parametrize(
    "inputs, needle",
    [
        (_fused_inputs(users=3), r"\(B, U\) in \[\(1, 1\), \(4, 1\), \(4, 4\)"),  # U not a bucket
        (_fused_inputs(users=16, peers=4), "the device runs only compiled shapes"),  # U > B: not compiled
        (_fused_inputs(users=4, peers=8), "the device runs only compiled shapes"),  # B not a bucket
        (_fused_inputs(features=15), "the device runs only compiled shapes"),
        (_fused_inputs()[:2], "takes 3 inputs"),
        (_fused_inputs(index_dtype=np.int32), "input 2 must be a C-contiguous int64 array, got int32"),
        ([np.zeros((4, 16), np.float64)] + _fused_inputs()[1:], "input 0 must be a C-contiguous float32"),
        (_fused_inputs()[:2] + [np.zeros(32, np.int64)[::2]], "input 2 must be a C-contiguous int64"),
        (_fused_inputs()[:2] + [np.zeros(8, np.int64)], "the device runs only compiled shapes"),
        (_fused_inputs(index=[4] + [0] * 15), r"user_index values must be in \[0, 4\).*got 0..4"),
        (_fused_inputs(index=[-1] + [0] * 15), r"user_index values must be in \[0, 4\)"),
    ],
)
def test_the_fused_runner_refuses_what_the_device_would_not_run(small_artifact, inputs, needle):
    device_rules = CpuBackend(small_artifact).load(FUSED_STAGE, CoreGroup(0))
    device_rules.any_rows = False  # the rule every fixed-shape (device) runner keeps
    with pytest.raises(InvalidInput, match=needle):
        device_rules.run(inputs)


@pytest.mark.parametrize("users, peers", [(3, 5), (1, 7), (16, 4), (2, 17)])
def test_the_cpu_fused_graph_runs_exact_shapes_that_are_no_bucket(fused_runner, users, peers):
    """The cpu artifact's one traced graph (parity-checked at every bucket and at one row count that is
    none) takes exact rows, so the pipeline never pads for it; the scores are the eager model's."""
    rng = np.random.default_rng(users * 100 + peers)
    user = rng.standard_normal((users, SMALL_CONFIG.user_features), dtype=np.float32)
    peer = rng.standard_normal((peers, SMALL_CONFIG.peer_features), dtype=np.float32)
    index = rng.integers(0, users, peers)
    assert fused_runner.any_rows
    out = fused_runner.run([user, peer, index])
    np.testing.assert_allclose(out, eager_scores(user, peer, index), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "inputs, needle",
    [
        (_fused_inputs(users=0), "the device runs only compiled shapes"),
        (_fused_inputs(peers=0, index=[]), "the device runs only compiled shapes"),
        (_fused_inputs(features=15), "the device runs only compiled shapes"),
        (_fused_inputs(users=3, index=[3] + [0] * 15), r"user_index values must be in \[0, 3\)"),
    ],
)
def test_the_cpu_fused_graph_still_refuses_what_it_cannot_run(fused_runner, inputs, needle):
    with pytest.raises(InvalidInput, match=needle):
        fused_runner.run(inputs)


def test_fused_warmup_runs_every_compiled_pair_and_the_cpu_one_graph_at_its_smallest_pairs(small_artifact):
    """A device warms every compiled (B, U) pair (FusedRunner.warmup); the cpu backend's one shape-generic
    graph is profiled by its first call and optimized at its second, whatever the shapes, so it runs its
    smallest pair twice and its second smallest once (cpu.warm_keys)."""
    from neuronserve.backends.base import FusedRunner

    runner = CpuBackend(small_artifact).load(FUSED_STAGE, CoreGroup(0))
    seen = []
    real_run = runner.run

    def run(inputs):
        seen.append((inputs[1].shape[0], inputs[0].shape[0]))
        return real_run(inputs)

    runner.run = run
    FusedRunner.warmup(runner)
    assert seen == [(1, 1), (4, 1), (4, 4), (16, 1), (16, 4), (16, 16)]
    seen.clear()
    runner.warmup()
    assert seen == [(1, 1), (1, 1), (4, 1)]


def test_an_artifact_without_the_fused_stage_still_loads_and_serves_three_stages(tmp_path):
    """Artifacts compiled before the fused graph: they verify, inspect says so, the three stages run,
    and asking for the fused stage is a clear ArtifactError (the pipeline then uses three stages)."""
    out = tmp_path / "old"
    compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1, 4), seed=1)
    strip_fused_stage(out)
    manifest = load_manifest(out, verify=True)
    assert not manifest.has_fused_stage and sorted(manifest.stages) == ["pair_scorer", "peer_tower", "user_tower"]
    assert not (out / "twotower.pt").exists()
    backend = CpuBackend(manifest)
    assert backend.load("user_tower", CoreGroup(0)).run([np.zeros((4, SMALL_CONFIG.user_features), np.float32)]).shape == (4, 3, 16)
    with pytest.raises(ArtifactError, match="has no stage 'twotower'"):
        backend.load(FUSED_STAGE, CoreGroup(0))
    result = neuronserve("inspect", out)
    assert result.returncode == 0, result.stderr
    assert "twotower: not in this artifact" in result.stdout


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["stages"]["twotower"]["buckets"][0].pop("user_batch_size"), "needs a user_batch_size from 1 to its batch size"),
        (lambda d: d["stages"]["twotower"]["buckets"][0].update(user_batch_size=8), "needs a user_batch_size from 1 to its batch size 1"),
        (lambda d: d["stages"]["twotower"]["buckets"][0].update(user_batch_size=0), "needs a user_batch_size"),
        (lambda d: d["stages"]["user_tower"]["buckets"][0].update(user_batch_size=1), "only twotower takes one"),
        (lambda d: d["stages"]["twotower"]["buckets"].append(dict(d["stages"]["twotower"]["buckets"][0])), "lists a bucket twice"),
    ],
)
def test_a_malformed_fused_stage_is_refused(tmp_path, mutate, needle):
    out = tmp_path / "artifact"
    compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1, 4), seed=1)
    rewrite_manifest(out, mutate)
    with pytest.raises(ArtifactError, match=needle):
        load_manifest(out)


class _EvenRowsOnly(torch.nn.Module):
    """Right at every even row count only: tracing bakes the branch taken at the trace's batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] % 2 == 0 else x * 3


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the baked branch is the point
def test_compile_refuses_a_cpu_graph_right_at_every_bucket_but_wrong_at_another_row_count(tmp_path):
    """The server runs cpu graphs at exact rows, so compile also checks one row count that is no bucket
    (the largest bucket less one): a graph baked at the trace's shape passes buckets 2, 4, 16 and fails there."""
    from neuronserve.artifact import TensorSpec
    from neuronserve.compile.graphs import compile_stage

    class _Bar:
        def set_postfix_str(self, _):
            pass

        def update(self, _):
            pass

    spec = [TensorSpec("x", "float32", (-1, 3))]
    with pytest.raises(ArtifactError, match=r"peer_tower batch 15 \(no bucket\) differs"):
        compile_stage(tmp_path, "peer_tower", _EvenRowsOnly(), spec, (2, 4, 16), "cpu", 1, None, {}, _Bar(), torch.Generator().manual_seed(0))
