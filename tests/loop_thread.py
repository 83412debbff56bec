"""LoopThread: an event loop on a daemon thread, where a test's servers live; the test calls them
from its own thread with sync stubs, or runs coroutines there with `run`."""

from __future__ import annotations

import asyncio
import threading


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
