"""The benchmark report's figures: server metrics deltas, the server's CPU and memory, the comparison.

The last step of `neuronserve bench`, outside the server's request path. The server's batch
statistics come from its Prometheus endpoint (Triton's metric names, `nv_inference_*`), read
before and after the measured window; only their difference is reported. Server CPU and resident
memory come from the same endpoint (`process_cpu_seconds_total`, `process_resident_memory_bytes`)
or, for a server bench started itself, from its process (psutil). With `--reference plain`
(or `probe`), Comparison gives neuronserve's result as a ratio of that server's. Everything else comes from
the load generator's results (loadgen.LoadResult) and the limits (limits.py); render.py prints and
writes the whole.
"""

from __future__ import annotations

import http.client
import math
import statistics
import urllib.request
from dataclasses import dataclass
from collections.abc import Sequence

from neuronserve.bench.loadgen import LoadResult
from neuronserve.errors import Unavailable

TRITON_PREFIX = "nv_"
PROCESS_CPU = "process_cpu_seconds_total"
CHILD_CPU = "neuronserve_child_cpu_seconds_total"  # the server's model processes (--model-process)
PROCESS_RSS = "process_resident_memory_bytes"
GROUP_EXECUTIONS = "neuronserve_core_group_executions_total"
INLINE_EXECUTIONS = "neuronserve_core_group_inline_executions_total"  # of them, run on the event loop
SIM_DEVICE = "neuronserve_sim_core_device_seconds_total"  # sim backend: device seconds, one sample per core
SIM_CORES = "sim cores"  # scrape_metrics' count of SIM_DEVICE's samples (not a metric of the server's)


def scrape_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Every `nv_*` sample, the process CPU and resident memory, the core groups' executions (all, and those
    run on the event loop) and the simulated cores' device seconds of a Prometheus text page, summed over
    label sets (histogram buckets skipped); under SIM_CORES, how many simulated cores reported."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError, InvalidURL: a malformed URL
        raise Unavailable(f"--metrics-url {url}: cannot read metrics ({type(exc).__name__}: {exc})") from None
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(
            (TRITON_PREFIX, PROCESS_CPU, PROCESS_RSS, CHILD_CPU, GROUP_EXECUTIONS, INLINE_EXECUTIONS, SIM_DEVICE)
        ):
            continue
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        fields = rest[rest.rindex("}") + 1 :].split() if "{" in line else rest.split()
        if name.endswith("_bucket"):
            continue
        try:
            value = float(fields[0])  # a trailing timestamp, if any, is ignored
        except (IndexError, ValueError):
            continue
        totals[name] = totals.get(name, 0.0) + value
        if name == SIM_DEVICE:
            totals[SIM_CORES] = totals.get(SIM_CORES, 0.0) + 1
    return totals


@dataclass(frozen=True)
class BatchStats:
    """What the server did during the measured window (deltas of its counters)."""

    requests: float  # nv_inference_request_success
    executions: float  # nv_inference_exec_count: batches run
    inferences: float  # nv_inference_count: rows run, summed over batches
    avg_batch_rows: float
    avg_queue_ms: float  # per successful request
    avg_compute_ms: float  # per successful request
    on_loop: float | None  # the core groups' executions run on the event loop, a fraction (None: not reported)
    counters: dict[str, float]  # every nv_* delta, as read

    def to_dict(self) -> dict:
        return {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "counters"
        } | {"counters": self.counters}


def batch_stats(before: dict[str, float], after: dict[str, float]) -> BatchStats:
    delta = {name: after[name] - before.get(name, 0.0) for name in sorted(after) if name.startswith(TRITON_PREFIX)}
    requests = delta.get("nv_inference_request_success", 0.0)
    executions = delta.get("nv_inference_exec_count", 0.0)
    inferences = delta.get("nv_inference_count", 0.0)
    group_executions = after.get(GROUP_EXECUTIONS, 0.0) - before.get(GROUP_EXECUTIONS, 0.0)
    inline = after.get(INLINE_EXECUTIONS, 0.0) - before.get(INLINE_EXECUTIONS, 0.0)
    return BatchStats(
        requests=requests,
        executions=executions,
        inferences=inferences,
        avg_batch_rows=inferences / executions if executions else math.nan,
        avg_queue_ms=delta.get("nv_inference_queue_duration_us", 0.0) / requests / 1000.0 if requests else math.nan,
        avg_compute_ms=delta.get("nv_inference_compute_infer_duration_us", 0.0) / requests / 1000.0
        if requests
        else math.nan,
        on_loop=inline / group_executions if INLINE_EXECUTIONS in after and group_executions > 0 else None,
        counters=delta,
    )


@dataclass(frozen=True)
class ServerCpu:
    """A server process's CPU time (user + system) over one run's measured window."""

    seconds: float
    requests: int  # requests scheduled in the measured window (answered or failed)
    source: str  # where the CPU time was read

    @property
    def ms_per_request(self) -> float | None:
        return 1000.0 * self.seconds / self.requests if self.requests else None

    def to_dict(self) -> dict:
        return {
            "seconds": round(self.seconds, 4),
            "requests": self.requests,
            "ms_per_request": _round(self.ms_per_request),
            "source": self.source,
        }


def metrics_cpu(before: dict[str, float], after: dict[str, float], requests: int) -> ServerCpu | None:
    """CPU from the server's `process_cpu_seconds_total`, plus its child processes' (None if it does not
    export the first)."""
    if PROCESS_CPU not in before or PROCESS_CPU not in after:
        return None
    children = after.get(CHILD_CPU, 0.0) - before.get(CHILD_CPU, 0.0)
    source = (
        f"{PROCESS_CPU} + {CHILD_CPU} from --metrics-url" if CHILD_CPU in after else f"{PROCESS_CPU} from --metrics-url"
    )
    return ServerCpu(after[PROCESS_CPU] - before[PROCESS_CPU] + children, requests, source)


def cpu_ticks() -> list[int]:
    """This machine's CPU time counters (/proc/stat's cpu line: user ... steal); [] off Linux."""
    try:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def steal_pct(before: list[int], after: list[int]) -> float | None:
    """Of the machine's CPU time between two cpu_ticks(), the percentage a hypervisor took (steal): on a
    shared VM a latency spike may be the host's, not the server's."""
    deltas = [b - a for a, b in zip(before, after, strict=False)]
    return round(100.0 * deltas[7] / sum(deltas), 1) if len(deltas) == 8 and sum(deltas) > 0 else None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a local process so far (psutil)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


@dataclass(frozen=True)
class DeviceBusy:
    """sim backend: the simulated cores' device time from a run's measured window's start to its last reply."""

    device_s: float  # summed over the cores
    cores: int
    wall_s: float

    @property
    def fraction(self) -> float | None:
        return self.device_s / (self.cores * self.wall_s) if self.cores and self.wall_s > 0 else None

    def to_dict(self) -> dict:
        return {
            "device_seconds": round(self.device_s, 4),
            "cores": self.cores,
            "wall_seconds": round(self.wall_s, 4),
            "busy_fraction": _round(self.fraction),
        }


def metrics_device_busy(before: dict[str, float], after: dict[str, float], wall_s: float) -> DeviceBusy | None:
    """The simulated cores' device seconds over `wall_s` (None unless the server is on the sim backend)."""
    if SIM_DEVICE not in after:
        return None
    return DeviceBusy(after[SIM_DEVICE] - before.get(SIM_DEVICE, 0.0), int(after[SIM_CORES]), wall_s)


@dataclass(frozen=True)
class ServerMemory:
    """A server process's resident memory at the start of a run's measured window and after its last reply."""

    before_bytes: float
    after_bytes: float
    source: str  # where it was read

    def to_dict(self) -> dict:
        return {
            "rss_before_bytes": int(self.before_bytes),
            "rss_after_bytes": int(self.after_bytes),
            "rss_change_bytes": int(self.after_bytes - self.before_bytes),
            "source": self.source,
        }


def metrics_memory(before: dict[str, float], after: dict[str, float]) -> ServerMemory | None:
    """RSS from the server's `process_resident_memory_bytes` (None if it does not export it)."""
    if PROCESS_RSS not in before or PROCESS_RSS not in after:
        return None
    return ServerMemory(before[PROCESS_RSS], after[PROCESS_RSS], f"{PROCESS_RSS} from --metrics-url")


def process_rss_bytes(pid: int) -> float:
    """Resident memory of a local process now (psutil)."""
    import psutil

    return float(psutil.Process(pid).memory_info().rss)


@dataclass(frozen=True)
class Measured:
    """One run against one server: the load generator's result plus what the server said about it."""

    result: LoadResult
    batches: BatchStats | None  # from --metrics-url
    cpu: ServerCpu | None
    memory: ServerMemory | None = None  # from --metrics-url, or psutil for a server bench started
    steal_pct: float | None = None  # the machine's CPU time the hypervisor took over the window (None: unknown)
    device: DeviceBusy | None = None  # the sim backend's cores, from --metrics-url

    def section(self, pairs_per_request: int) -> dict:
        """This run as a report section: result, server_batches, server_cpu, server_memory, cpu_steal_pct, sim_device."""
        result = self.result.to_dict()
        result["pairs_per_s"] = round(self.result.achieved_rate_per_s * pairs_per_request, 1)
        return {
            "result": result,
            "server_batches": self.batches.to_dict() if self.batches else None,
            "server_cpu": self.cpu.to_dict() if self.cpu else None,
            "server_memory": self.memory.to_dict() if self.memory else None,
            "cpu_steal_pct": self.steal_pct,
            "sim_device": self.device.to_dict() if self.device else None,
        }


@dataclass(frozen=True)
class Comparison:
    """neuronserve's result as a ratio of a reference server's, both measured in the same bench run.

    The served rate is the highest rate meeting the P99 bound (search) or the achieved rate, OK
    replies per second (fixed rate). P50/P99 ratios only at a fixed rate: the same offered load.
    Ratios are target / reference (served: above 1 is better; latency and CPU: below 1 is better);
    None when either side has no value.
    """

    reference: str  # "plain" or "probe"
    basis: str  # what the served rate is
    served_rate_per_s: float | None
    reference_served_rate_per_s: float | None
    served_ratio: float | None
    p50_ratio: float | None
    p99_ratio: float | None
    cpu_ms_per_request: float | None
    reference_cpu_ms_per_request: float | None
    cpu_ratio: float | None
    note: str = ""  # e.g. a search that passed every step: its rate is a lower bound, so the ratio is not exact

    def to_dict(self) -> dict:
        return {k: _round(v) for k, v in self.__dict__.items()}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
        return None
    return a / b


def _round(value, digits: int = 4):
    return round(value, digits) if isinstance(value, float) else value


def compare(
    reference: str,
    target: Measured | None,
    ref: Measured | None,
    search_bound_ms: float | None,
    never_failed: Sequence[str] = (),
) -> Comparison:
    """`target` and `ref`: the fixed-rate runs, or the highest passing steps of the searches (None: none
    passed); `never_failed` names the servers whose search passed every step (its rate is a lower bound)."""

    def served(m: Measured | None) -> float | None:
        if m is None:
            return None
        return m.result.offered_rate_per_s if search_bound_ms is not None else m.result.achieved_rate_per_s

    def latency(m: Measured | None, key: str) -> float | None:
        return m.result.latency_ms[key] if m is not None and search_bound_ms is None else None

    def cpu(m: Measured | None) -> float | None:
        return m.cpu.ms_per_request if m is not None and m.cpu is not None else None

    if search_bound_ms is not None:
        basis = f"highest rate meeting P99 <= {search_bound_ms:g} ms (CPU per request: each at its own highest passing rate)"
    else:
        basis = "achieved rate (OK replies/s) at the same offered rate"
    return Comparison(
        reference=reference,
        basis=basis,
        served_rate_per_s=served(target),
        reference_served_rate_per_s=served(ref),
        served_ratio=_ratio(served(target), served(ref)),
        p50_ratio=_ratio(latency(target, "p50"), latency(ref, "p50")),
        p99_ratio=_ratio(latency(target, "p99"), latency(ref, "p99")),
        cpu_ms_per_request=cpu(target),
        reference_cpu_ms_per_request=cpu(ref),
        cpu_ratio=_ratio(cpu(target), cpu(ref)),
        note=f"{' and '.join(never_failed)}: the search passed every step, so that rate is a lower bound and the served ratio is not exact"
        if never_failed
        else "",
    )


def median_comparison(rounds: Sequence[Comparison]) -> Comparison:
    """The rounds' comparisons in one: each rate, CPU figure and ratio the median of the rounds that have
    it (a ratio is the median of the rounds' ratios, not a ratio of medians); None where no round has it."""

    def median(field: str) -> float | None:
        values = [getattr(c, field) for c in rounds if getattr(c, field) is not None]
        return statistics.median(values) if values else None

    notes = sorted({c.note for c in rounds if c.note})
    first = rounds[0]
    return Comparison(
        reference=first.reference,
        basis=first.basis,
        note="; ".join([f"the median of {len(rounds)} rounds", *notes]),
        **{
            field: median(field)
            for field in (
                "served_rate_per_s",
                "reference_served_rate_per_s",
                "served_ratio",
                "p50_ratio",
                "p99_ratio",
                "cpu_ms_per_request",
                "reference_cpu_ms_per_request",
                "cpu_ratio",
            )
        },
    )
