"""The cpu backend's fused graph in its own process (model_process.py): the same scores as in the
serving process through padding and splitting, no executor thread used, a cancelled caller keeps its
slot until the child answers, a child that dies fails its batch and takes its group out of rotation,
close() leaves no process and no shared-memory file behind; and a real server with --model-process on."""

from __future__ import annotations

import asyncio
import glob
import os
import signal

import grpc
import numpy as np
import pytest

from neuronserve.artifact import Manifest, load_manifest
from neuronserve.backends.cpu import CpuBackend
from neuronserve.config import Placement, ServerConfig
from neuronserve.errors import CoreFault, Unavailable
from neuronserve.pipeline import Pipeline
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from support import LoopThread, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def manifest(small_artifact):
    return small_artifact if isinstance(small_artifact, Manifest) else load_manifest(small_artifact)


def started(manifest, model_process: bool) -> Pipeline:
    pipeline = Pipeline(CpuBackend(manifest, model_process=model_process), Placement.data_parallel(1))
    pipeline.start()
    return pipeline


def requests(manifest, sizes, seed: int):
    rng = np.random.default_rng(seed)
    cfg = manifest.model_config
    users = [rng.standard_normal((1, cfg.user_features)).astype(np.float32) for _ in sizes]
    peers = [rng.standard_normal((m, cfg.peer_features)).astype(np.float32) for m in sizes]
    return users, peers


def the_process(pipeline: Pipeline):
    return pipeline._groups[0].runners["twotower"].process


def test_scores_equal_the_in_process_graph_and_no_executor_thread_runs(manifest):
    local, remote = started(manifest, False), started(manifest, True)
    executor = remote._groups[0].executor
    executor.submit = lambda *a, **k: pytest.fail("a fused batch went to the executor thread")
    largest = remote.max_batch_rows

    async def main():
        for i, sizes in enumerate([(1,), (3, 5), (largest,), (largest - 1, 2), (7, largest + 2, 5)]):
            users, peers = requests(manifest, sizes, seed=i)
            want = (await local.score_requests(users, peers)).scores
            got = (await remote.score_requests(users, peers)).scores
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        users, peers = requests(manifest, (2, 3), seed=9)
        peers[1][0, 0] = np.nan  # non-finite rows still marked NaN on this path
        got = (await remote.score_requests(users, peers)).scores
        assert np.isnan(got[2]).all() and np.isfinite(got[np.arange(5) != 2]).all()
        many = await asyncio.gather(*(remote.score_requests(*requests(manifest, (4,), seed=20 + j)) for j in range(20)))
        assert all(r.scores.shape == (4, manifest.model_config.num_labels) for r in many)

    try:
        asyncio.run(main())
        group = remote.stats().groups[0]
        assert group.executions > 0 and group.busy_s > 0 and group.healthy
    finally:
        local.close()
        remote.close()


def test_a_cancelled_caller_keeps_its_slot_until_the_child_answers(manifest):
    pipeline = started(manifest, True)

    async def main():
        group = pipeline._groups[0]
        task = asyncio.ensure_future(pipeline.score_requests(*requests(manifest, (3,), seed=1)))
        await asyncio.sleep(0)  # the job is sent (no time passes: one loop turn)
        assert group.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert group.in_flight == 1  # the child still owns the slot's memory
        while group.in_flight:  # freed by the child's reply, on this loop
            await asyncio.sleep(0.001)
        assert len(the_process(pipeline)._free) == the_process(pipeline).slots
        after = await pipeline.score_requests(*requests(manifest, (2,), seed=2))
        assert after.scores.shape[0] == 2

    try:
        asyncio.run(main())
    finally:
        pipeline.close()


def test_a_child_that_dies_fails_its_batch_and_a_new_one_takes_over(manifest):
    pipeline = started(manifest, True)
    process = the_process(pipeline)

    async def main():
        first = process._proc
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(CoreFault, match="exited"):
            await pipeline.score_requests(*requests(manifest, (3,), seed=1))
        assert pipeline.stages_down()
        with pytest.raises(Unavailable):  # out of rotation while the next child warms up
            await pipeline.score_requests(*requests(manifest, (3,), seed=2))
        await asyncio.to_thread(wait_until, lambda: not pipeline.stages_down(), 30)  # restarted after a 1 s backoff
        assert process._proc is not first and first.poll() is not None
        again = await pipeline.score_requests(*requests(manifest, (3,), seed=3))
        assert np.isfinite(again.scores).all()

    try:
        asyncio.run(main())
    finally:
        pipeline.close()


def test_close_leaves_no_process_and_no_shared_memory_file(manifest):
    before = set(glob.glob("/dev/shm/neuronserve-*"))
    pipeline = started(manifest, True)
    child = the_process(pipeline)._proc
    assert set(glob.glob("/dev/shm/neuronserve-*")) == before  # unlinked once both sides mapped it
    pipeline.close()
    assert child.poll() == 0


def test_a_server_with_model_process_on_scores_like_one_without(small_artifact):
    directory = str(small_artifact.directory if isinstance(small_artifact, Manifest) else small_artifact)
    cfg = (small_artifact if isinstance(small_artifact, Manifest) else load_manifest(small_artifact)).model_config
    rng = np.random.default_rng(0)
    user = rng.standard_normal((1, cfg.user_features)).astype(np.float32)
    peers = rng.standard_normal((9, cfg.peer_features)).astype(np.float32)
    request = pb.ScoreRequest(user_features=pb.Tensor(data=user.tobytes(), shape=user.shape),
                              peer_features=pb.Tensor(data=peers.tobytes(), shape=peers.shape))
    scores = []
    for model_process in (False, True):
        loop = LoopThread()
        server = Server(ServerConfig(artifact=directory, backend="cpu", cores=1, port=0, metrics_port=None, model_process=model_process))
        loop.run(server.start())
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = pb_grpc.ScorerStub(channel).Score(request, timeout=30)
            scores.append(np.frombuffer(reply.scores.data, "<f4").reshape(tuple(reply.scores.shape)))
            if model_process:
                child = server.pipeline._groups[0].runners["twotower"].process._proc
        finally:
            loop.run(server.stop(grace_period_s=1.0))
            loop.close()
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5, atol=1e-6)
    wait_until(lambda: child.poll() is not None, timeout_s=10)
    assert child.returncode == 0
