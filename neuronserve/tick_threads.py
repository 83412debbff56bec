"""The tick's host threads: a step run over a tick's block starts on a kept pool, one BLAS thread per block,
stoppable between blocks (the caller gone). tick.score_tick's runner."""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from neuronserve.thread_placement import released_executor, usable_cpus


class TickStopped(Exception):
    """score_tick's stop was set: it ended between blocks, with no result (nobody waits for one)."""


def default_threads() -> int:
    """The host threads a tick runs on: one per CPU the process may use (the same on a pinned loop)."""
    try:
        return max(1, len(usable_cpus()))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def in_blocks(step, starts: list[int], threads: int, stop: threading.Event | None = None) -> None:
    """step over every block start on `threads` threads (a pool kept for the next tick: starting its threads
    was 9% of a tick thread's py-spy samples while the CPUs were busy) with one BLAS thread per block (two callers of a
    2-thread BLAS ran slower than one). Once `stop` is set, the blocks not yet started are skipped."""
    if stop is not None:
        step = functools.partial(_unless_stopped, step, stop)
    workers = min(threads, len(starts))
    if workers <= 1:
        for start in starts:
            step(start)
        return
    with threadpool_limits(limits=1, user_api="blas"):
        # numpy's matmul and ufuncs, torch's ops and the compiled kernels release the GIL
        list(_executor(workers).map(step, starts))


def _unless_stopped(step, stop: threading.Event, start: int) -> None:
    if not stop.is_set():
        step(start)


@functools.cache
def _executor(workers: int) -> ThreadPoolExecutor:
    """The tick's thread pool of `workers` threads, one per size asked for (the CPUs, or a device's executions)."""
    return released_executor(workers, "tick")
