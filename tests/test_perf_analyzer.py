"""Triton's perf_analyzer, the C++ load generator platform teams point at any Open Inference Protocol
server, against the real `neuronserve serve` command with its default settings (the demo model): it must
run to completion (exit 0) and print the server-side statistics it reads through ModelStatistics.

perf_analyzer parses model versions as integers and aborts unless ModelStatistics' compute counts are
equal; its default random input holds NaN and Inf, which the server refuses, hence `--input-data zero`.
It runs through tools/perf_analyzer, which installs tritonclient 2.50.0 from PyPI on its first run; the
test is skipped only when that install cannot be done here (no network, no apt)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "tools" / "perf_analyzer"
INSTALL_TIMEOUT_S = 1200  # the first run downloads tritonclient and the CUDA runtime wheel
RUN_TIMEOUT_S = 180
READY = re.compile(r"^neuronserve ready: grpc=[^:\s]+:(?P<port>\d+) ")

pytestmark = [
    pytest.mark.timeout(INSTALL_TIMEOUT_S + RUN_TIMEOUT_S + 120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="perf_analyzer's launcher installs Linux binaries"),
]


def _run(argv, timeout_s: float) -> subprocess.CompletedProcess:
    """argv in its own process group, all of which is killed past `timeout_s` (raises TimeoutExpired)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    """The repository's launcher, installed (skip only if the install itself is impossible here)."""
    root = Path(os.environ.get("NEURONSERVE_TOOLS", Path.home() / ".cache" / "neuronserve-tools")) / "perf_analyzer"
    try:
        done = _run([str(LAUNCHER), "--version"], INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing perf_analyzer into {root} took over {INSTALL_TIMEOUT_S} s: is PyPI reachable?")
    installed = os.access(root / "venv" / "bin" / "perf_analyzer", os.X_OK) and (root / "lib" / "libb64.so.0d").exists()
    if not installed:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        pytest.skip(f"perf_analyzer could not be installed into {root} (no network or no apt-get?):\n{tail}")
    assert done.returncode == 0, f"perf_analyzer is installed but does not run:\n{done.stderr}"
    return LAUNCHER


@pytest.fixture
def server(demo_artifact) -> Iterator[int]:
    """`neuronserve serve` on the demo model with default settings (but free ports); yields its gRPC port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuronserve", "serve", "--artifact", str(demo_artifact.directory), "--port", "0", "--metrics-port", "off"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    stderr: list = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [stderr.append(line) for line in proc.stderr], daemon=True).start()
    try:
        while True:
            try:
                match = READY.match(lines.get(timeout=120))
            except queue.Empty:
                raise AssertionError("no ready line within 120 s; stderr:\n" + "".join(stderr[-30:])) from None
            if match:
                break
        yield int(match["port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_perf_analyzer_runs_to_completion_and_reports_server_statistics(perf_analyzer, server, demo_artifact):
    cfg = demo_artifact.model_config
    argv = [
        str(perf_analyzer), "-m", "twotower", "-u", f"127.0.0.1:{server}", "-i", "grpc", "--async",
        "--shape", f"USER_FEATURES:1,{cfg.user_features}", "--shape", f"PEER_FEATURES:128,{cfg.peer_features}",
        "--input-data", "zero", "--concurrency-range", "4", "--measurement-interval", "1000",
        # the test checks that the run completes and what the server reports, not that this (shared) machine
        # is steady: any three windows are accepted as stable, so the run takes about three seconds
        "--stability-percentage", "1000",
    ]  # fmt: skip
    done = _run(argv, RUN_TIMEOUT_S)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    server_part = output.split("  Server: \n", 1)
    assert len(server_part) == 2, f"no server-side statistics in:\n{output}"
    figures = {k: int(v) for k, v in re.findall(r"^\s+(Inference count|Execution count|Successful request count): (\d+)$", server_part[1], re.M)}
    assert set(figures) == {"Inference count", "Execution count", "Successful request count"}, output
    # one inference per request (max_batch_size 0), several requests per batch execution at best
    assert figures["Inference count"] == figures["Successful request count"] > 0, output
    assert 1 <= figures["Execution count"] <= figures["Inference count"], output
    latency = re.search(r"Avg request latency: (\d+) usec \(overhead \d+ usec \+ queue \d+ usec \+ compute input \d+ usec \+ compute infer (\d+) usec", output)
    assert latency is not None and int(latency[2]) > 0, output  # the device time per request is measured
