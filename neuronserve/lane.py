"""BatchLane: Score batches formed and run on one host thread, the event loop only admitting requests.

For a score path that is one core group's fused graph run on a host thread (the cpu backend with
--inline-below 0 and one batch in flight: a pool worker's defaults; Pipeline.lane). The loop admits
each request (DynamicBatcher's rules: the latency model against its deadline, max_queue_wait_ms,
max_queue_rows), queues it and awaits one future; the lane's thread takes every pending request (up to
max_batch_rows rows, or one larger request alone) the moment it is free, runs the batch (`run_batch`:
assembly, the graph, NaN marking) and answers the whole batch in one loop callback. The loop spends no
task, timer or callback of its own per batch (docs/pipeline.md, "The lane").

At low load a request that finds the lane idle and nothing queued runs on the loop at once, as the plain
server does, saving the two wake-ups of a hand-off: while the loop thread's demand (loop_load) is under
`inline_below` (0: never; Runtime passes INLINE_BELOW).

Implements the batcher interface Runtime uses: start, submit, stats, close. A request whose deadline
the batch would miss leaves with DeadlineExceeded; a cancelled caller's rows never run once it has gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from neuronserve.admission import Admission, checked_rows
from neuronserve.batch_types import BatcherStats
from neuronserve.config import BatchingConfig
from neuronserve.errors import DeadlineExceeded, NeuronServeError, Unavailable
from neuronserve.execution import call_soon
from neuronserve.loop_load import BusyFraction, thread_demand_s
from neuronserve.thread_placement import release_thread

log = logging.getLogger(__name__)

# A pool worker's lane: a lone request runs on the loop while the loop is busy (running or waiting for a
# CPU) under half the time. Two workers at 475 and 650 req/s: P50 1.16-1.17x plain against 1.31-1.33x, CPU
# a request 1.29-1.33x against 1.38-1.40x, the same throughput at saturation (docs/benchmarks.md, thirteenth session)
INLINE_BELOW = 0.5

ScoreBatch = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], "LaneResult"]


class LaneResult(Protocol):
    """What run_batch returns: `scores` [rows, K] in request order (more attributes go to on_batch)."""

    scores: np.ndarray


@dataclass(eq=False)
class _Request:
    user: np.ndarray
    peers: np.ndarray
    rows: int
    arrival_s: float
    deadline_s: float | None
    future: asyncio.Future


class BatchLane:
    """One thread's queue of score requests (payload: (user [1, F_u], peers [rows, F_p])).

    run_batch(users, peers) runs one batch on the lane's thread (or, inline, on the loop) and returns a
    LaneResult; on_batch(result, requests, on_loop) counts it on the loop before its requests are answered.
    estimate_latency_s(rows): the latency model (seconds, cheap); clock: the seconds deadlines are on;
    demand_clock: the loop thread's seconds running or waiting for a CPU."""

    def __init__(
        self,
        run_batch: ScoreBatch,
        *,
        max_batch_rows: int,
        config: BatchingConfig,
        estimate_latency_s: Callable[[int], float],
        on_batch: Callable[[LaneResult, int, bool], None],
        name: str,
        inline_below: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        demand_clock: Callable[[], float] = thread_demand_s,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._clock = clock
        self._max_rows = min(max_batch_rows, config.max_batch_rows or max_batch_rows)
        self._admission = Admission(name, config, estimate_latency_s, self._max_rows)
        self._pending: deque[_Request] = deque()
        self._queued_rows = 0
        self._finish_s: float | None = None  # the running batch's expected end; None: the thread is idle
        self._lock = threading.Condition()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future | None = None  # done when the thread has exited
        self._batches = self._batch_rows = self._batched_requests = 0
        self._cancelled = self._failed = 0
        self._queue_s_total = 0.0
        self._inline_below = inline_below
        self._demand_clock = demand_clock
        self._demand = BusyFraction(tau_s=0.2)  # the loop thread's, read at each submission

    def start(self) -> None:
        """Start the lane's thread; the loop it answers on is the running one."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        threading.Thread(target=self._work, name=f"{self.name}-lane", daemon=True).start()

    async def submit(self, payload: tuple[np.ndarray, np.ndarray], rows: int, *, deadline_s: float | None = None):
        """Queue one request of `rows` peer rows; its scores [rows, K]."""
        if self._closing or self._loop is None:
            raise Unavailable(f"{self.name} is {'closed' if self._closing else 'not started'}: not accepting requests")
        rows = checked_rows(rows, self._admission.max_queue_rows, self.name)
        now = self._clock()
        if self._inline_below > 0 and not self._pending and self._finish_s is None and self._low_load(now):
            return self._run_inline(payload, rows, now, deadline_s)  # the thread is idle and stays so
        request = _Request(payload[0], payload[1], rows, now, deadline_s, self._loop.create_future())
        with self._lock:
            running_s = max(0.0, self._finish_s - now) if self._finish_s is not None else 0.0
            self._admission.admit(rows, now, deadline_s, self._queued_rows, running_s, devices=1)
            self._pending.append(request)
            self._queued_rows += rows
            if self._finish_s is None:
                self._lock.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._cancelled += 1
            with self._lock:
                if request in self._pending:
                    self._pending.remove(request)
                    self._queued_rows -= rows
            raise

    def _low_load(self, now: float) -> bool:
        """Whether the loop thread's demand is under inline_below. Read only when the lane is idle: the read
        is a system call, which gives the GIL away, and a busy lane's thread takes it (the loop then waits
        for it); the demand is cumulative, so the readings skipped are counted at the next one."""
        return self._demand.count_total(now, self._demand_clock()) < self._inline_below

    def _run_inline(self, payload: tuple[np.ndarray, np.ndarray], rows: int, now: float, deadline_s: float | None):
        """One request as its own batch, on the loop: admitted by the same rules, counted as a batch, its
        error the one a batch of it would give."""
        self._admission.admit(rows, now, deadline_s, 0, 0.0, devices=1)
        try:
            result = self._run_batch([payload[0]], [payload[1]])
        except NeuronServeError:
            raise
        except Exception as exc:
            raise self._batch_error(exc) from exc
        finally:
            self._admission.observe(rows, self._clock() - now)
        error = self._scores_error(result, rows)
        if error is not None:
            raise error
        with self._lock:
            self._batches += 1
            self._batch_rows += rows
            self._batched_requests += 1
        self._on_batch(result, 1, True)
        return result.scores

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(
                queued_rows=self._queued_rows,
                queued_requests=len(self._pending),
                in_flight_batches=int(self._finish_s is not None),
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

    async def close(self, drain: bool = True) -> None:
        """Refuse new requests; drain=True answers every queued one first, drain=False fails them with
        Unavailable. Either way, returns once the thread has ended (its running batch answered)."""
        with self._lock:
            self._closing = True
            dropped = [] if drain else list(self._pending)
            if not drain:
                self._pending.clear()
                self._queued_rows = 0
            self._lock.notify()
        self._fail(dropped, Unavailable(f"{self.name} closed before the request ran"))
        if self._stopped is not None:
            await asyncio.wait({self._stopped})  # wait, not await: cancelling close must not stop the drain

    def _work(self) -> None:
        """The lane's thread. A bug in it fails every queued request (INTERNAL) and closes the lane
        instead of leaving its callers waiting."""
        release_thread()  # started by the loop: back on every CPU if the loop is pinned
        try:
            self._serve()
        except BaseException:
            log.exception("%s: the lane's thread failed; refusing its requests", self.name)
            with self._lock:
                self._closing = True
                dropped = list(self._pending)
                self._pending.clear()
                self._queued_rows = 0
            self._post(self._fail, dropped, NeuronServeError(f"internal: {self.name}'s batch thread failed"))
        self._post(self._end)

    def _serve(self) -> None:
        """Take a batch, run it, hand it to the loop; until closed and drained."""
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._lock.wait()
                if not self._pending:
                    break
                batch, late = self._take(self._clock())
            self._post(self._expire, late)
            if batch:
                started_s = self._clock()
                try:
                    result: LaneResult | BaseException = self._run_batch(
                        [r.user for r in batch], [r.peers for r in batch]
                    )
                except BaseException as exc:  # the batch's error, for its requests
                    result = exc
                with self._lock:
                    self._admission.observe(sum(r.rows for r in batch), self._clock() - started_s)
                    self._finish_s = None
                self._post(self._answer, batch, result)

    def _take(self, now: float) -> tuple[list[_Request], list[tuple[_Request, DeadlineExceeded]]]:
        """Under the lock: the next batch (FIFO, up to max rows; a larger request alone) and the requests
        that left because the batch would miss their deadline; marks the thread running."""
        batch: list[_Request] = []
        late: list[tuple[_Request, DeadlineExceeded]] = []
        rows, deadline_s = 0, float("inf")
        while self._pending:
            request = self._pending[0]
            if batch and rows + request.rows > self._max_rows:
                break
            if request.future.done():  # its caller went away: its rows never run
                self._pending.popleft()
                self._queued_rows -= request.rows
                continue
            together = min(rows + request.rows, max(self._max_rows, request.rows))
            error = self._admission.late(request.rows, together, now, request.deadline_s)
            if error is not None:
                self._pending.popleft()
                self._queued_rows -= request.rows
                late.append((request, error))
                continue
            if batch and self._admission.shortfall_s(now, together, deadline_s) > 0:
                break  # it would make an earlier member late: the next batch
            self._pending.popleft()
            self._queued_rows -= request.rows
            batch.append(request)
            rows = together
            deadline_s = min(deadline_s, request.deadline_s or deadline_s)
            self._queue_s_total += now - request.arrival_s
        if batch:
            self._batches += 1
            self._batch_rows += rows
            self._batched_requests += len(batch)
            self._finish_s = now + self._admission.expected_s(rows)
        return batch, late

    def _post(self, callback, *args) -> None:
        """Run `callback(*args)` on the loop, unless its first argument is an empty list."""
        if not args or args[0]:
            call_soon(self._loop, callback, *args)  # type: ignore[arg-type]

    def _answer(self, batch: list[_Request], result: LaneResult | BaseException) -> None:
        """Loop thread: count the batch, then answer each request with its rows (or the batch's error)."""
        if isinstance(result, BaseException):
            error = result if isinstance(result, NeuronServeError) else self._batch_error(result)
            self._fail(batch, error)
            return
        rows = sum(r.rows for r in batch)
        scores = result.scores
        wrong = self._scores_error(result, rows)
        if wrong is not None:
            self._fail(batch, wrong)
            return
        self._on_batch(result, len(batch), False)
        offset = 0
        for request in batch:
            if not request.future.done():
                request.future.set_result(scores[offset : offset + request.rows])
            offset += request.rows

    def _scores_error(self, result: LaneResult, rows: int) -> NeuronServeError | None:
        scores = result.scores
        if not isinstance(scores, np.ndarray) or scores.ndim < 1 or scores.shape[0] != rows:
            return NeuronServeError(f"internal: {self.name} run_batch returned no scores for {rows} rows")
        return None

    def _expire(self, late: list[tuple[_Request, DeadlineExceeded]]) -> None:
        for request, error in late:
            if not request.future.done():
                request.future.set_exception(error)

    def _fail(self, requests: list[_Request], error: BaseException) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)
                self._failed += 1

    def _batch_error(self, exc: BaseException) -> NeuronServeError:
        return NeuronServeError(f"{self.name}: run_batch failed: {type(exc).__name__}: {exc}")

    def _end(self) -> None:
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
