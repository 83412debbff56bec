"""Issue 11, items 3 and 4, on a real server over loopback: ids as packed little-endian int64 bytes on the
RPCs that take many (equal to the repeated form; both forms or a bad length refused naming the field),
ScoreMatrixStream (the documented block rule, blocks that reassemble to a numpy reference, a client
cancel that stops the work), and ScoreTick's default pool bound. test_service.py and test_tick.py hold
the first cases of each; these are the ones they lack."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from neuronserve.config import ServerConfig
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.scorer_service import MATRIX_BLOCK_BYTES
from neuronserve.server import Server
from support import LoopThread, wait_until

MAX_PEERS = 512
MAX_MESSAGE_BYTES = 256 * 1024  # 64 users x 512 peers x 3 labels (393 KB) needs the stream
USERS = np.arange(1, 65, dtype=np.int64)
PEERS = np.arange(10_001, 10_001 + MAX_PEERS, dtype=np.int64)


def packed(ids) -> bytes:
    return np.asarray(ids, "<i8").tobytes()


def tensor(values) -> pb.Tensor:
    values = np.ascontiguousarray(values, "<f4")
    return pb.Tensor(data=values.tobytes(), shape=values.shape)


def array(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, "<f4").reshape(tuple(t.shape))


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=20)
    return info.value


@pytest.fixture(scope="module")
def served(small_artifact):
    """A CPU server (max_tick_ids at its default) with USERS and PEERS cached; (server, stub)."""
    loop = LoopThread()
    config = ServerConfig(
        artifact=str(small_artifact.directory), port=0, metrics_port=None, max_peers=MAX_PEERS,
        max_message_bytes=MAX_MESSAGE_BYTES, backend="cpu", cores=1,
    )
    server = Server(config)
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.ScorerStub(channel)
    cfg, rng = small_artifact.model_config, np.random.default_rng(5)
    for kind, ids, width in ((pb.USER, USERS, cfg.user_features), (pb.PEER, PEERS, cfg.peer_features)):
        request = pb.UpsertEmbeddingsRequest(kind=kind, ids_packed=packed(ids), features=tensor(rng.standard_normal((len(ids), width))))
        assert stub.UpsertEmbeddings(request, timeout=20).upserted == len(ids)
    yield server, stub
    channel.close()
    loop.run(server.stop(5.0))
    loop.close()


def reference(server, user_ids, peer_ids) -> np.ndarray:
    """numpy's scores [N, M, K] from the cached vectors: s_k = <U_k, P_k> + b_k."""
    cache = server.versions.current.cache
    users, peers = cache.lookup("user", np.asarray(user_ids)), cache.lookup("peer", np.asarray(peer_ids))
    return np.einsum("nkd,mkd->nmk", users, peers) + cache.label_bias


def test_an_upsert_with_packed_ids_caches_what_the_repeated_form_does(served, small_artifact):
    server, stub = served
    cfg = small_artifact.model_config
    features = np.random.default_rng(6).standard_normal((3, cfg.user_features))
    repeated, as_packed = [501, 502, 503], [601, 602, 603]
    stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids=repeated, features=tensor(features)), timeout=20)
    stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids_packed=packed(as_packed), features=tensor(features)), timeout=20)
    cache = server.versions.current.cache
    np.testing.assert_array_equal(cache.lookup("user", np.array(repeated)), cache.lookup("user", np.array(as_packed)))


def test_score_matrix_stream_with_packed_ids_equals_the_repeated_form_and_the_numpy_reference(served, small_artifact):
    server, stub = served
    users, peers = USERS[::-1], PEERS[::3]  # any order: rows and columns come back in the request's
    by_repeated = list(stub.ScoreMatrixStream(pb.ScoreMatrixRequest(user_ids=users.tolist(), peer_ids=peers.tolist()), timeout=20))
    by_packed = list(stub.ScoreMatrixStream(pb.ScoreMatrixRequest(user_ids_packed=packed(users), peer_ids_packed=packed(peers)), timeout=20))
    assert len(by_packed) == len(by_repeated)
    for a, b in zip(by_repeated, by_packed, strict=True):
        assert a.first_user == b.first_user
        np.testing.assert_array_equal(array(a.scores), array(b.scores))
    whole = np.concatenate([array(b.scores) for b in by_packed])
    np.testing.assert_allclose(whole, reference(server, users, peers), atol=1e-5)
    assert all(b.model_version == small_artifact.model_version for b in by_packed)


def test_score_matrix_stream_blocks_follow_the_documented_rule_and_reassemble_to_the_reference(served, small_artifact):
    server, stub = served
    labels = small_artifact.model_config.num_labels
    request = pb.ScoreMatrixRequest(user_ids_packed=packed(USERS), peer_ids_packed=packed(PEERS))
    assert rpc_error(stub.ScoreMatrix, request).code() == grpc.StatusCode.INVALID_ARGUMENT  # above one message
    blocks = list(stub.ScoreMatrixStream(request, timeout=20))
    # whole user rows, each block at most min(4 MiB, max_message_bytes / 2) of scores (one row at least)
    rows = max(1, min(MATRIX_BLOCK_BYTES, MAX_MESSAGE_BYTES // 2) // (4 * len(PEERS) * labels))
    assert [b.scores.shape[0] for b in blocks[:-1]] == [rows] * (len(blocks) - 1) and 1 <= blocks[-1].scores.shape[0] <= rows
    assert [b.first_user for b in blocks] == list(range(0, len(USERS), rows))
    assert len(blocks) >= 3 and all(b.ByteSize() <= MAX_MESSAGE_BYTES // 2 + 4096 for b in blocks)
    whole = np.concatenate([array(b.scores) for b in blocks])
    np.testing.assert_allclose(whole, reference(server, USERS, PEERS), atol=1e-5)
    unary = stub.ScoreMatrix(pb.ScoreMatrixRequest(user_ids_packed=packed(USERS[:rows]), peer_ids_packed=packed(PEERS)), timeout=20)
    np.testing.assert_array_equal(array(unary.scores), array(blocks[0].scores))


def test_a_client_cancel_stops_score_matrix_stream(served, monkeypatch):
    server, stub = served
    cache = server.versions.current.cache
    original, calls, release = cache.score_matrix, [], threading.Event()

    def score_matrix(user_ids, peer_ids):
        calls.append(len(user_ids))
        if len(calls) == 2:  # the second block waits until the client has gone
            release.wait(20)
        return original(user_ids, peer_ids)

    monkeypatch.setattr(cache, "score_matrix", score_matrix)
    gate = server.state.scoring
    idle = gate.reserved
    stream = stub.ScoreMatrixStream(pb.ScoreMatrixRequest(user_ids_packed=packed(USERS), peer_ids_packed=packed(PEERS)), timeout=20)
    try:
        assert next(stream).first_user == 0
        wait_until(lambda: len(calls) == 2)  # the handler is computing block 2
        held = gate.reserved
        stream.cancel()
        wait_until(lambda: server.state.in_flight == 0)  # the handler ended while block 2 was computing
        assert gate.reserved == held > idle  # its working memory is still in use by block 2's thread
    finally:
        release.set()
    wait_until(lambda: gate.reserved == idle)  # released when that thread returned
    assert stream.code() == grpc.StatusCode.CANCELLED
    assert len(calls) == 2  # no block after the cancel


def test_score_matrix_stream_refuses_an_unknown_id_before_its_first_block(served):
    _, stub = served
    users = USERS.copy()
    users[-1] = 987_654_321  # in the last block
    stream = stub.ScoreMatrixStream(pb.ScoreMatrixRequest(user_ids_packed=packed(users), peer_ids_packed=packed(PEERS)), timeout=20)
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(word in info.value.details() for word in ("user_ids", "987654321", f"1 of {len(USERS)}"))


@pytest.mark.parametrize(
    "rpc, request_, words",
    [
        ("ScoreMatrix", pb.ScoreMatrixRequest(user_ids=[1], peer_ids=[10_001], peer_ids_packed=packed([10_001])), ["peer_ids and peer_ids_packed", "both"]),
        ("ScoreMatrix", pb.ScoreMatrixRequest(user_ids=[1], peer_ids_packed=packed([10_001])[:-1]), ["peer_ids_packed", "7 bytes"]),
        ("ScoreMatrixStream", pb.ScoreMatrixRequest(user_ids=[1], user_ids_packed=packed([1]), peer_ids=[10_001]), ["user_ids and user_ids_packed", "both"]),
        ("ScoreMatrixStream", pb.ScoreMatrixRequest(user_ids_packed=b"\x01" * 12, peer_ids=[10_001]), ["user_ids_packed", "12 bytes"]),
        ("UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.USER, ids_packed=b"\x01" * 9, features=tensor(np.zeros((1, 16)))), ["ids_packed", "9 bytes"]),
        ("ScoreByIds", pb.ScoreByIdsRequest(user_id=1, peer_ids_packed=packed(np.arange(1, MAX_PEERS + 2))), ["peer_ids_packed", str(MAX_PEERS + 1), "max_peers"]),
    ],
)
def test_packed_ids_sent_twice_malformed_or_too_many_are_invalid_argument_naming_the_field(served, rpc, request_, words):
    _, stub = served
    call = getattr(stub, rpc)
    if rpc == "ScoreMatrixStream":
        call = (lambda stream: lambda request, timeout: list(stream(request, timeout=timeout)))(call)
    error = rpc_error(call, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert all(word in error.details() for word in words), error.details()


def test_score_tick_refuses_a_pool_above_the_default_max_tick_ids_naming_the_field(served):
    server, stub = served
    bound = server.config.max_tick_ids
    assert bound == ServerConfig(artifact="x").max_tick_ids >= 20_000  # the default, at least 20,000
    error = rpc_error(stub.ScoreTick, pb.ScoreTickRequest(pool_ids_packed=packed(np.arange(1, bound + 2)), k=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(word in error.details() for word in ("pool_ids_packed", str(bound + 1), "max_tick_ids", str(bound))), error.details()
