"""/metrics through prometheus-client, off the serving loop: the exposition keeps every name, type and
label; the latency histogram; the render bound (one render at a time, min_interval_s apart, concurrent
scrapes share it, waiting scrapes past max_waiting get 503); a scrape flood against a live server while
gRPC calls all succeed; the pool's merge through the same server; every metric the Grafana dashboard
(deploy/dashboard.json) queries exists on a live server's /metrics. No wall-clock speed is asserted:
bounds are counted (renders against elapsed time is an upper bound a slow machine only lowers)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuronserve.config import ServerConfig
from neuronserve.metric_families import FAMILIES, LATENCY_BUCKETS_S
from neuronserve.metrics import Metrics
from neuronserve.metrics_http import MetricsServer
from neuronserve.pool_metrics import PoolMetrics
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from support import LoopThread, wait_until

pytestmark = pytest.mark.timeout(120)

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "dashboard.json"


# ---- plumbing -----------------------------------------------------------------------------------


def get(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return response.read().decode()


def values(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value, through prometheus-client's parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples
    }


def sample_names(text: str) -> set[str]:
    """Every sample name on a page, as written (a counter's name as it is: nv_inference_count, x_total)."""
    return {re.split(r"[{ ]", line, 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def score_request(seed: int, peers: int = 4) -> pb.ScoreRequest:
    rng = np.random.default_rng(seed)

    def tensor(rows: int) -> pb.Tensor:
        values = rng.standard_normal((rows, 16)).astype("<f4")
        return pb.Tensor(data=values.tobytes(), shape=values.shape)

    return pb.ScoreRequest(user_features=tensor(1), peer_features=tensor(peers))


@pytest.fixture(scope="module")
def live(small_artifact):
    """A real server (cpu backend, 2 cores) on 127.0.0.1, gRPC and /metrics on free ports, its serving loop
    on a thread of its own; a channel to it."""
    loop = LoopThread()
    server = Server(ServerConfig(artifact=str(small_artifact.directory), port=0, metrics_port=0, backend="cpu", cores=2))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield SimpleNamespace(server=server, scorer=pb_grpc.ScorerStub(channel), loop=loop)
    channel.close()
    loop.run(server.stop(5.0))
    loop.close()


# ---- the exposition -----------------------------------------------------------------------------


def busy_metrics() -> Metrics:
    metrics = Metrics(version="v1", batch_buckets=(1, 4, 16))
    for duration in (0.0004, 0.004, 0.004, 0.09, 0.2, 2.0):
        metrics.request("twotower", "OK", duration)
    metrics.request("twotower", "INVALID_ARGUMENT", 0.001)
    metrics.execution("twotower", rows=3, requests=1, compute_s=0.001)
    metrics.execution("twotower", rows=40, requests=2, compute_s=0.002)
    return metrics


def test_the_page_keeps_every_name_type_and_label_and_triton_counters_have_no_total():
    """prometheus-client writes the page; Triton's counters keep their names (no _total on any line),
    ours keep theirs; each family's TYPE is FAMILIES'; histograms are self-consistent."""
    text = busy_metrics().render()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for name, kind in types.items():
        assert FAMILIES[name][0] == kind, name
    assert types["nv_inference_request_success"] == "counter" and "nv_inference_request_success_total" not in text
    assert 'nv_inference_request_failure{model="twotower",reason="INVALID_ARGUMENT",version="v1"} 1.0' in text
    assert 'neuronserve_batch_rows_bucket{le="4",model="twotower",version="v1"} 1.0' in text
    assert 'neuronserve_batch_rows_bucket{le="+Inf",model="twotower",version="v1"} 2.0' in text
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_threads"} <= sample_names(text)
    parsed = values(text)  # prometheus-client's own parser reads it back
    model = (("model", "twotower"), ("version", "v1"))
    assert parsed[("nv_inference_count_total", model)] == 43  # the parser names counter samples *_total


def test_request_latency_histogram_buckets_successes_only():
    """neuronserve_request_duration_seconds: each successful request in the first bucket >= its time,
    cumulative buckets, _count = successes, _sum = their seconds; a failure is not in it."""
    parsed = values(busy_metrics().render())
    model = (("model", "twotower"), ("version", "v1"))

    def bucket(le: str) -> float:
        return parsed[("neuronserve_request_duration_seconds_bucket", tuple(sorted(model + (("le", le),))))]

    assert (bucket("0.0005"), bucket("0.005"), bucket("0.1"), bucket("0.25"), bucket("1.0"), bucket("+Inf")) == (1, 3, 4, 5, 5, 6)
    assert parsed[("neuronserve_request_duration_seconds_count", model)] == 6
    assert parsed[("neuronserve_request_duration_seconds_sum", model)] == pytest.approx(0.0004 + 0.008 + 0.09 + 0.2 + 2.0)
    assert len(LATENCY_BUCKETS_S) == len(set(LATENCY_BUCKETS_S)) and LATENCY_BUCKETS_S[0] == 0.0005 and LATENCY_BUCKETS_S[-1] == 1.0


def test_rendering_on_another_thread_while_the_writer_adds_models_and_reasons():
    """The render reads what the loop thread writes: new models and failure reasons appearing during
    renders never break one (copy on write), and the last page counts everything."""
    metrics = Metrics(version="v1", batch_buckets=(1, 4))
    done = threading.Event()
    errors: list[BaseException] = []

    def render_loop() -> None:
        while not done.is_set():
            try:
                metrics.render()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    reader = threading.Thread(target=render_loop)
    reader.start()
    try:
        for i in range(3000):
            metrics.request(f"m{i % 300}", "OK" if i % 2 else f"REASON_{i % 97}", 0.001)
            metrics.execution(f"m{i % 300}", rows=1, requests=1, compute_s=0.0)
    finally:
        done.set()
        reader.join(30)
    assert not errors, errors
    parsed = values(metrics.render())
    assert sum(v for (name, _), v in parsed.items() if name == "nv_inference_request_success_total") == 1500
    assert sum(v for (name, _), v in parsed.items() if name == "nv_inference_request_failure_total") == 1500


# ---- the server's render bound ---------------------------------------------------------------------


class GatedSource:
    """A source whose render waits for `gate` (in a worker thread: the metrics loop stays free)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.renders = 0

    async def render(self) -> str:
        self.renders += 1
        await asyncio.to_thread(self.gate.wait, 30)
        return f"# page {self.renders}\n"


def raw_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
        return reply


def test_waiting_scrapes_past_the_bound_get_503_at_once_and_the_rest_share_renders():
    """One render at a time; a scrape arriving during it waits for the next; past max_waiting a scrape is
    answered 503 without waiting; after the gate opens the waiting ones are answered 200."""
    source = GatedSource()
    server = MetricsServer(source, min_interval_s=0.0, max_waiting=2)
    port = asyncio.run(server.start("127.0.0.1", 0))
    replies: dict[str, bytes] = {}
    try:
        first = threading.Thread(target=lambda: replies.__setitem__("first", raw_get(port)))
        first.start()
        wait_until(lambda: source.renders == 1)  # rendering, held at the gate
        second = threading.Thread(target=lambda: replies.__setitem__("second", raw_get(port)))
        second.start()
        wait_until(lambda: server._waiting == 2)
        third = raw_get(port)  # answered while the other two still wait
        assert third.startswith(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n")
        source.gate.set()
        first.join(20)
        second.join(20)
        assert replies["first"].startswith(b"HTTP/1.1 200 OK") and replies["first"].endswith(b"# page 1\n")
        assert replies["second"].startswith(b"HTTP/1.1 200 OK") and replies["second"].endswith(b"# page 2\n")  # rendered after it came
        assert server.stats() == type(server.stats())(renders=2, rendered=2, shared=0, rejected=1)
    finally:
        source.gate.set()
        asyncio.run(server.close())


def test_concurrent_scrapes_share_one_render():
    """While a render runs, every scrape that arrives joins the same next render."""
    source = GatedSource()
    server = MetricsServer(source, min_interval_s=0.0)
    port = asyncio.run(server.start("127.0.0.1", 0))
    replies: list[bytes] = []
    try:
        threads = [threading.Thread(target=lambda: replies.append(raw_get(port))) for _ in range(6)]
        threads[0].start()
        wait_until(lambda: source.renders == 1)
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: server._waiting == 6)
        source.gate.set()
        for thread in threads:
            thread.join(20)
        assert sorted(reply.rsplit(b"\n", 2)[-2] for reply in replies) == [b"# page 1"] + [b"# page 2"] * 5
        assert server.stats() == type(server.stats())(renders=2, rendered=2, shared=4, rejected=0)
    finally:
        source.gate.set()
        asyncio.run(server.close())


def test_a_taken_port_is_an_oserror_and_close_ends_the_thread():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MetricsServer(Metrics(version="v1", batch_buckets=(1,)))
        with pytest.raises(OSError):
            asyncio.run(server.start("127.0.0.1", taken.getsockname()[1]))
    assert server._thread is None  # stopped by start() itself
    server = MetricsServer(Metrics(version="v1", batch_buckets=(1,)))
    port = asyncio.run(server.start("127.0.0.1", 0))
    thread = server._thread
    assert "process_threads" in get(port)
    asyncio.run(server.close())
    assert thread is not None and not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_on_the_ipv6_wildcard_the_page_answers_over_ipv4_too():
    """--host ::, as gRPC's port there: IPv6 and IPv4 clients alike (asyncio alone listens IPv6 only)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = MetricsServer(Metrics(version="v1", batch_buckets=(1,)))
    port = asyncio.run(server.start("::", 0))
    try:
        for address in ("127.0.0.1", "[::1]"):
            with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=20) as response:
                assert response.status == 200 and b"process_threads" in response.read(), address
    finally:
        asyncio.run(server.close())


# ---- a live server ----------------------------------------------------------------------------------


def test_the_render_runs_on_the_metrics_thread_and_a_scrape_sees_the_requests_before_it(live):
    threads: set[str] = set()
    live.server.metrics.add_collector(lambda: threads.add(threading.current_thread().name) or [])
    before = values(get(live.server.metrics_port))
    live.scorer.Score(score_request(1), timeout=10)
    after = values(get(live.server.metrics_port))
    model = (("model", "twotower"), ("version", live.server.manifest.model_version))
    assert after[("nv_inference_request_success_total", model)] == before.get(("nv_inference_request_success_total", model), 0) + 1
    assert after[("neuronserve_request_duration_seconds_count", model)] == after[("nv_inference_request_success_total", model)]
    assert threads == {"metrics-http"}  # never the serving loop's thread


def test_a_scrape_flood_is_bounded_in_renders_and_grpc_requests_all_succeed(live):
    """16 threads scrape back to back for ~2 s while a client calls Score: every scrape is answered 200,
    every Score succeeds, and renders are at most one per min_interval_s (plus the first and the last):
    the rest of the scrapes shared a render."""
    port, interval = live.server.metrics_port, MetricsServer.MIN_INTERVAL_S
    stop = threading.Event()
    scrapes: list[int] = []
    failures: list[str] = []
    calls: list[int] = []

    def scraper() -> None:
        count = 0
        while True:
            try:
                get(port)
                count += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"scrape: {exc!r}")
            if stop.is_set() and count >= 2:
                break
        scrapes.append(count)

    def caller() -> None:
        ok, seed = 0, 0
        while not stop.is_set() or ok < 20:
            seed += 1
            try:
                reply = live.scorer.Score(score_request(seed), timeout=10)
                assert list(reply.scores.shape) == [4, 3]
                ok += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"Score: {exc!r}")
        calls.append(ok)

    start = time.monotonic()
    before = values(get(port))
    threads = [threading.Thread(target=scraper) for _ in range(16)] + [threading.Thread(target=caller)]
    for thread in threads:
        thread.start()
    wait_until(lambda: time.monotonic() - start >= 2.0, timeout_s=30)  # the flood's length
    stop.set()
    for thread in threads:
        thread.join(60)
    after = values(get(port))
    elapsed = time.monotonic() - start

    assert not failures, failures[:5]
    assert len(scrapes) == 16 and calls and calls[0] >= 20
    renders = after[("neuronserve_metrics_renders_total", ())] - before[("neuronserve_metrics_renders_total", ())]
    assert renders <= elapsed / interval + 2, (renders, elapsed)

    def scraped(result: str) -> float:
        key = ("neuronserve_metrics_scrapes_total", (("result", result),))
        return after[key] - before[key]

    assert scraped("rendered") == renders  # each render was started by one scrape ...
    assert scraped("rendered") + scraped("shared") == sum(scrapes) + 1  # ... every other scrape shared one
    assert sum(scrapes) > renders and scraped("rejected") == 0  # 16 waiting < max_waiting


# ---- the pool's merge through the same server --------------------------------------------------------


def test_the_pool_merges_a_workers_page_from_its_metrics_server():
    """PoolMetrics served by MetricsServer fetches a worker's private /metrics on the metrics loop and
    merges it: the latency histogram summed, the worker's own /metrics counters labelled with it."""
    worker_metrics = Metrics(version="v1", batch_buckets=(1, 4))
    worker_metrics.request("twotower", "OK", 0.003)
    worker_server = MetricsServer(worker_metrics)
    worker_port = asyncio.run(worker_server.start("127.0.0.1", 0))
    worker = SimpleNamespace(plan=SimpleNamespace(index=0), ready=SimpleNamespace(metrics_port=worker_port), restarts=0)
    pool_server = MetricsServer(PoolMetrics(SimpleNamespace(workers=[worker])))
    pool_port = asyncio.run(pool_server.start("127.0.0.1", 0))
    try:
        parsed = values(get(pool_port))
    finally:
        asyncio.run(pool_server.close())
        asyncio.run(worker_server.close())
    model = (("model", "twotower"), ("version", "v1"))
    assert parsed[("neuronserve_request_duration_seconds_bucket", tuple(sorted(model + (("le", "0.003"),))))] == 1
    assert parsed[("neuronserve_worker_up", (("worker", "0"),))] == 1
    assert parsed[("neuronserve_metrics_renders_total", (("worker", "0"),))] == 1
    assert parsed[("neuronserve_metrics_renders_total", (("worker", "supervisor"),))] == 1
    # the workers are the supervisor's children: their CPU is in their own process_cpu_seconds_total, so
    # the supervisor exports none as child CPU (the benchmark sums the two)
    assert ("neuronserve_child_cpu_seconds_total", (("worker", "supervisor"),)) not in parsed
    assert ("process_cpu_seconds_total", (("worker", "supervisor"),)) in parsed


# ---- the Grafana dashboard ----------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "stddev", "topk", "bottomk", "quantile", "by", "without", "on", "ignoring",
    "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges and label lists are removed, that are not functions, keywords or numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if word.lower() in PROMQL_WORDS or expr[match.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def test_the_promql_name_extractor():
    expr = 'histogram_quantile(0.99, sum by (le, model) (rate(a_bucket{instance=~"$i", le="0.1"}[$__rate_interval]))) / 1e6 + on(x) b_total'
    assert metric_names(expr) == {"a_bucket", "b_total"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets (nested rows too) and template variables
    (label_values(metric, label): the metric part)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            exprs.append(match.group(1) if match else query)
    return exprs


def test_every_metric_the_dashboard_queries_exists_on_a_live_server(live):
    """Each panel's names appear on /metrics after a success and a failure (requests, errors by reason,
    latency, batches, queue, cores, cache, process, /metrics itself)."""
    live.scorer.Score(score_request(7), timeout=10)
    bad = pb.ScoreRequest(user_features=score_request(7).user_features)  # no peers: INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        live.scorer.Score(bad, timeout=10)
    exposed = sample_names(get(live.server.metrics_port))
    queries = dashboard_queries()
    assert len(queries) >= 30
    queried = set()
    for expr in queries:
        names = metric_names(expr)
        assert names, expr
        queried |= names
    assert not queried - exposed, sorted(queried - exposed)
    assert {"neuronserve_request_duration_seconds_bucket", "nv_inference_request_failure", "neuronserve_core_group_busy_seconds_total",
            "nv_inference_pending_request_count", "neuronserve_batch_rows_bucket", "neuronserve_cache_hits_total"} <= queried


def test_the_pools_summed_counters_never_step_down_when_a_worker_is_missing_or_restarts():
    """Worker 1 misses a scrape, then comes back as a new process counting from zero: the summed
    request counter keeps what it had counted; a gauge and a per-worker family are not carried."""
    from neuronserve.metric_families import Sample
    from neuronserve.pool_metrics import Continuity, merge

    def page(start_s: float, ok: float, queue: float) -> list:
        model = (("model", "twotower"), ("version", "1"))
        return [
            Sample("process_start_time_seconds", (), start_s),
            Sample("nv_inference_request_success", model, ok),
            Sample("neuronserve_queue_rows", (("model", "twotower"),), queue),
        ]

    def summed(per_worker: dict) -> tuple:
        merged = merge(continuity.apply(per_worker))
        ok = sum(s.value for s in merged if s.name == "nv_inference_request_success")
        return ok, sorted(s.value for s in merged if s.name == "neuronserve_queue_rows")

    continuity = Continuity()
    assert summed({0: page(100.0, 10, 1), 1: page(100.0, 5, 2)}) == (15, [1, 2])
    assert summed({0: page(100.0, 12, 1)}) == (17, [1])  # worker 1 missing: its 5 still count
    assert summed({0: page(100.0, 12, 1), 1: page(200.0, 2, 3)}) == (19, [1, 3])  # a new process: 5 + 2
    assert summed({0: page(100.0, 13, 1), 1: page(200.0, 4, 0)}) == (22, [0, 1])


def test_docs_metrics_lists_every_family_with_its_type_and_no_other():
    table = Path(__file__).resolve().parents[1].joinpath("docs", "metrics.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (counter|gauge|histogram) \|", table, re.MULTILINE))
    assert rows == {name: kind for name, (kind, _) in FAMILIES.items()}
