"""Packaging: the wheel, the Inf1 image's pins, a read-only installation, Python 3.10 compatibility.

- The wheel carries the protobuf/gRPC modules generated at build time (setup.py), and its serving
  requirements name neither grpcio-tools nor what only the benchmark or the tests use.
- The serving path imports none of matplotlib, hdrh, tritonclient.
- The code stays Python-3.10 compatible (vermin, a static check: the suite itself runs on 3.11).
- Read-only: the wheel installed into a directory that is then bind-mounted read-only (a private
  mount namespace, `unshare -m`: even root cannot write there) imports and serves; nothing is added to
  the installation (listing before and after).
- Inf1 pins (the slow one, ~2-3 min the first time): a Python 3.11 venv holding AWS's Inf1 pins
  (protobuf 3.19.5, numpy 1.23.5; grpcio 1.49.1, the oldest the floors allow with a cp311 wheel: 1.48.2
  has none; torch 2.13.0, the local CPU wheel, as Inf1's torch 1.13.1 is not installable here). A
  `pip install --dry-run --report` of `wheel[inf1]` must install none of them, the real install must
  leave them as they were, and the serving tests (test_service.py, test_server_e2e.py) run there. Then
  `neuronserve serve` runs from that venv, bind-mounted read-only, as user nobody (when the venv's
  interpreter and path are reachable by nobody: the venv is built on /usr/bin/python3.11 when present).
  The venv is cached in .venv/inf1-pins, keyed on pyproject.toml, setup.py and the pins; the project
  itself is rebuilt and reinstalled on every run.

What this does not prove: Python 3.10 itself (the Inf1 image's) is not run here, and torch 1.13.1 and
torch-neuron are not installed (no wheel for them on this machine's Python 3.11).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parent.parent
PINS = {"protobuf": "3.19.5", "numpy": "1.23.5", "grpcio": "1.49.1", "torch": "2.13.0"}
TEST_TOOLS = ["pytest>=7", "pytest-timeout>=2"]
SERVING_TESTS = ["tests/test_service.py", "tests/test_server_e2e.py"]
# grpcio 1.49 logs its own line for a port that cannot be bound, besides the server's one-line error
NOT_UNDER_PINS = ["tests/test_server_e2e.py::test_a_taken_port_is_a_one_line_error"]
# (not grpc_tools: `import grpc` imports it when it is installed, as in this venv; the wheel's
# requirements show a serving install does not have it)
NOT_SERVING = ("matplotlib", "hdrh", "tritonclient")
READY = re.compile(r"^neuronserve ready: grpc=(?P<host>[^:\s]+):(?P<port>\d+) ")
SOURCES = ("pyproject.toml", "setup.py", "README.md", "neuronserve", "csrc", "compile", "bench")


def run(cmd: List[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd`, fail the test with its output when it exits non-zero."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def clean_env(**extra: str) -> Dict[str, str]:
    """This process's environment without what points Python at the outer venv or the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTEST_ADDOPTS")}
    env.update(extra)
    return env


# ---- the wheel ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel (pip's isolated build, setup.py's hook) from a copy of the sources,
    so concurrent edits and stale build/ directories of the checkout do not leak in."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*_pb2.py", "*_pb2_grpc.py", "*.pyc", "*.so")
    for name in SOURCES:
        path = REPO / name
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy2(path, src / name))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(src)], env=clean_env())
    (built,) = (work / "dist").glob("neuronserve-*.whl")
    return built


def wheel_metadata(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return archive.read(name).decode()


def test_the_wheel_carries_generated_stubs_and_serving_needs_only_serving_packages(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for proto in ("scorer", "open_inference"):
            assert f"neuronserve/protos/{proto}.proto" in names
            for suffix in ("_pb2.py", "_pb2_grpc.py"):
                text = archive.read(f"neuronserve/protos/{proto}{suffix}").decode()
                assert "runtime_version" not in text and "GRPC_GENERATED_VERSION" not in text, "a generator-version check crept in"
        # the compiled kernels (an optional extension: built wherever a C compiler is, as here)
        assert any(n.startswith("neuronserve/_kernels") and n.endswith(".so") for n in names), sorted(names)[:20]
    requires = [line.split(":", 1)[1].strip() for line in wheel_metadata(wheel).splitlines() if line.startswith("Requires-Dist:")]
    serving = {re.split(r"[<>=!~;\[ (]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert {"torch", "numpy", "grpcio", "protobuf", "grpcio-health-checking"} <= serving
    assert not serving & {"grpcio-tools", "matplotlib", "hdrhistogram", "tritonclient", "pytest"}, serving


def test_the_serving_path_imports_no_benchmark_or_test_library():
    code = (
        "import sys\n"
        "from neuronserve import cli, serve, server, health, scorer_service, oip_service\n"
        "from neuronserve.protos import scorer_pb2, scorer_pb2_grpc, open_inference_pb2\n"
        "cli.build_parser()\n"
        f"print(sorted(m for m in {NOT_SERVING!r} if m in sys.modules))\n"
    )
    out = run([sys.executable, "-c", code], env=clean_env(), cwd=REPO).stdout.strip()
    assert out == "[]", f"imported on the serving path: {out}"


def test_the_code_is_python_3_10_compatible():
    """vermin: a static check of syntax, modules and members against their minimum Python version."""
    pytest.importorskip("vermin", reason="vermin is in the test extra")
    targets = [str(REPO / d) for d in ("neuronserve", "compile", "bench", "tests", "tools", "setup.py") if (REPO / d).exists()]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "--target=3.10-", "--violations", "--no-tips", "--eval-annotations", *targets],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"code that needs Python > 3.10:\n{proc.stdout}{proc.stderr}"


# ---- serving from a read-only installation --------------------------------------------------------


def listing(root: Path) -> Dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def read_only_command(mount: Path, argv: List[str], user: Optional[str] = None) -> List[str]:
    """`argv` in a private mount namespace where `mount` is bind-mounted read-only (optionally as `user`)."""
    run_as = f"exec setpriv --reuid={user} --regid={user} --clear-groups " if user else "exec "
    script = f'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && {run_as}"$@"'
    return ["unshare", "-m", "sh", "-c", script, str(mount), *argv]


def can_mount_read_only(tmp: Path) -> bool:
    probe = tmp / "ro-probe"
    probe.mkdir(exist_ok=True)
    proc = subprocess.run(read_only_command(probe, ["touch", str(probe / "x")]), capture_output=True, text=True)
    return "Read-only file system" in proc.stderr


class Server:
    """`neuronserve serve` in a subprocess; `ready()` waits (with a deadline) for its ready line."""

    def __init__(self, cmd: List[str], env: Dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.stderr: List[str] = []
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout], daemon=True).start()
        threading.Thread(target=lambda: [self.stderr.append(l) for l in self.proc.stderr], daemon=True).start()

    def ready(self, timeout_s: float = 90.0) -> int:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                match = READY.match(self.lines.get(timeout=0.2))
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if match:
                return int(match["port"])
        self.stop()
        raise AssertionError(f"no ready line; exit {self.proc.poll()}; stderr:\n" + "".join(self.stderr[-30:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


CLIENT = """
import sys, grpc, numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from neuronserve.protos import scorer_pb2 as pb, scorer_pb2_grpc as pb_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as channel:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING, status
    f = int(sys.argv[2])
    def tensor(a):
        return pb.Tensor(data=a.astype("<f4").tobytes(), shape=list(a.shape))
    rng = np.random.default_rng(1)
    reply = pb_grpc.ScorerStub(channel).Score(pb.ScoreRequest(user_features=tensor(rng.random(f)), peer_features=tensor(rng.random((5, f)))), timeout=10)
    print("scores", list(reply.scores.shape))
"""


def serve_and_score(python: str, mount: Path, artifact: Path, features: int, env: Dict[str, str], cwd: Path, user: Optional[str] = None) -> None:
    """Start `python -m neuronserve serve` with `mount` read-only, check health and one Score, SIGTERM."""
    argv = [python, "-m", "neuronserve", "serve", "--artifact", str(artifact), "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"]
    server = Server(read_only_command(mount, argv, user), env, cwd)
    try:
        port = server.ready()
        out = run([python, "-c", CLIENT, str(port), str(features)], env=env, cwd=cwd, timeout=60).stdout
        assert "scores [5," in out, out
        # the image's HEALTHCHECK command: exit 0 while SERVING
        health = run([python, "-m", "neuronserve", "health", "--address", f"127.0.0.1:{port}"], env=env, cwd=cwd, timeout=30)
        assert "SERVING" in health.stderr, health.stderr
    finally:
        code = server.stop()
    assert code == 0, "".join(server.stderr[-30:])
    assert not any("Read-only file system" in line or "Permission denied" in line for line in server.stderr), "".join(server.stderr)


def test_the_package_serves_from_a_read_only_installation(wheel, small_artifact, tmp_path):
    """The wheel installed into a directory (no dependencies: this venv provides them), then that
    directory read-only (a read-only bind mount and no write bits); the server runs as root here, so the
    mount is what forbids writes. Nothing in the installation changes (no stubs, no __pycache__)."""
    if shutil.which("unshare") is None or not can_mount_read_only(tmp_path):
        pytest.skip("no private mount namespace here (unshare -m): cannot make a read-only mount")
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)], env=clean_env())
    subprocess.run(["chmod", "-R", "a-w", str(site)], check=True)
    before = listing(site)
    env = clean_env(PYTHONPATH=str(site), NEURONSERVE_CACHE_DIR=str(tmp_path / "cache"))
    where = run([sys.executable, "-c", "import neuronserve.protos.scorer_pb2 as m; print(m.__file__)"], env=env, cwd=tmp_path).stdout
    assert where.startswith(str(site)), f"imported from {where}, not the installation"
    try:
        serve_and_score(sys.executable, site, small_artifact.directory, 16, env, tmp_path)
        assert listing(site) == before, "the installation changed while serving"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(site)], check=True)


# ---- the Inf1 image's pins ------------------------------------------------------------------------


def pins_python() -> Optional[str]:
    """A Python 3.11 to build the pins venv on: Debian's (reachable by a non-root user) or this one."""
    for candidate in ("/usr/bin/python3.11", sys.executable if sys.version_info[:2] == (3, 11) else None, shutil.which("python3.11")):
        if candidate and Path(candidate).exists():
            ok = subprocess.run([candidate, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))"], capture_output=True)
            if ok.returncode == 0:
                return candidate
    return None


def installed(python: Path, names) -> Dict[str, Optional[str]]:
    code = "import json, sys\nfrom importlib import metadata\nout = {}\nfor n in sys.argv[1:]:\n    try:\n        out[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n        out[n] = None\nprint(json.dumps(out))"
    return json.loads(run([str(python), "-c", code, *names], env=clean_env()).stdout)


@pytest.fixture(scope="session")
def pins_venv() -> Path:
    """The cached venv holding the Inf1 pins (and pytest), without neuronserve's own dependencies: the
    test installs those, as a user would. Rebuilt when pyproject.toml, setup.py or the pins change."""
    base = pins_python()
    if base is None:
        pytest.skip("no Python 3.11 with venv here (the local torch wheel is for 3.11 only)")
    venv = Path(os.environ.get("NEURONSERVE_PINS_VENV") or REPO / ".venv" / "inf1-pins")
    key = hashlib.sha256(
        b"".join((REPO / f).read_bytes() for f in ("pyproject.toml", "setup.py")) + json.dumps([base, PINS, TEST_TOOLS]).encode()
    ).hexdigest()
    stamp = venv / ".pins-key"
    if stamp.exists() and stamp.read_text() == key and (venv / "bin" / "python").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    run([base, "-m", "venv", str(venv)], env=clean_env())
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # torch pinned (an unpinned torch would be a CUDA build of several GB), first, and alone
    run([*pip, f"torch=={PINS['torch']}"], env=clean_env(), timeout=900)
    run([*pip, *(f"{n}=={v}" for n, v in PINS.items() if n != "torch"), *TEST_TOOLS], env=clean_env())
    stamp.write_text(key)
    return venv


def test_installing_under_the_inf1_pins_changes_none_and_serving_tests_pass(pins_venv, wheel, small_artifact):
    python = pins_venv / "bin" / "python"
    before = installed(python, PINS)
    assert {n: (v or "").split("+")[0] for n, v in before.items()} == PINS, before

    # what pip would do: the report of a dry run names every distribution it would install
    report = json.loads(run([str(python), "-m", "pip", "install", "-q", "--dry-run",
                             "--report", "-", f"{wheel}[inf1]"], env=clean_env()).stdout)
    would_install = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
    assert not set(would_install) & set(PINS), f"the install would replace pins: {would_install}"
    run([str(python), "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)], env=clean_env())
    run([str(python), "-m", "pip", "install", "-q", f"{wheel}[inf1]"], env=clean_env())
    assert installed(python, PINS) == before, "installing neuronserve changed a pin"
    assert all(v is None for v in installed(python, ("matplotlib", "hdrhistogram", "tritonclient", "grpcio-tools")).values())

    with tempfile.TemporaryDirectory() as tmp:  # not the checkout: `import neuronserve` must find the installed one
        where = run([str(python), "-c", "import neuronserve.protos.scorer_pb2 as m, google.protobuf as p; print(m.__file__, p.__version__)"],
                    env=clean_env(), cwd=tmp).stdout.split()
        assert where[0].startswith(str(pins_venv)) and where[1] == PINS["protobuf"], where
        proc = subprocess.run(
            [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
             *(str(REPO / t) for t in SERVING_TESTS), *(f"--deselect={t}" for t in NOT_UNDER_PINS)],
            capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp,
        )
    assert proc.returncode == 0, f"serving tests under the Inf1 pins failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-2000:]

    # the same venv, read-only, as a non-root user
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("no unshare/setpriv here: the non-root, read-only run is not possible")
    world = Path(tempfile.mkdtemp(prefix="neuronserve-ro-"))
    try:
        world.chmod(0o755)
        if not can_mount_read_only(world):
            pytest.skip("no private mount namespace here (unshare -m)")
        reach = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c", "import neuronserve"], capture_output=True, text=True)
        if reach.returncode != 0:
            pytest.skip(f"user nobody cannot run the pins venv from {pins_venv} (a parent directory or the interpreter is not reachable): {reach.stderr[-300:]}")
        shutil.copytree(small_artifact.directory, world / "artifact")
        (world / "cache").mkdir()
        subprocess.run(["chmod", "-R", "a+rX", str(world)], check=True)
        subprocess.run(["chown", "nobody", str(world / "cache")], check=True)
        site = Path(run([str(python), "-c", "import neuronserve, os; print(os.path.dirname(os.path.dirname(neuronserve.__file__)))"], env=clean_env(), cwd=world).stdout.strip())
        before_listing = listing(site / "neuronserve")
        serve_and_score(str(python), pins_venv, world / "artifact", 16, clean_env(NEURONSERVE_CACHE_DIR=str(world / "cache"), HOME=str(world / "cache")),
                        world, user="65534")
        assert listing(site / "neuronserve") == before_listing
    finally:
        shutil.rmtree(world, ignore_errors=True)


def test_the_health_command_fails_when_nothing_serves(tmp_path):
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "neuronserve", "health", "--address", f"127.0.0.1:{port}", "--timeout-s", "2"],
                          capture_output=True, text=True, timeout=60, env=clean_env(), cwd=REPO)
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr, proc.stderr
