"""DynamicBatcher semantics, deterministic: run_batch is gated by one asyncio.Event per batch, and time
is a fake clock that moves only when a test moves it (no wall-clock assertions)."""

from __future__ import annotations

import asyncio
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import numpy as np
import pytest

from neuronserve.batcher import BatcherStats, DynamicBatcher, Slice
from neuronserve.config import BatchingConfig
from neuronserve.errors import ConfigError, CoreFault, DeadlineExceeded, InvalidInput, NeuronServeError, Overloaded, Unavailable

pytestmark = pytest.mark.timeout(20)

NEVER_MS = 1e9  # a max_queue_delay_ms no test could wait out: nothing may depend on it


class Timer:
    def __init__(self, due_s: float, callback: Callable[[], None]) -> None:
        self.due_s, self.callback, self.cancelled = due_s, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The batcher's fake time: `now_s` is what clock() reads; a timer set with call_later fires when
    advance_to() moves the clock past it, never on real time."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.timers: List[Timer] = []

    def __call__(self) -> float:
        return self.now_s

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now_s + delay_s, callback)
        self.timers.append(timer)
        return timer

    def advance_to(self, now_s: float) -> None:
        self.now_s = now_s
        due = [t for t in self.timers if t.due_s <= now_s]
        self.timers = [t for t in self.timers if t.due_s > now_s]
        for timer in due:
            if not timer.cancelled:
                timer.callback()


class Runner:
    """run_batch: records each batch as [(name, start, stop)], waits for that batch's gate, then echoes
    the rows (or raises what `fail` holds for that batch index, or returns `short` rows too few)."""

    def __init__(self, gated: bool = True) -> None:
        self.gated = gated
        self.batches: List[List[Tuple[str, int, int]]] = []
        self.gates: List[asyncio.Event] = []
        self.fail: Dict[int, BaseException] = {}
        self.short: Dict[int, int] = {}

    async def __call__(self, slices: Sequence[Slice]) -> np.ndarray:
        index = len(self.batches)
        self.batches.append([(s.payload[0], s.start, s.stop) for s in slices])
        gate = asyncio.Event()
        self.gates.append(gate)
        if not self.gated:
            gate.set()
        await gate.wait()
        if index in self.fail:
            raise self.fail[index]
        out = np.concatenate([s.payload[1][s.start : s.stop] for s in slices], axis=0)
        return out[: len(out) - self.short.get(index, 0)]

    def release(self, *indices: int) -> None:
        for index in indices:
            self.gates[index].set()

    def release_all(self) -> None:
        self.gated = False
        for gate in self.gates:
            gate.set()


def payload(name: str, rows: int) -> Tuple[str, np.ndarray]:
    """Rows that identify themselves: [row index, a number from the name]."""
    data = np.empty((rows, 2), dtype=np.float32)
    data[:, 0] = np.arange(rows)
    data[:, 1] = zlib.crc32(name.encode()) % 2**24  # exact in float32
    return name, data


async def settle() -> None:
    """Let every ready task run (submits land, the dispatcher forms batches)."""
    for _ in range(20):
        await asyncio.sleep(0)


def make(
    runner: Runner,
    *,
    max_batch_rows: int = 100,
    max_in_flight: int = 1,
    devices: int = 1,
    clock: Optional[Clock] = None,
    estimate=None,
    **config,
) -> DynamicBatcher:
    config.setdefault("max_queue_delay_ms", NEVER_MS)
    config.setdefault("max_queue_wait_ms", NEVER_MS)
    clock = clock or Clock()
    batcher = DynamicBatcher(
        runner,
        max_batch_rows=max_batch_rows,
        config=BatchingConfig(**config),
        max_in_flight=max_in_flight,
        estimate_latency_s=estimate,
        devices=devices,
        clock=clock,
        call_later=clock.call_later,
        name="test",
    )
    batcher.start()
    return batcher


def submit(batcher: DynamicBatcher, name: str, rows: int, **kwargs) -> "asyncio.Task[np.ndarray]":
    return asyncio.ensure_future(batcher.submit(payload(name, rows), rows, **kwargs))


def check(result: np.ndarray, name: str, rows: int) -> None:
    np.testing.assert_array_equal(result, payload(name, rows)[1])


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 15))


def test_lone_request_does_not_wait_for_the_delay():
    async def body():
        runner = Runner(gated=False)
        batcher = make(runner)  # the delay is ~11 days and the clock never moves
        check(await batcher.submit(payload("a", 3), 3), "a", 3)
        assert runner.batches == [[("a", 0, 3)]]
        stats = batcher.stats()
        assert (stats.batches, stats.batch_rows, stats.queue_s_total) == (1, 3, 0.0)
        await batcher.close()

    run(body())


def test_a_request_that_finds_the_batcher_idle_runs_its_batch_in_its_own_task():
    """Rule (a) with an empty queue: run_batch runs in the caller's task (no batch task, no future).
    Cancelling that caller mid-batch counts it cancelled and frees the device at once; a failure counts
    it failed, wrapped as NeuronServeError, and the batcher goes on."""

    async def body():
        runner = Runner()
        tasks: List[Optional[asyncio.Task]] = []

        async def tracked(slices: Sequence[Slice]) -> np.ndarray:
            tasks.append(asyncio.current_task())
            return await runner(slices)

        batcher = make(tracked)  # type: ignore[arg-type]
        a = submit(batcher, "a", 3)
        await settle()
        assert tasks == [a] and batcher.stats().in_flight_batches == 1
        b = submit(batcher, "b", 2)  # the device is busy: b queues
        await settle()
        assert batcher.stats().queued_rows == 2
        a.cancel()
        await settle()
        assert a.cancelled() and batcher.stats().cancelled == 1
        assert len(tasks) == 2 and tasks[1] is not b  # b went in a batch task as soon as a's ended
        runner.release(1)
        check(await b, "b", 2)
        runner.fail[2] = RuntimeError("boom")
        c = submit(batcher, "c", 1)
        await settle()
        runner.release(2)
        with pytest.raises(NeuronServeError, match="run_batch failed: RuntimeError: boom"):
            await c
        assert tasks[2] is c
        stats = batcher.stats()
        assert (stats.failed, stats.batches, stats.batched_requests, stats.in_flight_batches) == (1, 3, 3, 0)
        runner.release_all()
        check(await batcher.submit(payload("d", 4), 4), "d", 4)
        await batcher.close()

    run(body())


def test_requests_accumulate_while_busy_and_go_when_a_slot_frees():
    async def body():
        clock = Clock()
        runner = Runner()
        batcher = make(runner, clock=clock)
        a = submit(batcher, "a", 1)
        await settle()
        clock.now_s = 1.0
        b = submit(batcher, "b", 2)
        await settle()
        clock.now_s = 2.0
        c = submit(batcher, "c", 3)
        await settle()
        assert runner.batches == [[("a", 0, 1)]]
        assert (batcher.stats().queued_rows, batcher.stats().queued_requests) == (5, 2)
        clock.now_s = 5.0  # b and c waited 4 s and 3 s (from their own arrival, the oldest first)
        runner.release(0)
        await settle()
        assert runner.batches[1] == [("b", 0, 2), ("c", 0, 3)]  # at once, no fresh delay window
        runner.release(1)
        check(await a, "a", 1), check(await b, "b", 2), check(await c, "c", 3)
        assert batcher.stats().queue_s_total == pytest.approx(4.0 + 3.0)  # a waited 0 s
        assert batcher.stats().batched_requests == 3
        await batcher.close()

    run(body())


def test_a_free_slot_is_held_for_the_delay_from_the_oldest_arrival_while_the_device_is_busy():
    async def body():
        clock = Clock()
        runner = Runner()
        batcher = make(runner, max_batch_rows=4, max_in_flight=2, clock=clock, max_queue_delay_ms=10)
        a = submit(batcher, "a", 1)  # nothing running: goes at once
        await settle()
        b = submit(batcher, "b", 1)
        await settle()
        clock.advance_to(0.009)
        c = submit(batcher, "c", 1)
        await settle()  # b is 9 ms old, < 10 ms
        assert runner.batches == [[("a", 0, 1)]]  # a slot is free, but a runs: b and c wait to batch
        clock.advance_to(0.0101)  # the OLDEST (b, arrived at 0) has waited the delay; c only 1.1 ms
        await settle()
        assert runner.batches[1] == [("b", 0, 1), ("c", 0, 1)]
        d = submit(batcher, "d", 2)
        e = submit(batcher, "e", 2)
        await settle()
        assert runner.batches == [[("a", 0, 1)], [("b", 0, 1), ("c", 0, 1)]]  # both slots busy
        runner.release(0)
        await settle()
        assert runner.batches[2] == [("d", 0, 2), ("e", 0, 2)]  # a full batch goes without the delay
        runner.release(1, 2)
        for task, name, rows in ((a, "a", 1), (b, "b", 1), (c, "c", 1), (d, "d", 2), (e, "e", 2)):
            check(await task, name, rows)
        await batcher.close()

    run(body())


def test_rows_fill_the_batch_and_a_request_is_split_across_batches():
    async def body():
        runner = Runner()
        batcher = make(runner, max_batch_rows=8)
        x = submit(batcher, "x", 1)
        await settle()
        tasks = [submit(batcher, name, rows) for name, rows in (("a", 3), ("b", 3), ("c", 3), ("d", 1))]
        await settle()
        runner.release(0)
        await settle()
        assert runner.batches[1] == [("a", 0, 3), ("b", 0, 3), ("c", 0, 2)]  # c's first part fills it
        runner.release(1)
        await settle()
        assert runner.batches[2] == [("c", 2, 3), ("d", 0, 1)]
        runner.release(2)
        results = await asyncio.gather(x, *tasks)
        for result, (name, rows) in zip(results, (("x", 1), ("a", 3), ("b", 3), ("c", 3), ("d", 1))):
            check(result, name, rows)
        assert (batcher.stats().batches, batcher.stats().batch_rows) == (3, 11)
        await batcher.close()

    run(body())


def test_large_request_is_reassembled_in_row_order_when_parts_finish_out_of_order():
    async def body():
        runner = Runner()
        batcher = make(runner, max_batch_rows=4, max_in_flight=3)
        big = submit(batcher, "big", 10)
        await settle()
        assert runner.batches == [[("big", 0, 4)], [("big", 4, 8)], [("big", 8, 10)]]
        for index in (2, 1, 0):
            runner.release(index)
            await settle()
        check(await big, "big", 10)
        await batcher.close()

    run(body())


def test_lower_priority_value_first_and_fifo_within_a_priority():
    async def body():
        runner = Runner()
        batcher = make(runner, max_batch_rows=3)
        x = submit(batcher, "x", 1)
        await settle()
        tasks = [submit(batcher, n, 1, priority=p) for n, p in (("a", 1), ("b", 0), ("c", 1), ("d", 0))]
        await settle()
        runner.release(0)
        await settle()
        assert runner.batches[1] == [("b", 0, 1), ("d", 0, 1), ("a", 0, 1)]
        runner.release(1)
        await settle()
        assert runner.batches[2] == [("c", 0, 1)]
        runner.release(2)
        await asyncio.gather(x, *tasks)
        await batcher.close()

    run(body())


def test_in_flight_limit_and_config_overrides():
    async def body():
        runner = Runner()
        # config caps max_batch_rows lower (4 < 100) and overrides max_in_flight (2, not 1)
        batcher = DynamicBatcher(
            runner,
            max_batch_rows=100,
            config=BatchingConfig(max_queue_delay_ms=NEVER_MS, max_batch_rows=4, max_in_flight_batches=2),
            max_in_flight=1,
            clock=Clock(),
        )
        batcher.start()
        tasks = []
        for name in "abc":
            tasks.append(submit(batcher, name, 4))
            await settle()
        assert runner.batches == [[("a", 0, 4)], [("b", 0, 4)]]
        assert (batcher.stats().in_flight_batches, batcher.stats().queued_rows) == (2, 4)
        runner.release(1)
        await settle()
        assert runner.batches[2] == [("c", 0, 4)]
        runner.release(0, 2)
        await asyncio.gather(*tasks)
        await batcher.close()

    run(body())


def test_queue_is_bounded_and_overload_fails_at_once():
    async def body():
        runner = Runner()
        batcher = make(runner, max_queue_rows=10)
        a = submit(batcher, "a", 4)  # in flight: not queued
        await settle()
        b = submit(batcher, "b", 6)
        await settle()
        with pytest.raises(Overloaded, match=r"queue holds 6 rows; 5 more would pass max_queue_rows=10"):
            await batcher.submit(payload("c", 5), 5)
        d = submit(batcher, "d", 4)  # exactly fills the bound
        await settle()
        assert batcher.stats().rejected_overload == 1 and batcher.stats().queued_rows == 10
        with pytest.raises(InvalidInput, match=r"11 rows can never fit the queue \(max_queue_rows=10\)"):
            await batcher.submit(payload("huge", 11), 11)  # not a retryable overload: it never fits
        runner.release_all()
        await asyncio.gather(a, b, d)
        assert all("c" not in [n for n, _, _ in batch] for batch in runner.batches)
        await batcher.close()

    run(body())


def test_deadline_passed_or_unmeetable_is_rejected_at_submit():
    async def body():
        clock = Clock()
        clock.now_s = 10.0
        runner = Runner(gated=False)
        batcher = make(runner, clock=clock, estimate=lambda rows: 1.0 * rows)
        with pytest.raises(DeadlineExceeded, match=r"1 rows .* 1000\.000 ms after"):
            await batcher.submit(payload("late", 1), 1, deadline_s=10.0)  # 10 + 1 s: 1 s late
        with pytest.raises(DeadlineExceeded, match=r"1 rows .* 3000\.000 ms after"):
            await batcher.submit(payload("gone", 1), 1, deadline_s=8.0)  # already 2 s past it
        with pytest.raises(DeadlineExceeded, match=r"batch of 2 rows .* 500\.000 ms after"):
            await batcher.submit(payload("slow", 2), 2, deadline_s=11.5)  # 2 rows need 2 s
        check(await batcher.submit(payload("ok", 1), 1, deadline_s=11.0), "ok", 1)  # exactly in time
        assert runner.batches == [[("ok", 0, 1)]]
        assert batcher.stats().rejected_deadline == 3
        await batcher.close()

    run(body())


def test_deadline_checked_as_a_request_joins_a_batch():
    async def body():
        clock = Clock()
        runner = Runner()
        batcher = make(runner, clock=clock, estimate=lambda rows: 1.0 * rows)
        x = submit(batcher, "x", 1)
        await settle()
        a = submit(batcher, "a", 1, deadline_s=10.0)
        b = submit(batcher, "b", 1, deadline_s=5.0)
        c = submit(batcher, "c", 5, deadline_s=100.0)
        await settle()
        clock.now_s = 6.0  # b's deadline passes while it waits for a slot
        runner.release(0)
        await settle()
        # a: 6 + 1 <= 10 joins; b: 6 + 2 > 5 rejected; c: 6 + 6 > a's 10, so c waits for the next batch
        assert runner.batches[1] == [("a", 0, 1)]
        with pytest.raises(DeadlineExceeded, match=r"batch of 2 rows .* 3000\.000 ms after"):
            await b
        runner.release(1)
        await settle()
        assert runner.batches[2] == [("c", 0, 5)]
        runner.release(2)
        check(await x, "x", 1), check(await a, "a", 1), check(await c, "c", 5)
        assert all(name != "b" for batch in runner.batches for name, _, _ in batch)
        assert batcher.stats().rejected_deadline == 1
        await batcher.close()

    run(body())


def test_admission_counts_the_backlog_ahead_and_refuses_at_once():
    async def body():
        clock = Clock()
        runner = Runner()
        # 10 ms per row, batches of up to 10 rows, one slot: the backlog drains at 100 rows/s
        batcher = make(runner, max_batch_rows=10, clock=clock, estimate=lambda rows: 0.01 * rows, max_queue_wait_ms=120)
        running = submit(batcher, "run", 10)  # 100 ms in flight
        await settle()
        queued = submit(batcher, "q", 4)  # 100 ms ahead: within the budget
        await settle()
        # 14 rows ahead = 140 ms > the 120 ms budget: refused at once, whatever its deadline
        with pytest.raises(Overloaded, match=r"140\.0 ms to drain, above max_queue_wait_ms=120"):
            await batcher.submit(payload("over", 1), 1)
        with pytest.raises(DeadlineExceeded, match=r"after 2x the 140\.0 ms the queue ahead needs would finish 230\.000 ms"):
            await batcher.submit(payload("late", 1), 1, deadline_s=0.06)
        # 140 + 10 ms would end before a 200 ms deadline, but the queue is priced at twice its wait
        # (QUEUE_WAIT_FACTOR: the waits outside it grow with it): 290 ms, 90 ms late
        with pytest.raises(DeadlineExceeded, match=r"would finish 90\.000 ms after"):
            await batcher.submit(payload("queued", 1), 1, deadline_s=0.2)
        stats = batcher.stats()
        assert (stats.rejected_overload, stats.rejected_deadline) == (1, 2)
        clock.now_s = 0.3  # the running batch took 300 ms for a 100 ms estimate: 3x slower than modelled
        runner.release(0)
        await settle()
        assert batcher.stats().slowdown == pytest.approx(1 + 0.2 * (3 - 1))  # one EWMA step toward 3
        runner.release_all()
        check(await running, "run", 10), check(await queued, "q", 4)
        await batcher.close()

    run(body())


def test_a_batch_fires_at_once_while_a_device_is_idle_and_holds_only_the_extra_slots():
    async def body():
        clock = Clock()
        runner = Runner()
        batcher = make(runner, max_in_flight=4, devices=2, clock=clock, max_queue_delay_ms=5)
        a = submit(batcher, "a", 1)
        await settle()
        b = submit(batcher, "b", 1)  # one device busy, the other idle: goes at once
        await settle()
        assert len(runner.batches) == 2
        c = submit(batcher, "c", 1)  # both devices busy: held for the delay, though slots are free
        await settle()
        assert len(runner.batches) == 2
        clock.now_s = 0.005
        d = submit(batcher, "d", 1)  # wakes the dispatcher; c's delay is up
        await settle()
        assert runner.batches[2] == [("c", 0, 1), ("d", 0, 1)]
        runner.release_all()
        await asyncio.gather(a, b, c, d)
        await batcher.close()

    run(body())


def test_with_every_device_busy_a_spare_slot_fills_until_a_device_is_about_to_free():
    async def body():
        clock = Clock()
        runner = Runner()
        # one device, two in flight: the host prepares the next batch while the device runs one
        batcher = make(runner, max_in_flight=2, clock=clock, estimate=lambda rows: 0.010, max_queue_delay_ms=2)
        a = submit(batcher, "a", 1)  # device idle: at once; expected to free at 10 ms
        await settle()
        b = submit(batcher, "b", 1)
        await settle()
        clock.now_s = 0.005  # b waited past the delay, but the device is busy for 5 ms more: keep filling
        c = submit(batcher, "c", 1)
        await settle()
        assert len(runner.batches) == 1
        clock.now_s = 0.008  # 2 ms (the delay) before the device frees: form it now
        d = submit(batcher, "d", 1)
        await settle()
        assert runner.batches[1] == [("b", 0, 1), ("c", 0, 1), ("d", 0, 1)]
        runner.release_all()
        await asyncio.gather(a, b, c, d)
        await batcher.close()

    run(body())


def test_cancelled_requests_are_dropped_from_the_queue():
    async def body():
        runner = Runner()
        batcher = make(runner, max_batch_rows=4)
        big = submit(batcher, "big", 10)  # part [0, 4) runs, [4, 10) queued
        await settle()
        a = submit(batcher, "a", 2)
        b = submit(batcher, "b", 3)
        await settle()
        assert batcher.stats().queued_rows == 11
        big.cancel()
        a.cancel()
        await settle()
        assert big.cancelled() and a.cancelled()
        stats = batcher.stats()
        assert (stats.queued_rows, stats.queued_requests, stats.cancelled) == (3, 1, 2)
        runner.release(0)  # big's running part finishes into nobody
        await settle()
        assert runner.batches[1:] == [[("b", 0, 3)]]
        runner.release(1)
        check(await b, "b", 3)
        await batcher.close()

    run(body())


def test_run_batch_exception_fails_exactly_its_batch_and_the_batcher_goes_on():
    async def body():
        runner = Runner()
        runner.fail[1] = ValueError("boom")
        fault = CoreFault("core 2 hung")
        runner.fail[3] = fault
        batcher = make(runner, max_batch_rows=4)
        x = submit(batcher, "x", 1)  # the idle device takes it alone, at once
        await settle()
        a, b = submit(batcher, "a", 1), submit(batcher, "b", 2)  # queued behind x: one batch when it is done
        await settle()
        runner.release(0)
        check(await x, "x", 1)
        await settle()
        c = submit(batcher, "c", 1)
        await settle()
        assert runner.batches[1] == [("a", 0, 1), ("b", 0, 2)]
        runner.release(1)
        for task in (a, b):
            with pytest.raises(NeuronServeError, match="run_batch failed: ValueError: boom") as info:
                await task
            assert type(info.value) is NeuronServeError
        await settle()
        runner.release(2)
        check(await c, "c", 1)
        d = submit(batcher, "d", 1)
        await settle()
        runner.release(3)
        with pytest.raises(CoreFault) as info:
            await d
        assert info.value is fault  # a NeuronServeError is passed on as it is
        assert batcher.stats().failed == 3
        runner.release_all()
        check(await batcher.submit(payload("e", 2), 2), "e", 2)
        await batcher.close()

    run(body())


def test_wrong_number_of_rows_from_run_batch_is_an_internal_error():
    async def body():
        runner = Runner(gated=False)
        runner.short[0] = 1
        batcher = make(runner)
        with pytest.raises(NeuronServeError, match=r"returned shape \(2, 2\) for a batch of 3 rows") as info:
            await batcher.submit(payload("a", 3), 3)
        assert info.value.status.code == grpc.StatusCode.INTERNAL
        check(await batcher.submit(payload("b", 3), 3), "b", 3)
        await batcher.close()

    run(body())


def test_split_request_with_one_failed_part_fails_once_and_its_queued_rows_never_run():
    async def body():
        runner = Runner()
        fault = CoreFault("core 0 failed")
        runner.fail[0] = fault
        batcher = make(runner, max_batch_rows=4, max_in_flight=2, max_queue_delay_ms=0)  # purely work-conserving
        big = submit(batcher, "big", 10)  # [0,4) and [4,8) run, [8,10) queued
        await settle()
        e = submit(batcher, "e", 1)
        await settle()
        runner.release(0)
        with pytest.raises(CoreFault) as info:
            await big
        assert info.value is fault
        await settle()
        assert runner.batches[2:] == [[("e", 0, 1)]]  # the freed slot runs e; big's [8, 10) never runs
        runner.release(1, 2)  # big's [4, 8) finishes into nobody: big failed once, as a whole
        check(await e, "e", 1)
        await settle()
        assert batcher.stats().failed == 1 and batcher.stats().queued_rows == 0
        await batcher.close()

    run(body())


def test_close_with_drain_answers_every_queued_request_then_refuses():
    async def body():
        runner = Runner()
        batcher = make(runner)
        tasks = [submit(batcher, "a", 1)]
        await settle()
        tasks += [submit(batcher, "b", 2), submit(batcher, "c", 3)]
        await settle()
        closing = asyncio.ensure_future(batcher.close(drain=True))
        await settle()
        with pytest.raises(Unavailable, match="closed"):
            await batcher.submit(payload("late", 1), 1)
        assert not closing.done()
        runner.release_all()
        await closing
        for task, (name, rows) in zip(tasks, (("a", 1), ("b", 2), ("c", 3))):
            check(task.result(), name, rows)
        assert batcher.stats().in_flight_batches == 0

    run(body())


def test_close_without_drain_fails_queued_requests_and_finishes_running_ones():
    async def body():
        runner = Runner()
        batcher = make(runner)
        a = submit(batcher, "a", 1)
        await settle()
        b = submit(batcher, "b", 2)
        await settle()
        closing = asyncio.ensure_future(batcher.close(drain=False))
        await settle()
        with pytest.raises(Unavailable, match="closed before the request ran"):
            await b
        assert not closing.done()
        runner.release(0)
        await closing
        check(a.result(), "a", 1)
        assert len(runner.batches) == 1

    run(body())


def test_bad_rows_not_started_and_bad_settings():
    async def body():
        runner = Runner(gated=False)
        unstarted = DynamicBatcher(runner, max_batch_rows=4, config=BatchingConfig())
        with pytest.raises(Unavailable, match="not started"):
            await unstarted.submit(payload("a", 1), 1)
        batcher = make(runner)
        for rows in (0, -1, True, 1.5):
            with pytest.raises(InvalidInput, match="rows must be an integer >= 1"):
                await batcher.submit(payload("a", 1), rows)
        assert runner.batches == [] and batcher.stats() == BatcherStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 1.0)
        await batcher.close()
        with pytest.raises(ConfigError, match="max_batch_rows"):
            DynamicBatcher(runner, max_batch_rows=0, config=BatchingConfig())

    run(body())


def test_mixed_sizes_and_priorities_under_concurrency_each_get_their_own_rows():
    async def body():
        rng = np.random.default_rng(0)

        async def run_batch(slices: Sequence[Slice]) -> np.ndarray:
            for _ in range(int(rng.integers(0, 4))):  # batches finish out of order
                await asyncio.sleep(0)
            return np.concatenate([s.payload[1][s.start : s.stop] for s in slices], axis=0)

        batcher = DynamicBatcher(run_batch, max_batch_rows=16, config=BatchingConfig(), max_in_flight=3, clock=Clock())
        batcher.start()
        sizes = [int(n) for n in rng.integers(1, 40, size=60)]
        tasks = []
        for i, rows in enumerate(sizes):
            tasks.append(submit(batcher, f"r{i}", rows, priority=int(rng.integers(0, 3))))
            if i % 7 == 0:
                await asyncio.sleep(0)
        for i, (task, rows) in enumerate(zip(tasks, sizes)):
            check(await task, f"r{i}", rows)
        stats = batcher.stats()
        assert stats.batch_rows == sum(sizes) and stats.queued_rows == 0 and stats.failed == 0
        assert stats.batches >= -(-sum(sizes) // 16)
        await batcher.close()

    run(body())


def test_run_now_takes_a_lone_request_on_the_loop_and_falls_back_to_run_batch():
    """run_now runs a request that finds nothing queued or running (counted as a batch of its own);
    None from it, or a batch already running, sends the request to run_batch as before; its error
    fails only that request, as run_batch's would."""

    async def body():
        runner, now_calls = Runner(gated=True), []
        answer: Dict[str, object] = {}

        def run_now(request_payload, rows):
            now_calls.append((request_payload[0], rows))
            result = answer.get(request_payload[0])
            if isinstance(result, BaseException):
                raise result
            return request_payload[1] if result == "now" else None

        clock = Clock()
        batcher = DynamicBatcher(runner, max_batch_rows=100, config=BatchingConfig(max_queue_delay_ms=NEVER_MS),
                                 clock=clock, call_later=clock.call_later, name="test", run_now=run_now)
        batcher.start()
        answer["a"] = "now"
        check(await batcher.submit(payload("a", 3), 3), "a", 3)  # done before any batch ran
        assert runner.batches == [] and now_calls == [("a", 3)]
        b = submit(batcher, "b", 2)  # run_now declines: run_batch runs it
        await settle()
        assert now_calls[-1] == ("b", 2) and runner.batches == [[("b", 0, 2)]]
        answer["c"] = "now"
        c = submit(batcher, "c", 4)  # b still runs: queued behind it, run_now not asked
        await settle()
        assert [name for name, _ in now_calls] == ["a", "b"]
        runner.release_all()
        check(await b, "b", 2)
        check(await c, "c", 4)
        answer["d"] = ValueError("graph failed")
        with pytest.raises(NeuronServeError, match="run_batch failed: ValueError: graph failed"):
            await batcher.submit(payload("d", 1), 1)
        stats = batcher.stats()
        assert stats.batches == 4 and stats.batch_rows == 10 and stats.failed == 1 and stats.in_flight_batches == 0
        await batcher.close()

    run(body())
