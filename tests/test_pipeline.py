"""The pipeline over simulated NeuronCores: exact outputs through padding and splitting, data
parallelism and stage pipelining measured on the simulated clock, fault isolation and recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import pytest

from neuronserve.artifact import Manifest, load_manifest
from neuronserve.backends.cpu import CpuBackend
from neuronserve.backends.sim import LatencyModel, SimBackend, StageLatency
from neuronserve.config import STAGES, CoreGroup, Placement, SimConfig
from neuronserve.contract import FUSED_STAGE
from neuronserve.errors import CoreFault, InvalidInput, Unavailable
from neuronserve.pipeline import Pipeline

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def manifest(small_artifact):
    """The small artifact (conftest): buckets like (1, 4, 16), so splitting is cheap to exercise."""
    return small_artifact if isinstance(small_artifact, Manifest) else load_manifest(small_artifact)


def latency(fixed_s: float, per_row_s: float = 0.0, **per_stage_fixed_s: float) -> LatencyModel:
    return LatencyModel(
        {stage: StageLatency(per_stage_fixed_s.get(stage, fixed_s), per_row_s) for stage in STAGES}
    )


def sim_pipeline(manifest, placement: Placement, model: LatencyModel, **sim_settings) -> tuple:
    sim = SimBackend(manifest, SimConfig(**sim_settings), latency=model)
    pipeline = Pipeline(sim, placement)
    pipeline.start()
    return pipeline, sim


def reference_runners(manifest) -> dict:
    """The three stages on the plain CPU backend: what every pipeline output must equal."""
    cpu = CpuBackend(manifest)
    return {stage: cpu.load(stage, CoreGroup(0)) for stage in STAGES}


def instant_pipeline(manifest, placement: str, data_parallel_cores: int) -> tuple:
    """A started pipeline over 4 simulated cores that take no time: data parallel on the first
    `data_parallel_cores` when `placement` starts with "data", else the placement it spells."""
    layout = Placement.data_parallel(data_parallel_cores) if placement.startswith("data") else Placement.parse(placement, 4)
    return sim_pipeline(manifest, layout, latency(0.0), latency_scale=0.0)


def rows(manifest, count: int, features: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, features)).astype(np.float32)


def direct(runner, x_list):
    """The CPU reference: every 16-or-fewer-row piece padded to the largest bucket, run, unpadded."""
    largest = max(runner.batch_sizes)
    parts = []
    for start in range(0, x_list[0].shape[0], largest):
        piece = [x[start : start + largest] for x in x_list]
        n = piece[0].shape[0]
        padded = [np.concatenate([p, np.zeros((largest - n,) + p.shape[1:], np.float32)]) for p in piece]
        parts.append(runner.run(padded)[:n])
    return np.concatenate(parts)


@pytest.mark.parametrize("placement", ["data parallel (fused: one job per batch)", "user_tower=0,peer_tower=1-2,pair_scorer=3"])
def test_scores_equal_direct_cpu_outputs_for_mixed_sizes(manifest, placement):
    cfg = manifest.model_config
    ref = reference_runners(manifest)
    pipeline, _ = instant_pipeline(manifest, placement, data_parallel_cores=4)
    largest = pipeline.max_batch_rows
    assert largest < 40  # the small artifact: sizes below exceed its largest bucket

    async def main():
        for i, (users, peers) in enumerate([(1, 1), (3, 5), (2, largest), (7, largest + 1), (largest + 3, 40), (5, 3 * largest + 7)]):
            user_x = rows(manifest, users, cfg.user_features, seed=i)
            peer_x = rows(manifest, peers, cfg.peer_features, seed=100 + i)
            index = np.random.default_rng(i).integers(0, users, size=peers)
            got = await pipeline.score(user_x, peer_x, index)
            u = direct(ref["user_tower"], [user_x])
            p = direct(ref["peer_tower"], [peer_x])
            expected = direct(ref["pair_scorer"], [u[index], p])
            assert got.shape == (peers, cfg.num_labels) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(await pipeline.run_stage("peer_tower", [peer_x]), p, rtol=1e-5, atol=1e-6)

    asyncio.run(main())
    stats = pipeline.stats()
    assert stats.stages["peer_tower"].padded_rows > 0 and stats.faults == 0
    pipeline.close()


@pytest.mark.parametrize("placement", ["data parallel (the fused graph)", "user_tower=0,peer_tower=1-2,pair_scorer=3"])
def test_score_requests_equal_the_three_stages_and_mark_rows_with_non_finite_features(manifest, placement):
    """A batch of requests (one user, m peers each) as the runtime hands it over: one fused execution
    per chunk when data parallel, the stages otherwise; the same scores either way, padding and
    splitting included; a row whose features are NaN or Inf scores NaN, every other row as usual."""
    cfg = manifest.model_config
    ref = reference_runners(manifest)
    pipeline, sim = instant_pipeline(manifest, placement, data_parallel_cores=2)
    largest = pipeline.max_batch_rows
    warm = sim.stats().executions  # the warm-up ran every stage

    async def main():
        for i, sizes in enumerate([(1,), (3, 5), (largest,), (largest - 1, 2), (1,) * (largest + 1), (7, largest + 2, 5)]):
            users = [rows(manifest, 1, cfg.user_features, seed=10 * i + j) for j in range(len(sizes))]
            peers = [rows(manifest, m, cfg.peer_features, seed=100 * i + j) for j, m in enumerate(sizes)]
            got = (await pipeline.score_requests(users, peers)).scores
            index = np.repeat(np.arange(len(sizes)), sizes)
            u = direct(ref["user_tower"], [np.concatenate(users)])
            expected = direct(ref["pair_scorer"], [u[index], direct(ref["peer_tower"], [np.concatenate(peers)])])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        users = [rows(manifest, 1, cfg.user_features, seed=j) for j in range(3)]
        peers = [rows(manifest, 2, cfg.peer_features, seed=50 + j) for j in range(3)]
        users[0][0, 1] = np.inf
        peers[2][1, 0] = np.nan
        got = (await pipeline.score_requests(users, peers)).scores
        bad = np.array([1, 1, 0, 0, 0, 1], dtype=bool)
        assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all()
        got = (await pipeline.score_requests(users[2:], peers[2:])).scores  # one request: its own fast path
        assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()

    asyncio.run(main())
    executions = {stage: count - warm[stage] for stage, count in sim.stats().executions.items()}
    fused = placement.startswith("data")
    assert (executions["twotower"] > 0) == fused and (executions["pair_scorer"] > 0) != fused
    pipeline.close()


def test_score_now_runs_a_lone_request_at_once_on_the_cpu_backend_as_score_requests_would(manifest):
    """The cpu backend at low load: score_now answers one request on the calling thread with
    score_requests' scores and counts, NaN in a row with a non-finite feature; None above one exact
    execution's rows, with inline runs off, and on a backend whose runner cannot run it now (the sim)."""
    from neuronserve.backends.cpu import CpuBackend as Cpu

    cfg = manifest.model_config
    # inline until the loop's demand reaches 0.99 + INLINE_GAP, which a thread's demand cannot: every run here stays inline
    pipeline = Pipeline(Cpu(manifest, inline_below=0.99), Placement.data_parallel(1))
    pipeline.start()
    assert pipeline.runs_now
    user, peers = rows(manifest, 1, cfg.user_features, seed=1), rows(manifest, 9, cfg.peer_features, seed=2)
    before = pipeline.stats()
    now = pipeline.score_now(user, peers)
    assert now is not None and now.compute_s > 0
    after = pipeline.stats()
    assert after.stages["twotower"].executions == before.stages["twotower"].executions + 1
    assert after.stages["twotower"].rows == before.stages["twotower"].rows + 9
    assert after.groups[0].executions == before.groups[0].executions + 1
    assert after.groups[0].inline_executions == before.groups[0].inline_executions + 1
    batched = asyncio.run(pipeline.score_requests([user], [peers])).scores
    np.testing.assert_allclose(now.scores, batched, rtol=1e-5, atol=1e-6)
    assert pipeline.stats().groups[0].inline_executions == after.groups[0].inline_executions + 1  # run in submit
    peers[4, 3] = np.inf
    marked = pipeline.score_now(user, peers).scores
    assert np.isnan(marked[4]).all() and np.isfinite(np.delete(marked, 4, axis=0)).all()
    bad_user = user.copy()
    bad_user[0, 2] = np.nan
    assert np.isnan(pipeline.score_now(bad_user, rows(manifest, 5, cfg.peer_features, seed=4)).scores).all()
    too_many = rows(manifest, pipeline._now_rows + 1, cfg.peer_features, seed=3)
    assert pipeline.score_now(user, too_many) is None
    pipeline.close()
    off = Pipeline(Cpu(manifest, inline_below=0.0), Placement.data_parallel(1))
    off.start()
    assert not off.runs_now and off.score_now(user, peers) is None
    asyncio.run(off.score_requests([user], [peers]))  # on torch's thread: counted, not as on the loop
    assert off.stats().groups[0].executions >= 1 and off.stats().groups[0].inline_executions == 0
    off.close()
    sim_pipeline, _ = instant_pipeline(manifest, "data parallel (the fused graph)", data_parallel_cores=2)
    assert not sim_pipeline.runs_now and sim_pipeline.score_now(user, peers) is None
    sim_pipeline.close()


def test_the_cpu_backend_runs_under_the_pipeline_too(manifest):
    """No latency model: the pipeline times each bucket at start-up and plans with that."""
    pipeline = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    pipeline.start()
    x = rows(manifest, pipeline.max_batch_rows * 2 + 1, manifest.model_config.peer_features, seed=3)
    expected = direct(CpuBackend(manifest).load("peer_tower", CoreGroup(0)), [x])
    np.testing.assert_allclose(asyncio.run(pipeline.run_stage("peer_tower", [x])), expected, rtol=1e-5, atol=1e-6)
    assert pipeline.estimate_latency_s(10) > 0
    pipeline.close()


def test_a_pipeline_of_the_same_shapes_reuses_the_bucket_plans_instead_of_timing_again(manifest, monkeypatch):
    """A later version of one model plans with the served version's bucket costs: no timed runs beside
    served traffic. A plan for other buckets is not reused."""
    import neuronserve.bucket_plan as bucket_plan

    first = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    first.start()
    timed = []
    monkeypatch.setattr(bucket_plan, "timed_run", lambda *args: timed.append(args) or (None, 1.0))
    second = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    second.start(plans=first.plans)
    assert timed == [] and all(second.plans[s] is first.plans[s] for s in first.plans)
    stage, plan = next(iter(first.plans.items()))
    third = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    third.start(plans={stage: bucket_plan.BucketPlan(plan.buckets[:-1], plan.cost_s)})
    assert third.plans[stage].cost_s == dict.fromkeys(plan.buckets, 1.0) and len(timed) == 3 * len(plan.buckets) * len(first.plans)
    for pipeline in (first, second, third):
        pipeline.close()


def test_a_paced_start_pauses_after_every_stage_it_loads(manifest):
    """The pace (a version loading beside traffic sleeps there) runs once per stage loaded and warm."""
    pipeline = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    loaded = []
    pipeline.start(pace=lambda: loaded.append(sorted(pipeline._groups[0].runners)))
    stages = sorted(pipeline._groups[0].runners)
    assert len(loaded) == len(stages) and loaded[-1] == stages
    assert [len(names) for names in loaded] == list(range(1, len(stages) + 1))
    pipeline.close()


def test_the_cpu_fused_runner_scripts_one_launch_wrapper_per_distinct_graph(manifest, monkeypatch):
    """A cpu artifact's one fused file serves every (B, U) bucket: its launch wrapper is scripted once
    (each scripting holds the GIL ~3 ms; once per bucket stalled the traffic beside a version load)."""
    import neuronserve.backends.cpu as cpu

    scripted = []
    real = cpu.forking
    monkeypatch.setattr(cpu, "forking", lambda graph: scripted.append(graph) or real(graph))
    runner = CpuBackend(manifest).load(FUSED_STAGE, CoreGroup(0))
    assert len(runner._graphs) > 1 and len({id(g) for g in runner._graphs.values()}) == 1
    assert len(scripted) == 1 and len({id(f) for f in runner._forks.values()}) == 1


def test_the_cpu_backend_queues_the_next_execution_behind_the_running_one(manifest):
    """Two executions in flight on the host's one executor thread: they run one after the other, never
    at once (two torch calls on a small host would only fight over its cores), and the second starts
    without waiting for the event loop."""
    import threading

    pipeline = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    pipeline.start()
    assert pipeline.concurrency == 2
    runner = pipeline._groups[0].runners["peer_tower"]
    real_run, running, overlaps, threads = runner.run, [0], [], set()
    lock = threading.Lock()

    def run(inputs):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
            threads.add(threading.get_ident())
        try:
            return real_run(inputs)
        finally:
            with lock:
                running[0] -= 1

    runner.run = run
    x = rows(manifest, pipeline.max_batch_rows, manifest.model_config.peer_features, seed=4)

    async def main():
        return await asyncio.gather(*(pipeline.run_stage("peer_tower", [x]) for _ in range(6)))

    outs = asyncio.run(main())
    assert len(outs) == 6 and max(overlaps) == 1 and len(threads) == 1
    pipeline.close()


def test_exact_chunks_cover_the_rows_unpadded_within_the_widest_efficient_bucket():
    from neuronserve.bucket_plan import BucketPlan, exact_rows_cap

    cost_s = {128: 0.37e-3, 512: 1.45e-3, 1024: 3.9e-3}  # per row: 2.9, 2.8, 3.8 us (1,024 spills the caches)
    assert exact_rows_cap((128, 512, 1024), cost_s) == 512
    assert exact_rows_cap((128, 512, 1024), cost_s, slack=1.4) == 1024
    plan = BucketPlan((128, 512, 1024), cost_s, any_rows=True)
    assert plan.chunks(1) == ((1, 1),) and plan.chunks(430) == ((430, 430),) and plan.chunks(512) == ((512, 512),)
    assert plan.chunks(513) == ((257, 257), (256, 256)) and plan.chunks(1100) == ((367, 367), (367, 367), (366, 366))
    assert BucketPlan((128, 512, 1024), cost_s).chunks(430) == ((430, 512),)  # a device's fixed shapes: padded
    assert plan.total_cost_s(430) == cost_s[512]  # the batcher's estimate stays the padded plan's, an upper bound


def test_the_cpu_backend_runs_batches_at_their_exact_rows(manifest):
    """The cpu artifact's graphs are shape-generic (one traced file per stage): a batch is never padded,
    and it is one execution while it fits the widest efficient bucket."""
    pipeline = Pipeline(CpuBackend(manifest), Placement.data_parallel(1))
    pipeline.start()
    ref = reference_runners(manifest)
    cfg = manifest.model_config
    peers = pipeline.plans["twotower"].chunks(10**6)[0][0] - 1  # the cap less one: no bucket, one execution

    async def main():
        users = [rows(manifest, 1, cfg.user_features, seed=i) for i in range(3)]
        sizes = [peers // 3, peers // 3, peers - 2 * (peers // 3)]
        peer_rows = [rows(manifest, n, cfg.peer_features, seed=10 + i) for i, n in enumerate(sizes)]
        batch = await pipeline.score_requests(users, peer_rows)
        index = np.repeat(np.arange(3), sizes)
        u, p = direct(ref["user_tower"], [np.concatenate(users)]), direct(ref["peer_tower"], [np.concatenate(peer_rows)])
        np.testing.assert_allclose(batch.scores, direct(ref["pair_scorer"], [u[index], p]), rtol=1e-5, atol=1e-6)
        tower = await pipeline.run_stage("peer_tower", [peer_rows[0][:3]])
        np.testing.assert_allclose(tower, p[:3], rtol=1e-5, atol=1e-6)

    asyncio.run(main())
    stats = pipeline.stats().stages
    assert (stats["twotower"].executions, stats["twotower"].rows, stats["twotower"].padded_rows) == (1, peers, 0)
    assert (stats["peer_tower"].executions, stats["peer_tower"].padded_rows) == (1, 0)
    pipeline.close()


def test_pad_up_or_split_by_the_latency_model(manifest):
    buckets = manifest.stage("peer_tower").batch_sizes  # e.g. (1, 4, 16)
    small, largest = buckets[0], buckets[-1]
    assert small == 1 and buckets[1] > 2
    features = manifest.model_config.peer_features

    def run(model, count):
        pipeline, sim = sim_pipeline(manifest, Placement.data_parallel(1), model, num_cores=1)
        before = sim.stats().executions["peer_tower"]
        asyncio.run(pipeline.run_stage("peer_tower", [rows(manifest, count, features, seed=count)]))
        stats = pipeline.stats().stages["peer_tower"]
        pipeline.close()
        return sim.stats().executions["peer_tower"] - before, stats.padded_rows

    overhead_bound = LatencyModel({s: StageLatency(1e-3, 1e-7) for s in STAGES})
    row_bound = LatencyModel({s: StageLatency(1e-7, 1e-3) for s in STAGES})
    # largest + 1 rows: one more full bucket plus the smallest one, never padding up
    assert run(overhead_bound, largest + small) == (2, 0)
    # two rows: when the fixed cost dominates, pad up to one bucket; when rows dominate, split
    assert run(overhead_bound, 2 * small) == (1, buckets[1] - 2 * small)
    assert run(row_bound, 2 * small) == (2, 0)


def test_estimate_latency_follows_the_model_and_placement(manifest):
    model = latency(0.0, user_tower=1.0, peer_tower=2.0, pair_scorer=3.0)
    pipelined, _ = sim_pipeline(manifest, Placement.parse("user_tower=0,peer_tower=1,pair_scorer=2", 4), model, latency_scale=0.001)
    single, _ = sim_pipeline(manifest, Placement.data_parallel(1), model, num_cores=1, latency_scale=0.001)
    fused, _ = sim_pipeline(manifest, Placement.data_parallel(2), model, num_cores=2, latency_scale=0.001)
    assert pipelined.estimate_latency_s(1) == pytest.approx((2.0 + 3.0) * 0.001)  # towers overlap
    assert single.estimate_latency_s(1) == pytest.approx(1.0 * 0.001)  # one core, data parallel: fused too
    assert fused.estimate_latency_s(1) == pytest.approx(1.0 * 0.001)  # data parallel: one fused execution, one overhead
    assert pipelined.estimate_latency_s(2 * pipelined.max_batch_rows) == pytest.approx(2 * (2.0 + 3.0) * 0.001)
    assert pipelined.concurrency == 6 and single.concurrency == 2  # two executions in flight per core
    pipelined.close()
    single.close()
    fused.close()


def throughput_rows_per_modelled_s(manifest, cores: int, batches: int) -> tuple:
    """Run `batches` full buckets of peer_tower on `cores` data-parallel cores; rows per modelled second."""
    pipeline, sim = sim_pipeline(manifest, Placement.data_parallel(cores), latency(1.0), num_cores=4, latency_scale=0.02)
    x = rows(manifest, pipeline.max_batch_rows, manifest.model_config.peer_features, seed=0)
    warm = sim.stats()

    async def main():
        await asyncio.gather(*(pipeline.run_stage("peer_tower", [x]) for _ in range(batches)))

    asyncio.run(main())
    stats = sim.stats()
    busy = [now.busy_s - before.busy_s for now, before in zip(stats.cores, warm.cores)]
    pipeline.close()
    return batches * len(x) / max(busy), stats.peak_in_flight


def test_data_parallel_on_four_cores_is_close_to_four_times_one(manifest):
    one, one_peak = throughput_rows_per_modelled_s(manifest, cores=1, batches=24)
    four, four_peak = throughput_rows_per_modelled_s(manifest, cores=4, batches=24)
    assert (one_peak, four_peak) == (2, 8)  # the four cores really ran at the same time, two executions each
    assert four / one >= 3.3  # 4.0 if dispatch balances perfectly; least-loaded keeps it within a batch or so


def test_three_stage_placement_is_paced_by_the_slowest_stage(manifest):
    model = latency(0.0, user_tower=1.0, peer_tower=2.0, pair_scorer=3.0)  # modelled seconds
    placement = Placement.parse("user_tower=0,peer_tower=1,pair_scorer=2", 4)
    pipeline, sim = sim_pipeline(manifest, placement, model, num_cores=4, latency_scale=0.01)
    cfg = manifest.model_config
    warm = sim.stats()
    batches = 8

    async def main():
        async def one(i):
            await pipeline.score(rows(manifest, 2, cfg.user_features, i), rows(manifest, 3, cfg.peer_features, i), np.array([0, 1, 1]))

        await asyncio.gather(*(one(i) for i in range(batches)))

    asyncio.run(main())
    stats = sim.stats()
    busy = [now.busy_s - before.busy_s for now, before in zip(stats.cores, warm.cores)]
    runs = [now.executions - before.executions for now, before in zip(stats.cores, warm.cores)]
    assert runs == [batches, batches, batches, 0]  # each stage on its own core, core 3 unused
    assert busy[:3] == pytest.approx([1.0 * batches, 2.0 * batches, 3.0 * batches])
    # towers of a later batch ran while an earlier batch was scored: all three cores at once (and
    # each accepted a second execution, prepared while its first ran)
    assert stats.peak_in_flight >= 3
    # so throughput in device time is set by the slowest stage (3 s/batch), not the sum (6 s/batch)
    assert batches / max(busy) == pytest.approx(1 / 3.0)
    pipeline.close()


def test_pipelined_groups_take_two_in_flight(manifest):
    pipelined = dataclasses.replace(manifest, pipeline_cores=2)
    pipeline, sim = sim_pipeline(pipelined, Placement.data_parallel(4, group_size=2), latency(1.0), latency_scale=0.02)
    assert pipeline.concurrency == 8  # 2 groups x 2 cores x 2 executions in flight per core
    x = rows(manifest, 1, manifest.model_config.peer_features, seed=0)

    async def main():
        await asyncio.gather(*(pipeline.run_stage("peer_tower", [x]) for _ in range(12)))

    asyncio.run(main())
    assert sim.stats().peak_in_flight == 8  # 2 groups x 4 in flight, and never an oversubscription error
    assert all(g.executions > 0 for g in pipeline.stats().groups)
    pipeline.close()


@pytest.mark.parametrize("kind", ["fail", "hang"])
def test_a_core_fault_fails_only_its_batch(manifest, kind):
    pipeline, sim = sim_pipeline(
        manifest, Placement.data_parallel(2), latency(1.0), num_cores=2, latency_scale=0.01, core_timeout_s=0.3, reset_s=0.5
    )
    x = rows(manifest, 3, manifest.model_config.peer_features, seed=0)
    expected = asyncio.run(pipeline.run_stage("peer_tower", [x]))  # dispatched to core 0 (fewest dispatches)
    asyncio.run(pipeline.run_stage("peer_tower", [x]))  # and core 1; the tie goes to core 0 next
    sim.inject_fault(0, kind)
    before = sim.stats().cores

    async def main():
        first = asyncio.ensure_future(pipeline.run_stage("peer_tower", [x]))  # takes core 0 and faults
        await asyncio.sleep(0)
        others = [pipeline.run_stage("peer_tower", [x]) for _ in range(6)]
        return await asyncio.gather(first, *others, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], CoreFault)
    assert ("hung past its timeout" if kind == "hang" else "core 0 failed") in str(results[0])
    for out in results[1:]:
        np.testing.assert_array_equal(out, expected)
    after = sim.stats().cores
    ran = [now.executions - then.executions for now, then in zip(after, before)]
    # every other batch ran once: on core 1, or (at most the one or two core 0 had accepted behind the
    # faulting one before the fault showed) on core 0 after its reset; none was lost
    assert sum(ran) == 6 and ran[0] <= 2
    assert pipeline.stats().faults == 1

    time.sleep(0.55)  # the reset
    assert all(g.healthy for g in pipeline.stats().groups)
    asyncio.run(pipeline.run_stage("peer_tower", [x]))
    assert sim.stats().cores[0].executions == after[0].executions + 1  # core 0 is back in rotation
    pipeline.close()


def test_no_healthy_group_is_unavailable(manifest):
    pipeline, sim = sim_pipeline(manifest, Placement.data_parallel(1), latency(0.0), num_cores=1, latency_scale=0.0, reset_s=5.0)
    x = rows(manifest, 1, manifest.model_config.peer_features, seed=0)
    sim.inject_fault(0, "fail")
    with pytest.raises(CoreFault):
        asyncio.run(pipeline.run_stage("peer_tower", [x]))
    with pytest.raises(Unavailable, match="no healthy core group for peer_tower") as info:
        asyncio.run(pipeline.run_stage("peer_tower", [x]))
    assert not isinstance(info.value, CoreFault)
    pipeline.close()


def test_a_cancelled_caller_keeps_its_slot_until_the_core_is_done(manifest):
    pipeline, sim = sim_pipeline(manifest, Placement.data_parallel(1), latency(1.0), num_cores=1, latency_scale=0.1)
    x = rows(manifest, 1, manifest.model_config.peer_features, seed=0)

    async def main():
        first = asyncio.ensure_future(pipeline.run_stage("peer_tower", [x]))
        await asyncio.sleep(0.03)  # running on core 0 now
        first.cancel()
        return await pipeline.run_stage("peer_tower", [x])  # must wait for core 0, not oversubscribe it

    assert asyncio.run(main()).shape[0] == 1
    # the cancelled execution finished on the core and was accounted there (its slot freed only then)
    assert pipeline.stats().groups[0].executions == 2
    pipeline.close()


def test_inputs_are_validated(manifest):
    pipeline, _ = sim_pipeline(manifest, Placement.data_parallel(1), latency(0.0), num_cores=1, latency_scale=0.0)
    cfg = manifest.model_config
    users = rows(manifest, 2, cfg.user_features, seed=0)
    peers = rows(manifest, 3, cfg.peer_features, seed=1)
    with pytest.raises(InvalidInput, match="user_index values must be in"):
        asyncio.run(pipeline.score(users, peers, np.array([0, 1, 2])))
    with pytest.raises(InvalidInput, match="one per peer row"):
        asyncio.run(pipeline.score(users, peers, np.array([0, 1])))
    with pytest.raises(InvalidInput, match="one per peer row"):
        asyncio.run(pipeline.score(users, peers, np.array([0.0, 1.0, 1.0])))
    with pytest.raises(InvalidInput, match=r"peer_tower input 0 must have shape \(rows, "):
        asyncio.run(pipeline.run_stage("peer_tower", [users[:, :-1]]))
    with pytest.raises(InvalidInput, match="at least 1 row"):
        asyncio.run(pipeline.run_stage("peer_tower", [peers[:0]]))
    pipeline.close()
