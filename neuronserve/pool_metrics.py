"""One /metrics for a pool of workers, served by the supervisor: each live worker's private /metrics
(rendered on the worker's /metrics thread, not its serving loop), fetched concurrently, parsed with
prometheus-client's parser, merged, and written by prometheus-client (metrics.render_samples). The
supervisor serves it with the same MetricsServer as a lone server (metrics_http.py: its own thread and
loop, where the fetches run too; renders coalesced, so a scrape flood on the supervisor fetches from the
workers at most once per min_interval_s).

Merge rule per family: PER_WORKER families (a worker's cores, queue, process) keep their samples with a
`worker` label added; SHARED families (the embedding cache, one store for the pool) are reported once;
every other family is summed over workers, label set by label set. Plus the supervisor's own process
figures and /metrics counters (worker="supervisor") and, per worker: neuronserve_worker_up,
_restarts_total, _requests_total. The summed counters stay monotonic (Continuity): a worker absent from
a scrape counts with what it had counted, and a restarted one's earlier counts carry on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

from neuronserve.metric_families import FAMILIES, Sample
from neuronserve.metric_sources import process_samples
from neuronserve.metrics import render_samples

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 2.0
PER_WORKER = frozenset(
    name
    for name in FAMILIES
    if name.startswith(("neuronserve_core_group_", "neuronserve_sim_core_", "neuronserve_metrics_", "process_"))
    or name in ("neuronserve_queue_rows", "neuronserve_in_flight_batches", "nv_inference_pending_request_count")
)
SHARED = frozenset(
    ("neuronserve_cache_rows", "neuronserve_cache_max_rows", "neuronserve_cache_bytes")
    + tuple(name for name in FAMILIES if name.startswith("neuronserve_embedding_store_"))
)  # one follower per host
REQUEST_FAMILIES = ("nv_inference_request_success", "nv_inference_request_failure")
_SUFFIXES = ("_bucket", "_sum", "_count")
_ORDER = {name: i for i, name in enumerate(FAMILIES)}


def parse_samples(text: str) -> list[Sample]:
    """Our own exposition text back into Samples (family name, labels, value, suffix)."""
    out: list[Sample] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, suffix = sample.name, ""
            if name not in FAMILIES and name.endswith("_total") and name[: -len("_total")] in FAMILIES:
                name = name[: -len("_total")]  # the parser names every counter's samples *_total
            if name not in FAMILIES:
                for end in _SUFFIXES:
                    if name.endswith(end) and name[: -len(end)] in FAMILIES:
                        name, suffix = name[: -len(end)], end
                        break
                else:
                    continue  # not one of ours
            out.append(Sample(name, tuple(sample.labels.items()), sample.value, suffix))
    return out


def merge(per_worker: dict[int, list[Sample]]) -> list[Sample]:
    """Workers' samples merged by the module's rule (ordered by family, then as first seen)."""
    merged: dict[tuple[str, str, tuple], float] = {}
    for index, samples in sorted(per_worker.items()):
        for s in samples:
            labels = s.labels + (("worker", str(index)),) if s.name in PER_WORKER else s.labels
            key = (s.name, s.suffix, labels)
            if s.name in SHARED:
                merged[key] = max(merged.get(key, s.value), s.value)
            else:
                merged[key] = merged.get(key, 0.0) + s.value
    return [Sample(name, labels, value, suffix) for (name, suffix, labels), value in merged.items()]


def _summed_counter(name: str) -> bool:
    return FAMILIES[name][0] in ("counter", "histogram") and name not in PER_WORKER and name not in SHARED


@dataclasses.dataclass
class _Seen:
    start_s: float | None  # the worker process's process_start_time_seconds: another one is a restart
    counters: list[Sample]


class Continuity:
    """Keeps the pool's summed counters from stepping down: a worker missing from a scrape (restarting,
    slow) counts with its last-seen counters, and when a worker's process changes (another start time)
    its last-seen counters carry on under the new process's. Without it a summed counter steps down,
    and Prometheus' rate() reads the step as a reset and the whole remaining sum as new increase."""

    def __init__(self) -> None:
        self._seen: dict[int, _Seen] = {}
        self._carry: dict[int, dict[tuple[str, str, tuple], float]] = {}  # per worker: (name, suffix, labels) -> sum

    def apply(self, per_worker: dict[int, list[Sample]]) -> dict[int, list[Sample]]:
        for index, samples in per_worker.items():
            start_s = next((s.value for s in samples if s.name == "process_start_time_seconds"), None)
            seen = self._seen.get(index)
            if seen is not None and seen.start_s != start_s:
                carry = self._carry.setdefault(index, {})
                for s in seen.counters:
                    carry[(s.name, s.suffix, s.labels)] = carry.get((s.name, s.suffix, s.labels), 0.0) + s.value
            self._seen[index] = _Seen(start_s, [s for s in samples if _summed_counter(s.name)])
        out: dict[int, list[Sample]] = {}
        for index, seen in self._seen.items():
            others = [s for s in per_worker.get(index, ()) if not _summed_counter(s.name)]
            carried = [Sample(n, labels, v, suffix) for (n, suffix, labels), v in self._carry.get(index, {}).items()]
            out[index] = others + seen.counters + carried  # merge() sums equal keys
        return out


class PoolMetrics:
    """`render()` for the supervisor's MetricsServer (awaited on its thread's loop). `supervisor`:
    workers.Supervisor (its .workers, read from that thread: a copy of the list, then plain attributes)."""

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        # the supervisor's own figures; not its children's CPU: they are the workers, each counted once already
        self._collectors: tuple[Callable[[], Iterable[Sample]], ...] = (
            functools.partial(process_samples, children=False),
        )
        self._continuity = Continuity()

    def add_collector(self, collector: Callable[[], Iterable[Sample]]) -> None:
        """The supervisor's own samples (its MetricsServer's counters), labelled worker="supervisor"."""
        self._collectors = self._collectors + (collector,)

    async def render(self) -> str:
        workers = list(self.supervisor.workers)
        live = {w.plan.index: w.ready.metrics_port for w in workers if w.ready is not None and w.ready.metrics_port}
        texts = await asyncio.gather(*(_fetch(port) for port in live.values()))
        per_worker = {index: parse_samples(text) for index, text in zip(live, texts, strict=False) if text is not None}
        samples = merge(self._continuity.apply(per_worker))
        for collector in self._collectors:
            samples += [dataclasses.replace(s, labels=s.labels + (("worker", "supervisor"),)) for s in collector()]
        for w in workers:
            index = w.plan.index
            worker = (("worker", str(index)),)
            answered = sum(s.value for s in per_worker.get(index, ()) if s.name in REQUEST_FAMILIES)
            samples += [
                Sample("neuronserve_worker_up", worker, 1.0 if index in per_worker else 0.0),
                Sample("neuronserve_worker_restarts_total", worker, w.restarts),
                Sample("neuronserve_worker_requests_total", worker, answered),
            ]
        samples.sort(key=lambda s: _ORDER[s.name])  # stable: groups each family's lines
        return render_samples(samples)


async def _fetch(port: int) -> str | None:
    """GET a worker's private /metrics on 127.0.0.1:port; None (logged) if it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), FETCH_TIMEOUT_S)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), FETCH_TIMEOUT_S)
        finally:
            writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        log.warning("metrics of the worker on port %d unavailable: %s", port, exc)
        return None
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    return body.decode("utf-8")
