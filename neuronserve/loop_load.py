"""The event loop's load, as the switches that run work on the loop read it (torch_launch.TorchLauncher, lane.
BatchLane): a BusyFraction of recent seconds, and a thread's demand for a CPU (its seconds running plus its
seconds waiting, runnable, for one). Why demand and not CPU time: docs/pipeline.md ("At low load").
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

_demand = threading.local()  # per thread: its open /proc/thread-self/schedstat (-1: none), kept for its life


def thread_demand_s() -> float:
    """The calling thread's demand for a CPU so far, in seconds: the time it ran plus the time it waited,
    runnable, for a CPU (Linux /proc/thread-self/schedstat). A loop that other processes keep off the CPUs
    reads as busy, where its CPU time alone would read as half idle. Where schedstat is missing, the
    thread's CPU time (time.thread_time). A pread on a descriptor the thread keeps open: 1.6 us a call in a
    tight loop, 8-9 us right after a model call (measured; docs/benchmarks.md, nineteenth session)."""
    fd = getattr(_demand, "fd", None)
    if fd is None:
        try:
            fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            fd = -1
        _demand.fd = fd
    if fd >= 0:
        try:
            run_ns, wait_ns = os.pread(fd, 64, 0).split()[:2]
            return (int(run_ns) + int(wait_ns)) / 1e9
        except (OSError, ValueError):
            _demand.fd = -1
    return time.thread_time()


@dataclass
class BusyFraction:
    """The share of a core that recent work needs: its seconds decayed with time constant `tau_s`
    (e^-t/tau per second of age), divided by tau_s. Work of e seconds every p seconds reads e/p; with
    none for a few tau it falls to 0. Not thread-safe: one thread's, or under its user's lock."""

    tau_s: float
    _value: float = 0.0
    _at_s: float = 0.0
    _total_s: float | None = None  # the last reading count_total saw

    def at(self, now_s: float) -> float:
        return self._value * math.exp(-max(0.0, now_s - self._at_s) / self.tau_s)

    def add(self, at_s: float, work_s: float) -> float:
        """Count `work_s` done at `at_s`; the busy fraction then."""
        self._value = self.at(at_s) + work_s / self.tau_s
        self._at_s = at_s
        return self._value

    def count_total(self, at_s: float, total_s: float) -> float:
        """Count the work a cumulative clock (thread_demand_s, time.thread_time) shows since its last reading
        here (none at the first); the busy fraction then."""
        last_s = total_s if self._total_s is None else self._total_s
        self._total_s = total_s
        return self.add(at_s, max(0.0, total_s - last_s))
