"""What several test files share: LoopThread, an event loop on a daemon thread where a test's servers
live (the test calls them from its own thread with sync stubs, or runs coroutines there with `run`),
wait_until, a poll with a deadline instead of a sleep, and FakeClock, a clock a test moves by hand."""

from __future__ import annotations

import asyncio
import threading
import time


class FakeClock:
    """Seconds that move only when a test sets `now_s`."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class LoopThread:
    def __init__(self, name: str = "test-serving-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn, *args):
        """fn(*args) on the loop's thread (to read state the loop owns)."""

        async def call():
            return fn(*args)

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    """Poll `predicate` every 5 ms until true; AssertionError past `timeout_s`."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
