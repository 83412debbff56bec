"""A model repository served by a pool (`--workers 2 --model-repository DIR`): a version loaded or
unloaded through one worker is served by every worker, each version's embedding cache is shared by the
workers, and a restarted worker serves what the pool serves."""

from __future__ import annotations

import json
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
        self.bias: tuple[float, ...] = ()

    def clear_for(self, model_version: str, label_bias) -> None:
        self.cleared.append(model_version)
        self.bias = tuple(label_bias)


def test_a_version_has_one_cache_for_every_worker_and_a_free_slot_is_emptied_for_it():
    pool = PoolVersions(workers=2, slots=2, new_cache=_Cache)
    first = pool.cache_for(0, 1, "aaa", [0.1])
    assert pool.cache_for(1, 1, "aaa", [0.1]) is first  # held by worker 0: shared, not emptied again
    assert first.cleared == ["aaa"] and first.bias == (0.1,)
    second = pool.cache_for(0, 2, "bbb", [0.2])
    assert second is not first and second.cleared == ["bbb"] and second.bias == (0.2,)
    with pytest.raises(ModelControlError, match=r"at most 2 versions at once \(held: \[1, 2\]\)"):
        pool.cache_for(1, 3, "ccc", [0.3])  # versions 1 and 2 hold both slots
    pool.release(0, 1)
    with pytest.raises(ModelControlError):
        pool.cache_for(1, 3, "ccc", [0.3])  # version 1 is still held by worker 1
    pool.release(1, 1)
    third = pool.cache_for(1, 3, "ccc", [0.3])
    assert third is first and first.cleared == ["aaa", "ccc"]  # nobody holds version 1 any more
    assert first.bias == (0.3,)  # the slot takes the new version's bias with its tag


def test_a_slot_is_free_when_no_worker_holds_it_whatever_version_it_was_tagged_with():
    """load [1, 2] -> unload all -> load [1] used to leave both slots tagged 1, one of them held by
    nobody, and a load of version 2 was then refused while only version 1 was held (auditE D2)."""
    pool = PoolVersions(workers=2, slots=2, new_cache=_Cache)
    for worker in (0, 1):
        pool.cache_for(worker, 2, "bbb", [0.2])
        pool.cache_for(worker, 1, "aaa", [0.1])
    for worker in (0, 1):
        pool.release(worker, 1)
        pool.release(worker, 2)
    one = {pool.cache_for(worker, 1, "aaa", [0.1]) for worker in (0, 1)}
    assert len(one) == 1
    two = {pool.cache_for(worker, 2, "bbb", [0.2]) for worker in (0, 1)}
    assert len(two) == 1 and two != one and next(iter(two)).cleared[-1] == "bbb"
    with pytest.raises(ModelControlError, match=r"\(held: \[1, 2\]\)"):
        pool.cache_for(0, 3, "ccc", [0.3])


def test_a_restarting_worker_drops_what_its_predecessor_held_and_reads_the_wanted_versions():
    pool = PoolVersions(workers=2, slots=2, new_cache=_Cache)
    pool.cache_for(0, 1, "aaa", [0.1])
    pool.cache_for(0, 2, "bbb", [0.2])
    pool.forget(0)
    assert pool.cache_for(1, 3, "ccc", [0.3]).cleared[-1] == "ccc"
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


def _load(address: str, versions: list[int]) -> None:
    request = oip.RepositoryModelLoadRequest(model_name="twotower")
    request.parameters["config"].string_param = json.dumps({"version_policy": {"specific": {"versions": versions}}})
    with connect(address) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelLoad(request, timeout=60)


def test_each_version_scores_its_cache_with_its_own_label_bias(pools, artifacts, tmp_path):
    """ScoreByIds / ScoreMatrix / ScoreMatrixStream / ScoreTick of either version equal Score of the same
    features: the slot of the version not read at start-up used to score with the start-up version's bias."""
    v1, v2 = artifacts
    assert np.abs(np.subtract(v1.label_bias, v2.label_bias)).max() > 1e-3  # else this test proves nothing
    root = tmp_path / "repo"
    for number, artifact in ((1, v1), (2, v2)):
        shutil.copytree(artifact.directory, root / "twotower" / str(number))
    pool = _serve(pools, root, "--version-policy", "specific:1,2")
    workers = pool.workers()
    pool.wait_for(r"version 1 \(artifact \S+\) loaded and warm", count=2)  # loaded after start-up, by each worker
    rng = np.random.default_rng(11)
    users, peers, peer_ids = rng.standard_normal((1, FEATURES)), rng.standard_normal((4, FEATURES)), [21, 22, 23, 24]
    for artifact, version in ((v1, "1"), (v2, "2")):
        with connect(workers[0].address) as channel:
            stub = pb_grpc.ScorerStub(channel)
            stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids=[5], features=tensor(users), model_version=version), timeout=20)  # fmt: skip
            stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=peer_ids, features=tensor(peers), model_version=version), timeout=20)  # fmt: skip
            want = stub.Score(pb.ScoreRequest(user_features=tensor(users), peer_features=tensor(peers), model_version=version), timeout=20)  # fmt: skip
        assert want.model_version == artifact.model_version
        want_scores = scores(want)
        for worker in workers.values():
            with connect(worker.address) as channel:
                stub = pb_grpc.ScorerStub(channel)
                by_ids = stub.ScoreByIds(pb.ScoreByIdsRequest(user_id=5, peer_ids=peer_ids, model_version=version), timeout=20)  # fmt: skip
                matrix_request = pb.ScoreMatrixRequest(user_ids=[5], peer_ids=peer_ids, model_version=version)
                matrix = stub.ScoreMatrix(matrix_request, timeout=20)
                (block,) = list(stub.ScoreMatrixStream(matrix_request, timeout=20))
                tick = stub.ScoreTick(pb.ScoreTickRequest(user_ids=[5], peer_ids=peer_ids, k=4, include_label_scores=True, model_version=version), timeout=20)  # fmt: skip
            assert by_ids.model_version == matrix.model_version == tick.model_version == artifact.model_version
            np.testing.assert_allclose(scores(by_ids), want_scores, atol=2e-5, err_msg=f"ScoreByIds of version {version}")
            np.testing.assert_allclose(scores(matrix)[0], want_scores, atol=2e-5, err_msg=f"ScoreMatrix of version {version}")
            np.testing.assert_allclose(scores(block)[0], want_scores, atol=2e-5, err_msg=f"ScoreMatrixStream of version {version}")
            order = np.argsort(np.frombuffer(tick.ids, "<i8"))  # the tick's candidates in peer id order
            np.testing.assert_allclose(scores(pb.ScoreResponse(scores=tick.label_scores))[0][order], want_scores, atol=2e-5, err_msg=f"ScoreTick of version {version}")  # fmt: skip


def test_after_load_unload_all_and_reload_the_pool_still_switches_to_another_version(pools, artifacts, tmp_path):
    """load [1, 2] -> unload all -> load [1] -> load [2]: the last load used to be refused
    FAILED_PRECONDITION ('at most 2 versions ... (held: [1])') by a slot left tagged 1 and held by nobody."""
    v1, v2 = artifacts
    root = tmp_path / "repo"
    for number, artifact in ((1, v1), (2, v2)):
        shutil.copytree(artifact.directory, root / "twotower" / str(number))
    pool = _serve(pools, root)  # latest:1 -> 2 cache slots
    address = pool.workers()[0].address
    _load(address, [1, 2])
    with connect(address) as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="twotower"), timeout=60)  # fmt: skip
    pool.wait_for(r"version [12] drained and unloaded", count=4)  # both versions, on both workers: slots released
    _load(address, [1])
    _load(address, [2])
    for worker in pool.workers().values():
        assert _score(worker.address).model_version == v2.model_version
