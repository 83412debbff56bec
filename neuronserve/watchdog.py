"""The event-loop watchdog of a single serving process (`--workers 1`).

A loop that stops turning answers nothing, health included. The loop beats every `interval_s`; a
thread checks the beat and, once it is older than `timeout_s` (--worker-timeout-s), logs every
thread's stack and exits the process with EXIT_LOOP_STALLED, so whatever runs it (Kubernetes, a
systemd unit) restarts it at once instead of waiting for liveness probes to time out. Armed only once
the server is ready (a warm-up may block the loop on imports). A pool's workers are watched by their
supervisor instead (workers.py). The clock is injectable: tests drive `check()` on a fake one.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_LOOP_STALLED = 3


def _exit_stalled(silent_s: float) -> None:
    log.critical(
        "the event loop has not turned for %.1f s: every thread's stack follows; exiting %d so the process is restarted",
        silent_s,
        EXIT_LOOP_STALLED,
    )
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    logging.shutdown()
    os._exit(EXIT_LOOP_STALLED)


class LoopWatchdog:
    """Beats on the event loop (`arm()`), checks on its own thread; `on_stall(silent_s)` once, on a stall."""

    def __init__(
        self,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_stall: Callable[[float], None] = _exit_stalled,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.interval_s = min(0.5, timeout_s / 4)
        self._clock = clock
        self._on_stall = on_stall
        self._last = clock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = self._clock()

    def check(self) -> bool:
        """One check: True (after calling on_stall) when the last beat is older than timeout_s."""
        silent_s = self._clock() - self._last
        if silent_s <= self.timeout_s:
            return False
        self._on_stall(silent_s)
        return True

    def arm(self) -> None:
        """On the event loop: start beating on it and checking on a thread (once)."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            if not self._stopped.is_set():
                self.beat()
                loop.call_later(self.interval_s, tick)

        tick()
        self._thread = threading.Thread(target=self._watch, name="neuronserve-loop-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval_s):
            if self.check():
                return

    def stop(self) -> None:
        """No check runs after this returns (a drain may legitimately take the loop's time)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
