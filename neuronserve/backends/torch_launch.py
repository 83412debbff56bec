"""TorchLauncher: one core group's fused executions on torch's inter-op threads, in order, one at a time.

Why not an executor thread: a Python thread that calls a TorchScript graph gives the GIL up and takes it
back about five times a call (once per input tensor the graph lets go of, see _Fork), and every retake
waits for the event loop's thread to let go of it (docs/benchmarks.md, 2026-12-04). A graph forked inside
TorchScript (`torch.jit.fork`) on detached inputs runs on torch's C++ inter-op thread, which takes the GIL
once per execution, for the completion callback.

Contract: `submit(steps)` on the event loop -> an asyncio future of (the steps' outputs, first `rows`
rows of each, concatenated in order; busy seconds). Executions run in submission order, one at a time;
the next one starts from the previous one's completion callback on torch's thread, so the core never
waits for the loop between executions. An execution that fails fails its own submission only.

At low load the graph runs on the loop instead (plain's way, no thread at all): while the event loop,
the graph on it, is busy less than `inline_below` of the time (`--inline-below`, default 0.75), a
submission that finds the launcher idle runs inside `submit` and its future is done when `submit`
returns. A batch is then about one request anyway, and the two wake-ups of a hand-off (torch's thread,
then the loop) cost more CPU than the overlap saves (docs/pipeline.md). From `inline_below + INLINE_GAP`
on, the launcher hands executions to torch's thread again, where the next batch forms while one runs and
the loop keeps its time for the calls.

The readings, each a BusyFraction: leaving the loop, the loop thread's demand (seconds it ran or waited,
runnable, for a CPU: thread_demand_s), so a loop that other processes keep off the CPUs still reads as
saturated; coming back, its CPU seconds plus the rows' cost at the CPU seconds per row the inline runs
measured (what the graph would add to it).
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from neuronserve.errors import Unavailable
from neuronserve.loop_load import BusyFraction, thread_demand_s
from neuronserve.sched_policy import use_policy
from neuronserve.thread_placement import release_thread
from neuronserve.execution import call_soon, concat


class _Fork(torch.nn.Module):
    """Scripted around a graph: calling it starts the graph on an inter-op thread and returns at once.

    The graph gets detached aliases of the inputs (new tensors on the same memory, with no Python
    object): when torch's thread drops the last C++ reference to a tensor that has a Python object, it
    takes the GIL to release that object, once per input (perf: `decref_pyobject`). The callers' tensors
    are released with the step, in the done-callback, which already holds the GIL."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(
        self, user: torch.Tensor, peer: torch.Tensor, index: torch.Tensor
    ) -> torch.futures.Future[torch.Tensor]:
        return torch.jit.fork(self.graph, user.detach(), peer.detach(), index.detach())


_kept = threading.local()


def keep_thread_state() -> None:
    """Torch's thread, the GIL held: keep this thread's Python thread state for the thread's life, and
    put the thread under the default scheduling policy (it inherits --sched-policy from the loop that
    started it; its completions wake the loop, sched_policy.py) and on every CPU (it inherits a pinned
    loop's one CPU, thread_placement.py).

    pybind11 (torch's callbacks) gives a thread it did not start a new Python thread state each time it
    takes the GIL, and deletes it on release: on Python 3.11 a 16 KiB mmap and munmap per callback, each
    munmap a TLB shootdown that interrupts the event loop's CPU too. One extra PyGILState_Ensure (never
    released) keeps the state's count above zero, so pybind11 reuses it."""
    if not getattr(_kept, "state", False):
        ctypes.pythonapi.PyGILState_Ensure()
        use_policy("normal")
        release_thread()  # started by the loop: back on every CPU if the loop is pinned (thread_placement.py)
        _kept.state = True


INLINE_GAP = 0.1  # the hysteresis: threaded from inline_below + INLINE_GAP, inline again under inline_below
Fork = Callable[..., torch.futures.Future]  # (user, peer, index) -> a future of the graph's output


def forking(graph: torch.jit.ScriptModule) -> Fork:
    """`graph` wrapped so that a call forks it: the scripted wrapper's `forward`, bound once at load
    (calling it skips torch.nn.Module's call machinery: 62 us a launch against 75, measured)."""
    return torch.jit.script(_Fork(graph)).forward


@dataclass(frozen=True)
class Step:
    """One execution: `fork` (from `forking`) on `inputs`, keeping the first `rows` rows of its output;
    `graph` is the graph itself, called on the loop when the launcher runs the step inline."""

    fork: Fork
    inputs: tuple[torch.Tensor, ...]
    rows: int
    graph: Callable[..., torch.Tensor]


@dataclass(eq=False)
class _Submission:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outs: list[np.ndarray]  # by step; a step's slot holds its output once settled
    remaining: int
    busy_s: float = 0.0

    def settle(self, index: int, rows: int, done: torch.futures.Future, busy_s: float) -> None:
        """Loop thread: one step's output is back (or its error)."""
        if self.future.done():  # failed through an earlier step, or its caller cancelled it
            return
        try:
            self.outs[index] = done.value().numpy()[:rows]
        except Exception as exc:  # the graph raised: this submission fails, the launcher goes on
            self.future.set_exception(exc)
            return
        self.busy_s += busy_s
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result((concat(self.outs), self.busy_s))


@dataclass(eq=False)
class _Queued:
    submission: _Submission
    index: int
    step: Step


@dataclass(eq=False)
class TorchLauncher:
    """The executions of one core group (thread-safe: submit on the loop, callbacks on torch's threads).
    The queue is bounded by the caller: the pipeline submits only while the group has a free slot."""

    clock: Callable[[], float] = time.perf_counter
    cpu_clock: Callable[[], float] = time.thread_time  # the loop thread's CPU seconds (preemption excluded)
    demand_clock: Callable[[], float] = thread_demand_s  # its seconds run or waiting, runnable, for a CPU
    inline_below: float = 0.0  # the loop's load under which an idle launcher runs submissions inline (0: never)
    load: BusyFraction = field(default_factory=lambda: BusyFraction(tau_s=0.2))  # the rows' (the graph's)
    loop: BusyFraction = field(default_factory=lambda: BusyFraction(tau_s=0.2))  # the loop thread's CPU
    demand: BusyFraction = field(default_factory=lambda: BusyFraction(tau_s=0.2))  # and its demand
    row_s: float = 0.0  # CPU seconds per row, as the inline runs measure them (a moving average)
    _inline: bool = False  # set in __post_init__
    _queue: deque[_Queued] = field(default_factory=deque)
    _running: bool = False
    _closed: bool = False
    _loop_thread: int = 0  # the submitting loop's thread (threading.get_ident; callbacks on it are not torch's)
    _idle: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self._inline = self.inline_below > 0

    def submit(self, steps: Sequence[Step]) -> asyncio.Future:
        """Queue the steps (one submission), or run them here at low load; the future is settled on
        the calling loop."""
        if not steps:
            raise ValueError("submit needs at least one step")
        loop = asyncio.get_running_loop()
        with self._idle:
            if self._closed:
                raise Unavailable("the core group's launcher is closed")
            rows = sum(step.rows for step in steps)
            inline = self._low_load(rows) and not self._running
            if inline:
                self._running = True  # close() waits for the inline run too
            else:
                self._loop_thread = threading.get_ident()  # pthread_self: no system call, unlike get_native_id
                submission = _Submission(loop, loop.create_future(), [np.empty(0)] * len(steps), len(steps))
                self._queue.extend(_Queued(submission, i, step) for i, step in enumerate(steps))
                first = self._next_locked() if not self._running else None
        if inline:
            return self._run_inline(loop, steps, rows)
        if first is not None:
            self._start(first)
        return submission.future

    def run_now(self, graph: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], rows: int):
        """One execution on this thread at once, when the launcher is idle and in its inline mode: (the
        first `rows` rows of its output, busy seconds), or None (nothing counted: submit it). The rows
        count into the load, which may turn the launcher to its thread for the next submissions; the
        graph's error propagates to the caller."""
        with self._idle:
            if self._closed or self._running or not self._inline:
                return None
            self._low_load(rows)
            self._running = True  # close() waits for it
        return self._inline_run([(graph, inputs, rows)], rows)

    def _inline_run(self, calls: Sequence[tuple[Callable[..., torch.Tensor], Sequence[torch.Tensor], int]], rows: int):
        """Each (graph, inputs, rows kept) on this thread, one after the other: (their rows concatenated,
        busy seconds); the CPU per row learned; the launcher marked idle after (nothing was queued
        meanwhile: only the loop submits). The graph's error propagates."""
        try:
            start_s, start_cpu_s = self.clock(), self.cpu_clock()
            with torch.inference_mode():
                outs = [graph(*inputs).numpy()[:kept] for graph, inputs, kept in calls]
            self._learn_row_s(self.cpu_clock() - start_cpu_s, rows)
            return concat(outs), self.clock() - start_s
        finally:
            with self._idle:
                self._next_locked()

    def _learn_row_s(self, cpu_s: float, rows: int) -> None:
        """An inline run's CPU seconds per row into the moving average the load is counted at."""
        row_s = cpu_s / max(1, rows)
        self.row_s = row_s if self.row_s == 0 else 0.9 * self.row_s + 0.1 * row_s

    def _low_load(self, rows: int) -> bool:
        """Loop thread: count a submission's rows into the graph's load and the loop's CPU and demand since
        the last one into theirs; True while the loop with the graph on it is idle enough to run it inline
        (hysteresis: inline until its demand reaches inline_below + INLINE_GAP, then threaded until its CPU
        plus the graph's load is back under inline_below)."""
        if self.inline_below > 0:
            now_s = self.clock()
            loop = self.loop.count_total(now_s, self.cpu_clock())
            demand = self.demand.count_total(now_s, self.demand_clock())
            graph = self.load.add(now_s, self.row_s * rows)
            if self._inline:  # the loop's demand holds the graph's: kept off the CPUs, it is still busy
                self._inline = demand < self.inline_below + INLINE_GAP
            else:  # on torch's thread: it would come back to the loop
                self._inline = loop + graph < self.inline_below
        return self._inline

    def _run_inline(self, loop: asyncio.AbstractEventLoop, steps: Sequence[Step], rows: int) -> asyncio.Future:
        """The steps on this thread, one after the other; a future of `loop`, done on return."""
        future = loop.create_future()
        try:
            future.set_result(self._inline_run([(step.graph, step.inputs, step.rows) for step in steps], rows))
        except Exception as exc:  # the graph raised: this submission fails, the launcher goes on
            future.set_exception(exc)
        return future

    def close(self, timeout_s: float = 60.0) -> None:
        """Refuse new submissions; wait (up to timeout_s) for the queued and running executions to end."""
        with self._idle:
            self._closed = True
            self._idle.wait_for(lambda: not self._running, timeout=timeout_s)

    def _next_locked(self) -> _Queued | None:
        """The next step to start (marking the launcher running), or None (marking it idle)."""
        queued = self._queue.popleft() if self._queue else None
        self._running = queued is not None
        if queued is None:
            self._idle.notify_all()
        return queued

    def _start(self, queued: _Queued) -> None:
        """Fork the step; its callback starts the next one. Any thread holding the GIL."""
        start_s = self.clock()
        try:
            with torch.inference_mode():
                done = queued.step.fork(*queued.step.inputs)
        except Exception as exc:  # refused before it ran (its inputs): fail it, go on with the next
            done = torch.futures.Future()
            done.set_exception(exc)
        done.add_done_callback(lambda finished: self._finished(queued, start_s, finished))

    def _finished(self, queued: _Queued, start_s: float, done: torch.futures.Future) -> None:
        """Torch's thread, the GIL held: hand this step to its loop, then start the next one (in that
        order: a step that completes at once calls back from inside _start, and settles stay in order)."""
        busy_s = self.clock() - start_s
        if threading.get_ident() != self._loop_thread:  # not a step that completed inside submit
            keep_thread_state()
        submission = queued.submission
        call_soon(submission.loop, submission.settle, queued.index, queued.step.rows, done, busy_s)
        with self._idle:
            following = self._next_locked()
        if following is not None:
            self._start(following)
