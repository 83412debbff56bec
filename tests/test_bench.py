"""Tests of `neuronserve bench`: the open-loop generator, the search, the limits, the report.

End-to-end tests drive a real server subprocess over gRPC (`neuronserve serve --backend cpu` on a
small artifact). No assertion is about speed.
"""

from __future__ import annotations

import http.server
import json
import os
import re
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


def _serve_argv(artifact_dir, *flags: str) -> list[str]:
    """`serve` on the cpu backend, any ports, with gRPC's own pending bound: these tests SIGSTOP the
    server, and every call that queues meanwhile must reach the loop (the default 64 refuses the calls
    past 64 waiting at once; README)."""
    return [sys.executable, "-m", "neuronserve", "serve", "--artifact", artifact_dir, "--backend", "cpu", "--port", "0",
            "--metrics-port", "0", "--max-pending-rpcs", "off", *flags]


@pytest.fixture(scope="module")
def server(artifact_dir):
    srv = ServerProcess(_serve_argv(artifact_dir))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def refusing_server(artifact_dir):
    """A server whose queue bound in time is 1 us: a request arriving while any work is queued or
    running is refused at the door (RESOURCE_EXHAUSTED), so modest load provokes refusals. Batches go to
    torch's thread (--inline-below 0): run on the loop, no work would ever be running when one arrives."""
    # --sched-policy normal: how many requests meet a running batch (and so are refused at once) depends on
    # how soon a woken thread runs; under SCHED_BATCH on a loaded CI host too few did (docs/workers.md)
    srv = ServerProcess(
        _serve_argv(artifact_dir, "--max-queue-wait-ms", "0.001", "--inline-below", "0", "--sched-policy", "normal")
    )
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


def test_a_search_comparison_uses_the_highest_passing_rates_and_no_latency_ratio():
    from neuronserve.bench.report import Measured, ServerCpu, compare

    ours = Measured(_fake_result(1200.0, capacity=2000.0), None, ServerCpu(0.9, 1000, "metrics"))
    plain = Measured(_fake_result(800.0, capacity=2000.0), None, ServerCpu(1.2, 1000, "psutil"))
    cmp = compare("plain", ours, plain, search_bound_ms=100.0)
    assert cmp.served_ratio == pytest.approx(1.5) and cmp.cpu_ratio == pytest.approx(0.75)
    assert cmp.p50_ratio is None and cmp.p99_ratio is None and cmp.note == ""  # different loads: latencies not compared
    assert compare("plain", ours, None, 100.0).served_ratio is None  # the plain server passed no step
    capped = compare("plain", ours, plain, 100.0, never_failed=["plain"])
    assert "plain" in capped.note and "lower bound" in capped.note
    fixed = compare("plain", ours, plain, search_bound_ms=None)
    assert fixed.served_ratio == pytest.approx(1.5) and fixed.p50_ratio == pytest.approx(1.0)


def test_metrics_deltas_give_batch_statistics(tmp_path):
    pages = [
        "nv_inference_request_success{model=\"twotower\"} 10\nnv_inference_exec_count 2\nnv_inference_count 10\n",
        "# HELP x\nnv_inference_request_success{model=\"twotower\"} 110\nnv_inference_exec_count 12\nnv_inference_count 170\n"
        "nv_inference_queue_duration_us 200000\nnv_batch_size_bucket{le=\"8\"} 3\nunrelated 5\n"
        'neuronserve_core_group_executions_total{cores="0"} 30\nneuronserve_core_group_executions_total{cores="1"} 10\n'
        'neuronserve_core_group_inline_executions_total{cores="0"} 8\nneuronserve_core_group_inline_executions_total{cores="1"} 2\n',
    ]

    httpd, url = _serve_pages(pages)
    try:
        stats = batch_stats(scrape_metrics(url), scrape_metrics(url))
    finally:
        httpd.shutdown()
    assert stats.requests == 100 and stats.executions == 10 and stats.avg_batch_rows == 16.0
    assert stats.avg_queue_ms == pytest.approx(2.0)
    assert stats.on_loop == pytest.approx(10 / 40)  # the groups' executions on the event loop (none before)
    assert "nv_batch_size_bucket" not in stats.counters and "unrelated" not in stats.counters


def _serve_pages(pages: list[str]) -> tuple[http.server.HTTPServer, str]:
    """A local metrics endpoint answering each GET with the next page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(pages.pop(0).encode())

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_port}/metrics"


def test_the_sim_cores_device_time_over_the_window_is_reported_as_a_busy_fraction():
    from neuronserve.bench.render import _measured_lines
    from neuronserve.bench.runs import Endpoint, _ServerProbe

    device = "neuronserve_sim_core_device_seconds_total"
    httpd, url = _serve_pages(
        [
            f'{device}{{core="0"}} 1.0\n{device}{{core="1"}} 2.0\nprocess_cpu_seconds_total 1\n',
            f'# TYPE {device} counter\n{device}{{core="0"}} 4.0\n{device}{{core="1"}} 4.5\nprocess_cpu_seconds_total 2\n',
            "process_cpu_seconds_total 1\n",  # a server on another backend
            "process_cpu_seconds_total 2\n",
        ]
    )
    now = iter([10.0, 14.0, 20.0, 21.0])
    try:
        probe = _ServerProbe(Endpoint("127.0.0.1:1", url), clock=lambda: next(now))
        probe.start()
        measured = probe.finish(_fake_result(100.0, capacity=200.0))
        other = _ServerProbe(Endpoint("127.0.0.1:1", url), clock=lambda: next(now))
        other.start()
        on_cpu = other.finish(_fake_result(100.0, capacity=200.0))
    finally:
        httpd.shutdown()
    assert (measured.device.device_s, measured.device.cores, measured.device.wall_s) == (5.5, 2, 4.0)
    assert measured.device.fraction == pytest.approx(5.5 / (2 * 4.0))
    assert measured.section(1)["sim_device"]["busy_fraction"] == pytest.approx(0.6875)
    assert any(line.startswith("  device busy       68.8% of 2 simulated cores' time") for line in _measured_lines(measured, 1))
    assert on_cpu.device is None and on_cpu.section(1)["sim_device"] is None
    assert not any("device busy" in line for line in _measured_lines(on_cpu, 1))


# ---------------------------------------------------------------- against real servers


@pytest.mark.timeout(60)
def test_late_sends_are_counted_and_none_at_a_trivial_rate(echo):
    common = dict(target=echo.target, method="/any.Service/Call", payloads=(b"x" * 33_000,), warmup_s=0.0, clients=1, channels=1)
    flooded = run_load(LoadSpec(duration_s=0.5, rate_per_s=20_000.0, **common))  # far beyond one process
    assert flooded.late_sends > 0
    assert flooded.late_max_ms > 2.0 and flooded.late_p99_ms > 0.0
    trivial = run_load(LoadSpec(duration_s=2.0, rate_per_s=20.0, arrival="constant", **common))
    assert trivial.ok == trivial.sent == 40
    # timer jitter on a loaded 2-core box makes a few trivial sends late; the point is the contrast with the flood
    assert trivial.late_sends / trivial.sent < 0.5 * flooded.late_sends / flooded.sent


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


@pytest.mark.timeout(60)
def test_score_ids_draws_its_ids_from_the_cached_peers_it_upserts(server):
    import grpc

    from neuronserve.bench.workloads import WorkloadSpec, prepare_workload
    from neuronserve.protos import scorer_pb2 as pb

    workload = prepare_workload(server.target, WorkloadSpec(name="score-ids", peers=8, pool_peers=3000))
    asked = np.concatenate([np.frombuffer(pb.ScoreByIdsRequest.FromString(p).peer_ids_packed, "<i8") for p in workload.payloads])
    assert asked.max() >= 2000 and asked.max() < 3000  # from the whole pool, never past it
    with grpc.insecure_channel(server.target) as channel:  # the last of the 3,000 is cached: it scores
        ask = channel.unary_unary("/neuronserve.v1.Scorer/ScoreByIds")
        reply = pb.ScoreResponse.FromString(ask(pb.ScoreByIdsRequest(user_id=0, peer_ids=[2999]).SerializeToString(), timeout=10))
    assert list(reply.scores.shape) == [1, 2]


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
    passed = [s["offered_rate_per_s"] for s in report["search"]["steps"] if s["passed"]]
    assert report["search"]["best_rate_per_s"] == (max(passed) if passed else None)  # a slow host may fail every step
    assert report["limits"]["transport"]["requests_per_s"] > 0
    assert report["limits"]["transport"]["served_fraction"] > 0
    assert report["limits"]["compute"]["pairs_per_s"] > 0 and report["limits"]["compute"]["served_fraction"] > 0
    assert "fused twotower graph at batch 128" in report["limits"]["compute"]["how"]  # the artifact has it: the limit says it used it
    assert f"pairs/s; {report['limits']['compute']['how']})" in done.stdout
    assert report["server_batches"]["executions"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "name, extra, workloads",
    [("plain", (), ("score", "oip")), ("plain", ("--three-stages",), ("score", "oip")), ("probe", (), ("oip",))],
    ids=["plain-fused-if-compiled", "plain-three-stages", "probe"],
)
def test_the_reference_servers_answer_like_neuronserve(server, artifact_dir, name, extra, workloads):
    """Same request, same artifact: the same reply shape and the same scores, through each API it serves."""
    import grpc

    from neuronserve.bench.reference import ReferenceServer
    from neuronserve.bench.workloads import WorkloadSpec, prepare_workload
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import scorer_pb2 as pb

    def ask(target, method, payload, reply_type):
        with grpc.insecure_channel(target) as channel:
            return reply_type.FromString(channel.unary_unary(method)(payload, timeout=10))

    reply_types = {"score": pb.ScoreResponse, "oip": oip.ModelInferResponse}
    with ReferenceServer(name, artifact_dir, extra=extra) as ref:
        for workload_name in workloads:
            reply_type = reply_types[workload_name]
            workload = prepare_workload(ref.target, WorkloadSpec(name=workload_name, peers=24))  # also the bench's metadata call and probe
            assert workload.payloads == prepare_workload(server.target, WorkloadSpec(name=workload_name, peers=24)).payloads
            replies = [ask(t, workload.method, workload.payloads[3], reply_type) for t in (server.target, ref.target)]
            if workload_name == "score":
                shapes = [list(r.scores.shape) for r in replies]
                scores = [np.frombuffer(r.scores.data, "<f4") for r in replies]
                assert replies[0].label_names == replies[1].label_names
            else:
                shapes = [list(r.outputs[0].shape) for r in replies]
                scores = [np.frombuffer(r.raw_output_contents[0], "<f4") for r in replies]
                assert [r.outputs[0].name for r in replies] == ["SCORES", "SCORES"]
            assert shapes[0] == shapes[1] == [24, 2]
            np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5, atol=1e-5)
            assert abs(len(replies[1].SerializeToString()) - len(replies[0].SerializeToString())) <= 16  # the version strings may differ
        pid = ref.pid
    import psutil

    assert not psutil.pid_exists(pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name, workload, what", [("plain", "score", "no batching"), ("probe", "oip", "issue 9's probe")])
def test_a_reference_server_reports_both_servers_and_their_ratios(server, artifact_dir, tmp_path, name, workload, what):
    out_json = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", server.target, "--workload", workload, "--peers", "32", "--rate", "40",
            "--duration-s", "2", "--warmup-s", "0.5", "--no-limits", "--quiet", "--json", str(out_json), "--artifact", artifact_dir,
            "--metrics-url", server.metrics_url, "--reference", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    report = json.loads(out_json.read_text())
    ours, ref, cmp = report["result"], report["reference"]["result"], report["versus_reference"]
    assert report["reference"]["server"] == name and report["reference"]["target"] != server.target
    assert what in report["reference"]["how"] and f"neuronserve / {name} server" in done.stdout
    assert ours["ok"] > 0 and ref["ok"] > 0
    assert ours["sent"] == ref["sent"]  # the same generator: the same schedule
    assert cmp["served_ratio"] == pytest.approx(ours["achieved_rate_per_s"] / ref["achieved_rate_per_s"], rel=1e-3)
    assert cmp["p50_ratio"] == pytest.approx(ours["latency_ms"]["p50"] / ref["latency_ms"]["p50"], rel=1e-2)
    assert cmp["p99_ratio"] == pytest.approx(ours["latency_ms"]["p99"] / ref["latency_ms"]["p99"], rel=1e-2)
    ours_cpu, ref_cpu = report["server_cpu"], report["reference"]["server_cpu"]
    assert ours_cpu["ms_per_request"] > 0 and ref_cpu["ms_per_request"] > 0
    assert ref_cpu["ms_per_request"] == pytest.approx(1000 * ref_cpu["seconds"] / ref["sent"], rel=1e-2)
    assert cmp["cpu_ratio"] == pytest.approx(ours_cpu["ms_per_request"] / ref_cpu["ms_per_request"], rel=1e-2)
    # the text prints each ratio to 2 places, the JSON keeps 4: compare the numbers, not the rounding
    served = re.search(r"served rate +([0-9.]+)x", done.stdout)
    assert served is not None, done.stdout
    assert float(served[1]) == pytest.approx(cmp["served_ratio"], abs=0.0051)
    printed = re.search(r"latency +p50 ([0-9.]+)x  p99 ([0-9.]+)x", done.stdout)
    assert printed is not None, done.stdout
    assert float(printed[1]) == pytest.approx(cmp["p50_ratio"], abs=0.0051)
    assert float(printed[2]) == pytest.approx(cmp["p99_ratio"], abs=0.0051)
    assert done.stdout.count("\n  achieved rate ") == 2  # both servers' results
    import psutil

    assert not psutil.pid_exists(report["reference"]["pid"])  # bench stopped the server it started


@pytest.mark.parametrize("module", ["plain", "probe"])
def test_a_reference_server_on_a_missing_artifact_says_so_in_one_line(module, tmp_path):
    missing = str(tmp_path / "no-artifact")
    done = subprocess.run([sys.executable, "-m", f"neuronserve.bench.{module}", "--artifact", missing],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and missing in done.stderr and "does not exist" in done.stderr


@pytest.mark.timeout(150)
def test_rounds_alternate_the_order_and_report_the_median_of_each_ratio(server, artifact_dir, tmp_path):
    out_json = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", server.target, "--workload", "oip", "--peers", "16", "--rate", "40",
            "--duration-s", "1", "--warmup-s", "0.3", "--no-limits", "--json", str(out_json), "--artifact", artifact_dir,
            "--metrics-url", server.metrics_url, "--reference", "plain", "--rounds", "3"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stderr
    assert "round 2 of 3: the reference first" in done.stderr and "round 3 of 3: the target first" in done.stderr
    report = json.loads(out_json.read_text())
    rounds, median = report["versus_reference_rounds"], report["versus_reference"]
    assert len(rounds) == 3 and median["note"].startswith("the median of 3 rounds")
    for key in ("served_ratio", "p50_ratio", "p99_ratio", "cpu_ratio"):
        values = sorted(r[key] for r in rounds)
        assert values[0] > 0 and median[key] == pytest.approx(values[1], rel=1e-3)  # the middle round's, not a mean
    assert done.stdout.count("\n  achieved rate ") == 2  # the tables are the first round's: one per server
    printed = re.findall(r"^ +([123]) +([0-9.]+)x +([0-9.]+)x +([0-9.]+)x +([0-9.]+)x$", done.stdout, re.M)
    assert [int(p[0]) for p in printed] == [1, 2, 3], done.stdout
    assert [float(p[4]) for p in printed] == pytest.approx([r["cpu_ratio"] for r in rounds], abs=0.0051)


def test_the_median_comparison_takes_each_figure_from_the_rounds_that_have_it():
    from neuronserve.bench.report import Comparison, median_comparison

    def cmp(served: float, p50: float | None, note: str = "") -> Comparison:
        return Comparison("plain", "basis", served, 100.0, served / 100.0, p50, None, 1.0, 0.5, 2.0, note)

    rounds = [cmp(150.0, 1.5), cmp(110.0, None, "plain: lower bound"), cmp(130.0, 1.1), cmp(120.0, 1.3)]
    median = median_comparison(rounds)
    assert median.served_rate_per_s == 125.0 and median.served_ratio == pytest.approx(1.25)
    assert median.p50_ratio == 1.3  # of the three rounds that have one
    assert median.p99_ratio is None and median.cpu_ratio == 2.0
    assert median.note == "the median of 4 rounds; plain: lower bound"


@pytest.mark.timeout(90)
def test_error_latencies_are_kept_per_status_and_merged_over_clients(refusing_server):
    """Refusals at the door and the client's deadline, in one run: a 1 s SIGSTOP makes the requests
    sent meanwhile hit the 300 ms client deadline or, reaching the server as it resumes, the 1 us queue bound."""
    timeout_ms = 300.0
    spec = LoadSpec(target=refusing_server.target, method="/neuronserve.v1.Scorer/Score", payloads=_score_payloads(refusing_server), duration_s=3.0,
                    warmup_s=0.5, rate_per_s=150.0, arrival="constant", clients=2, timeout_ms=timeout_ms)

    def stall():
        refusing_server.signal(signal.SIGSTOP)
        time.sleep(1.0)
        refusing_server.signal(signal.SIGCONT)

    result = run_load(spec, on_window_start=lambda: threading.Timer(0.5, stall).start())
    assert result.ok + result.failed == result.sent == 450
    assert set(result.error_latency_ms) == set(result.errors) == set(result.error_histograms)
    for status, dist in result.error_latency_ms.items():
        assert dist.count == result.errors[status]  # both client processes' histograms, merged
        assert dist.p50 <= dist.p99 <= dist.max
    timed_out, refused = result.error_latency_ms["DEADLINE_EXCEEDED"], result.error_latency_ms["RESOURCE_EXHAUSTED"]
    assert 0.5 * 150 <= timed_out.count <= 1.5 * 150  # about the second stopped
    assert timed_out.p50 >= timeout_ms  # measured from the schedule: never before the deadline
    # most refusals are the calls sent during the stop that reach the server as it resumes (one runs, the
    # rest meet the bound): answered before the deadline, so kept apart from the timed-out ones
    assert refused.p50 < timeout_ms
    assert result.to_dict()["error_latency_ms"]["DEADLINE_EXCEEDED"] == timed_out.to_dict()


@pytest.mark.timeout(90)
def test_the_report_shows_error_latencies_and_server_memory(refusing_server, tmp_path):
    import psutil

    out_json = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", refusing_server.target, "--peers", "32", "--rate", "300", "--duration-s", "2",
            "--warmup-s", "0.5", "--no-limits", "--quiet", "--json", str(out_json), "--metrics-url", refusing_server.metrics_url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=80)
    assert done.returncode == 0, done.stderr
    rss_now = psutil.Process(refusing_server.proc.pid).memory_info().rss
    report = json.loads(out_json.read_text())
    result = report["result"]
    assert result["errors"].get("RESOURCE_EXHAUSTED", 0) > 0
    assert {k: v["count"] for k, v in result["error_latency_ms"].items()} == result["errors"]
    refused = result["error_latency_ms"]["RESOURCE_EXHAUSTED"]
    assert set(refused) == {"count", "p50", "p90", "p99", "p99.9", "max", "mean"}  # full in the JSON
    compact = re.search(r"^  error latency ms  RESOURCE_EXHAUSTED: p50 ([0-9.]+)  p99 ([0-9.]+)  max ([0-9.]+)$", done.stdout, re.M)
    assert compact is not None, done.stdout  # compact in the table, to 2 places; the JSON keeps 3
    assert [float(x) for x in compact.groups()] == pytest.approx([refused["p50"], refused["p99"], refused["max"]], abs=0.006)
    memory = report["server_memory"]
    assert memory["source"].startswith("process_resident_memory_bytes")
    assert memory["rss_change_bytes"] == memory["rss_after_bytes"] - memory["rss_before_bytes"]
    assert 0.5 * rss_now <= memory["rss_after_bytes"] <= 1.5 * rss_now  # the server's RSS, not the client's or a stale value
    assert f"server RSS        {memory['rss_before_bytes'] / 2**20:.1f} MiB at the window's start" in done.stdout


@pytest.mark.timeout(120)
def test_against_a_sim_server_the_report_gives_its_cores_busy_fraction(artifact_dir, tmp_path):
    argv = _serve_argv(artifact_dir, "--cores", "2")
    sim = ServerProcess([*argv[: argv.index("--backend") + 1], "sim", *argv[argv.index("--backend") + 2 :]])
    try:
        out_json = tmp_path / "bench.json"
        bench = [sys.executable, "-m", "neuronserve.bench", "--target", sim.target, "--peers", "32", "--rate", "100", "--duration-s", "1",
                 "--warmup-s", "0.5", "--no-limits", "--quiet", "--json", str(out_json), "--metrics-url", sim.metrics_url]
        done = subprocess.run(bench, capture_output=True, text=True, timeout=80)
    finally:
        sim.stop()
    assert done.returncode == 0, done.stderr
    device = json.loads(out_json.read_text())["sim_device"]
    assert device["cores"] == 2 and device["device_seconds"] > 0
    assert 0 < device["busy_fraction"] <= 1.0  # two cores' device time over the window, never more than the wall time
    shown = re.search(r"device busy +([0-9.]+)% of 2 simulated cores' time", done.stdout)
    assert shown, done.stdout
    assert abs(float(shown[1]) - 100 * device["busy_fraction"]) <= 0.06  # one decimal in the table; the JSON keeps four


@pytest.mark.timeout(120)
def test_a_rate_list_runs_in_order_against_the_same_server(server, tmp_path):
    out_json = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "neuronserve.bench", "--target", server.target, "--peers", "32", "--rate", "60,120", "--arrival", "constant",
            "--duration-s", "1.5", "--warmup-s", "0.5", "--no-limits", "--quiet", "--json", str(out_json), "--metrics-url", server.metrics_url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    report = json.loads(out_json.read_text())
    assert report["mode"] == "rate-sequence" and "result" not in report
    runs = report["runs"]
    assert [r["result"]["offered_rate_per_s"] for r in runs] == [60.0, 120.0]
    assert [r["result"]["sent"] for r in runs] == [90, 180]  # constant arrivals: rate x duration each
    assert [r["result"]["warmup_s"] for r in runs] == [0.5, 0.0]  # only the first run warms up
    for run in runs:
        assert run["server_memory"]["rss_before_bytes"] > 0 and run["server_cpu"]["requests"] == run["result"]["sent"]
    # each run's server counters cover its own window: the second run (no warm-up) sees only its own requests
    # the window's first scrape lands a few requests (8 ms apart) into run 2, so it may miss those; run 1's 90 would show as -90
    assert 0 <= runs[1]["result"]["ok"] - runs[1]["server_batches"]["requests"] <= 30
    lines = done.stdout.splitlines()
    assert "run 1 of 2: 60.0/s" in lines and "run 2 of 2: 120.0/s, right after run 1" in lines
    summary = lines.index("the 2 runs in order, each right after the one before")
    assert [line.split()[:2] for line in lines[summary + 2 : summary + 4]] == [["1", "60.0"], ["2", "120.0"]]
    assert done.stdout.count("\n  achieved rate ") == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("peers, users", [(32, 8), (1000, 1)])
def test_the_compute_limit_runs_the_fused_graph_at_the_largest_bucket(artifact_dir, monkeypatch, peers, users):
    """B = 128 (the largest bucket) peer rows against ceil(128 / M) users, rounded up to a compiled user batch."""
    import neuronserve.backends as backends
    from neuronserve.bench.limits import compute_limit
    from neuronserve.bench.workloads import Workload, WorkloadSpec

    shapes = set()
    make_backend = backends.make_backend

    class Recording:
        def __init__(self, runner):
            self.runner = runner

        def __getattr__(self, name):
            return getattr(self.runner, name)

        def run(self, inputs):
            shapes.add((self.runner.stage,) + tuple(a.shape for a in inputs))
            return self.runner.run(inputs)

    def recording_backend(*args, **kwargs):
        engine = make_backend(*args, **kwargs)
        load = engine.load
        engine.load = lambda stage, cores: Recording(load(stage, cores))
        return engine

    monkeypatch.setattr(backends, "make_backend", recording_backend)
    workload = Workload(WorkloadSpec(name="score", peers=peers), "/x", (b"",), peers, 0, 0, 16, 16, 2)
    limit = compute_limit(artifact_dir, workload, seconds=0.2)
    assert shapes == {("twotower", (users, 16), (128, 16), (128,))}
    assert f"fused twotower graph at batch 128 ({users} user row" in limit.how
    assert limit.pairs_per_s > 0 and limit.requests_per_s == pytest.approx(limit.pairs_per_s / peers)


@pytest.mark.timeout(60)
def test_the_compute_limit_runs_three_stages_without_the_fused_graph(artifact_dir, monkeypatch):
    from neuronserve.artifact import Manifest
    from neuronserve.bench.limits import compute_limit
    from neuronserve.bench.workloads import Workload, WorkloadSpec

    monkeypatch.setattr(Manifest, "has_fused_stage", property(lambda self: False))  # an artifact compiled before the fused graph
    limit = compute_limit(artifact_dir, Workload(WorkloadSpec(name="score", peers=32), "/x", (b"",), 32, 0, 0, 16, 16, 2), seconds=0.2)
    assert "three stages" in limit.how and "fused" not in limit.how.replace("no fused", "")
    assert limit.pairs_per_s > 0


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--metrics-url", "metrics"], ["--metrics-url", "not an http URL"]),
        (["--metrics-url", "http://127.0.0.1:abc/metrics"], ["--metrics-url", "not a URL"]),
        (["--json", "/nonexistent-dir/out.json"], ["--json", "/nonexistent-dir", "cannot write there", "No such file"]),
        (["--json", "/tmp"], ["--json /tmp", "cannot write there", "Is a directory"]),
        (["--limit-s", "0"], ["--limit-s", "> 0"]),
        (["--latency-bound-ms", "0"], ["--latency-bound-ms must be > 0"]),
        (["--duration-s", "-1"], ["--duration-s must be > 0"]),
        (["--peers", "0"], ["--peers must be >= 1"]),
        (["--target", "notaport"], ["--target 'notaport'", "HOST:PORT"]),
        (["--artifact", "/nonexistent-artifact"], ["/nonexistent-artifact", "does not exist"]),
        (["--reference", "plain"], ["--reference plain needs --artifact"]),
        (["--reference", "plain", "--workload", "score-ids", "--artifact", "/nonexistent-artifact"], ["--reference plain", "score or oip"]),
        (["--reference", "probe", "--workload", "score", "--artifact", "/nonexistent-artifact"], ["--reference probe", "--workload oip, not score"]),
        (["--reference", "plain", "--no-limits", "--artifact", "/nonexistent-artifact"], ["/nonexistent-artifact", "does not exist"]),
        (["--rate", "1800,fast"], ["--rate", "1800,fast", "separated by commas"]),
        (["--rate", "1800,0"], ["--rate must be > 0"]),
        (["--reference", "plain", "--rate", "10,20", "--artifact", "/nonexistent-artifact"], ["--reference plain", "one --rate"]),
        (["--rounds", "2"], ["--rounds", "give --reference plain"]),
        (["--rounds", "0", "--reference", "plain"], ["--rounds must be >= 1"]),
        (["--workload", "score-ids", "--cached-peers", "10"], ["--peers 1000", "exceed", "10 peers: --cached-peers"]),
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


def test_the_switch_summary_counts_version_changes_in_send_order_and_failures():
    from neuronserve.bench.switches import Reply, Switch, _summarise

    replies = [Reply(0.1 * i, 5.0, "OK", 1) for i in range(10)]  # steady: version 1
    replies += [Reply(1.5, 40.0, "OK", 2), Reply(1.2, 30.0, "OK", 1), Reply(1.6, 6.0, "UNAVAILABLE", 0)]
    summary = _summarise(replies, [Switch(2, 1.1, 1.4)])
    assert summary.version_changes == 1  # sent in order: 1 ... 1 (at 1.2 s), then 2 (at 1.5 s)
    assert summary.failures == {"UNAVAILABLE": 1} and not summary.ok
    assert summary.steady_p99_ms == 5.0 and summary.loading_p99_ms == 30.0 and summary.after_p99_ms == 40.0
    assert summary.outside_p99_ms == 5.0  # the switch's load and the second after it are left out
    assert summary.p99_over_steady == round(summary.all_p99_ms / 5.0, 2) > 1
    back_and_forth = replies[:3] + [Reply(0.35, 5.0, "OK", 2)]  # a version 2 reply between version 1 replies
    assert _summarise(back_and_forth, [Switch(2, 0.3, 0.31)]).version_changes == 1
    assert _summarise(back_and_forth + [Reply(0.4, 5.0, "OK", 1)], [Switch(2, 0.3, 0.31)]).version_changes == 2
    warm = _summarise([Reply(0.0, 900.0, "OK", 1)] + replies, [Switch(2, 1.1, 1.4)], warmup_s=0.05)
    assert warm.steady_p99_ms == 5.0 and warm.all_p99_ms < 100  # the warm-up's 900 ms left out
    assert warm.requests == summary.requests + 1  # ... but counted, with the failures and version changes
