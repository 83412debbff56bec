"""Prometheus metrics: the counters the serving path updates, and their exposition through prometheus-client.

Beside the request path, not on it: the service records each request's outcome (`request`) and the
runtime each executed batch (`execution`): plain-Python increments on the event loop thread (a few
hundred nanoseconds, no lock); everything else (batcher queues, core groups, the embedding cache, the
process) is read from its owner's `stats()` when Prometheus scrapes. At a scrape a custom prometheus-client
Collector (`MetricsCollector`, in a private CollectorRegistry per Metrics) turns them into metric families
and prometheus-client's `generate_latest` writes the text format. The scrape runs on the /metrics thread
(metrics_http.py), not the serving loop: so the structures it reads are either ints and floats (a read is
atomic under the GIL) or copied on write (a new model, a new failure reason, a new collector replaces its
dict or tuple, never resizes one a reader may be iterating). Every metric name is in FAMILIES below.

The metric families and their semantics (Triton's names where they exist): metric_families.py.

ModelStatistics (Triton's statistics extension, `statistics()`) differs from the Prometheus counters in
one way, as Triton's does for a model with max_batch_size 0: inference_count counts requests, not rows.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

try:  # prometheus-client >= 0.14; before it a collector is any object with collect()
    from prometheus_client.registry import Collector as _CollectorBase
except ImportError:  # pragma: no cover
    _CollectorBase = object  # type: ignore[assignment,misc]

from neuronserve.metric_families import FAMILIES, LATENCY_BUCKETS_S, Collector, Labels, Sample
from neuronserve.metric_sources import batcher_samples, process_samples
from neuronserve.versions import ROUTED

log = logging.getLogger(__name__)


# The render pauses this long between families (about 45): the GIL is held ~25 us at a time, not the
# whole 1-2 ms render, so the serving loop waits less for it (a render takes ~5 ms more, on the /metrics
# thread). time.sleep(0) releases the GIL but the renderer usually takes it straight back.
GIL_PAUSE_S = 0.0001

# Triton's counters, named without `_total` (see render_samples).
_BARE_COUNTERS = tuple(
    name for name, (kind, _) in FAMILIES.items() if kind == "counter" and not name.endswith("_total")
)
_FAMILY_CLASSES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}


@dataclass(frozen=True)
class ModelStats:
    """One model's cumulative counters with Triton's ModelStatistics semantics for a model whose
    config says max_batch_size 0 (a request is one inference, whatever its rows).

    Counts: `success` is also the count of queue, compute_input, compute_infer and compute_output (one
    per successful request, so they are equal in every snapshot, as perf_analyzer requires) and the
    inference_count; `executions` counts batch executions. Durations are summed over requests: queue
    from the batcher, compute_* from each executed batch charged to every request in it."""

    model: str
    last_request_ms: int  # wall clock of the last answered request, ms since the epoch; 0: none yet
    success: int
    success_s: float  # request durations in the server
    failure: int
    failure_s: float
    queue_s: float  # batch start - arrival, summed over requests that reached a batch
    compute_input_s: float
    compute_infer_s: float
    compute_output_s: float
    inferences: int  # Triton's inference_count: successful requests (max_batch_size 0)
    executions: int  # batches executed
    rows: int  # rows in executed batches (nv_inference_count on /metrics)


class _ModelCounters:
    """Cumulative counters of one model (version fixed per server). Written on the event loop thread
    only; read by the /metrics thread: `failure` is replaced, not grown, when a new reason appears."""

    def __init__(self, batch_buckets: int) -> None:
        self.success = 0
        self.failure: dict[str, int] = {}
        self.request_s = 0.0
        self.failure_s = 0.0
        self.last_request_ms = 0  # wall clock, milliseconds since the epoch
        self.rows = 0  # in executed batches
        self.executions = 0
        self.input_s = 0.0  # compute_input, compute_infer, compute_output: summed over requests
        self.compute_s = 0.0
        self.output_s = 0.0
        self.batch_counts = [0] * (batch_buckets + 1)  # per bucket, not cumulative; last: +Inf
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # successful requests, likewise


class Metrics:
    """The counters the service and runtime update (on the event loop thread), plus collectors read at
    scrape time, exposed through a private prometheus-client CollectorRegistry (`registry`).

    `batch_buckets`: upper bounds of the neuronserve_batch_rows histogram (the compiled buckets).
    `render()` is for the /metrics thread (it pauses between families, see GIL_PAUSE_S): it reads the
    counters without stopping their writers."""

    def __init__(self, *, version: str, batch_buckets: Sequence[int]) -> None:
        self.version = version
        self._bounds: tuple[int, ...] = tuple(sorted(set(int(b) for b in batch_buckets)))
        self._models: dict[str, _ModelCounters] = {}  # copied on write (a new model)
        # (model, integer version, arm, status) -> requests: neuronserve_requests_total; copied on write
        self._routed: dict[tuple[str, int, str, str], int] = {}
        self._collectors: tuple[Collector, ...] = (process_samples,)  # copied on write
        self._batcher_stats: dict[str, Callable] = {}  # copied on write
        self._write = threading.Lock()  # the rare structural changes above
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self))

    def _model(self, model: str) -> _ModelCounters:
        counters = self._models.get(model)
        if counters is None:
            with self._write:
                counters = self._models.get(model)
                if counters is None:
                    counters = _ModelCounters(len(self._bounds))
                    self._models = {**self._models, model: counters}
        return counters

    def request(self, model: str, status: str, duration_s: float) -> None:
        """One request answered: status "OK" or the gRPC status name it failed with. A successful one
        also goes into neuronserve_request_duration_seconds. A request routed to a version (its
        versions.Route in ROUTED, this task's) is counted by version and arm too."""
        route = ROUTED.get()
        if route is not None:
            ROUTED.set(None)
            key = (model, route.version, route.arm, status)
            if key in self._routed:
                self._routed[key] += 1
            else:  # bounded: the served versions x 4 arms x statuses
                self._routed = {**self._routed, key: 1}
        counters = self._models.get(model) or self._model(model)
        counters.last_request_ms = int(time.time() * 1e3)
        if status == "OK":
            counters.success += 1
            counters.request_s += duration_s
            counters.latency_counts[bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1
        else:
            failure = counters.failure
            if status in failure:
                failure[status] += 1
            else:  # a new reason: a new dict, so a reader iterating the old one is undisturbed
                counters.failure = {**failure, status: 1}
            counters.failure_s += duration_s

    def execution(
        self, model: str, *, rows: int, requests: int, compute_s: float, input_s: float = 0.0, output_s: float = 0.0
    ) -> None:
        """One batch of `rows` rows for `requests` requests (each part of a split request counts) ran on
        the device in `compute_s` seconds, after `input_s` preparing its inputs (gather, pad, convert)
        and before `output_s` extracting its outputs (unpad, split); each request is charged all three."""
        counters = self._models.get(model) or self._model(model)
        counters.executions += 1
        counters.rows += rows
        counters.compute_s += compute_s * requests
        counters.input_s += input_s * requests
        counters.output_s += output_s * requests
        counters.batch_counts[bisect_left(self._bounds, rows)] += 1

    def outcomes(self) -> dict[str, int]:
        """Requests answered so far, by status ("OK" or a gRPC status name), over every model."""
        totals: dict[str, int] = {}
        for counters in self._models.values():
            for status, count in [("OK", counters.success), *counters.failure.items()]:
                if count:
                    totals[status] = totals.get(status, 0) + count
        return totals

    def add_collector(self, collector: Collector) -> None:
        """`collector()` -> Samples, called at every scrape (on the /metrics thread: it must be safe to
        call from another thread than its owner's). A collector that raises loses its samples for that
        scrape only (logged)."""
        with self._write:
            self._collectors = self._collectors + (collector,)

    def add_batcher(self, model: str, stats: Callable) -> None:
        """`model`'s batcher: `stats()` returns its batcher.BatcherStats, read at scrape and by statistics()."""
        with self._write:
            self._batcher_stats = {**self._batcher_stats, model: stats}
        self.add_collector(lambda: batcher_samples(model, self.version, stats()))

    def statistics(self, model: str) -> ModelStats:
        """`model`'s cumulative counters, as Triton's ModelStatistics reports them (zeros if unseen)."""
        c = self._models.get(model) or _ModelCounters(len(self._bounds))
        batcher = self._batcher_stats[model]() if model in self._batcher_stats else None
        return ModelStats(
            model=model,
            last_request_ms=c.last_request_ms,
            success=c.success,
            success_s=c.request_s,
            failure=sum(c.failure.values()),
            failure_s=c.failure_s,
            queue_s=batcher.queue_s_total if batcher is not None else 0.0,
            compute_input_s=c.input_s,
            compute_infer_s=c.compute_s,
            compute_output_s=c.output_s,
            inferences=c.success,
            executions=c.executions,
            rows=c.rows,
        )

    def samples(self) -> list[Sample]:
        """Every sample now: the counters, then each collector's (a failing collector is logged and skipped)."""
        out: list[Sample] = []
        batch_le = [str(b) for b in self._bounds] + ["+Inf"]
        latency_le = [_go_float(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for model, c in sorted(self._models.items()):
            mv: Labels = (("model", model), ("version", self.version))
            out.append(Sample("nv_inference_request_success", mv, c.success))
            out += [
                Sample("nv_inference_request_failure", mv + (("reason", r),), n) for r, n in sorted(c.failure.items())
            ]
            out += [
                Sample("nv_inference_count", mv, c.rows),
                Sample("nv_inference_exec_count", mv, c.executions),
                Sample("nv_inference_request_duration_us", mv, c.request_s * 1e6),
                Sample("nv_inference_compute_input_duration_us", mv, c.input_s * 1e6),
                Sample("nv_inference_compute_infer_duration_us", mv, c.compute_s * 1e6),
                Sample("nv_inference_compute_output_duration_us", mv, c.output_s * 1e6),
            ]
            out += _histogram(
                "neuronserve_request_duration_seconds", mv, latency_le, list(c.latency_counts), c.request_s
            )
            out += _histogram("neuronserve_batch_rows", mv, batch_le, list(c.batch_counts), c.rows)
        out += [
            Sample("neuronserve_requests_total", (("model", m), ("version", str(v)), ("arm", a), ("status", s)), n)
            for (m, v, a, s), n in sorted(self._routed.items())
        ]
        for collector in self._collectors:
            try:
                out.extend(_collect(collector))
            except Exception:  # a broken collector must not take /metrics down
                log.exception("metrics collector %r failed", collector)
        return out

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4), written by prometheus-client."""
        return _exposition(generate_latest(self.registry))


class MetricsCollector(_CollectorBase):
    """prometheus-client's view of a Metrics: its samples as Counter/Gauge/HistogramMetricFamily."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        for family in to_families(self.metrics.samples()):
            yield family  # generate_latest writes it before asking for the next one ...
            time.sleep(GIL_PAUSE_S)  # ... and between families a serving loop waiting for the GIL takes it

    def describe(self) -> Iterable[Metric]:
        return []  # names vary with the models seen: not checked for clashes at register()


def _histogram(name: str, labels: Labels, le: list[str], counts: list[int], total: float) -> list[Sample]:
    """A histogram's lines from per-bucket (not cumulative) counts: _count is their sum, so the page is
    self-consistent (+Inf bucket == _count) even while a writer increments them."""
    out: list[Sample] = []
    running = 0
    for bound, count in zip(le, counts, strict=False):
        running += count
        out.append(Sample(name, labels + (("le", bound),), running, "_bucket"))
    out.append(Sample(name, labels, total, "_sum"))
    out.append(Sample(name, labels, running, "_count"))
    return out


def _collect(collector: Collector) -> list[Sample]:
    """collector() on the /metrics thread. An owner's stats() iterating a dict its thread resized meanwhile
    raises RuntimeError ("dictionary changed size"): read again (twice), the next read sees a settled dict."""
    for attempt in range(3):
        try:
            return list(collector())
        except RuntimeError:
            if attempt == 2:
                raise
    return []  # pragma: no cover


def _go_float(value: float) -> str:
    """A bucket bound as prometheus-client's own histograms write it (Go's formatting)."""
    from prometheus_client.utils import floatToGoString

    return floatToGoString(value)


def to_families(samples: Iterable[Sample]) -> list[Metric]:
    """Samples grouped into prometheus-client metric families (in order of first appearance), each of its
    FAMILIES type; sample names are the family name plus the suffix (a counter's `_total` is in its name)."""
    families: dict[str, Metric] = {}
    for s in samples:
        family = families.get(s.name)
        if family is None:
            kind, help_text = FAMILIES[s.name]
            family = families[s.name] = _FAMILY_CLASSES[kind](s.name, help_text)
        family.add_sample(s.name + s.suffix, dict(s.labels), float(s.value))
    return list(families.values())


class _Families:
    """A one-shot collector (generate_latest takes anything with collect())."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render_samples(samples: Iterable[Sample]) -> str:
    """Samples in the Prometheus text exposition format (version 0.0.4), grouped by family, written by
    prometheus-client's generate_latest."""
    return _exposition(generate_latest(_Families(to_families(samples))))  # type: ignore[arg-type]


def _exposition(text: bytes) -> str:
    """generate_latest's page with Triton's counter names on their HELP and TYPE lines: prometheus-client
    writes `# TYPE nv_inference_count_total counter` above samples named nv_inference_count."""
    page = text.decode("utf-8")
    for name in _BARE_COUNTERS:
        page = page.replace(f"# HELP {name}_total ", f"# HELP {name} ", 1).replace(
            f"# TYPE {name}_total counter\n", f"# TYPE {name} counter\n", 1
        )
    return page
