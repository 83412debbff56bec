"""Prometheus text metrics on GET /metrics, served by a tiny asyncio HTTP server (no dependency).

Beside the request path, not on it: the service records each request's outcome (`request`) and the
runtime each executed batch (`execution`), cheap counter updates on the event loop thread; everything
else (batcher queues, core groups, the embedding cache, the process) is read from its owner's
`stats()` by a collector when Prometheus scrapes. Every metric name is in FAMILIES below.

Triton's names and semantics where they exist (cumulative counters, per model and version; `model` is
twotower (Score, OIP twotower), user_tower / peer_tower (UpsertEmbeddings, OIP towers) or
twotower_cached (ScoreByIds, ScoreMatrix: cached tower outputs); `version` is the artifact's version,
the content hash unless compile named one):
  nv_inference_request_success / nv_inference_request_failure{reason}  requests answered OK / not;
      reason is the gRPC status name (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, CANCELLED, ...)
  nv_inference_count            inferences (rows: peers scored, tower rows) in executed batches
  nv_inference_exec_count       executions (batches; a cached-embedding request is one execution)
  nv_inference_request_duration_us       summed over successful requests, in the server
  nv_inference_queue_duration_us         summed over requests: batch start - arrival (the batcher's)
  nv_inference_compute_input_duration_us / _infer_ / _output_   summed over requests: the time the batch
      each was in spent preparing inputs / running / extracting outputs (every request of a batch is
      charged its batch's times, as Triton charges the requests of a dynamic batch)
  nv_inference_pending_request_count     requests queued now (gauge)
neuronserve_* for the rest (`_total` = counter), process_* as the Prometheus client libraries name them.

ModelStatistics (Triton's statistics extension, `statistics()`) differs from the Prometheus counters in
one way, as Triton's does for a model with max_batch_size 0: inference_count counts requests, not rows.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

Labels = Tuple[Tuple[str, str], ...]

# Every metric family: name -> (type, help).
FAMILIES: Dict[str, Tuple[str, str]] = {
    "nv_inference_request_success": ("counter", "Successful inference requests"),
    "nv_inference_request_failure": ("counter", "Failed inference requests, by gRPC status"),
    "nv_inference_count": ("counter", "Inferences performed (rows in executed batches)"),
    "nv_inference_exec_count": ("counter", "Model executions (batches) performed"),
    "nv_inference_request_duration_us": ("counter", "Cumulative successful request duration in the server, microseconds"),
    "nv_inference_queue_duration_us": ("counter", "Cumulative queue duration over requests, microseconds"),
    "nv_inference_compute_input_duration_us": ("counter", "Cumulative compute input duration over requests, microseconds"),
    "nv_inference_compute_infer_duration_us": ("counter", "Cumulative compute duration over requests, microseconds"),
    "nv_inference_compute_output_duration_us": ("counter", "Cumulative compute output duration over requests, microseconds"),
    "nv_inference_pending_request_count": ("gauge", "Requests queued, not yet in a batch"),
    "neuronserve_batch_rows": ("histogram", "Rows per executed batch"),
    "neuronserve_queue_rows": ("gauge", "Rows queued, not yet in a batch"),
    "neuronserve_in_flight_batches": ("gauge", "Batches running now"),
    "neuronserve_rejected_total": ("counter", "Requests the batcher refused, by reason"),
    "neuronserve_cancelled_total": ("counter", "Queued requests dropped because their caller went away"),
    "neuronserve_batch_failed_total": ("counter", "Requests failed by an error in their batch"),
    "neuronserve_core_group_busy_seconds_total": ("counter", "Seconds a core group spent running executions"),
    "neuronserve_core_group_executions_total": ("counter", "Executions completed on a core group"),
    "neuronserve_sim_core_device_seconds_total": ("counter", "sim backend: seconds of (simulated) device time a core ran"),
    "neuronserve_core_group_faults_total": ("counter", "Core faults on a core group"),
    "neuronserve_core_group_healthy": ("gauge", "1 while the core group is in rotation"),
    "neuronserve_stage_executions_total": ("counter", "Executions of a stage at a compiled bucket"),
    "neuronserve_stage_rows_total": ("counter", "Caller rows run by a stage"),
    "neuronserve_stage_padded_rows_total": ("counter", "Padding rows added to reach compiled buckets"),
    "neuronserve_cache_rows": ("gauge", "Cached tower outputs, by kind"),
    "neuronserve_cache_max_rows": ("gauge", "Cache bound per kind (rows)"),
    "neuronserve_cache_bytes": ("gauge", "Bytes held by the embedding cache"),
    "neuronserve_cache_hits_total": ("counter", "Looked-up ids found in the cache"),
    "neuronserve_cache_misses_total": ("counter", "Looked-up ids not in the cache"),
    "neuronserve_cache_evictions_total": ("counter", "Rows evicted to stay within the bound"),
    "process_cpu_seconds_total": ("counter", "User and system CPU time of the server process, seconds"),
    "process_resident_memory_bytes": ("gauge", "Resident memory of the server process"),
    "process_threads": ("gauge", "Threads of the server process"),
    "neuronserve_worker_up": ("gauge", "workers: 1 while the worker serves (ready and alive)"),
    "neuronserve_worker_restarts_total": ("counter", "workers: times the worker was restarted"),
    "neuronserve_worker_requests_total": ("counter", "workers: requests the worker answered (any status), since it last started"),
}


@dataclass(frozen=True)
class Sample:
    """One line of the exposition: a family in FAMILIES, its labels and value."""

    name: str
    labels: Labels
    value: float
    suffix: str = ""  # "_bucket", "_sum", "_count" for histogram lines


Collector = Callable[[], Iterable[Sample]]


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
    """Cumulative counters of one model (version fixed per server)."""

    def __init__(self, batch_buckets: np.ndarray) -> None:
        self.success = 0
        self.failure: Dict[str, int] = {}
        self.request_s = 0.0
        self.failure_s = 0.0
        self.last_request_ms = 0  # wall clock, milliseconds since the epoch
        self.rows = 0  # in executed batches
        self.executions = 0
        self.input_s = 0.0  # compute_input, compute_infer, compute_output: summed over requests
        self.compute_s = 0.0
        self.output_s = 0.0
        self.batch_counts = np.zeros(len(batch_buckets) + 1, dtype=np.int64)  # last: +Inf


class Metrics:
    """The counters the service and runtime update, plus collectors read at scrape time.

    `batch_buckets`: upper bounds of the neuronserve_batch_rows histogram (the compiled buckets)."""

    def __init__(self, *, version: str, batch_buckets: Sequence[int]) -> None:
        self.version = version
        self._bounds = np.asarray(sorted(set(int(b) for b in batch_buckets)), dtype=np.int64)
        self._models: Dict[str, _ModelCounters] = {}
        self._collectors: List[Collector] = [process_samples]
        self._batcher_stats: Dict[str, Callable] = {}

    def _model(self, model: str) -> _ModelCounters:
        counters = self._models.get(model)
        if counters is None:
            counters = self._models[model] = _ModelCounters(self._bounds)
        return counters

    def request(self, model: str, status: str, duration_s: float) -> None:
        """One request answered: status "OK" or the gRPC status name it failed with."""
        counters = self._model(model)
        counters.last_request_ms = int(time.time() * 1e3)
        if status == "OK":
            counters.success += 1
            counters.request_s += duration_s
        else:
            counters.failure[status] = counters.failure.get(status, 0) + 1
            counters.failure_s += duration_s

    def execution(
        self, model: str, *, rows: int, requests: int, compute_s: float, input_s: float = 0.0, output_s: float = 0.0
    ) -> None:
        """One batch of `rows` rows for `requests` requests (each part of a split request counts) ran on
        the device in `compute_s` seconds, after `input_s` preparing its inputs (gather, pad, convert)
        and before `output_s` extracting its outputs (unpad, split); each request is charged all three."""
        counters = self._model(model)
        counters.executions += 1
        counters.rows += rows
        counters.compute_s += compute_s * requests
        counters.input_s += input_s * requests
        counters.output_s += output_s * requests
        counters.batch_counts[int(np.searchsorted(self._bounds, rows))] += 1

    def outcomes(self) -> Dict[str, int]:
        """Requests answered so far, by status ("OK" or a gRPC status name), over every model."""
        totals: Dict[str, int] = {}
        for counters in self._models.values():
            for status, count in [("OK", counters.success), *counters.failure.items()]:
                if count:
                    totals[status] = totals.get(status, 0) + count
        return totals

    def add_collector(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def add_batcher(self, model: str, stats: Callable) -> None:
        """`model`'s batcher: `stats()` returns its batcher.BatcherStats, read at scrape and by statistics()."""
        self._batcher_stats[model] = stats
        self.add_collector(lambda: batcher_samples(model, self.version, stats()))

    def statistics(self, model: str) -> ModelStats:
        """`model`'s cumulative counters, as Triton's ModelStatistics reports them (zeros if unseen)."""
        c = self._models.get(model) or _ModelCounters(self._bounds)
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

    def samples(self) -> List[Sample]:
        out: List[Sample] = []
        for model, c in sorted(self._models.items()):
            mv: Labels = (("model", model), ("version", self.version))
            out.append(Sample("nv_inference_request_success", mv, c.success))
            out += [Sample("nv_inference_request_failure", mv + (("reason", r),), n) for r, n in sorted(c.failure.items())]
            out += [
                Sample("nv_inference_count", mv, c.rows),
                Sample("nv_inference_exec_count", mv, c.executions),
                Sample("nv_inference_request_duration_us", mv, c.request_s * 1e6),
                Sample("nv_inference_compute_input_duration_us", mv, c.input_s * 1e6),
                Sample("nv_inference_compute_infer_duration_us", mv, c.compute_s * 1e6),
                Sample("nv_inference_compute_output_duration_us", mv, c.output_s * 1e6),
            ]
            bounds = [str(b) for b in self._bounds] + ["+Inf"]
            out += [Sample("neuronserve_batch_rows", mv + (("le", b),), n, "_bucket") for b, n in zip(bounds, np.cumsum(c.batch_counts))]
            out.append(Sample("neuronserve_batch_rows", mv, c.rows, "_sum"))
            out.append(Sample("neuronserve_batch_rows", mv, c.executions, "_count"))
        for collector in self._collectors:
            try:
                out.extend(collector())
            except Exception:  # a broken collector must not take /metrics down
                log.exception("metrics collector %r failed", collector)
        return out

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        return render_samples(self.samples())


def render_samples(samples: Iterable[Sample]) -> str:
    """Samples in the Prometheus text exposition format (version 0.0.4), grouped by family."""
    families: Dict[str, List[Sample]] = {}
    for sample in samples:
        families.setdefault(sample.name, []).append(sample)
    lines: List[str] = []
    for name, members in families.items():
        kind, help_text = FAMILIES[name]
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for s in members:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels)
            lines.append(f"{name}{s.suffix}{{{labels}}} {_number(s.value)}" if labels else f"{name}{s.suffix} {_number(s.value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def batcher_samples(model: str, version: str, stats) -> List[Sample]:
    """From a batcher.BatcherStats of the batcher in front of `model`."""
    mv: Labels = (("model", model), ("version", version))
    return [
        Sample("nv_inference_queue_duration_us", mv, stats.queue_s_total * 1e6),
        Sample("nv_inference_pending_request_count", mv, stats.queued_requests),
        Sample("neuronserve_queue_rows", mv, stats.queued_rows),
        Sample("neuronserve_in_flight_batches", mv, stats.in_flight_batches),
        Sample("neuronserve_rejected_total", mv + (("reason", "overload"),), stats.rejected_overload),
        Sample("neuronserve_rejected_total", mv + (("reason", "deadline"),), stats.rejected_deadline),
        Sample("neuronserve_cancelled_total", mv, stats.cancelled),
        Sample("neuronserve_batch_failed_total", mv, stats.failed),
    ]


def pipeline_samples(stats) -> List[Sample]:
    """From a pipeline.PipelineStats: per core group and per stage."""
    out: List[Sample] = []
    for g in stats.groups:
        labels: Labels = (("cores", g.cores), ("stages", ",".join(g.stages)))
        out += [
            Sample("neuronserve_core_group_busy_seconds_total", labels, g.busy_s),
            Sample("neuronserve_core_group_executions_total", labels, g.executions),
            Sample("neuronserve_core_group_faults_total", labels, g.faults),
            Sample("neuronserve_core_group_healthy", labels, 1 if g.healthy else 0),
        ]
    for stage, s in stats.stages.items():
        labels = (("stage", stage),)
        out += [
            Sample("neuronserve_stage_executions_total", labels, s.executions),
            Sample("neuronserve_stage_rows_total", labels, s.rows),
            Sample("neuronserve_stage_padded_rows_total", labels, s.padded_rows),
        ]
    return out


def sim_samples(stats) -> List[Sample]:
    """From a backends.sim.SimStats: per simulated core, the device seconds it ran (latency_scale
    applied: wall seconds of device time), so busy fraction = its rate of increase."""
    return [
        Sample("neuronserve_sim_core_device_seconds_total", (("core", str(c.core)),), c.busy_s * stats.latency_scale)
        for c in stats.cores
    ]


def cache_samples(stats) -> List[Sample]:
    """From an embeddings.CacheStats."""
    version: Labels = (("version", stats.model_version),)
    return [
        Sample("neuronserve_cache_rows", version + (("kind", "user"),), stats.user_rows),
        Sample("neuronserve_cache_rows", version + (("kind", "peer"),), stats.peer_rows),
        Sample("neuronserve_cache_max_rows", version, stats.max_rows),
        Sample("neuronserve_cache_bytes", version, stats.bytes),
        Sample("neuronserve_cache_hits_total", version, stats.hits),
        Sample("neuronserve_cache_misses_total", version, stats.misses),
        Sample("neuronserve_cache_evictions_total", version, stats.evictions),
    ]


def process_samples() -> List[Sample]:
    import psutil

    process = psutil.Process()
    cpu = process.cpu_times()
    return [
        Sample("process_cpu_seconds_total", (), cpu.user + cpu.system),
        Sample("process_resident_memory_bytes", (), process.memory_info().rss),
        Sample("process_threads", (), process.num_threads()),
    ]


class MetricsServer:
    """GET /metrics -> metrics.render() (a str, or an awaitable of one); anything else 404. One request per connection."""

    READ_TIMEOUT_S = 5.0

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the bound port."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _read_request_line(self, reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read and ignored. Lines are bounded by the reader's limit."""
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        return request_line

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:  # one deadline for the whole request: a client dripping header lines is cut off too
                request_line = await asyncio.wait_for(self._read_request_line(reader), self.READ_TIMEOUT_S)
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):  # a line past the limit
                request_line = b""
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            extra, ctype = "", "text/plain; charset=utf-8"
            if path != "/metrics":
                status, body = "404 Not Found", b"not found: GET /metrics\n"
            elif method not in ("GET", "HEAD"):
                status, body, extra = "405 Method Not Allowed", b"method not allowed: GET /metrics\n", "Allow: GET, HEAD\r\n"
            else:
                start = time.perf_counter()
                text = self.metrics.render()
                if inspect.isawaitable(text):  # the pool's metrics gather the workers' first
                    text = await text
                body = text.encode("utf-8")
                log.debug("rendered metrics in %.1f ms", (time.perf_counter() - start) * 1e3)
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            body_out = b"" if method == "HEAD" else body
            head = f"HTTP/1.1 {status}\r\n{extra}Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode("latin-1") + body_out)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
