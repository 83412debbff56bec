"""The open-loop gRPC load generator: arrivals on a schedule, latency from the scheduled send time.

The client side of every benchmark run, outside the server's request path: it sends pre-serialized
request bytes to one gRPC method (any server: neuronserve, Triton, the echo server of limits.py)
and never parses the replies. Like wrk2, a request's latency runs from when the schedule said to
send it, not from when it was actually sent, so a stalled server shows in the tail instead of
silently slowing the generator (coordinated omission). The schedule (Poisson or constant arrivals)
is drawn once in the parent and dealt round-robin to `clients` spawned processes (loadclient.py),
each with its own event loop and channels; each reports how late its sends left against the
schedule, so the report can say when the generator itself was the bottleneck. Failed requests are
timed on the same clock, in one histogram per gRPC status, so a refusal at the door
(RESOURCE_EXHAUSTED in a millisecond) and a client deadline (DEADLINE_EXCEEDED at the full timeout)
are told apart. A closed-loop mode (a fixed number of requests in flight, flat out) measures the
transport limit. The clients talk to the parent in the messages Ready, Tick, Done and Failed.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuronserve.bench.histograms import count_above, decode_histogram, new_histogram

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LATENCY_KEYS = (*(f"p{p:g}" for p in PERCENTILES), "max", "mean")  # of LoadResult.latency_ms
ARRIVALS = ("poisson", "constant")


@dataclass(frozen=True)
class LoadSpec:
    """One run: where, what, how fast, for how long. rate_per_s > 0 is open loop; concurrency > 0 closed loop."""

    target: str  # host:port
    method: str  # full method path, e.g. /neuronserve.v1.Scorer/Score
    payloads: tuple[bytes, ...]  # serialized requests, sent in turn
    duration_s: float
    warmup_s: float = 0.0
    rate_per_s: float = 0.0
    arrival: str = "poisson"
    concurrency: int = 0  # closed loop: requests in flight per client process
    clients: int = 2
    channels: int = 2  # gRPC connections per client process
    timeout_ms: float = 1000.0
    late_ms: float = 2.0  # a send leaving later than this after its scheduled time counts as late
    seed: int = 0

    def __post_init__(self) -> None:
        from neuronserve.errors import ConfigError

        if (self.rate_per_s > 0) == (self.concurrency > 0):
            raise ConfigError(
                f"load: give either rate_per_s > 0 (open loop) or concurrency > 0 (closed loop), got rate_per_s={self.rate_per_s} concurrency={self.concurrency}"
            )
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"load: arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ConfigError(
                f"load: duration_s must be > 0 and warmup_s >= 0, got {self.duration_s} and {self.warmup_s}"
            )
        if self.clients < 1 or self.channels < 1:
            raise ConfigError(f"load: clients and channels must be >= 1, got {self.clients} and {self.channels}")
        if self.timeout_ms <= 0:
            raise ConfigError(f"load: timeout_ms must be > 0, got {self.timeout_ms}")
        if not self.payloads:
            raise ConfigError("load: payloads must hold at least one serialized request")


@dataclass(frozen=True)
class Percentiles:
    """One latency distribution in ms (from an HdrHistogram), e.g. of the requests that failed with one status."""

    count: int
    p50: float
    p90: float
    p99: float
    p99_9: float
    max: float
    mean: float

    @classmethod
    def of(cls, hist) -> Percentiles:
        """From a histogram of microseconds (NaN everywhere when it is empty)."""
        count = hist.get_total_count()
        if not count:
            return cls(0, *([float("nan")] * 6))
        p50, p90, p99, p99_9 = (hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES)
        return cls(count, p50, p90, p99, p99_9, hist.get_max_value() / 1000.0, hist.get_mean_value() / 1000.0)

    def to_dict(self) -> dict:
        """The keys of LoadResult.latency_ms, plus count."""
        values = {
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p99.9": self.p99_9,
            "max": self.max,
            "mean": self.mean,
        }
        return {"count": self.count, **{k: round(v, 3) for k, v in values.items()}}


@dataclass(frozen=True)
class LoadResult:
    """What one run measured, over the measured window only (requests scheduled after the warm-up)."""

    offered_rate_per_s: float  # 0 for a closed-loop run
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]  # gRPC status name -> count
    achieved_rate_per_s: float  # successful replies per second of the measured window
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max, mean; from the scheduled send time (open loop)
    late_sends: int
    late_threshold_ms: float
    late_p99_ms: float
    late_max_ms: float
    histogram: bytes = field(repr=False, default=b"")  # encoded HdrHistogram of successful latencies, in us
    error_latency_ms: dict[str, Percentiles] = field(
        default_factory=dict
    )  # gRPC status name -> its latencies (same clock as latency_ms)
    error_histograms: dict[str, bytes] = field(
        repr=False, default_factory=dict
    )  # status name -> encoded HdrHistogram, in us
    warmup_s: float = 0.0  # the load sent before the measured window, not measured

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def count_over_ms(self, bound_ms: float) -> int:
        """Successful requests slower than bound_ms (from the histogram)."""
        return count_above(decode_histogram(self.histogram), bound_ms * 1000.0)

    def to_dict(self) -> dict:
        return {
            "offered_rate_per_s": round(self.offered_rate_per_s, 3),
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(self.errors),
            "error_latency_ms": {status: p.to_dict() for status, p in self.error_latency_ms.items()},
            "achieved_rate_per_s": round(self.achieved_rate_per_s, 3),
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "late_sends": self.late_sends,
            "late_threshold_ms": self.late_threshold_ms,
            "late_p99_ms": round(self.late_p99_ms, 3),
            "late_max_ms": round(self.late_max_ms, 3),
        }


def arrival_offsets_s(rate_per_s: float, span_s: float, arrival: str, seed: int) -> np.ndarray:
    """Scheduled send times in [0, span_s): Poisson (exponential gaps) or evenly spaced."""
    if arrival == "constant":
        return np.arange(0.0, span_s, 1.0 / rate_per_s)
    rng = np.random.default_rng(seed)
    expected = int(rate_per_s * span_s)
    gaps = rng.exponential(1.0 / rate_per_s, size=expected + 6 * int(expected**0.5) + 16)
    offsets = np.cumsum(gaps) - gaps[0]
    return offsets[offsets < span_s]


# ---------------------------------------------------------------- client -> parent messages


@dataclass(frozen=True)
class Ready:
    """A client process is connected and waits for the start."""

    index: int


@dataclass(frozen=True)
class Tick:
    """About once a second: a client's running totals (warm-up included) and its last second's latencies."""

    index: int
    sent: int
    replied: int
    errors: int
    histogram: bytes  # encoded HdrHistogram of the successful latencies since the last Tick, in us


@dataclass(frozen=True)
class Done:
    """A client's counts and histograms over the measured window, after its last reply."""

    index: int
    sent: int
    ok: int
    errors: dict[str, int]  # gRPC status name -> count
    error_histograms: dict[str, bytes]  # status name -> encoded HdrHistogram, in us
    last_done: float  # time.monotonic() of the last successful reply
    histogram: bytes  # encoded HdrHistogram of successful latencies, in us
    late_histogram: bytes  # encoded HdrHistogram of send lateness, in us
    late_count: int  # sends later than LoadSpec.late_ms


@dataclass(frozen=True)
class Failed:
    """A client process raised; `error` says what."""

    index: int
    error: str


ClientMessage = Ready | Tick | Done | Failed


# ---------------------------------------------------------------- the parent


Progress = Callable[[str], None]


def run_load(
    spec: LoadSpec, progress: Progress | None = None, on_window_start: Callable[[], None] | None = None
) -> LoadResult:
    """Run `spec` with `spec.clients` spawned processes; block until every reply or deadline is in.

    `progress` receives a one-line status about once a second; `on_window_start` is called when
    the warm-up ends (e.g. to snapshot the server's metrics).
    """
    from neuronserve.bench.loadclient import client_main
    from neuronserve.errors import Unavailable

    span_s = spec.warmup_s + spec.duration_s
    if spec.concurrency > 0:
        shares = [np.empty(0)] * spec.clients
    else:
        offsets = arrival_offsets_s(spec.rate_per_s, span_s, spec.arrival, spec.seed)
        shares = [offsets[i :: spec.clients] for i in range(spec.clients)]
    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
    out = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=client_main, args=(i, spec, shares[i], start_at, go, out), daemon=True)
        for i in range(spec.clients)
    ]
    for proc in procs:
        proc.start()
    try:
        _await_ready(out, procs, 60.0)
        start_at.value = time.monotonic() + 0.1
        go.set()
        finals = _collect(spec, out, procs, start_at.value, progress, on_window_start)
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
    if len(finals) != spec.clients:
        raise Unavailable(f"load: {spec.clients - len(finals)} client process(es) did not finish")
    return _merge(spec, list(finals.values()), start_at.value)


def _await_ready(out, procs, timeout_s: float) -> None:
    """Until every client process has said Ready; Unavailable if one fails, exits or is not ready in time."""
    from neuronserve.errors import Unavailable

    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout_s
    while pending:
        try:
            msg: ClientMessage = out.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [i for i in pending if not procs[i].is_alive()]
            if dead or time.monotonic() > deadline:
                why = (
                    f"exited (code {procs[dead[0]].exitcode})"
                    if dead
                    else f"not ready after {timeout_s:.0f} s (is the target reachable?)"
                )
                raise Unavailable(f"load: client processes {dead or sorted(pending)} {why}") from None
            continue
        if isinstance(msg, Failed):
            raise Unavailable(f"load: client process {msg.index} failed: {msg.error}")
        if isinstance(msg, Ready):
            pending.discard(msg.index)


def _collect(spec: LoadSpec, out, procs, t0: float, progress: Progress | None, on_window_start) -> dict[int, Done]:
    """Every client's Done (fewer if all exited first), feeding `progress` from their Ticks meanwhile.

    `on_window_start` is called once: when the warm-up ends, or at the end if the run ended before.
    """
    from neuronserve.errors import Unavailable

    finals: dict[int, Done] = {}
    display = _ProgressLine(spec, t0, progress)
    window = _WindowStart(t0 + spec.warmup_s, on_window_start)
    deadline = t0 + spec.warmup_s + spec.duration_s + spec.timeout_ms / 1000.0 + 30.0
    while len(finals) < len(procs):
        now = time.monotonic()
        wait_s = window.poll(now)
        if now > deadline:
            raise Unavailable(f"load: clients still running {deadline - t0:.0f} s after the start")
        try:
            msg: ClientMessage = out.get(timeout=wait_s) if wait_s > 0 else out.get_nowait()
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if isinstance(msg, Failed):
            raise Unavailable(f"load: client process {msg.index} failed: {msg.error}")
        if isinstance(msg, Done):
            finals[msg.index] = msg
        elif isinstance(msg, Tick):
            display.tick(msg, now)
    window.close()
    return finals


class _WindowStart:
    """The measured window's start: `on_start` is called once, at the first poll at or after `at`, or at close()."""

    def __init__(self, at: float, on_start: Callable[[], None] | None) -> None:
        self.at, self.on_start, self.started = at, on_start, False

    def poll(self, now: float) -> float:
        """Start the window if it is time; how long the caller may block (it must wake for the start)."""
        if now >= self.at:
            self.close()
        return 0.2 if self.started else min(0.2, max(0.0, self.at - now))

    def close(self) -> None:
        if not self.started:
            self.started = True
            if self.on_start is not None:
                self.on_start()


class _ProgressLine:
    """The status line of a run, from the clients' Ticks, at most about once a second."""

    def __init__(self, spec: LoadSpec, t0: float, progress: Progress | None) -> None:
        self.t0, self.window_at, self.progress = t0, t0 + spec.warmup_s, progress
        self.ticks: dict[int, Tick] = {}  # the latest of each client
        self.window_hist = new_histogram()  # the successful latencies since the last line
        self.last_print = time.monotonic()

    def tick(self, msg: Tick, now: float) -> None:
        self.ticks[msg.index] = msg
        self.window_hist.decode_and_add(msg.histogram)
        if self.progress is None or time.monotonic() - self.last_print < 0.9:
            return
        sent = sum(t.sent for t in self.ticks.values())
        replied = sum(t.replied for t in self.ticks.values())
        errors = sum(t.errors for t in self.ticks.values())
        hist = self.window_hist
        p99 = hist.get_value_at_percentile(99.0) / 1000.0 if hist.get_total_count() else float("nan")
        phase = "warm-up" if now < self.window_at else "measure"
        self.progress(
            f"t={now - self.t0:5.1f}s {phase}  sent {sent}  done {replied}  errors {errors}  p99(last 1s) {p99:.1f} ms"
        )
        hist.reset()
        self.last_print = time.monotonic()


def _merge(spec: LoadSpec, finals: list[Done], t0: float) -> LoadResult:
    """The clients' Done messages as one LoadResult."""
    hist, late_hist = new_histogram(), new_histogram()
    errors: Counter = Counter()
    error_hists: dict[str, Any] = {}
    for final in finals:
        hist.decode_and_add(final.histogram)
        late_hist.decode_and_add(final.late_histogram)
        errors.update(final.errors)
        for code, encoded in final.error_histograms.items():
            error_hists.setdefault(code, new_histogram()).decode_and_add(encoded)
    ok = sum(final.ok for final in finals)
    last_done = max([t0 + spec.warmup_s, *(final.last_done for final in finals)])
    elapsed_s = max(spec.duration_s, last_done - (t0 + spec.warmup_s)) if spec.concurrency == 0 else spec.duration_s
    late_count = late_hist.get_total_count()
    return LoadResult(
        offered_rate_per_s=spec.rate_per_s,
        duration_s=spec.duration_s,
        sent=sum(final.sent for final in finals),
        ok=ok,
        errors=dict(sorted(errors.items())),
        achieved_rate_per_s=ok / elapsed_s,
        latency_ms=_latency_ms(hist) if ok else {key: float("nan") for key in LATENCY_KEYS},
        late_sends=sum(final.late_count for final in finals) if spec.concurrency == 0 else 0,
        late_threshold_ms=spec.late_ms,
        late_p99_ms=late_hist.get_value_at_percentile(99.0) / 1000.0 if late_count else 0.0,
        late_max_ms=late_hist.get_max_value() / 1000.0 if late_count else 0.0,
        histogram=hist.encode(),
        error_latency_ms={code: Percentiles.of(error_hists[code]) for code in sorted(error_hists)},
        error_histograms={code: error_hists[code].encode() for code in sorted(error_hists)},
        warmup_s=spec.warmup_s,
    )


def _latency_ms(hist) -> dict[str, float]:
    """LoadResult.latency_ms of a histogram of microseconds that is not empty."""
    latency = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
    latency["max"] = hist.get_max_value() / 1000.0
    latency["mean"] = hist.get_mean_value() / 1000.0
    return latency


def stderr_progress(line: str) -> None:
    """A status line that rewrites itself on a terminal and appends elsewhere."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
