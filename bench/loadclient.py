"""One client process of the load generator: its channels, its sends and what it measured.

Spawned by loadgen.run_load, one per `LoadSpec.clients`, each with its own event loop and gRPC
channels. It connects, says Ready, waits for the parent's start event, then sends its share of the
schedule (open loop: each request at its scheduled time, latency from that time) or keeps
`concurrency` requests in flight (closed loop). About once a second it sends a Tick (running totals,
the last second's latencies); at the end, a Done with its counts and encoded histograms over the
measured window. Any exception becomes a Failed, so the parent never waits on a dead client.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from neuronserve.bench.histograms import count_above, micros, new_histogram
from neuronserve.bench.loadgen import Done, Failed, Ready, Tick

if TYPE_CHECKING:
    from neuronserve.bench.loadgen import LoadSpec

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]
READY_TIMEOUT_S = 20.0  # per channel, to connect

Call = Callable[..., Awaitable[Any]]


def client_main(index: int, spec: LoadSpec, offsets_s: np.ndarray, start_at, go, out) -> None:
    """Entry point of one spawned client process; every message it sends to the parent goes on `out`."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is optional (e.g. Windows)
        pass
    try:
        asyncio.run(_client(index, spec, offsets_s, start_at, go, out))
    except BaseException as exc:  # report, never hang the parent
        out.put(Failed(index, f"{type(exc).__name__}: {exc}"))


async def _client(index: int, spec: LoadSpec, offsets_s: np.ndarray, start_at, go, out) -> None:
    """Connect, say Ready, wait for the start (`start_at` is set before `go`), run, say Done."""
    channels = [grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) for _ in range(spec.channels)]
    await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), READY_TIMEOUT_S) for ch in channels))
    calls = [ch.unary_unary(spec.method) for ch in channels]  # bytes in, bytes out: no (de)serialization
    out.put(Ready(index))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go.wait)
    client = _Client(index, spec, calls, out, start_at.value)
    gc.collect()
    gc.freeze()
    tick_task = loop.create_task(client.ticker())
    if spec.concurrency > 0:
        await asyncio.gather(*(client.closed_loop(w) for w in range(spec.concurrency)))
    else:
        await client.open_loop(offsets_s)
    tick_task.cancel()
    for ch in channels:
        await ch.close()
    out.put(client.done())


class _Client:
    """The sends of one client process from the start at `t0`, and what they measured.

    Only requests scheduled (open loop) or sent (closed loop) inside the measured window are
    recorded; `sent_all` and `replied` count the warm-up too (for the Ticks).
    """

    def __init__(self, index: int, spec: LoadSpec, calls: list[Call], out, t0: float) -> None:
        self.index, self.spec, self.calls, self.out = index, spec, calls, out
        self.t0 = t0
        self.window_start = t0 + spec.warmup_s
        self.window_end = self.window_start + spec.duration_s
        self.timeout_s = spec.timeout_ms / 1000.0
        self.payloads = spec.payloads
        self.hist, self.tick_hist, self.late_hist = new_histogram(), new_histogram(), new_histogram()
        self.errors: Counter[str] = Counter()
        self.error_hists: dict[str, Any] = {}  # status name -> HdrHistogram of those requests' latencies
        self.sent = self.sent_all = self.replied = self.ok = 0
        self.last_done = self.window_start

    async def one(self, k: int, t_sched: float, measured: bool, scheduled: bool = False) -> None:
        """Send request k (due at t_sched) and, if `measured`, record its latency under its status."""
        if measured and scheduled:  # lateness at the real send, after any backlog of task starts ahead of it
            self.late_hist.record_value(micros(time.monotonic() - t_sched))
        code = None
        try:
            payload = self.payloads[k % len(self.payloads)]
            await self.calls[k % len(self.calls)](payload, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        t_done = time.monotonic()
        self.replied += 1
        if measured:
            self._record(code, t_done, micros(t_done - t_sched))

    def _record(self, code: str | None, t_done: float, latency_us: int) -> None:
        if code is None:
            self.hist.record_value(latency_us)
            self.tick_hist.record_value(latency_us)
            self.ok += 1
            self.last_done = max(self.last_done, t_done)
        else:
            self.errors[code] += 1
            if code not in self.error_hists:
                self.error_hists[code] = new_histogram()
            self.error_hists[code].record_value(latency_us)

    async def open_loop(self, offsets_s: np.ndarray) -> None:
        """Each request at t0 + its offset, without waiting for replies; returns when all are in."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        for k, offset in enumerate(offsets_s.tolist()):
            t_sched = self.t0 + offset
            delay = t_sched - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif k % 32 == 0:
                await asyncio.sleep(0)  # behind schedule: send the backlog, but let replies in
            measured = self.window_start <= t_sched < self.window_end
            self.sent += measured
            self.sent_all += 1
            task = loop.create_task(self.one(k, t_sched, measured, scheduled=True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)

    async def closed_loop(self, worker: int) -> None:
        """One of `concurrency` senders: the next request as soon as the last reply is in, until the window ends."""
        k = worker
        while True:
            t_send = time.monotonic()
            if t_send >= self.window_end:
                return
            measured = t_send >= self.window_start
            self.sent += measured
            self.sent_all += 1
            await self.one(k, t_send, measured)
            k += self.spec.concurrency

    async def ticker(self) -> None:
        """A Tick every second until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            self.out.put(
                Tick(self.index, self.sent_all, self.replied, sum(self.errors.values()), self.tick_hist.encode())
            )
            self.tick_hist.reset()

    def done(self) -> Done:
        return Done(
            index=self.index,
            sent=self.sent,
            ok=self.ok,
            errors=dict(self.errors),
            error_histograms={code: h.encode() for code, h in self.error_hists.items()},
            last_done=self.last_done,
            histogram=self.hist.encode(),
            late_histogram=self.late_hist.encode(),
            late_count=count_above(self.late_hist, self.spec.late_ms * 1000.0),
        )
