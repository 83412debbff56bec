"""TorchLauncher: a core group's executions on torch's inter-op threads (neuronserve/backends/torch_launch.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from neuronserve.backends.torch_launch import Fork, Step, TorchLauncher, forking, keep_thread_state
from neuronserve.loop_load import BusyFraction, thread_demand_s
from neuronserve.errors import Unavailable
from support import FakeClock


class _Graph(torch.nn.Module):
    """Row i: peer[i] * 2 + sum(user[index[i]]); index_select fails on an index past the user rows."""

    def forward(self, user: torch.Tensor, peer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return peer * 2 + user.index_select(0, index).sum(1, keepdim=True)


GRAPH = torch.jit.script(_Graph())


@pytest.fixture(scope="module")
def fork() -> Fork:
    return forking(GRAPH)


def threaded(**kwargs) -> TorchLauncher:
    """A launcher that never runs inline (its default): every execution on torch's thread."""
    return TorchLauncher(**kwargs)


def settled(launcher: TorchLauncher) -> None:
    """Wait until torch's thread has marked the launcher idle: it settles a step's future first, so the
    awaiting loop can run before the launcher is idle, and the next submit would not run inline."""
    with launcher._idle:
        assert launcher._idle.wait_for(lambda: not launcher._running, timeout=10)


def _step(fork, rows: int, bucket: int, seed: int, index_offset: int = 0) -> tuple[Step, np.ndarray]:
    """A step of `bucket` padded rows keeping `rows`, and the expected output rows."""
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((2, 3)).astype(np.float32)
    peer = rng.standard_normal((bucket, 3)).astype(np.float32)
    index = (np.arange(bucket) % 2 + index_offset).astype(np.int64)
    expected = peer * 2 + user.sum(1, keepdims=True)[index % 2]
    tensors = (torch.from_numpy(user), torch.from_numpy(peer), torch.from_numpy(index))
    return Step(fork, tensors, rows, GRAPH), expected[:rows]


def test_a_submission_returns_its_steps_rows_in_order(fork):
    async def main():
        launcher = threaded()
        (a, want_a), (b, want_b) = _step(fork, 3, 8, seed=1), _step(fork, 8, 8, seed=2)
        out, busy_s = await launcher.submit([a, b])
        launcher.close()
        return out, busy_s, np.concatenate([want_a, want_b])

    out, busy_s, want = asyncio.run(main())
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert out.shape == (11, 3) and busy_s > 0


def _callbacks_on_torchs_thread(fork, count: int) -> list[tuple[int, bool]]:
    """For `count` executions one after another, each completion callback calling keep_thread_state:
    (its OS thread, whether it found what an earlier callback on that thread put in a threading.local,
    which lives in the Python thread state and so survives only if that state does). A callback added
    after its future completed runs on the adding thread instead of torch's."""
    local, seen = threading.local(), []

    def callback(_):
        keep_thread_state()
        seen.append((threading.get_native_id(), getattr(local, "mark", False)))
        local.mark = True

    for seed in range(count):
        step, _ = _step(fork, 8, 1 << 18, seed)  # long enough (~1 ms) to outlast add_done_callback below
        done = threading.Event()
        future = step.fork(*step.inputs)
        future.add_done_callback(callback)
        future.add_done_callback(lambda _: done.set())
        assert done.wait(10)
    return seen


def test_torchs_thread_keeps_its_python_thread_state_across_callbacks(fork):
    # pybind11 makes and deletes a thread state per callback (on 3.11 an mmap and munmap each time;
    # a no-op keep_thread_state fails this); kept, only each thread's first callback finds nothing
    threads: set[int] = set()
    later = []  # what each callback found, past the first on its thread
    for thread, found in _callbacks_on_torchs_thread(fork, 12):
        if thread in threads:
            later.append(found)
        threads.add(thread)
    assert threads - {threading.get_native_id()}  # some ran on torch's threads
    assert later and all(later)


def test_submissions_complete_in_the_order_they_were_made(fork):
    async def main():
        launcher = threaded()
        finished: list[int] = []
        futures = [launcher.submit([_step(fork, 64, 64, seed=i)[0]]) for i in range(6)]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: finished.append(i))
        await asyncio.gather(*futures)
        launcher.close()
        return finished

    assert asyncio.run(main()) == list(range(6))


def test_a_failing_execution_fails_its_own_submission_only(fork):
    async def main():
        launcher = threaded()
        good, want = _step(fork, 4, 4, seed=3)
        bad, _ = _step(fork, 4, 4, seed=4, index_offset=5)  # index past the 2 user rows: index_select raises
        results = await asyncio.gather(
            launcher.submit([good]), launcher.submit([good, bad]), launcher.submit([good]), return_exceptions=True
        )
        launcher.close()
        return results, want

    (first, failed, last), want = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and "index" in str(failed).lower()
    np.testing.assert_allclose(first[0], want, rtol=1e-6)
    np.testing.assert_allclose(last[0], want, rtol=1e-6)


def test_close_waits_for_queued_work_then_refuses(fork):
    async def main():
        launcher = threaded()
        futures = [launcher.submit([_step(fork, 256, 256, seed=i)[0]]) for i in range(4)]
        await asyncio.to_thread(launcher.close)  # off the loop: the settles are queued on it meanwhile
        assert not launcher._running  # every execution ended before close returned
        with pytest.raises(Unavailable, match="closed"):
            launcher.submit([_step(fork, 1, 1, seed=9)[0]])
        return await asyncio.gather(*futures)

    assert len(asyncio.run(main())) == 4


def test_busy_seconds_come_from_the_injected_clock(fork):
    ticks = iter(range(0, 100, 5))  # each reading 5 s after the one before: a start and an end per step

    async def main():
        launcher = threaded(clock=lambda: float(next(ticks)))
        _, busy_s = await launcher.submit([_step(fork, 2, 2, seed=5)[0], _step(fork, 2, 2, seed=6)[0]])
        launcher.close()
        return busy_s

    assert asyncio.run(main()) == 10.0


def test_the_busy_fraction_reads_the_share_of_a_core_recent_work_needs():
    busy = BusyFraction(tau_s=0.2)
    for i in range(400):  # 1 ms of work every 4 ms, for 1.6 s (8 tau)
        busy.add(i * 0.004, 0.001)
    assert busy.at(1.6) == pytest.approx(0.25, rel=0.1)
    assert busy.at(1.6 + 1.0) < 0.25 * 0.01  # 5 tau idle later
    after = busy.add(1.6 + 1.0, 0.002)  # 2 ms more: 0.002 / tau on top of what is left
    assert after == busy.at(1.6 + 1.0) and after == pytest.approx(0.01, abs=0.0025)


def test_a_cumulative_clock_counts_what_it_shows_since_its_last_reading():
    busy = BusyFraction(tau_s=1.0)
    assert busy.count_total(0.0, 5.0) == 0.0  # the first reading is the baseline
    assert busy.count_total(0.0, 5.5) == pytest.approx(0.5)
    assert busy.count_total(0.0, 5.2) == pytest.approx(0.5)  # a clock that stepped back counts nothing
    assert busy.count_total(0.0, 5.4) == pytest.approx(0.7)  # from the last reading, 5.2


def test_the_loops_inline_runs_load_it_and_the_cpu_cost_per_row_is_learned(fork):
    """Fake clocks: each inline run takes 1 ms of the loop's CPU for 4 rows, so 250 us a row; one every
    2 ms keeps the loop half busy, past inline_below + INLINE_GAP, so the launcher turns to torch's thread."""
    clock, cpu = FakeClock(), FakeClock()

    async def main():
        launcher = TorchLauncher(
            clock=clock,
            cpu_clock=cpu,
            demand_clock=cpu,  # never kept off the CPU: its demand is its CPU time
            inline_below=0.2,
            load=BusyFraction(tau_s=0.02),
            loop=BusyFraction(tau_s=0.02),
            demand=BusyFraction(tau_s=0.02),
        )
        real = GRAPH

        def one_ms_of_cpu(*inputs):
            cpu.now_s += 0.001
            return real(*inputs)

        modes = []
        for _ in range(40):
            step = dataclasses.replace(_step(fork, 4, 4, seed=2)[0], graph=one_ms_of_cpu)
            future = launcher.submit([step])
            modes.append(future.done())
            await future
            clock.now_s += 0.002
        launcher.close()
        return modes, launcher.row_s

    modes, row_s = asyncio.run(main())
    assert row_s == pytest.approx(0.00025)
    assert modes[0] and not modes[-1] and modes.index(False) > 3


def test_an_idle_launcher_at_low_load_runs_the_submission_before_submit_returns(fork):
    clock = FakeClock()

    async def main():
        launcher = TorchLauncher(clock=clock, inline_below=0.2)
        step, want = _step(fork, 3, 4, seed=7)
        future = launcher.submit([step])
        done_at_return = future.done()
        out, _ = await future
        launcher.close()
        return done_at_return, out, want, launcher

    done_at_return, out, want, launcher = asyncio.run(main())
    assert done_at_return and not launcher._running
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_past_the_gap_the_launcher_forks_until_the_loop_with_the_graph_falls_under_inline_below(fork):
    """Hysteresis on the loop's busy fractions (fake clocks, nothing counted): inline while the loop's
    demand (the graph's runs on it included, its waits for a CPU too) is under inline_below + INLINE_GAP;
    then torch's thread until the loop's CPU plus the graph's load there is back under inline_below."""
    clock, cpu = FakeClock(), FakeClock()

    async def mode_at(launcher: TorchLauncher, loop: float, graph: float, demand: float | None = None) -> str:
        launcher.loop = BusyFraction(tau_s=0.2, _value=loop, _at_s=clock.now_s)
        launcher.demand = BusyFraction(tau_s=0.2, _value=loop if demand is None else demand, _at_s=clock.now_s)
        launcher.load = BusyFraction(tau_s=0.2, _value=graph, _at_s=clock.now_s)
        future = launcher.submit([_step(fork, 2, 2, seed=8)[0]])
        mode = "inline" if future.done() else "threaded"
        await future
        settled(launcher)
        return mode

    async def main():
        launcher = TorchLauncher(clock=clock, cpu_clock=cpu, demand_clock=cpu, inline_below=0.30)  # threaded from 0.40
        loads = [(0.10, 0.5, None), (0.39, 0.5, None), (0.41, 0.0, None), (0.15, 0.2, None), (0.05, 0.2, None)]
        loads += [(0.39, 0.9, None), (0.25, 0.0, 0.45), (0.25, 0.0, 0.45)]  # half its demand waiting for a CPU
        modes = [await mode_at(launcher, *load) for load in loads]
        launcher.close()
        return modes

    # the graph's own load counts only while it is off the loop: 0.15 + 0.2 >= 0.30 stays threaded; a loop
    # at 0.25 of a CPU but 0.45 of demand is saturated (others hold the CPUs), and back on its CPU alone
    want = ["inline", "inline", "threaded", "threaded", "inline", "inline", "threaded", "inline"]
    assert asyncio.run(main()) == want


def test_an_inline_failure_fails_its_own_submission_and_the_launcher_goes_on(fork):
    async def main():
        launcher = TorchLauncher(clock=FakeClock(), inline_below=0.2)
        bad, _ = _step(fork, 4, 4, seed=4, index_offset=5)
        good, want = _step(fork, 4, 4, seed=3)
        failed = launcher.submit([bad])
        with pytest.raises(RuntimeError, match="(?i)index"):
            await failed
        out, _ = await launcher.submit([good])
        launcher.close()
        return out, want

    out, want = asyncio.run(main())
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_the_server_setting_reaches_the_cpu_backends_launcher_and_is_checked(small_artifact):
    from neuronserve.artifact import load_manifest
    from neuronserve.backends import make_backend
    from neuronserve.config import CoreGroup, ServerConfig
    from neuronserve.contract import FUSED_STAGE
    from neuronserve.errors import ConfigError

    directory = str(small_artifact.directory)
    config = ServerConfig(artifact=directory)
    assert config.inline_below is None and config.inline_share() == 0.75
    assert ServerConfig(artifact=directory, inline_below=0.0).inline_share() == 0.0
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="inline_below"):
            ServerConfig(artifact=directory, inline_below=bad)
    backend = make_backend("cpu", load_manifest(directory), inline_below=0.25)
    runner = backend.load(FUSED_STAGE, CoreGroup(0))
    assert runner._launcher.inline_below == 0.25
    runner.close()


def test_run_now_runs_at_once_only_while_the_launcher_is_idle_and_inline(fork):
    """run_now: the graph on this thread when the launcher is inline and idle, its rows counted into the
    load and its CPU per row learned; None (nothing counted) while it hands off to torch's thread or an
    execution is queued, and once it is closed."""
    clock, cpu = FakeClock(), FakeClock()

    def one_ms_of_cpu(*inputs):
        cpu.now_s += 0.001
        return GRAPH(*inputs)

    async def main():
        launcher = TorchLauncher(clock=clock, cpu_clock=cpu, demand_clock=cpu, inline_below=0.2)
        step, want = _step(fork, 3, 4, seed=11)
        out, busy_s = launcher.run_now(one_ms_of_cpu, step.inputs, 3)
        assert launcher.row_s == pytest.approx(0.001 / 3) and not launcher._running
        launcher.load = BusyFraction(tau_s=0.2, _value=0.5, _at_s=clock.now_s)
        launcher._inline = False
        assert launcher.run_now(one_ms_of_cpu, step.inputs, 3) is None
        assert launcher.load.at(clock.now_s) == pytest.approx(0.5)  # nothing counted
        launcher._inline = True
        launcher.demand = BusyFraction(tau_s=0.2, _value=0.5, _at_s=clock.now_s)  # past the gap: hands off
        with launcher._idle:  # (re-entrant) torch's thread cannot mark the launcher idle meanwhile
            queued = launcher.submit([_step(fork, 4, 4, seed=12)[0]])  # the load hands it to torch's thread
            assert not queued.done() and launcher.run_now(one_ms_of_cpu, step.inputs, 3) is None
        await queued
        settled(launcher)
        launcher.close()
        assert launcher.run_now(one_ms_of_cpu, step.inputs, 3) is None
        return out, busy_s, want

    out, busy_s, want = asyncio.run(main())
    np.testing.assert_allclose(out, want, rtol=1e-6)
    assert busy_s == 0.0  # the fake clock did not move


def test_a_pools_workers_run_no_batch_inline_and_one_in_flight_unless_set(small_artifact):
    """A pool's event loops share the CPUs: each worker's own CPU reading stays under the switch while it
    is the bottleneck, so a worker defaults to --inline-below 0, and to one batch in flight (bigger
    batches), one per executor where it has several; values the operator gave reach every worker."""
    import dataclasses

    from neuronserve.config import BatchingConfig, CoreGroup, ServerConfig
    from neuronserve.worker_plan import WorkerPlan, member_config

    plan = WorkerPlan(1, CoreGroup(1, 1))
    config = ServerConfig(artifact=str(small_artifact.directory), workers=2, backend="cpu")
    worker = member_config(config, plan)
    assert (worker.inline_below, worker.workers, worker.cores) == (0.0, 1, 1)
    assert worker.batching.max_in_flight_batches == 1 and config.batching.max_in_flight_batches is None
    device = member_config(dataclasses.replace(config, backend="sim"), plan)  # two in flight per core stay
    assert device.batching.max_in_flight_batches is None
    bigger = member_config(config, WorkerPlan(1, CoreGroup(0, 3)))  # a bigger host: one in flight per executor
    assert bigger.batching.max_in_flight_batches == 3
    given = ServerConfig(
        artifact=str(small_artifact.directory),
        workers=2,
        backend="cpu",
        inline_below=0.5,
        batching=BatchingConfig(max_in_flight_batches=2),
    )
    worker = member_config(given, plan)
    assert worker.inline_below == 0.5 and worker.batching.max_in_flight_batches == 2


def test_one_process_with_one_usable_cpu_batches_as_a_pools_worker(small_artifact):
    """Its graph can only take turns with the event loop on that CPU: the lane's batching, unless set;
    with two CPUs, or a device backend's in-flight batches, nothing changes."""
    from neuronserve.config import BatchingConfig, ServerConfig
    from neuronserve.serve import with_one_cpu_batching

    config = ServerConfig(artifact=str(small_artifact.directory), workers=1)  # backend auto: cpu
    one = with_one_cpu_batching(config, usable_cpus=1)
    assert (one.backend, one.inline_below, one.batching.max_in_flight_batches) == ("cpu", 0.0, 1)
    assert with_one_cpu_batching(config, usable_cpus=2) == config
    sim = with_one_cpu_batching(dataclasses.replace(config, backend="sim"), usable_cpus=1)
    assert sim.batching.max_in_flight_batches is None
    given = dataclasses.replace(config, inline_below=0.5, batching=BatchingConfig(max_in_flight_batches=2))
    kept = with_one_cpu_batching(given, usable_cpus=1)
    assert kept.inline_below == 0.5 and kept.batching.max_in_flight_batches == 2


needs_schedstat = pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/schedstat") or not hasattr(os, "sched_setaffinity"),
    reason="Linux schedstat and CPU affinity",
)


def _burn_s(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@needs_schedstat
def test_the_loops_demand_counts_the_time_it_waits_for_a_cpu_held_by_another_process():
    """The launcher's load reading: a thread sharing its one CPU with a busy process runs about half
    the time; its demand (run + run-queue wait) still reads about the wall time, its CPU time half."""
    readings: dict[str, float] = {}

    def on_one_cpu(cpu: int) -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        hog = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"],
            stdout=subprocess.PIPE,
        )
        try:
            assert hog.stdout is not None
            hog.stdout.readline()  # the hog is on the CPU
            _burn_s(0.1)  # and running
            demand_s, cpu_s, wall_s = thread_demand_s(), time.thread_time(), time.perf_counter()
            _burn_s(0.4)
            readings["demand"] = thread_demand_s() - demand_s
            readings["cpu"] = time.thread_time() - cpu_s
            readings["wall"] = time.perf_counter() - wall_s
        finally:
            hog.kill()
            hog.communicate()

    worker = threading.Thread(target=on_one_cpu, args=(min(os.sched_getaffinity(0)),))
    worker.start()
    worker.join()
    assert readings["demand"] == pytest.approx(readings["wall"], rel=0.15)
    assert readings["demand"] > 1.3 * readings["cpu"]


@needs_schedstat
def test_the_demand_clock_is_the_calling_threads_own():
    """Each thread reads its own schedstat: another thread's work does not move it."""
    seen: dict[str, float] = {}

    def worker() -> None:
        seen["start"] = thread_demand_s()
        _burn_s(0.05)
        seen["end"] = thread_demand_s()

    _burn_s(0.1)  # this thread's own demand: at least 0.1 s
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["start"] < 0.05 and seen["end"] - seen["start"] >= 0.04  # a new thread starts near zero
