"""A model repository served by a pool (`--workers 2 --model-repository DIR`): a version loaded or
unloaded through one worker is served by every worker, each version's embedding cache is shared by the
workers, and a restarted worker serves what the pool serves."""

from __future__ import annotations

import os
import shutil
import signal
import sys

import grpc
import numpy as np
import pytest

from neuronserve.pool_versions import PoolVersions
from neuronserve.errors import ModelControlError
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from test_repository import artifacts  # noqa: F401 - a fixture: versions 1 and 2 of one model
from test_workers import FEATURES, LABELS, connect, poll, pools, scores, tensor  # noqa: F401 - pools is a fixture

class _Cache:
    def __init__(self) -> None:
        self.cleared: list[str] = []

    def clear_for(self, model_version: str) -> None:
        self.cleared.append(model_version)


def test_a_version_has_one_cache_for_every_worker_and_a_free_slot_is_emptied_for_it():
    pool = PoolVersions(workers=2, slots=2, new_cache=_Cache)
    first = pool.cache_for(0, 1, "aaa")
    assert pool.cache_for(1, 1, "aaa") is first  # held by worker 0: shared, not emptied again
    assert first.cleared == ["aaa"]
    second = pool.cache_for(0, 2, "bbb")
    assert second is not first and second.cleared == ["bbb"]
    with pytest.raises(ModelControlError, match="at most 2 versions"):
        pool.cache_for(1, 3, "ccc")  # versions 1 and 2 hold both slots
    pool.release(0, 1)
    with pytest.raises(ModelControlError):
        pool.cache_for(1, 3, "ccc")  # version 1 is still held by worker 1
    pool.release(1, 1)
    third = pool.cache_for(1, 3, "ccc")
    assert third is first and first.cleared == ["aaa", "ccc"]  # nobody holds version 1 any more


def test_a_restarting_worker_drops_what_its_predecessor_held_and_reads_the_wanted_versions():
    pool = PoolVersions(workers=2, slots=2, new_cache=_Cache)
    pool.cache_for(0, 1, "aaa")
    pool.cache_for(0, 2, "bbb")
    pool.forget(0)
    assert pool.cache_for(1, 3, "ccc").cleared[-1] == "ccc"
    assert pool.wanted() is None
    pool.set_wanted((2, 1))
    assert pool.wanted() == (1, 2)
    pool.set_wanted(())
    assert pool.wanted() == ()


def _serve(pools, root, *extra: str):
    control = () if "--model-control" in extra else ("--model-control", "explicit")
    argv = [
        sys.executable, "-m", "neuronserve", "serve", "--model-repository", str(root), "--backend", "cpu",
        "--workers", "2", "--port", "0", "--metrics-port", "0", *control, *extra,
    ]  # fmt: skip
    pool = pools(argv)
    pool.ready()
    return pool


def _score(address: str, version: str = "") -> pb.ScoreResponse:
    rng = np.random.default_rng(3)
    request = pb.ScoreRequest(
        user_features=tensor(rng.standard_normal((1, FEATURES))),
        peer_features=tensor(rng.standard_normal((4, FEATURES))),
        model_version=version,
    )
    with connect(address) as channel:
        return pb_grpc.ScorerStub(channel).Score(request, timeout=20)


def test_a_load_through_one_worker_is_served_by_both_and_their_caches_are_one(pools, artifacts, tmp_path):
    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    pool = _serve(pools, root)
    workers = pool.workers()
    assert {_score(w.address).model_version for w in workers.values()} == {v1.model_version}

    shutil.copytree(v2.directory, root / "twotower" / "2")
    with connect(workers[0].address) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(
            oip.RepositoryModelLoadRequest(model_name="twotower"), timeout=60
        )
    assert {_score(w.address).model_version for w in workers.values()} == {v2.model_version}

    rng = np.random.default_rng(5)
    peer_ids = [11, 12, 13]
    with connect(workers[1].address) as channel:  # upserts to version 2 through the other worker
        stub = pb_grpc.ScorerStub(channel)
        stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=peer_ids, features=tensor(rng.standard_normal((3, FEATURES)))), timeout=20)  # fmt: skip
        stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids=[7], features=tensor(rng.standard_normal((1, FEATURES)))), timeout=20)  # fmt: skip
        on_writer = scores(stub.ScoreByIds(pb.ScoreByIdsRequest(user_id=7, peer_ids=peer_ids), timeout=20))
    with connect(workers[0].address) as channel:
        on_other = pb_grpc.ScorerStub(channel).ScoreByIds(pb.ScoreByIdsRequest(user_id=7, peer_ids=peer_ids), timeout=20)
    assert on_writer.shape == (3, LABELS)
    np.testing.assert_array_equal(scores(on_other), on_writer)
    assert on_other.model_version == v2.model_version

    victim = workers[1]  # restarted: it serves version 2, with the cache the pool kept
    os.kill(victim.pid, signal.SIGKILL)
    pool.wait_for(rf"worker 1 ready: pid (?!{victim.pid}\b)")
    restarted = pool.workers()[1]
    assert _score(restarted.address).model_version == v2.model_version
    with connect(restarted.address) as channel:
        again = pb_grpc.ScorerStub(channel).ScoreByIds(pb.ScoreByIdsRequest(user_id=7, peer_ids=peer_ids), timeout=20)
    np.testing.assert_array_equal(scores(again), on_writer)

    with connect(restarted.address) as channel:  # an unload through one worker reaches the other too
        oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            oip.RepositoryModelUnloadRequest(model_name="twotower"), timeout=60
        )
    for worker in (workers[0], restarted):
        with pytest.raises(grpc.RpcError) as failed:
            _score(worker.address)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_with_poll_every_worker_serves_a_version_copied_into_the_repository(pools, artifacts, tmp_path):
    v1, v2 = artifacts
    root = tmp_path / "repo"
    shutil.copytree(v1.directory, root / "twotower" / "1")
    pool = _serve(pools, root, "--model-control", "poll", "--repository-poll-s", "0.2")
    workers = pool.workers()
    shutil.copytree(v2.directory, root / "twotower" / "2")
    for worker in workers.values():
        poll(lambda w=worker: _score(w.address).model_version == v2.model_version, 60, lambda: pool.log())
