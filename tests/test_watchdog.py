"""The event-loop watchdog: a fake clock for the rule, a real loop blocked on an event for the thread."""

from __future__ import annotations

import asyncio
import threading

import pytest

from neuronserve.watchdog import LoopWatchdog
from support import FakeClock


def test_a_stall_is_told_once_the_last_beat_is_older_than_the_timeout():
    clock, stalls = FakeClock(), []
    dog = LoopWatchdog(2.0, clock=clock, on_stall=stalls.append)
    clock.now_s += 2.0
    assert not dog.check() and stalls == []  # exactly the timeout: not yet
    dog.beat()
    clock.now_s += 1.9
    assert not dog.check()
    clock.now_s += 0.2
    assert dog.check()
    assert stalls == [pytest.approx(2.1)]


def test_a_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        LoopWatchdog(0.0)


@pytest.mark.timeout(30)
def test_a_loop_blocked_in_a_callback_is_noticed_by_the_thread_and_a_turning_loop_is_not():
    stalls: list[float] = []
    unblock = threading.Event()

    def on_stall(silent_s: float) -> None:
        stalls.append(silent_s)
        unblock.set()

    dog = LoopWatchdog(1.0, on_stall=on_stall)  # a busy host's scheduling pauses stay well under it

    async def main() -> None:
        dog.arm()
        for _ in range(15):  # 1.5 s of a turning loop, longer than the timeout: beats keep it quiet
            await asyncio.sleep(0.1)
        assert stalls == []
        unblock.wait(20.0)  # the loop stops turning until the watchdog tells

    try:
        asyncio.run(main())
    finally:
        dog.stop()
    assert len(stalls) == 1 and stalls[0] > 1.0
