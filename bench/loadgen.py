"""The open-loop gRPC load generator: arrivals on a schedule, latency from the scheduled send time.

The client side of every benchmark run, outside the server's request path: it sends pre-serialized
request bytes to one gRPC method (any server: neuronserve, Triton, the echo server of limits.py)
and never parses the replies. Like wrk2, a request's latency runs from when the schedule said to
send it, not from when it was actually sent, so a stalled server shows in the tail instead of
silently slowing the generator (coordinated omission). The schedule (Poisson or constant arrivals)
is drawn once in the parent and dealt round-robin to `clients` spawned processes, each with its
own event loop and channels; each process reports how late its sends left against the schedule,
so the report can say when the generator itself was the bottleneck. Failed requests are timed on
the same clock, in one histogram per gRPC status, so a refusal at the door (RESOURCE_EXHAUSTED in
a millisecond) and a client deadline (DEADLINE_EXCEEDED at the full timeout) are told apart. A
closed-loop mode (a fixed number of requests in flight, flat out) measures the transport limit.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue as queue_mod
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable

from typing import Any

import numpy as np

HIST_MAX_US = 120_000_000  # 2 minutes: the histogram's highest trackable latency
HIST_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
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


def new_histogram():
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, HIST_MAX_US, HIST_DIGITS)


def decode_histogram(encoded: bytes):
    hist = new_histogram()
    if encoded:
        hist.decode_and_add(encoded)
    return hist


def count_above(hist, bound: float) -> int:
    """How many recorded values are above `bound` (at the histogram's precision)."""
    if hist.get_total_count() == 0:
        return 0
    return sum(
        it.count_at_value_iterated_to
        for it in hist.get_recorded_iterator()
        if hist.get_lowest_equivalent_value(it.value_iterated_to) > bound
    )


def arrival_offsets_s(rate_per_s: float, span_s: float, arrival: str, seed: int) -> np.ndarray:
    """Scheduled send times in [0, span_s): Poisson (exponential gaps) or evenly spaced."""
    if arrival == "constant":
        return np.arange(0.0, span_s, 1.0 / rate_per_s)
    rng = np.random.default_rng(seed)
    expected = int(rate_per_s * span_s)
    gaps = rng.exponential(1.0 / rate_per_s, size=expected + 6 * int(expected**0.5) + 16)
    offsets = np.cumsum(gaps) - gaps[0]
    return offsets[offsets < span_s]


# ---------------------------------------------------------------- the client process


def _client_main(index: int, spec: LoadSpec, offsets_s: np.ndarray, start_at, go, out) -> None:
    """Entry point of one spawned client process."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional (e.g. Windows)
        pass
    try:
        asyncio.run(_client(index, spec, offsets_s, start_at, go, out))
    except BaseException as exc:  # report, never hang the parent
        out.put(("failed", index, f"{type(exc).__name__}: {exc}"))


async def _client(index: int, spec: LoadSpec, offsets_s: np.ndarray, start_at, go, out) -> None:
    import gc

    import grpc

    options = [
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.max_send_message_length", 256 << 20),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [grpc.aio.insecure_channel(spec.target, options=options) for _ in range(spec.channels)]
    await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 20.0) for ch in channels))
    calls = [ch.unary_unary(spec.method) for ch in channels]  # bytes in, bytes out: no (de)serialization
    out.put(("ready", index, None))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    t0 = start_at.value
    window_start = t0 + spec.warmup_s
    window_end = window_start + spec.duration_s
    timeout_s = spec.timeout_ms / 1000.0
    payloads = spec.payloads
    hist, tick_hist, late_hist = new_histogram(), new_histogram(), new_histogram()
    errors: Counter = Counter()
    error_hists: dict[str, Any] = {}  # status name -> HdrHistogram of those requests' latencies
    counts = {"sent": 0, "sent_all": 0, "done": 0, "ok": 0, "last_done": window_start}
    gc.collect()
    gc.freeze()

    async def one(k: int, t_sched: float, measured: bool, scheduled: bool = False) -> None:
        if measured and scheduled:  # lateness at the real send, after any backlog of task starts ahead of it
            late_hist.record_value(min(HIST_MAX_US, max(1, int((time.monotonic() - t_sched) * 1e6))))
        code = None
        try:
            await calls[k % len(calls)](payloads[k % len(payloads)], timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        t_done = time.monotonic()
        counts["done"] += 1
        if not measured:
            return
        latency_us = min(HIST_MAX_US, max(1, int((t_done - t_sched) * 1e6)))
        if code is None:
            hist.record_value(latency_us)
            tick_hist.record_value(latency_us)
            counts["ok"] += 1
            counts["last_done"] = max(counts["last_done"], t_done)
        else:
            errors[code] += 1
            if code not in error_hists:
                error_hists[code] = new_histogram()
            error_hists[code].record_value(latency_us)

    async def open_loop() -> None:
        tasks = set()
        for k, offset in enumerate(offsets_s.tolist()):
            t_sched = t0 + offset
            delay = t_sched - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif k % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: send the backlog, but let replies in
            measured = window_start <= t_sched < window_end
            counts["sent"] += measured
            counts["sent_all"] += 1
            task = loop.create_task(one(k, t_sched, measured, scheduled=True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)

    async def closed_loop(worker: int) -> None:
        k = worker
        while True:
            t_send = time.monotonic()
            if t_send >= window_end:
                return
            measured = t_send >= window_start
            counts["sent"] += measured
            counts["sent_all"] += 1
            await one(k, t_send, measured)
            k += spec.concurrency

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            out.put(("tick", index, (counts["sent_all"], counts["done"], sum(errors.values()), tick_hist.encode())))
            tick_hist.reset()

    tick_task = loop.create_task(ticker())
    if spec.concurrency > 0:
        await asyncio.gather(*(closed_loop(w) for w in range(spec.concurrency)))
    else:
        await open_loop()
    tick_task.cancel()
    for ch in channels:
        await ch.close()
    out.put(
        (
            "done",
            index,
            {
                "sent": counts["sent"],
                "ok": counts["ok"],
                "errors": dict(errors),
                "error_hists": {code: h.encode() for code, h in error_hists.items()},
                "last_done": counts["last_done"],
                "hist": hist.encode(),
                "late_hist": late_hist.encode(),
                "late_count": count_above(late_hist, spec.late_ms * 1000.0),
            },
        )
    )


# ---------------------------------------------------------------- the parent


Progress = Callable[[str], None]


def run_load(
    spec: LoadSpec, progress: Progress | None = None, on_window_start: Callable[[], None] | None = None
) -> LoadResult:
    """Run `spec` with `spec.clients` spawned processes; block until every reply or deadline is in.

    `progress` receives a one-line status about once a second; `on_window_start` is called when
    the warm-up ends (e.g. to snapshot the server's metrics).
    """
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
        ctx.Process(target=_client_main, args=(i, spec, shares[i], start_at, go, out), daemon=True)
        for i in range(spec.clients)
    ]
    for proc in procs:
        proc.start()
    try:
        _await_all(out, procs, "ready", 60.0)
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
    return _merge(spec, finals, start_at.value)


def _await_all(out, procs, kind: str, timeout_s: float) -> None:
    from neuronserve.errors import Unavailable

    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout_s
    while pending:
        try:
            msg_kind, index, detail = out.get(timeout=0.2)
        except queue_mod.Empty:
            dead = [i for i in pending if not procs[i].is_alive()]
            if dead or time.monotonic() > deadline:
                why = (
                    f"exited (code {procs[dead[0]].exitcode})"
                    if dead
                    else f"not {kind} after {timeout_s:.0f} s (is the target reachable?)"
                )
                raise Unavailable(f"load: client processes {dead or sorted(pending)} {why}") from None
            continue
        if msg_kind == "failed":
            raise Unavailable(f"load: client process {index} failed: {detail}")
        if msg_kind == kind:
            pending.discard(index)


def _collect(spec: LoadSpec, out, procs, t0: float, progress: Progress | None, on_window_start) -> dict[int, dict]:
    from neuronserve.errors import Unavailable

    finals: dict[int, dict] = {}
    ticks: dict[int, tuple[int, int, int]] = {}
    window_hist = new_histogram()
    last_print = time.monotonic()
    window_started = False
    deadline = t0 + spec.warmup_s + spec.duration_s + spec.timeout_ms / 1000.0 + 30.0
    while len(finals) < len(procs):
        now = time.monotonic()
        if not window_started and now >= t0 + spec.warmup_s:
            window_started = True
            if on_window_start is not None:
                on_window_start()
        if now > deadline:
            raise Unavailable(f"load: clients still running {deadline - t0:.0f} s after the start")
        wait_s = 0.2 if window_started else min(0.2, max(0.0, t0 + spec.warmup_s - now))  # wake for the window's start
        try:
            kind, index, detail = out.get(timeout=wait_s) if wait_s > 0 else out.get_nowait()
        except queue_mod.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        if kind == "failed":
            raise Unavailable(f"load: client process {index} failed: {detail}")
        if kind == "done":
            finals[index] = detail
        elif kind == "tick":
            sent, done, errs, encoded = detail
            ticks[index] = (sent, done, errs)
            window_hist.decode_and_add(encoded)
            if progress is not None and time.monotonic() - last_print >= 0.9:
                sent_t, done_t, err_t = (sum(v[i] for v in ticks.values()) for i in range(3))
                p99 = (
                    window_hist.get_value_at_percentile(99.0) / 1000.0
                    if window_hist.get_total_count()
                    else float("nan")
                )
                phase = "warm-up" if now < t0 + spec.warmup_s else "measure"
                progress(
                    f"t={now - t0:5.1f}s {phase}  sent {sent_t}  done {done_t}  errors {err_t}  p99(last 1s) {p99:.1f} ms"
                )
                window_hist.reset()
                last_print = time.monotonic()
    if not window_started and on_window_start is not None:
        on_window_start()
    return finals


def _merge(spec: LoadSpec, finals: dict[int, dict], t0: float) -> LoadResult:
    hist, late_hist = new_histogram(), new_histogram()
    errors: Counter = Counter()
    error_hists: dict[str, Any] = {}
    sent = ok = late = 0
    last_done = t0 + spec.warmup_s
    for final in finals.values():
        hist.decode_and_add(final["hist"])
        late_hist.decode_and_add(final["late_hist"])
        errors.update(final["errors"])
        for code, encoded in final["error_hists"].items():
            error_hists.setdefault(code, new_histogram()).decode_and_add(encoded)
        sent += final["sent"]
        ok += final["ok"]
        late += final["late_count"]
        last_done = max(last_done, final["last_done"])
    elapsed_s = max(spec.duration_s, last_done - (t0 + spec.warmup_s)) if spec.concurrency == 0 else spec.duration_s
    latency = (
        {f"p{p:g}": hist.get_value_at_percentile(p) / 1000.0 for p in PERCENTILES}
        if ok
        else {f"p{p:g}": float("nan") for p in PERCENTILES}
    )
    latency["max"] = hist.get_max_value() / 1000.0 if ok else float("nan")
    latency["mean"] = hist.get_mean_value() / 1000.0 if ok else float("nan")
    return LoadResult(
        offered_rate_per_s=spec.rate_per_s,
        duration_s=spec.duration_s,
        sent=sent,
        ok=ok,
        errors=dict(sorted(errors.items())),
        achieved_rate_per_s=ok / elapsed_s,
        latency_ms=latency,
        late_sends=late if spec.concurrency == 0 else 0,
        late_threshold_ms=spec.late_ms,
        late_p99_ms=late_hist.get_value_at_percentile(99.0) / 1000.0 if late_hist.get_total_count() else 0.0,
        late_max_ms=late_hist.get_max_value() / 1000.0 if late_hist.get_total_count() else 0.0,
        histogram=hist.encode(),
        error_latency_ms={code: Percentiles.of(error_hists[code]) for code in sorted(error_hists)},
        error_histograms={code: error_hists[code].encode() for code in sorted(error_hists)},
        warmup_s=spec.warmup_s,
    )


def stderr_progress(line: str) -> None:
    """A status line that rewrites itself on a terminal and appends elsewhere."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K" + line)
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()
