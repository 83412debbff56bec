"""The pipeline: the three stages (or the fused graph) on NeuronCore groups, bucket padding and
splitting, dispatch to the least-loaded healthy group.

Between the batcher (above: whole batches, `score_requests`) and a backend (below: one graph at one
compiled bucket on one core group). Contract: outputs are unpadded and in request order; a core fault
fails only its batch and takes its group out of rotation; no healthy group left -> Unavailable.
Data parallelism, pipelining, the fused path and the bucket rule: docs/pipeline.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from neuronserve.backends.base import Backend, FusedRunner, Runner
from neuronserve.config import CoreGroup, Placement
from neuronserve.thread_placement import released_executor
from neuronserve.bucket_plan import BucketPlan, measured_plan
from neuronserve.execution import (
    JobResult,
    ScoredBatch,
    call_soon,
    chunk_starts,
    concat,
    executions,
    fused_inputs,
    mark_nonfinite,
    remote_fused,
    run_chunks,
    run_stages,
    score_fused,
    run_fused,
    user_rows_of,
)
from neuronserve.errors import CoreFault, CoreResetting, InvalidInput, LoadAbandoned, Unavailable
from neuronserve.contract import FUSED_STAGE, PAIR_SCORER, PEER_TOWER, STAGES, USER_TOWER
from neuronserve.pipeline_stats import GroupStats, PipelineStats, StageStats


class _Group:
    """One core group: its runners (one per stage placed on it), executor and load. Loop-thread only."""

    def __init__(self, index: int, cores: CoreGroup, stages: tuple[str, ...]) -> None:
        self.index = index
        self.cores = cores
        self.stages = stages
        self.runners: dict[str, Runner] = {}
        self.capacity = 1
        self.executor: ThreadPoolExecutor | None = None  # set by Pipeline.start
        self.in_flight = 0
        self.dispatched = 0
        self.executions = 0
        self.busy_s = 0.0
        self.faults = 0
        self.inline_executions = 0  # of `executions`, those run on the event loop

    def healthy(self) -> bool:
        return all(runner.healthy() for runner in self.runners.values())

    def stats(self) -> GroupStats:
        return GroupStats(
            str(self.cores),
            self.stages,
            self.executions,
            self.inline_executions,
            self.busy_s,
            self.faults,
            self.healthy(),
        )


class Pipeline:
    def __init__(self, backend: Backend, placement: Placement) -> None:
        self.backend = backend
        self.placement = placement
        groups = placement.all_groups()
        self._groups = [
            _Group(i, cores, tuple(s for s in STAGES if cores in placement.groups.get(s, ())))
            for i, cores in enumerate(groups)
        ]
        self._stage_groups: dict[str, list[_Group]] = {
            stage: [g for g in self._groups if stage in g.stages] for stage in STAGES if placement.groups.get(stage)
        }
        self._shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        self._plans: dict[str, BucketPlan] = {}
        self._stage_counts = {stage: StageStats() for stage in STAGES + (FUSED_STAGE,)}
        self._estimates: list[float] = []  # score batch of r rows -> modelled seconds, r <= max_batch_rows
        self._user_buckets: dict[int, tuple[int, ...]] = {}  # fused: peer bucket -> its compiled user buckets
        self._waiters: deque[asyncio.Future] = deque()
        self._now: list[tuple[_Group, FusedRunner]] = []  # score_now's groups and their fused runners
        self._now_rows = 0  # the most rows score_now runs (one exact execution)
        self._fused = False
        self._started = False

    def start(
        self,
        abort: threading.Event | None = None,
        plans: Mapping[str, BucketPlan] | None = None,
        pace: Callable[[], None] | None = None,
    ) -> None:
        """Load and warm up every stage on its groups (blocking), then plan buckets (reusing `plans`, the
        `plans` of a pipeline of the same graphs' shapes, where they cover the same buckets).
        Once `abort` is set (from another thread), it gives up before the next stage load (LoadAbandoned).
        `pace` runs after each stage's load and warm-up (a version loading beside traffic sleeps there, so
        the serving threads get the GIL back between the stalls of torch.jit.load and the warm-up).
        gc.freeze() is deliberately not called here: the server calls it once everything is built."""
        # Data parallel (every group holds all three stages): a score batch runs start to end on one
        # group in ONE executor job, instead of a thread hop and loop wake-up per stage execution; with
        # the fused graph in the artifact, as one execution.
        self._fused = all(set(g.stages) == set(STAGES) for g in self._groups)
        if self._fused and self.backend.manifest.has_fused_stage:
            for group in self._groups:
                group.stages += (FUSED_STAGE,)
            self._stage_groups[FUSED_STAGE] = list(self._groups)
        for group in self._groups:
            for stage in group.stages:
                if abort is not None and abort.is_set():
                    raise LoadAbandoned("start-up abandoned: the server was asked to stop while loading its stages")
                loaded = self.backend.load(stage, group.cores)
                loaded.warmup()
                group.runners[stage] = loaded
                if pace is not None:
                    pace()
        self.backend.tick_device()  # ScoreTick's graphs, where the backend has them: loaded now, never on a request
        self.backend.manifest.release_files()  # every stage is loaded: drop the verified file bytes kept for it
        for group in self._groups:
            group.capacity = max(r.max_in_flight for r in group.runners.values())
            threads = max(r.threads or r.max_in_flight for r in group.runners.values())
            group.executor = released_executor(threads, f"cores-{group.cores}")
        for stage, groups in self._stage_groups.items():
            runner = groups[0].runners[stage]
            self._shapes[stage] = tuple(runner.input_shapes())
            self._plans[stage] = measured_plan(runner, (plans or {}).get(stage))
        if FUSED_STAGE in self._stage_groups:
            fused = self._stage_groups[FUSED_STAGE][0].runners[FUSED_STAGE]
            assert isinstance(fused, FusedRunner)
            self._user_buckets = {b: fused.user_batch_sizes(b) for b in fused.batch_sizes}
            now = [(g, g.runners[FUSED_STAGE]) for g in self._stage_groups[FUSED_STAGE]]
            self._now = [(g, r) for g, r in now if isinstance(r, FusedRunner) and r.runs_now]
            self._now_rows = self._plans[FUSED_STAGE].exact_cap if self._now else 0
        self._started = True
        self._estimates = [0.0] + [self._estimate_s(rows) for rows in range(1, self.max_batch_rows + 1)]

    @property
    def plans(self) -> dict[str, BucketPlan]:
        """Each stage's bucket plan (measured once at start; a later version of the same shapes reuses them)."""
        return dict(self._plans)

    @property
    def max_batch_rows(self) -> int:
        return min(plan.buckets[-1] for plan in self._plans.values())

    @property
    def concurrency(self) -> int:
        """Batches worth keeping in flight: one per executor slot of every core group."""
        return sum(group.capacity for group in self._groups)

    @property
    def devices(self) -> int:
        """Batches that run in parallel on separate core groups: while fewer run, a core idles."""
        return len(self._groups)

    def _chunks(self, stage: str, rows: int) -> tuple[tuple[int, int], ...]:
        return self._plans[stage].chunks(rows)

    def plan_cost_s(self, stage: str, rows: int) -> float:
        return self._plans[stage].total_cost_s(rows)

    def estimate_latency_s(self, rows: int) -> float:
        """Device time of a score batch of `rows` peers (a table lookup: the batcher asks per request)."""
        if 0 < rows < len(self._estimates):
            return self._estimates[rows]
        return self._estimate_s(max(1, rows))

    def _estimate_s(self, rows: int) -> float:
        """The fused stage's plan, or the towers (in parallel when they can run on two groups) then the
        scorer; chunks counted one after another."""
        if FUSED_STAGE in self._stage_groups:
            return self.plan_cost_s(FUSED_STAGE, rows)
        user, peer = self.plan_cost_s(USER_TOWER, rows), self.plan_cost_s(PEER_TOWER, rows)
        tower_groups = {g.index for stage in (USER_TOWER, PEER_TOWER) for g in self._stage_groups[stage]}
        # fused: one job, in turn
        towers = max(user, peer) if len(tower_groups) > 1 and not self._fused else user + peer
        return towers + self.plan_cost_s(PAIR_SCORER, rows)

    async def run_stage(self, stage: str, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """Run `stage` on any number of rows >= 1: split (and pad) to the plan's chunks, unpad the output."""
        if not self._started:
            raise Unavailable("the pipeline is not started: call start() first")
        if stage not in self._stage_groups:
            raise InvalidInput(
                f"stage {stage!r} is not placed on any core group; placed: {', '.join(self._stage_groups)}"
            )
        arrays, rows = self._check(stage, inputs)
        chunks = self._chunks(stage, rows)
        parts = await asyncio.gather(
            *(self._run_chunk(stage, arrays, s, *chunk) for s, chunk in zip(chunk_starts(chunks), chunks, strict=True))
        )
        return concat(parts)

    async def score_requests(self, users: Sequence[np.ndarray], peers: Sequence[np.ndarray]) -> ScoredBatch:
        """A batch of score requests: request i is users[i] ([1, F_u]) against peers[i] ([m_i, F_p]);
        -> logits [sum m_i, K] in request order, NaN in every row with a non-finite feature. With the fused
        graph the batch is assembled and padded here, on the event loop (docs/pipeline.md says why)."""
        if not self._started:
            raise Unavailable("the pipeline is not started: call start() first")
        start_s = time.perf_counter()
        user, user_index = concat(users), user_rows_of(peers)
        if FUSED_STAGE not in self._stage_groups:
            peer = concat(peers)
            sent_s = time.perf_counter()
            scores = await self.score(user, peer, user_index)
        else:
            chunks = self._chunks(FUSED_STAGE, user_index.shape[0])
            peer, inputs = fused_inputs(user, peers, user_index, chunks, self._user_rows)
            sent_s = time.perf_counter()
            scores = await self._execute(
                FUSED_STAGE, run_fused, inputs, chunks, remote=functools.partial(remote_fused, inputs, chunks)
            )
        back_s = time.perf_counter()
        scores = mark_nonfinite(scores, user, peer, user_index)
        return ScoredBatch(scores, sent_s - start_s, back_s - sent_s, time.perf_counter() - back_s)

    def _user_rows(self, bucket: int, users: int) -> int:
        """A fused chunk's user rows: exact (any rows), else the smallest user bucket compiled with `bucket`."""
        return users if self._plans[FUSED_STAGE].any_rows else next(u for u in self._user_buckets[bucket] if u >= users)

    def lane(self) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], ScoredBatch] | None:
        """The blocking batch run of a BatchLane (lane.py), when the score path is one group's fused runner
        that runs on a host thread (FusedRunner.lane): score_fused on its runners; else None."""
        groups = self._stage_groups.get(FUSED_STAGE, [])
        if len(groups) != 1 or not getattr(groups[0].runners[FUSED_STAGE], "lane", False):
            return None
        return self._scored_here(groups[0])

    def score_here(self, users: Sequence[np.ndarray], peers: Sequence[np.ndarray]) -> ScoredBatch | None:
        """Blocking, on the calling thread: score_requests' batch on the first fused group's runners called
        directly (no launcher, no slot, not counted), for the reference check before anything serves; None
        without the fused stage."""
        groups = self._stage_groups.get(FUSED_STAGE)
        return self._scored_here(groups[0])(users, peers) if groups else None

    def _scored_here(self, group: _Group) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], ScoredBatch]:
        """score_fused on `group`'s runners, blocking on the calling thread (a lane's batches, the reference check)."""
        chunks_of = functools.partial(self._chunks, FUSED_STAGE)
        return functools.partial(score_fused, group.runners, chunks_of=chunks_of, user_rows=self._user_rows)

    def count_lane(self, batch: ScoredBatch, on_loop: bool) -> None:
        """Loop thread: a lane batch's executions (run on the loop, or on the lane's thread) into its group's counts."""
        group = self._stage_groups[FUSED_STAGE][0]
        group.in_flight += 1
        self._finish(group, batch.job, None, on_loop=on_loop)

    @property
    def runs_now(self) -> bool:  # score_now can run a request at all (a fused runner that runs it here)
        return bool(self._now)

    def score_now(self, user: np.ndarray, peers: np.ndarray) -> ScoredBatch | None:
        """One score request (user [1, F_u], peers [m, F_p]) run here by an idle group whose fused runner runs
        it now (FusedRunner.score_now: cpu, low load), counted as score_requests counts; None: batch it."""
        rows = peers.shape[0]
        if rows > self._now_rows:
            return None
        for group, runner in self._now:
            if group.in_flight == 0:
                done = runner.score_now(user, peers)
                if done is None:
                    return None
                group.in_flight += 1  # a job that ran on the group: _finish frees the slot and counts it
                self._finish(group, JobResult(*done, executions(FUSED_STAGE, ((rows, rows),))), None, on_loop=True)
                back_s = time.perf_counter()
                scores = mark_nonfinite(done[0], user, peers, None)
                return ScoredBatch(scores, 0.0, done[1], time.perf_counter() - back_s)
        return None

    async def score(self, user_features: np.ndarray, peer_features: np.ndarray, user_index: np.ndarray) -> np.ndarray:
        """Row i of the result [N, K] scores user user_index[i] against peer i (logits, float32)."""
        user_index = np.asarray(user_index)
        users = np.shape(user_features)[0] if np.ndim(user_features) else 0
        peers = np.shape(peer_features)[0] if np.ndim(peer_features) else 0
        if user_index.shape != (peers,) or user_index.dtype.kind not in "iu":
            raise InvalidInput(
                f"user_index must be {peers} integers (one per peer row), got shape {user_index.shape} dtype {user_index.dtype}"
            )
        if peers and (user_index.min() < 0 or user_index.max() >= users):
            raise InvalidInput(
                f"user_index values must be in [0, {users}) (the user rows), got {user_index.min()}..{user_index.max()}"
            )
        if not self._fused:  # stages on their own groups: each overlaps other batches' stages
            user, peer = await asyncio.gather(
                self.run_stage(USER_TOWER, [user_features]), self.run_stage(PEER_TOWER, [peer_features])
            )
            return await self.run_stage(PAIR_SCORER, [np.take(user, user_index, axis=0), peer])
        (user,), _ = self._check(USER_TOWER, [user_features])
        (peer,), _ = self._check(PEER_TOWER, [peer_features])
        return await self._execute(USER_TOWER, run_stages, self._chunks, user, peer, user_index)

    def stages_down(self) -> frozenset[str]:
        """The placed stages whose every core group is out of rotation (empty: every model can run).
        Cheap (a flag per runner): the server's health watcher polls it on the event loop."""
        return frozenset(s for s, groups in self._stage_groups.items() if not any(g.healthy() for g in groups))

    def stats(self) -> PipelineStats:
        return PipelineStats(
            stages={stage: dataclasses.replace(counts) for stage, counts in self._stage_counts.items()},
            groups=tuple(g.stats() for g in self._groups),
        )

    def close(self) -> None:
        """Wait for running executions, then release every runner."""
        for group in self._groups:
            if group.executor is not None:
                group.executor.shutdown(wait=True)
            for runner in group.runners.values():
                runner.close()
            group.runners.clear()
        self._started = False

    def _check(self, stage: str, inputs: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
        shapes = self._shapes[stage]
        if len(inputs) != len(shapes):
            raise InvalidInput(f"{stage} takes {len(shapes)} input(s), got {len(inputs)}")
        arrays = [np.ascontiguousarray(x, dtype=np.float32) for x in inputs]
        rows = arrays[0].shape[0] if arrays[0].ndim else 0
        for i, (array, shape) in enumerate(zip(arrays, shapes, strict=False)):
            if array.shape != (rows,) + shape:
                raise InvalidInput(
                    f"{stage} input {i} must have shape (rows, {', '.join(map(str, shape))}) with the same rows "
                    f"for every input, got {tuple(array.shape)}"
                )
        if rows < 1:
            raise InvalidInput(f"{stage} needs at least 1 row, got 0")
        return arrays, rows

    async def _run_chunk(self, stage: str, arrays: list[np.ndarray], start: int, rows: int, bucket: int) -> np.ndarray:
        """Rows [start, start+rows) padded to `bucket`, on the least-loaded healthy group; unpadded output."""
        chunk = [array[start : start + rows] for array in arrays]  # contiguous views, no copy
        return await self._execute(stage, lambda runners: run_chunks(runners[stage], chunk, ((rows, bucket),)))

    async def _execute(self, stage: str, job, *args, remote=None) -> np.ndarray:
        """`job(group.runners, *args)` -> (output, busy seconds, executions) on a slot of the least-loaded
        healthy group holding `stage`; returns the output. A core that refused the job because it is
        resetting (CoreResetting: nothing ran) is out of rotation now, so the job goes to another group.
        `remote(group.runners)`: the same job sent to the group's model process (no executor thread),
        as (an asyncio future of (output, busy seconds), executions), or None to use the executor."""
        loop = asyncio.get_running_loop()
        while True:
            group = await self._acquire(stage)
            future = loop.create_future()
            try:
                sent = remote(group.runners) if remote is not None else None
            except BaseException as exc:  # refused before it ran (its inputs): the slot is free again
                self._finish(group, None, exc)
                raise
            if sent is not None:  # the process's reply settles `future` and frees the slot, on this loop
                done, executions = sent
                if done.done():  # run inline (the cpu backend at low load): settled now, no loop round trip
                    self._settle(future, group, done, executions, on_loop=True)
                else:
                    done.add_done_callback(functools.partial(self._settle, future, group, executions=executions))
            else:
                assert group.executor is not None  # set by start()
                try:
                    done = group.executor.submit(job, group.runners, *args)
                except RuntimeError:  # the executor is shut down: the pipeline is closing
                    self._finish(group, None, None)
                    raise Unavailable("the pipeline is closed") from None
                # One hop back: the job's completion settles `future` and frees the slot in one loop callback.
                # The slot is freed by the job, never by the caller: a cancelled caller keeps it until the core is done.
                done.add_done_callback(functools.partial(call_soon, loop, self._settle, future, group))
            try:
                result = await future
            except CoreResetting:
                continue
            return result.out

    def _settle(self, future: asyncio.Future, group: _Group, done, executions=None, on_loop: bool = False) -> None:
        """Loop thread, once a job ends (`done`: its concurrent.futures.Future, or the model process's
        asyncio future of (output, busy seconds) with `executions`; on_loop: it ran inside the submit): free
        its slot, count, and answer its caller unless the caller went away."""
        error = (
            Unavailable("the execution was cancelled: the pipeline is closing")
            if done.cancelled()
            else done.exception()
        )
        result = None if error is not None else done.result()
        if result is not None and executions is not None:  # the model process's (output, busy seconds)
            out, busy_s = result
            result = JobResult(out, busy_s, executions)
        self._finish(group, result, error, on_loop=on_loop)
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    async def _acquire(self, stage: str) -> _Group:
        """A slot on the least-loaded healthy group for `stage`; waits (FIFO) while all are busy."""
        while True:
            healthy = [g for g in self._stage_groups[stage] if g.healthy()]
            if not healthy:
                cores = ", ".join(str(g.cores) for g in self._stage_groups[stage])
                raise Unavailable(
                    f"no healthy core group for {stage}: cores {cores} are all out of rotation after faults; retry after their reset"
                )
            free = [g for g in healthy if g.in_flight < g.capacity]
            if free:
                group = min(free, key=lambda g: (g.in_flight / g.capacity, g.dispatched, g.index))
                group.in_flight += 1
                group.dispatched += 1
                return group
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def _finish(
        self, group: _Group, result: JobResult | None, error: BaseException | None, on_loop: bool = False
    ) -> None:
        """Loop thread: free the slot, wake waiters, count the job's (output, busy seconds, executions);
        on_loop: the job ran on the event loop (the launcher's or the lane's inline run)."""
        group.in_flight -= 1
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if isinstance(error, CoreFault) and not isinstance(error, CoreResetting):
            group.faults += 1
        if result is not None:
            group.busy_s += result.busy_s
            if on_loop:
                group.inline_executions += len(result.executions)
            for execution in result.executions:
                group.executions += 1
                counts = self._stage_counts[execution.stage]
                counts.executions += 1
                counts.rows += execution.rows
                counts.padded_rows += execution.bucket - execution.rows
