"""Authenticated artifacts (issue 12, item 5): Ed25519 signatures, trusted keys, stages loaded from the
bytes that were verified, and files refused by name when they leave the artifact or are not regular.

`manifest_sha256` is integrity, not authenticity: an attacker who edits the manifest and recomputes it
passes every integrity check (shown below). Only a signature by a key the operator trusts
(--trusted-key) refuses that artifact. One signed artifact and two key pairs are made once per module
with the real CLI; each test tampers with its own copy. CLI errors are checked as subprocesses: one
line on stderr, exit 2, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import grpc
import numpy as np
import pytest
import torch

from conftest import SMALL_CONFIG
from neuronserve.artifact import FUSED_STAGE, MANIFEST_HASH_KEY, load_manifest, manifest_hash
from neuronserve.backends.cpu import CpuBackend
from neuronserve.config import CoreGroup
from neuronserve.errors import ArtifactError, ConfigError
from neuronserve.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, SIGNATURE_NAME

pytestmark = pytest.mark.timeout(120)

STAGE_FILE = "user_tower.pt"  # one stage file of the artifact (every bucket of the stage on cpu)


def cli(*args: str, env: Optional[dict] = None, prefix: List[str] = (), timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "neuronserve", *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *words: str) -> str:
    """Exit 2 and exactly one stderr line, `neuronserve COMMAND: error: ...` holding every word."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith(f"neuronserve {command}: error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def fingerprint_of(keygen_stdout: str) -> str:
    return next(line.split()[1] for line in keygen_stdout.splitlines() if line.startswith("fingerprint"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs made by `neuronserve keygen`: `right` signs the artifact, `other` is someone else's."""
    root = tmp_path_factory.mktemp("keys")
    made = {}
    for name in ("right", "other"):
        result = cli("keygen", "--out", str(root / name))
        assert result.returncode == 0, result.stderr
        made[name] = (root / name, fingerprint_of(result.stdout))
    return made


@pytest.fixture(scope="module")
def signed(tmp_path_factory, keys):
    """A small cpu artifact compiled and signed by `neuronserve compile --signing-key`."""
    root = tmp_path_factory.mktemp("signed")
    (root / "model.json").write_text(json.dumps(SMALL_CONFIG.to_dict()))
    out = root / "artifact"
    result = cli("compile", "--target", "cpu", "--out", str(out), "--seed", "0", "--quiet", "--batch-sizes", "1,4",
                 "--model-config", str(root / "model.json"), "--signing-key", str(keys["right"][0] / PRIVATE_KEY_NAME))
    assert result.returncode == 0, result.stderr
    assert f"signature  ed25519 by key {keys['right'][1]}, valid for that key" in result.stdout
    return out


def public(keys, name: str) -> str:
    return str(keys[name][0] / PUBLIC_KEY_NAME)


@pytest.fixture
def artifact(signed, tmp_path) -> Path:
    """This test's own copy of the signed artifact (symlinks kept as links)."""
    return Path(shutil.copytree(signed, tmp_path / "artifact", symlinks=True))


def rehash(directory: Path, edit) -> None:
    """What an attacker without the key can do: edit manifest.json and recompute its manifest_sha256."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    data[MANIFEST_HASH_KEY] = manifest_hash(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---- keys and signatures ------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_into_the_artifact(keys, signed):
    directory, _ = keys["right"]
    assert stat.S_IMODE((directory / PRIVATE_KEY_NAME).stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / PUBLIC_KEY_NAME).stat().st_mode) == 0o644
    assert (directory / PRIVATE_KEY_NAME).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert_one_line_error(cli("keygen", "--out", str(directory)), "keygen", "already exist", "--force")
    assert (signed / SIGNATURE_NAME).is_file()
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in signed.iterdir())


def test_a_signed_artifact_verifies_with_the_right_key_and_not_with_another(signed, keys, tmp_path):
    right, other = keys["right"][1], keys["other"][1]
    check = load_manifest(signed, trusted_key=public(keys, "right")).signature
    assert (check.signed, check.valid, check.trusted, check.fingerprint) == (True, True, True, right)
    with pytest.raises(ArtifactError, match=f"is by key {right}, which is not trusted .trusted: {other} from"):
        load_manifest(signed, trusted_key=public(keys, "other"))
    keyring = tmp_path / "keyring.pem"  # a file of several trusted keys
    keyring.write_bytes(Path(public(keys, "other")).read_bytes() + Path(public(keys, "right")).read_bytes())
    assert load_manifest(signed, trusted_key=keyring).signature.fingerprint == right

    result = cli("inspect", str(signed), "--trusted-key", public(keys, "right"))
    assert result.returncode == 0 and f"signature  ed25519, verified with trusted key {right}" in result.stdout, result.stderr
    assert_one_line_error(cli("inspect", str(signed), "--trusted-key", public(keys, "other")), "inspect", "not trusted", right, other)
    plain = cli("inspect", str(signed))  # no trusted key: says it is signed and by whom, checks integrity only
    assert plain.returncode == 0 and f"ed25519 by key {right}, valid for that key; not checked against a trusted key" in plain.stdout


def test_a_rehashed_manifest_passes_integrity_but_not_a_trusted_key(artifact, keys):
    """Integrity alone is not authenticity: label_bias +5.2 with a recomputed manifest_sha256 passes every
    check without --trusted-key (inspect exit 0, serve starts); with it, inspect and serve refuse."""
    rehash(artifact, lambda data: data["label_bias"].__setitem__(0, data["label_bias"][0] + 5.2))
    accepted = load_manifest(artifact, verify=True)  # manifest_sha256 and every file's sha256 pass
    assert accepted.signature.signed and not accepted.signature.valid
    plain = cli("inspect", str(artifact))
    assert plain.returncode == 0 and "INVALID: manifest.json was changed after it was signed" in plain.stdout
    assert_one_line_error(cli("inspect", str(artifact), "--trusted-key", public(keys, "right")), "inspect", "does not verify", "changed after it was signed")
    serve = ["serve", "--artifact", str(artifact), "--backend", "cpu", "--cores", "1", "--workers", "1", "--port", "0", "--metrics-port", "off"]
    assert_one_line_error(cli(*serve, "--trusted-key", public(keys, "right")), "serve", str(artifact / SIGNATURE_NAME), "does not verify")
    # the setting from the environment, and a pool (the supervisor refuses before forking a worker)
    pool = serve[:5] + ["--workers", "2", "--cores", "2"] + serve[9:]
    assert_one_line_error(cli(*pool, env={"NEURONSERVE_TRUSTED_KEY": public(keys, "right")}), "serve", "does not verify")
    with Server(serve) as server:  # without a trusted key it is served (integrity only), as before
        assert server.ready.startswith("neuronserve ready:")


def test_an_attacker_cannot_drop_or_replace_the_signature(artifact, keys):
    rehash(artifact, lambda data: data["label_bias"].__setitem__(0, 9.0))
    result = cli("sign", str(artifact), "--signing-key", str(keys["other"][0] / PRIVATE_KEY_NAME))  # their own key
    assert result.returncode == 0, result.stderr
    with pytest.raises(ArtifactError, match=f"is by key {keys['other'][1]}, which is not trusted"):
        load_manifest(artifact, trusted_key=public(keys, "right"))
    (artifact / SIGNATURE_NAME).unlink()
    with pytest.raises(ArtifactError, match="manifest.sig is missing: the artifact is not signed"):
        load_manifest(artifact, trusted_key=public(keys, "right"))
    (artifact / SIGNATURE_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.sig is malformed"):
        load_manifest(artifact, trusted_key=public(keys, "right"))
    assert "malformed" in load_manifest(artifact).signature.describe()  # reported, not refused, without a trusted key


def test_sign_refuses_a_tampered_artifact_and_keys_that_are_not_right(artifact, keys, tmp_path):
    key = str(keys["right"][0] / PRIVATE_KEY_NAME)
    (artifact / STAGE_FILE).write_bytes(b"tampered")
    assert_one_line_error(cli("sign", str(artifact), "--signing-key", key), "sign", STAGE_FILE, "fails its checksum")
    inside = artifact / "key.pem"
    shutil.copy(key, inside)
    assert_one_line_error(cli("sign", str(artifact), "--signing-key", str(inside)), "sign", "inside the artifact")
    assert_one_line_error(cli("inspect", str(artifact), "--trusted-key", key), "inspect", "is a private key")
    (tmp_path / "junk.pem").write_text("not a key")
    assert_one_line_error(cli("inspect", str(artifact), "--trusted-key", str(tmp_path / "junk.pem")), "inspect", "no PEM public key")


def test_compile_refuses_a_signing_key_inside_its_output_before_compiling(tmp_path, keys):
    from neuronserve.compile import compile_artifact

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(keys["right"][0] / PRIVATE_KEY_NAME, out / "key.pem")
    with pytest.raises(ConfigError, match="must never be part of the artifact"):
        compile_artifact(out, config=SMALL_CONFIG, batch_sizes=(1,), signing_key=out / "key.pem", force=True)
    with pytest.raises(ConfigError, match="not a readable PEM private key"):
        compile_artifact(tmp_path / "x", config=SMALL_CONFIG, batch_sizes=(1,), signing_key=Path(public(keys, "right")))


def test_the_trusted_key_setting_comes_from_flag_config_file_or_environment(tmp_path):
    import argparse

    from neuronserve.settings import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "serve.json").write_text(json.dumps({"trusted_key": "/etc/file.pem"}))
    assert resolve_config(parser.parse_args([]), environ={}).trusted_key is None
    assert resolve_config(parser.parse_args([]), environ={"NEURONSERVE_TRUSTED_KEY": "/etc/env.pem"}).trusted_key == "/etc/env.pem"
    from_file = parser.parse_args(["--config", str(tmp_path / "serve.json")])
    assert resolve_config(from_file, environ={"NEURONSERVE_TRUSTED_KEY": "/etc/env.pem"}).trusted_key == "/etc/file.pem"
    flag = parser.parse_args(["--config", str(tmp_path / "serve.json"), "--trusted-key", "/etc/flag.pem"])
    assert resolve_config(flag, environ={}).trusted_key == "/etc/flag.pem"


# ---- read once, load what was verified ------------------------------------------------------------


class Server:
    """`neuronserve serve ARGS` until its ready line (stdout); its log goes to a file, not a pipe."""

    def __init__(self, args: List[str]) -> None:
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "neuronserve", *args], stdout=subprocess.PIPE, stderr=self.log, text=True)

    def __enter__(self) -> "Server":
        self.ready = self.proc.stdout.readline().strip()  # blocks until ready (or exit: "")
        assert self.ready, self.stderr()
        self.port = int(self.ready.split("grpc=", 1)[1].split()[0].rsplit(":", 1)[1])
        return self

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def score(port: int, seed: int = 3) -> np.ndarray:
    from neuronserve.protos import scorer_pb2 as pb
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)

    def tensor(array):
        array = np.ascontiguousarray(array, dtype="<f4")
        return pb.Tensor(data=array.tobytes(), shape=array.shape)

    request = pb.ScoreRequest(user_features=tensor(rng.standard_normal((1, 16))), peer_features=tensor(rng.standard_normal((4, 16))))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = pb_grpc.ScorerStub(channel).Score(request, timeout=20)
    return np.frombuffer(reply.scores.data, dtype="<f4").reshape(tuple(reply.scores.shape)).copy()


def swap_graph(path: Path) -> None:
    """Replace a stage file (atomically, as an attacker or a careless deploy would) by the same graph with
    its weights scaled: same shapes, other outputs."""
    graph = torch.jit.load(str(path))
    with torch.no_grad():
        for parameter in graph.parameters():
            parameter.mul_(1.5)
    tmp = path.with_name(path.name + ".swap")
    torch.jit.save(graph, str(tmp))
    os.replace(tmp, path)


def test_a_stage_file_swapped_after_start_up_changes_nothing_and_a_restart_refuses_it(artifact, keys):
    args = ["serve", "--artifact", str(artifact), "--trusted-key", public(keys, "right"), "--backend", "cpu", "--cores", "1",
            "--workers", "1", "--port", "0", "--metrics-port", "off"]
    with Server(args) as server:
        before = score(server.port)
        for path in artifact.glob("*.pt"):
            swap_graph(path)
        assert np.array_equal(score(server.port), before)  # the loaded graphs are the verified bytes
        assert server.stop() == 0
    assert_one_line_error(cli(*args), "serve", "fails its checksum", "it was changed or truncated")


def test_a_swapped_graph_with_its_checksums_redone_is_refused_at_start_up_by_the_reference_check(artifact):
    """Integrity passes (every sha256 recomputed, no trusted key), but the graph does not score as compiled:
    the start-up runs the artifact's reference inputs, as a version load does, and refuses it (one process
    and a pool); the untouched artifact starts."""
    swap_graph(artifact / STAGE_FILE)
    rehash(artifact, lambda data: data["files"].update({STAGE_FILE: hashlib.sha256((artifact / STAGE_FILE).read_bytes()).hexdigest()}))
    load_manifest(artifact, verify=True)  # passes every checksum
    serve = ["serve", "--artifact", str(artifact), "--backend", "cpu", "--port", "0", "--metrics-port", "off"]
    alone = cli(*serve, "--workers", "1", "--cores", "1")
    last = alone.stderr.strip().splitlines()[-1]
    assert alone.returncode == 2 and "Traceback" not in alone.stderr, alone.stderr
    assert last.startswith("neuronserve serve: error: ") and "reference.npz" in last and "does not score as compiled" in last
    pool = cli(*serve, "--workers", "2", "--cores", "2")  # the workers load the graphs: the pool stops, exit 1
    assert pool.returncode == 1 and "Traceback" not in pool.stderr, pool.stderr
    assert "cannot start" in pool.stderr and "does not score as compiled" in pool.stderr


def test_stages_load_from_the_bytes_that_were_verified_never_from_the_path_again(artifact):
    """The window between the check and the load: a file swapped there is either never read again
    (keep_files: the server's start-up) or refused when read (its sha256 is checked on that read)."""
    kept = load_manifest(artifact, verify=True, keep_files=True)
    lazy = load_manifest(artifact, verify=True)
    reference = np.load(artifact / "reference.npz")
    users = np.ascontiguousarray(reference["user_features"][:4])
    swap_graph(artifact / STAGE_FILE)
    with torch.no_grad():  # the swap matters: the graph on disk now computes something else
        swapped = torch.jit.load(str(artifact / STAGE_FILE))(torch.from_numpy(users)).numpy()
    assert not np.allclose(swapped, reference["user_embeddings"][:4], atol=1e-3)
    runner = CpuBackend(kept).load("user_tower", CoreGroup(0))
    np.testing.assert_allclose(runner.run([users]), reference["user_embeddings"][:4], rtol=0, atol=1e-5)
    with pytest.raises(ArtifactError, match=f"{STAGE_FILE} fails its checksum"):
        CpuBackend(lazy).load("user_tower", CoreGroup(0))
    kept.release_files()  # after the load the bytes are dropped; a later read is checked again
    with pytest.raises(ArtifactError, match="fails its checksum"):
        kept.file_bytes(STAGE_FILE)
    CpuBackend(kept).load(FUSED_STAGE, CoreGroup(0))  # an untouched file read again still loads


# ---- files that leave the artifact or are not files ----------------------------------------------


def _symlink_outside(artifact: Path, tmp_path: Path) -> str:
    outside = tmp_path / "outside.pt"
    shutil.copy(artifact / STAGE_FILE, outside)  # the same bytes: the sha256 would pass, the place does not
    (artifact / STAGE_FILE).unlink()
    (artifact / STAGE_FILE).symlink_to(outside)
    return "outside the artifact directory"


def _symlink_dev_zero(artifact: Path, tmp_path: Path) -> str:
    (artifact / STAGE_FILE).unlink()
    (artifact / STAGE_FILE).symlink_to("/dev/zero")
    return "is a symlink to /dev/zero, outside the artifact directory"


def _directory(artifact: Path, tmp_path: Path) -> str:
    (artifact / STAGE_FILE).unlink()
    (artifact / STAGE_FILE).mkdir()
    return "is a directory, not a regular file"


def _fifo(artifact: Path, tmp_path: Path) -> str:
    (artifact / STAGE_FILE).unlink()
    os.mkfifo(artifact / STAGE_FILE)  # opened non-blocking: refused at once, never a hang
    return "is a FIFO, not a regular file"


def _dot_dot(artifact: Path, tmp_path: Path) -> str:
    shutil.copy(artifact / STAGE_FILE, tmp_path / STAGE_FILE)

    def point_up(data):
        for spec in data["stages"].values():
            for bucket in spec["buckets"]:
                if bucket["file"] == STAGE_FILE:
                    bucket["file"] = f"../{STAGE_FILE}"
        data["files"][f"../{STAGE_FILE}"] = data["files"].pop(STAGE_FILE)

    rehash(artifact, point_up)
    return "is not a plain file name in the artifact directory"


@pytest.mark.parametrize("make", [_symlink_outside, _symlink_dev_zero, _directory, _fifo, _dot_dot], ids=lambda f: f.__name__.strip("_"))
def test_a_file_outside_the_artifact_or_not_a_regular_file_is_refused_by_name(artifact, tmp_path, make):
    reason = make(artifact, tmp_path)
    with pytest.raises(ArtifactError, match=reason):
        load_manifest(artifact, verify=True)
    assert_one_line_error(cli("inspect", str(artifact)), "inspect", reason)


def test_a_symlink_to_a_file_inside_the_artifact_is_followed(artifact):
    (artifact / "graphs").mkdir()
    os.replace(artifact / STAGE_FILE, artifact / "graphs" / STAGE_FILE)
    (artifact / STAGE_FILE).symlink_to(Path("graphs") / STAGE_FILE)
    assert load_manifest(artifact, verify=True, keep_files=True).file_bytes(STAGE_FILE)


def test_a_permission_error_is_one_line_and_exit_2(artifact, monkeypatch):
    """In process: os.open failing with EACCES (what a file the serving user may not read gives)."""
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(STAGE_FILE):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    from neuronserve.cli import main

    with pytest.raises(ArtifactError, match=f"{STAGE_FILE} cannot be read .Permission denied."):
        load_manifest(artifact)
    assert main(["inspect", str(artifact)]) == 2


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run the CLI as another user")
def test_an_unreadable_file_is_one_line_and_exit_2_for_a_user_who_may_not_read_it(signed):
    """For real: the CLI as user nobody (root reads a mode-000 file; nobody does not)."""
    root = Path(tempfile.mkdtemp(prefix="neuronserve-perm-"))
    try:
        root.chmod(0o755)
        artifact = Path(shutil.copytree(signed, root / "artifact"))
        (artifact / STAGE_FILE).chmod(0)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        assert_one_line_error(cli("inspect", str(artifact), prefix=nobody), "inspect", STAGE_FILE, "cannot be read (Permission denied)")
        (artifact / "manifest.json").chmod(0)
        assert_one_line_error(cli("inspect", str(artifact), prefix=nobody), "inspect", "manifest.json cannot be read (Permission denied)")
        artifact.chmod(0o700)  # not even searchable: not "missing", but why it cannot be read
        assert_one_line_error(cli("inspect", str(artifact), prefix=nobody), "inspect", "manifest.json cannot be read (Permission denied)")
        serve = ["serve", "--artifact", str(artifact), "--backend", "cpu", "--workers", "1", "--port", "0", "--metrics-port", "off"]
        assert_one_line_error(cli(*serve, prefix=nobody), "serve", "cannot be read (Permission denied)")
    finally:
        shutil.rmtree(root)
