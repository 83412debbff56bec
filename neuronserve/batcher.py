"""DynamicBatcher: queues requests in rows and hands batches to an injected `run_batch`.

Between the service (above: `await submit(payload, rows)` per request) and the pipeline (below:
`run_batch(slices)` runs one batch). Generic: it never looks inside a payload; a Slice names rows
[start, stop) of one request's payload, and run_batch returns one array holding those rows in slice
order, which the batcher cuts back per request.

Contract: a batch forms only while a slot is free; at once when a device is idle, a full batch is
queued or a split request's rest heads the queue; else the free slot is held until the OLDEST queued
request has waited max_queue_delay_ms (Triton's delay clock, made work-conserving). Admission is at
once and before any work: a request whose expected completion misses its deadline is
DeadlineExceeded, a backlog past max_queue_wait_ms or max_queue_rows is Overloaded. A failing batch
fails exactly its requests, once each; a cancelled caller's unbatched rows never run. The rules in
full, with the reasons: docs/batching.md.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from neuronserve.admission import Admission, checked_rows
from neuronserve.batch_types import BatcherStats, CallLater, RunBatch, Slice
from neuronserve.config import BatchingConfig
from neuronserve.errors import ConfigError, NeuronServeError, Unavailable


@dataclass(eq=False)
class _Request:
    payload: Any
    rows: int
    priority: int
    arrival_s: float
    deadline_s: float | None
    future: asyncio.Future
    taken: int = 0  # rows already put in batches
    received: int = 0  # rows whose results are back
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start, rows) of a split request


@dataclass(eq=False)
class _Batch:
    """A running batch and when the dispatcher expects its device to start and finish it."""

    rows: int
    device_start_s: float  # now, or when the busy device it waits for is expected to free
    finish_s: float


@dataclass(frozen=True)
class _Member:
    """A batch member: the request and the rows [start, stop) of it in this batch."""

    request: _Request
    start: int
    stop: int


class DynamicBatcher:
    """One queue of requests in rows for one run_batch (rules: docs/batching.md).

    max_batch_rows / max_in_flight: the largest batch and the batches running at once (config's, if set,
    override them); estimate_latency_s(rows) -> seconds (cheap, never raises); devices: batches that
    really run in parallel; clock: the seconds every deadline_s is on; call_later(delay_s, callback) ->
    a handle with cancel(): the hold's timer on that clock (default: the running loop's). run_now(payload,
    rows): a lone request's rows run on the loop itself, or None (then run_batch runs it) when nothing else runs.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_rows: int,
        config: BatchingConfig,
        max_in_flight: int = 1,
        estimate_latency_s: Callable[[int], float] | None = None,
        devices: int = 1,
        clock: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None,
        name: str = "batcher",
        run_now: Callable[[Any, int], np.ndarray | None] | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_in_flight < 1 or devices < 1:
            raise ConfigError(
                f"{name}: max_batch_rows, max_in_flight and devices must be >= 1, got {max_batch_rows}, {max_in_flight} and {devices}"
            )
        self.name = name
        self._run_batch = run_batch
        self._run_now = run_now
        self._max_rows = min(max_batch_rows, config.max_batch_rows or max_batch_rows)
        self._max_in_flight = config.max_in_flight_batches or max_in_flight
        self._devices = min(devices, self._max_in_flight)
        self._delay_s = config.max_queue_delay_ms / 1e3
        self._admission = Admission(name, config, estimate_latency_s, self._max_rows)
        self._clock = clock
        self._call_later = call_later  # None: the running loop's call_later
        self._queues: dict[int, deque[_Request]] = {}  # priority -> FIFO
        self._queued_rows = 0
        self._hold_until_s = float("inf")  # when the dispatcher's current hold ends, on `clock` (inf: none)
        self._running: dict[asyncio.Task, _Batch] = {}
        self._wake: asyncio.Event = None  # type: ignore[assignment]  # made in start(), on the running loop
        self._dispatcher: asyncio.Task | None = None
        self._closing = False
        self._batches = self._batch_rows = 0
        self._cancelled = self._failed = 0
        self._batched_requests = 0
        self._queue_s_total = 0.0

    def start(self) -> None:
        """Create the dispatcher task on the running loop."""
        if self._dispatcher is not None:
            return
        self._wake = asyncio.Event()
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name=f"{self.name}-dispatcher")

    async def close(self, drain: bool = True) -> None:
        """Refuse new requests; drain=True answers every queued one first, drain=False fails them with
        Unavailable. Either way, returns once no batch is running."""
        self._closing = True
        if not drain:
            for queue in list(self._queues.values()):
                for request in list(queue):
                    self._failed += self._fail(request, Unavailable(f"{self.name} closed before the request ran"))
        if self._dispatcher is not None:
            self._wake.set()
            await asyncio.wait({self._dispatcher})  # wait, not await: cancelling close must not stop the drain
        while self._running:
            await asyncio.wait(set(self._running))

    async def submit(
        self, payload: Any, rows: int, *, deadline_s: float | None = None, priority: int = 0
    ) -> np.ndarray:
        """Queue `rows` rows of `payload`; the result holds this request's rows of run_batch's output, in order."""
        if self._closing or self._dispatcher is None:
            raise Unavailable(f"{self.name} is {'closed' if self._closing else 'not started'}: not accepting requests")
        rows = checked_rows(rows, self._admission.max_queue_rows, self.name)
        now = self._clock()
        self._admission.admit(rows, now, deadline_s, self._queued_rows, self._running_s(now), self._devices)
        if self._queued_rows == 0 and len(self._running) < self._devices and rows <= self._max_rows:
            return await self._run_alone(payload, rows, now)
        request = _Request(payload, rows, priority, now, deadline_s, asyncio.get_running_loop().create_future())
        self._queues.setdefault(priority, deque()).append(request)
        self._queued_rows += rows
        if len(self._running) < self._devices:
            self._launch()  # rule (a) at once: an idle device does not wait for the dispatcher's turn
        # Wake the dispatcher only when these rows can change its decision (docs/batching.md).
        if self._queued_rows and (
            self._queued_rows == rows or self._queued_rows >= self._max_rows or now >= self._hold_until_s
        ):
            self._wake.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._cancelled += 1
            self._unqueue(request)
            raise

    def stats(self) -> BatcherStats:
        return BatcherStats(
            queued_rows=self._queued_rows,
            queued_requests=sum(len(q) for q in self._queues.values()),
            in_flight_batches=len(self._running),
            batches=self._batches,
            batch_rows=self._batch_rows,
            rejected_overload=self._admission.rejected_overload,
            rejected_deadline=self._admission.rejected_deadline,
            cancelled=self._cancelled,
            failed=self._failed,
            batched_requests=self._batched_requests,
            queue_s_total=self._queue_s_total,
            slowdown=self._admission.slowdown,
        )

    async def _dispatch(self) -> None:
        while True:
            while self._queued_rows == 0 or len(self._running) >= self._max_in_flight:
                if self._closing and self._queued_rows == 0:
                    return
                self._wake.clear()
                await self._wake.wait()
            hold_s = self._hold_s()
            if hold_s > 0:
                self._wake.clear()
                self._hold_until_s = self._clock() + hold_s
                call_later = self._call_later or asyncio.get_running_loop().call_later
                timer = call_later(hold_s, self._wake.set)  # no task per hold
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                    self._hold_until_s = float("inf")
                continue  # re-evaluate: a batch finished, a full batch is queued, or the delay is up
            self._launch()

    def _launch(self) -> None:
        """Form one batch (per the firing rule, docs/batching.md) and start running it."""
        members = self._form()
        if members:
            now = self._clock()
            rows = sum(m.stop - m.start for m in members)
            device_start_s = max(now, self._device_free_s(now))
            batch = _Batch(rows, device_start_s, device_start_s + self._admission.expected_s(rows))
            task = asyncio.get_running_loop().create_task(self._run(members, batch))
            self._running[task] = batch
            task.add_done_callback(self._finished)

    def _hold_s(self) -> float:
        """Seconds to hold a free slot for more rows (rules (a)-(d), docs/batching.md); <= 0: fire now."""
        if len(self._running) < self._devices or self._closing or self._queued_rows >= self._max_rows:
            return 0.0
        heads = [queue[0] for queue in self._queues.values() if queue]
        if any(request.taken for request in heads):
            return 0.0  # the rest of a split request: it is already running, holding its tail only delays it
        now = self._clock()
        oldest_s = min(request.arrival_s for request in heads)
        return max(oldest_s + self._delay_s, self._device_free_s(now) - self._delay_s) - now

    def _device_free_s(self, now: float) -> float:
        """When the next device without a batch waiting behind its current one is expected to free: with
        R batches running on D devices, R - D of them wait behind another, so the (R - D + 1)-th earliest
        expected finish (now, if a device is idle)."""
        excess = len(self._running) - self._devices
        if excess < 0:
            return now
        return sorted(batch.finish_s for batch in self._running.values())[excess]

    def _form(self) -> list[_Member]:
        """Take queued rows for one batch, per the firing rule (docs/batching.md)."""
        now = self._clock()
        members: list[_Member] = []
        rows = 0
        members_deadline_s = float("inf")
        for priority in sorted(self._queues):
            queue = self._queues[priority]
            while queue and rows < self._max_rows:
                request = queue[0]
                part = min(request.rows - request.taken, self._max_rows - rows)
                if self._dropped(request, now, rows + part):
                    continue
                if members and self._admission.shortfall_s(now, rows + part, members_deadline_s) > 0:
                    return self._count(members, rows)  # it would make an earlier member late: next batch
                members.append(self._take(request, part, now))
                rows += part
                if request.deadline_s is not None:
                    members_deadline_s = min(members_deadline_s, request.deadline_s)
                if request.taken == request.rows:
                    queue.popleft()
            if not queue:
                del self._queues[priority]
            if rows == self._max_rows:
                break
        return self._count(members, rows)

    def _dropped(self, request: _Request, now: float, batch_rows: int) -> bool:
        """Whether the request at the head of its queue left it instead of joining a batch of `batch_rows`:
        its caller went away (this loop step; submit's handler has not run yet), or it would miss its deadline."""
        if request.future.done():
            self._unqueue(request)
            return True
        error = self._admission.late(request.rows, batch_rows, now, request.deadline_s)
        if error is not None:
            self._fail(request, error)
            return True
        return False

    def _take(self, request: _Request, part: int, now: float) -> _Member:
        """The next `part` rows of the request at the head of its queue, into the batch being formed."""
        if request.taken == 0:
            self._batched_requests += 1
            self._queue_s_total += now - request.arrival_s
        member = _Member(request, request.taken, request.taken + part)
        request.taken += part
        self._queued_rows -= part
        return member

    def _count(self, members: list[_Member], rows: int) -> list[_Member]:
        if members:
            self._batches += 1
            self._batch_rows += rows
        return members

    async def _run_alone(self, payload: Any, rows: int, now: float) -> np.ndarray:
        """Rule (a) for a request that finds the queue empty and a device idle: its batch of its own rows
        runs in the caller's task (no batch task, no future, no loop round trip). Cancelling the caller
        stops only its own wait: the pipeline keeps the slot until the device is done."""
        task = asyncio.current_task()
        assert task is not None  # submit runs in a task
        self._running[task] = batch = _Batch(rows, now, now + self._admission.expected_s(rows))
        self._batches += 1
        self._batch_rows += rows
        self._batched_requests += 1
        try:
            out = self._run_now(payload, rows) if self._run_now is not None and len(self._running) == 1 else None
            if out is None:
                out = await self._run_batch([Slice(payload, 0, rows)])
            return self._checked(out, batch)
        except asyncio.CancelledError:
            self._cancelled += 1
            raise
        except NeuronServeError:
            self._failed += 1
            raise
        except Exception as exc:
            self._failed += 1
            raise self._batch_error(exc) from exc
        finally:
            self._finished(task)

    def _checked(self, out: np.ndarray, batch: _Batch) -> np.ndarray:
        """run_batch's output for `batch`, after learning its speed; NeuronServeError if it has the wrong rows."""
        self._admission.observe(batch.rows, self._clock() - batch.device_start_s)
        if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != batch.rows:
            got = f"shape {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise NeuronServeError(f"internal: {self.name} run_batch returned {got} for a batch of {batch.rows} rows")
        return out

    def _batch_error(self, exc: Exception) -> NeuronServeError:
        return NeuronServeError(f"{self.name}: run_batch failed: {type(exc).__name__}: {exc}")

    async def _run(self, members: list[_Member], batch: _Batch) -> None:
        rows = batch.rows
        try:
            out = self._checked(
                await self._run_batch([Slice(m.request.payload, m.start, m.stop) for m in members]), batch
            )
            offset = 0
            for m in members:
                self._deliver(m.request, m.start, out[offset : offset + m.stop - m.start])
                offset += m.stop - m.start
        except asyncio.CancelledError:
            self._fail_batch(members, Unavailable(f"{self.name}: batch of {rows} rows was cancelled"))
            raise
        except Exception as exc:
            self._fail_batch(members, exc if isinstance(exc, NeuronServeError) else self._batch_error(exc))

    def _finished(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        if self._queued_rows or self._closing:  # else nothing to dispatch: the next submit wakes it
            self._wake.set()

    def _deliver(self, request: _Request, start: int, rows: np.ndarray) -> None:
        if request.future.done():  # cancelled, or failed through another part
            return
        if len(rows) == request.rows:
            request.future.set_result(rows)
            return
        request.parts.append((start, rows))
        request.received += len(rows)
        if request.received == request.rows:
            request.parts.sort(key=lambda part: part[0])
            request.future.set_result(np.concatenate([part for _, part in request.parts], axis=0))
            request.parts.clear()

    def _fail_batch(self, members: list[_Member], exc: BaseException) -> None:
        for m in members:
            self._failed += self._fail(m.request, exc)

    def _fail(self, request: _Request, exc: BaseException) -> bool:
        """Fail a request once, as a whole (True if this call failed it); its rows not yet batched leave the queue."""
        self._unqueue(request)
        if request.future.done():
            return False
        request.future.set_exception(exc)
        return True

    def _unqueue(self, request: _Request) -> None:
        """Drop a request's rows not yet batched (an emptied priority queue is removed by _form)."""
        if request.taken == request.rows:
            return
        self._queues[request.priority].remove(request)
        self._queued_rows -= request.rows - request.taken
        request.taken = request.rows

    def _running_s(self, now: float) -> float:
        """The running batches' expected device seconds still to go, summed."""
        return sum(b.finish_s - max(now, b.device_start_s) for b in self._running.values() if b.finish_s > now)
