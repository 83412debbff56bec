"""BatchLane semantics: run_batch runs on the lane's own thread, gated by a threading.Event per batch,
and time is a fake clock that moves only when a test moves it (no sleeps, no wall-clock assertions)."""

from __future__ import annotations

import asyncio
import functools
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from neuronserve.config import BatchingConfig
from neuronserve.errors import DeadlineExceeded, InvalidInput, NeuronServeError, Overloaded, Unavailable
from neuronserve.lane import BatchLane

pytestmark = pytest.mark.timeout(20)

ROW_S = 0.001  # the fake latency model: a millisecond a row


def asynchronous(case):
    """A test written as a coroutine, run on a fresh loop (bounded: a stuck lane fails, not hangs)."""

    @functools.wraps(case)
    def test() -> None:
        asyncio.run(asyncio.wait_for(case(), 15))

    return test


@dataclass
class Result:
    scores: np.ndarray


class Runner:
    """run_batch on the lane's thread: records each batch's peer row counts, waits for its gate, then
    returns each peer row's first feature as its score (or raises what `fail` holds)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[threading.Event] = [threading.Event() for _ in range(16)]
        self.started = threading.Semaphore(0)
        self.fail: BaseException | None = None

    def __call__(self, users, peers) -> Result:
        index = len(self.batches)
        self.batches.append([p.shape[0] for p in peers])
        self.started.release()
        assert self.gates[index].wait(10)
        if self.fail is not None:
            raise self.fail
        return Result(np.concatenate([p[:, :1] for p in peers]))

    async def running(self, batches: int) -> None:
        """Until `batches` batches have started on the lane's thread."""
        for _ in range(batches):
            while not self.started.acquire(blocking=False):
                await asyncio.sleep(0)


class Clock:
    now_s = 0.0
    reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now_s


def lane(runner: Runner, clock: Clock | None = None, counted: list | None = None, **config) -> BatchLane:
    return BatchLane(
        runner,
        max_batch_rows=8,
        config=BatchingConfig(**config),
        estimate_latency_s=lambda rows: ROW_S * rows,
        on_batch=lambda result, requests, on_loop: (counted if counted is not None else []).append(requests),
        name="twotower",
        clock=clock or Clock(),
    )


def request(rows: int, tag: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    peers = np.full((rows, 2), tag, dtype=np.float32)
    return np.zeros((1, 2), np.float32), peers


@asynchronous
async def test_pending_requests_form_one_batch_while_one_runs_and_each_gets_its_rows() -> None:
    runner, counted = Runner(), []
    batcher = lane(runner, counted=counted)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(request(2, 1.0), 2))
    await runner.running(1)
    rest = [asyncio.ensure_future(batcher.submit(request(rows, tag), rows)) for rows, tag in ((3, 2.0), (3, 3.0), (4, 4.0))]
    await asyncio.sleep(0)
    assert batcher.stats().queued_rows == 10 and batcher.stats().in_flight_batches == 1
    runner.gates[0].set()
    runner.gates[1].set()
    runner.gates[2].set()
    results = await asyncio.gather(first, *rest)
    assert runner.batches == [[2], [3, 3], [4]]  # FIFO, up to 8 rows: the 4-row request waits for the next
    assert [r[:, 0].tolist() for r in results] == [[1.0] * 2, [2.0] * 3, [3.0] * 3, [4.0] * 4]
    assert counted == [1, 2, 1]
    stats = batcher.stats()
    assert (stats.batches, stats.batch_rows, stats.batched_requests, stats.queued_rows) == (3, 12, 4, 0)
    await batcher.close()


@asynchronous
async def test_a_request_larger_than_a_batch_runs_alone() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    runner.gates[0].set()
    out = await batcher.submit(request(20, 5.0), 20)
    assert out.shape == (20, 1) and runner.batches == [[20]]
    await batcher.close()


@asynchronous
async def test_admission_refuses_a_deadline_the_backlog_makes_it_miss_and_an_overlong_queue() -> None:
    runner, clock = Runner(), Clock()
    batcher = lane(runner, clock, max_queue_wait_ms=10.0)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(request(8), 8))
    await runner.running(1)
    queued = [asyncio.ensure_future(batcher.submit(request(1), 1)) for _ in range(3)]
    await asyncio.sleep(0)
    # running: 8 ms left; queued: 3 rows, 3 ms; this request: 1 ms more -> 12 ms, past a 5 ms deadline
    with pytest.raises(DeadlineExceeded, match="cannot meet its deadline"):
        await batcher.submit(request(1), 1, deadline_s=0.005)
    with pytest.raises(Overloaded, match="max_queue_wait_ms"):
        await batcher.submit(request(3), 3)  # 11 ms ahead, past max_queue_wait_ms
    assert batcher.stats().rejected_deadline == 1
    with pytest.raises(InvalidInput, match="rows must be an integer"):
        await batcher.submit(request(1), 0)
    for gate in runner.gates[:2]:
        gate.set()
    await asyncio.gather(first, *queued)
    await batcher.close()


@asynchronous
async def test_a_queued_request_whose_deadline_the_batch_would_miss_leaves_with_deadline_exceeded() -> None:
    runner, clock = Runner(), Clock()
    batcher = lane(runner, clock)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(request(2), 2))
    await runner.running(1)
    late = asyncio.ensure_future(batcher.submit(request(2), 2, deadline_s=0.010))
    on_time = asyncio.ensure_future(batcher.submit(request(2), 2))
    await asyncio.sleep(0)
    clock.now_s = 0.009  # by the time the lane is free, 2 rows (2 ms) end past the 10 ms deadline
    runner.gates[0].set()
    runner.gates[1].set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    await on_time
    assert runner.batches == [[2], [2]]
    assert batcher.stats().rejected_deadline == 1
    await batcher.close()


@asynchronous
async def test_a_cancelled_callers_rows_never_run() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(request(2), 2))
    await runner.running(1)
    gone = asyncio.ensure_future(batcher.submit(request(3), 3))
    kept = asyncio.ensure_future(batcher.submit(request(1), 1))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert batcher.stats().queued_rows == 1 and batcher.stats().cancelled == 1
    runner.gates[0].set()
    runner.gates[1].set()
    await asyncio.gather(first, kept)
    assert runner.batches == [[2], [1]]
    await batcher.close()


@asynchronous
async def test_a_failing_batch_fails_exactly_its_requests_and_the_lane_goes_on() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    runner.fail = RuntimeError("graph exploded")
    runner.gates[0].set()
    with pytest.raises(NeuronServeError, match="run_batch failed: RuntimeError: graph exploded"):
        await batcher.submit(request(2), 2)
    runner.fail = None
    runner.gates[1].set()
    assert (await batcher.submit(request(1, 7.0), 1))[0, 0] == 7.0
    assert batcher.stats().failed == 1
    await batcher.close()


@asynchronous
async def test_close_answers_every_queued_request_then_refuses_new_ones() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    calls = [asyncio.ensure_future(batcher.submit(request(4), 4)) for _ in range(3)]
    await runner.running(1)
    closing = asyncio.ensure_future(batcher.close(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="closed"):
        await batcher.submit(request(1), 1)
    for gate in runner.gates[:3]:
        gate.set()
    await closing
    assert all(c.result().shape == (4, 1) for c in calls)


@asynchronous
async def test_close_without_drain_fails_the_queued_requests_and_waits_for_the_running_batch() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(request(4), 4))
    await runner.running(1)
    queued = asyncio.ensure_future(batcher.submit(request(4), 4))
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(batcher.close(drain=False))
    with pytest.raises(Unavailable, match="closed before the request ran"):
        await queued
    assert not closing.done()
    runner.gates[0].set()
    await closing
    assert running.result().shape == (4, 1) and runner.batches == [[4]]


def test_a_pool_workers_runtime_scores_through_the_lane_as_the_batched_path_does(small_artifact) -> None:
    """The cpu backend threaded only (--inline-below 0) with one batch in flight: the runtime's score
    batcher is a BatchLane, whose concurrent requests get the scores the batched path gives, NaN in a
    row with a non-finite feature, every batch counted in the pipeline and the metrics; with two in
    flight (or inline runs on) it is the DynamicBatcher."""
    from neuronserve.backends.cpu import CpuBackend
    from neuronserve.config import Placement
    from neuronserve.metrics import Metrics
    from neuronserve.pipeline import Pipeline
    from neuronserve.runtime import Runtime

    manifest = small_artifact
    cfg = manifest.model_config
    pipeline = Pipeline(CpuBackend(manifest, inline_below=0.0), Placement.data_parallel(1))
    pipeline.start()
    metrics = Metrics(version="v1", batch_buckets=(1, 4, 16))
    generator = np.random.default_rng(3)
    users = [generator.standard_normal((1, cfg.user_features)).astype(np.float32) for _ in range(6)]
    peers = [generator.standard_normal((rows, cfg.peer_features)).astype(np.float32) for rows in (1, 7, 30, 2, 5, 11)]
    peers[3][1, 2] = np.inf

    async def main() -> tuple[list[np.ndarray], np.ndarray]:
        runtime = Runtime(pipeline, BatchingConfig(max_in_flight_batches=1), metrics)
        assert isinstance(runtime.batchers["twotower"], BatchLane)
        assert not isinstance(Runtime(pipeline, BatchingConfig(), metrics).batchers["twotower"], BatchLane)
        runtime.start()
        got = await asyncio.gather(*(runtime.score(u, p, None) for u, p in zip(users, peers)))
        expected = (await pipeline.score_requests(users, peers)).scores
        await runtime.close(5.0)
        return list(got), expected

    before = pipeline.stats().stages["twotower"].rows
    got, expected = asyncio.run(main())
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-6)
    assert np.isnan(got[3][1]).all() and np.isfinite(np.delete(got[3], 1, axis=0)).all()
    assert pipeline.stats().stages["twotower"].rows - before == 2 * sum(p.shape[0] for p in peers)
    group = pipeline.stats().groups[0]  # the lane's first lone request runs on the loop (its first reading)
    assert 1 <= group.inline_executions <= group.executions
    counted = metrics.statistics("twotower")
    assert counted.rows == sum(p.shape[0] for p in peers) and 1 <= counted.executions <= len(peers)
    pipeline.close()


@asynchronous
async def test_a_bug_in_the_lanes_thread_fails_its_requests_instead_of_leaving_them_waiting() -> None:
    runner = Runner()
    batcher = lane(runner)
    batcher.start()
    first = asyncio.ensure_future(batcher.submit(request(2), 2))
    await runner.running(1)
    queued = asyncio.ensure_future(batcher.submit(request(2), 2))
    await asyncio.sleep(0)

    def broken(*args):
        raise RuntimeError("a bug")

    batcher._admission.late = broken  # the next _take on the thread raises
    runner.gates[0].set()
    await first
    with pytest.raises(NeuronServeError, match="batch thread failed"):
        await queued
    with pytest.raises(Unavailable):
        await batcher.submit(request(1), 1)
    await batcher.close()


def inline_lane(runner, demand: Clock, clock: Clock, counted: list) -> BatchLane:
    """A lane that runs a lone request on the loop while the loop's demand (a fake clock: its seconds
    running or waiting for a CPU) is under half of the (fake) wall time."""
    return BatchLane(
        runner,
        max_batch_rows=8,
        config=BatchingConfig(),
        estimate_latency_s=lambda rows: ROW_S * rows,
        on_batch=lambda result, requests, on_loop: counted.append((requests, on_loop)),
        name="twotower",
        inline_below=0.5,
        clock=clock,
        demand_clock=demand,
    )


def peers_of(rows: int, first: float) -> np.ndarray:
    return np.full((rows, 3), first, np.float32)


@asynchronous
async def test_at_low_load_a_lone_request_runs_on_the_loop_and_past_it_on_the_lanes_thread():
    """The loop's demand under inline_below: the request runs in submit, on the loop's thread, counted as
    a batch of one; at 0.6 of the time busy, the next goes to the lane's thread."""
    clock, demand, counted, threads = Clock(), Clock(), [], []

    def run(users, peers):
        threads.append(threading.get_ident())
        return Result(np.concatenate([p[:, :1] for p in peers]))

    batches = inline_lane(run, demand, clock, counted)
    batches.start()
    user = np.zeros((1, 2), np.float32)
    clock.now_s, demand.now_s = 1.0, 0.1  # the first reading only sets the baseline
    np.testing.assert_array_equal(await batches.submit((user, peers_of(2, 7.0)), 2), [[7.0], [7.0]])
    clock.now_s, demand.now_s = 1.1, 0.12  # 0.02 s in 0.1 s: 0.2 of the time
    np.testing.assert_array_equal(await batches.submit((user, peers_of(3, 8.0)), 3), [[8.0]] * 3)
    assert threads == [threading.get_ident()] * 2 and counted == [(1, True), (1, True)]
    clock.now_s, demand.now_s = 1.2, 0.24  # 0.12 s in 0.1 s: busy past 0.5
    np.testing.assert_array_equal(await batches.submit((user, peers_of(1, 9.0)), 1), [[9.0]])
    assert threads[-1] != threading.get_ident() and counted == [(1, True), (1, True), (1, False)]
    stats = batches.stats()
    assert (stats.batches, stats.batch_rows, stats.batched_requests) == (3, 6, 3)
    await batches.close()


@asynchronous
async def test_a_request_behind_a_running_batch_waits_for_the_thread_even_at_low_load():
    """Inline only when the lane is idle and nothing is queued: FIFO holds."""
    runner, clock, demand, counted = Runner(), Clock(), Clock(), []
    runner.gates[0].set()  # the first request runs inline, at once
    batches = inline_lane(runner, demand, clock, counted)
    batches.start()
    user = np.zeros((1, 2), np.float32)
    clock.now_s, demand.now_s = 1.0, 0.9
    assert (await batches.submit((user, peers_of(2, 1.0)), 2)).tolist() == [[1.0], [1.0]]
    clock.now_s, demand.now_s = 1.1, 1.1  # 0.2 s in the last 0.1 s (waits included): to the thread
    second = asyncio.ensure_future(batches.submit((user, peers_of(2, 2.0)), 2))
    await runner.running(2)
    clock.now_s = 10.0  # long idle since: the demand has decayed, but the thread is busy
    reads = demand.reads
    third = asyncio.ensure_future(batches.submit((user, peers_of(1, 3.0)), 1))
    await asyncio.sleep(0)
    assert not third.done() and runner.batches == [[2], [2]]
    # the demand is not read while the thread is busy: the read (a system call) would give the GIL away
    assert demand.reads == reads
    runner.gates[1].set()
    runner.gates[2].set()
    assert (await second).tolist() == [[2.0], [2.0]] and (await third).tolist() == [[3.0]]
    assert runner.batches == [[2], [2], [1]] and counted == [(1, True), (1, False), (1, False)]
    await batches.close()


@asynchronous
async def test_an_inline_runs_failure_is_the_requests_own_error_and_the_lane_goes_on():
    clock, demand, counted = Clock(), Clock(), []
    calls = []

    def run(users, peers):
        calls.append(len(peers))
        if len(calls) == 1:
            raise ValueError("graph broke")
        return Result(np.concatenate([p[:, :1] for p in peers]))

    batches = inline_lane(run, demand, clock, counted)
    batches.start()
    user = np.zeros((1, 2), np.float32)
    with pytest.raises(NeuronServeError, match="run_batch failed: ValueError: graph broke"):
        await batches.submit((user, peers_of(1, 3.0)), 1)
    assert (await batches.submit((user, peers_of(1, 4.0)), 1)).tolist() == [[4.0]]
    assert counted == [(1, True)] and batches.stats().batches == 1
    await batches.close()
