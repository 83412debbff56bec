"""Tests of `neuronserve bench`: the open-loop generator, the search, the limits, the report.

End-to-end tests drive a real server subprocess over gRPC (`neuronserve serve --backend cpu` on a
small artifact). No assertion is about speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from neuronserve.bench.loadgen import LoadSpec, arrival_offsets_s, run_load
from neuronserve.bench.report import batch_stats, scrape_metrics
from neuronserve.bench.search import search_rate, step_passes
from neuronserve.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- servers under test


class ServerProcess:
    """A server subprocess in its own process group (so SIGSTOP stops all of it)."""

    def __init__(self, argv, env=None) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        line = self._ready_line(60.0)
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        self.target = fields["grpc"] if "grpc" in fields else f"127.0.0.1:{fields['port']}"  # the echo server says port=
        self.metrics_url = f"http://{fields['metrics']}/metrics" if "metrics" in fields else None

    def _ready_line(self, timeout_s: float) -> str:
        found = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found or "ready" not in found[0]:
            self.stop()
            raise RuntimeError(f"server did not start: {found[:1]} {self.proc.stderr.read()[-2000:] if self.proc.poll() is not None else ''}")
        return found[0]

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory):
    """A small CPU artifact for the real server and the compute limit."""
    from neuronserve.artifact import ModelConfig
    from neuronserve.compile import compile_artifact

    out = tmp_path_factory.mktemp("bench-artifact")
    config = ModelConfig(user_features=16, peer_features=16, hidden_sizes=(32,), embedding_dim=16, num_labels=2, label_dim=8, label_names=("like", "match"))
    compile_artifact(out, config=config, batch_sizes=(1, 8, 32, 128), seed=0, target="cpu")
    return str(out)


@pytest.fixture(scope="module")
def server(artifact_dir):
    argv = [sys.executable, "-m", "neuronserve", "serve", "--artifact", artifact_dir, "--backend", "cpu", "--port", "0", "--metrics-port", "0"]
    srv = ServerProcess(argv)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def echo():
    srv = ServerProcess([sys.executable, "-m", "neuronserve.bench.echo", "--port", "0", "--reply-bytes", "2100"])
    yield srv
    srv.stop()


# ---------------------------------------------------------------- pure parts


def test_poisson_schedule_has_the_rate_and_exponential_gaps():
    offsets = arrival_offsets_s(1000.0, 20.0, "poisson", seed=1)
    assert abs(len(offsets) - 20_000) < 600  # 4 sigma
    gaps = np.diff(offsets)
    assert np.all(gaps >= 0) and offsets[-1] < 20.0
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: cv = 1
    constant = arrival_offsets_s(100.0, 1.0, "constant", seed=1)
    assert len(constant) == 100 and np.allclose(np.diff(constant), 0.01)


def test_load_spec_refuses_both_or_neither_mode():
    with pytest.raises(ConfigError, match="rate_per_s"):
        LoadSpec(target="x:1", method="/a/b", payloads=(b"",), duration_s=1, rate_per_s=10, concurrency=2)
    with pytest.raises(ConfigError, match="arrival"):
        LoadSpec(target="x:1", method="/a/b", payloads=(b"",), duration_s=1, rate_per_s=10, arrival="burst")


def _fake_result(rate: float, capacity: float):
    """A LoadResult whose latency explodes past `capacity` requests/s."""
    from neuronserve.bench.loadgen import LoadResult, new_histogram

    hist = new_histogram()
    latency_us = 5_000 if rate <= capacity else 400_000
    hist.record_value(latency_us, count=int(rate))
    lat = {"p50": latency_us / 1000, "p90": latency_us / 1000, "p99": latency_us / 1000, "p99.9": latency_us / 1000, "max": latency_us / 1000, "mean": latency_us / 1000}
    return LoadResult(rate, 1.0, int(rate), int(rate), {}, rate, lat, 0, 2.0, 0.0, 0.0, hist.encode())


def test_search_grows_then_bisects_to_the_capacity():
    tried = []

    def run_step(rate):
        tried.append(rate)
        return _fake_result(rate, capacity=730.0)

    found = search_rate(run_step, bound_ms=100.0, start_rate_per_s=100.0, step_s=0.0, precision=0.05)
    assert tried[:4] == [100.0, 200.0, 400.0, 800.0]
    assert 730.0 * 0.95 <= found.best.rate_per_s <= 730.0
    assert all(s.passed == (s.rate_per_s <= 730.0) for s in found.steps)
    low = search_rate(lambda r: _fake_result(r, capacity=30.0), bound_ms=100.0, start_rate_per_s=100.0, step_s=0.0)
    assert low.best is not None and low.best.rate_per_s <= 30.0
    capped = search_rate(run_step, bound_ms=100.0, start_rate_per_s=100.0, step_s=0.0, max_steps=2)
    assert len(capped.steps) == 2


def test_a_step_fails_when_more_than_one_percent_fail_or_are_slow():
    ok = _fake_result(100.0, capacity=1000.0)
    assert step_passes(ok, 100.0)
    failing = ok.__class__(**{**ok.__dict__, "errors": {"DEADLINE_EXCEEDED": 2}})
    assert not step_passes(failing, 100.0)
    assert not step_passes(_fake_result(100.0, capacity=50.0), 100.0)


def test_metrics_deltas_give_batch_statistics(tmp_path):
    import http.server

    pages = [
        "nv_inference_request_success{model=\"twotower\"} 10\nnv_inference_exec_count 2\nnv_inference_count 10\n",
        "# HELP x\nnv_inference_request_success{model=\"twotower\"} 110\nnv_inference_exec_count 12\nnv_inference_count 170\n"
        "nv_inference_queue_duration_us 200000\nnv_batch_size_bucket{le=\"8\"} 3\nunrelated 5\n",
    ]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(pages.pop(0).encode())

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}/metrics"
    try:
        stats = batch_stats(scrape_metrics(url), scrape_metrics(url))
    finally:
        httpd.shutdown()
    assert stats.requests == 100 and stats.executions == 10 and stats.avg_batch_rows == 16.0
    assert stats.avg_queue_ms == pytest.approx(2.0)
    assert "nv_batch_size_bucket" not in stats.counters and "unrelated" not in stats.counters


# ---------------------------------------------------------------- against real servers


@pytest.mark.timeout(60)
def test_late_sends_are_counted_and_none_at_a_trivial_rate(echo):
    common = dict(target=echo.target, method="/any.Service/Call", payloads=(b"x" * 33_000,), warmup_s=0.0, clients=1, channels=1)
    flooded = run_load(LoadSpec(duration_s=0.5, rate_per_s=20_000.0, **common))  # far beyond one process
    assert flooded.late_sends > 0
    assert flooded.late_max_ms > 2.0 and flooded.late_p99_ms > 0.0
    trivial = run_load(LoadSpec(duration_s=2.0, rate_per_s=20.0, arrival="constant", **common))
    assert trivial.ok == trivial.sent == 40
    assert trivial.late_sends <= 4  # at most 10%: timer jitter on a noisy 2-core box; the point is the flood above


@pytest.mark.timeout(90)
def test_a_stopped_server_shows_in_the_tail(server):
    """SIGSTOP for 1 s: every request scheduled in that second waits for the rest of it."""
    rate, stop_s = 100.0, 1.0
    spec = LoadSpec(target=server.target, method="/neuronserve.v1.Scorer/Score", payloads=_score_payloads(server), duration_s=4.0, warmup_s=0.5,
                    rate_per_s=rate, arrival="constant", clients=2, timeout_ms=10_000.0)

    def stall():
        server.signal(signal.SIGSTOP)
        time.sleep(stop_s)
        server.signal(signal.SIGCONT)

    result = run_load(spec, on_window_start=lambda: threading.Timer(1.0, stall).start())
    assert result.failed == 0 and result.ok == result.sent == 400
    assert result.latency_ms["max"] >= 900.0
    assert result.latency_ms["p99"] >= 800.0  # the top 1% (4 requests) were scheduled at the start of the stop
    # latency from the scheduled time falls linearly across the stop: about rate * 0.5 s exceed 500 ms
    assert 0.3 * rate * stop_s <= result.count_over_ms(500.0) <= 0.7 * rate * stop_s + 10

    # the same stall seen by a closed-loop generator: only the requests in flight notice it
    closed = LoadSpec(target=server.target, method=spec.method, payloads=spec.payloads, duration_s=4.0, warmup_s=0.5, concurrency=1, clients=2, timeout_ms=10_000.0)
    blind = run_load(closed, on_window_start=lambda: threading.Timer(1.0, stall).start())
    assert blind.latency_ms["max"] >= 900.0
    assert blind.count_over_ms(500.0) <= 2  # one per client: the stall is hidden


def _score_payloads(server):
    from neuronserve.bench.workloads import WorkloadSpec, prepare_workload

    return prepare_workload(server.target, WorkloadSpec(name="score", peers=16)).payloads


@pytest.mark.timeout(120)
def test_search_prints_the_rate_and_the_limits(server, artifact_dir, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", server.target, "--workload", "score", "--peers", "32", "--search",
            "--search-start-rate", "20", "--search-max-steps", "3", "--duration-s", "1", "--warmup-s", "0.5", "--limit-s", "1",
            "--json", str(out_json), "--plot", str(out_png), "--quiet", "--artifact", artifact_dir, "--metrics-url", server.metrics_url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert "highest rate meeting P99 <= 100 ms:" in done.stdout
    assert "transport limit" in done.stdout and "compute limit" in done.stdout
    report = json.loads(out_json.read_text())
    assert len(report["search"]["steps"]) == 3
    assert report["search"]["best_rate_per_s"] == max(s["offered_rate_per_s"] for s in report["search"]["steps"] if s["passed"])
    assert report["limits"]["transport"]["requests_per_s"] > 0
    assert report["limits"]["transport"]["served_fraction"] > 0
    assert report["limits"]["compute"]["pairs_per_s"] > 0 and report["limits"]["compute"]["served_fraction"] > 0
    assert report["server_batches"]["executions"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--metrics-url", "metrics"], ["--metrics-url", "not an http URL"]),
        (["--metrics-url", "http://127.0.0.1:abc/metrics"], ["--metrics-url", "not a URL"]),
        (["--json", "/nonexistent-dir/out.json"], ["--json", "/nonexistent-dir", "does not exist"]),
        (["--limit-s", "0"], ["--limit-s", "> 0"]),
        (["--artifact", "/nonexistent-artifact"], ["/nonexistent-artifact", "does not exist"]),
    ],
)
def test_bad_bench_arguments_fail_before_any_load(extra, words):
    """One line, non-zero exit, and no load sent: the target is a port nothing listens on, so a run
    that started would fail differently (and only after its whole duration)."""
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", "127.0.0.1:9", "--rate", "10", "--duration-s", "30", "--quiet", *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
