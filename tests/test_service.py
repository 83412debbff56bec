"""The gRPC services in process: real grpc.aio servers on 127.0.0.1 (port 0) running on their own event
loop thread, called through the generated stubs. Scores are checked against the artifact's reference
(the eager model's tower outputs) and the CPU stages run directly; every bad input gets its status code
and a message naming the field; overload, deadlines, a core fault and draining are driven by gates,
never by wall-clock speed."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from neuronserve.backends.cpu import CpuBackend
from neuronserve.config import STAGES, BatchingConfig, CoreGroup, ServerConfig, SimConfig
from neuronserve.embeddings import EmbeddingCache
from neuronserve.metrics import Metrics
from neuronserve.pipeline import ScoredBatch
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.runtime import Runtime
from neuronserve.server import Server
from neuronserve.version_build import model_info
from neuronserve.oip_service import InferenceService
from neuronserve.scorer_service import ScorerService
from neuronserve.service import ServingState
from neuronserve.tls import PENDING_BOUND_SINCE, grpc_version
from support import LoopThread, wait_until

pytestmark = pytest.mark.timeout(60)

MAX_PEERS = 64


# ---- plumbing -----------------------------------------------------------------------------------


class Stubs:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.scorer = pb_grpc.ScorerStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(self.channel)


def tensor(array) -> pb.Tensor:
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


def array(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))


def score_request(user, peers) -> pb.ScoreRequest:
    return pb.ScoreRequest(user_features=tensor(user), peer_features=tensor(peers))


def infer_request(user, peers, *, typed: bool = False, model: str = "twotower", version: str = "") -> oip.ModelInferRequest:
    tensors = [("USER_FEATURES", np.asarray(user, np.float32)), ("PEER_FEATURES", np.asarray(peers, np.float32))]
    request = oip.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    for name, values in tensors:
        entry = request.inputs.add(name=name, datatype="FP32", shape=values.shape)
        if typed:
            entry.contents.fp32_contents.extend(values.ravel().tolist())
        else:
            request.raw_input_contents.append(values.astype("<f4").tobytes())
    return request


def rng_features(seed: int, rows: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


def start_server(loop_thread: LoopThread, manifest, **settings) -> Server:
    server = Server(ServerConfig(artifact=str(manifest.directory), port=0, metrics_port=0, max_peers=MAX_PEERS, **settings))
    loop_thread.run(server.start())
    return server


@pytest.fixture(scope="module")
def cpu_server(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=2)
    yield server
    loop_thread.run(server.stop(5.0))


@pytest.fixture(scope="module")
def sim_server(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="sim", cores=2, sim=SimConfig(latency_scale=0.0, reset_s=2.0))
    yield server
    loop_thread.run(server.stop(5.0))


@pytest.fixture(scope="module")
def cpu(cpu_server):
    stubs = Stubs(cpu_server.port)
    yield stubs
    stubs.channel.close()


@pytest.fixture(scope="module")
def sim(sim_server):
    stubs = Stubs(sim_server.port)
    yield stubs
    stubs.channel.close()


@pytest.fixture(scope="module")
def reference(small_artifact):
    with np.load(small_artifact.path(small_artifact.reference_file)) as data:
        return {name: data[name] for name in data.files}


def direct_scores(manifest, user: np.ndarray, peers: np.ndarray) -> np.ndarray:
    """The CPU stages run directly (no service, batcher or pipeline): every piece padded to the largest bucket."""
    backend = CpuBackend(manifest)
    runners = {stage: backend.load(stage, CoreGroup(0)) for stage in STAGES}
    largest = max(runners["peer_tower"].batch_sizes)

    def run(stage, *inputs):
        parts = []
        for start in range(0, inputs[0].shape[0], largest):
            piece = [x[start : start + largest] for x in inputs]
            rows = piece[0].shape[0]
            padded = [np.concatenate([p, np.zeros((largest - rows,) + p.shape[1:], np.float32)]) for p in piece]
            parts.append(runners[stage].run(padded)[:rows])
        return np.concatenate(parts)

    u = run("user_tower", user)
    p = run("peer_tower", peers)
    return run("pair_scorer", np.repeat(u, len(peers), axis=0), p)


# ---- scores ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_score_equals_the_artifacts_reference_outputs(backend, request, reference, small_artifact):
    stubs = request.getfixturevalue(backend)
    bias = np.asarray(small_artifact.label_bias, np.float32)
    for i in range(len(reference["user_features"])):
        reply = stubs.scorer.Score(score_request(reference["user_features"][i : i + 1], reference["peer_features"]), timeout=10)
        expected = np.einsum("kd,pkd->pk", reference["user_embeddings"][i], reference["peer_embeddings"]) + bias
        scores = array(reply.scores)
        assert scores.shape == expected.shape
        np.testing.assert_allclose(scores, expected, atol=1e-4)
        np.testing.assert_allclose(scores[i], reference["scores"][i], atol=1e-4)  # the eager model's own pair (i, i)
        assert list(reply.label_names) == list(small_artifact.label_names)
        assert reply.model_version == small_artifact.model_version


def test_concurrent_scores_of_mixed_sizes_equal_the_cpu_stages_run_directly(cpu, small_artifact):
    """Concurrent requests share batches (users stacked, user_index per peer row) and large ones are split."""
    cfg = small_artifact.model_config
    cases = [(rng_features(10 + i, 1, cfg.user_features), rng_features(20 + i, m, cfg.peer_features)) for i, m in enumerate((1, 5, 16, 37, 3, 64))]
    futures = [cpu.scorer.Score.future(score_request(u, p), timeout=20) for u, p in cases]
    for (user, peers), future in zip(cases, futures):
        np.testing.assert_allclose(array(future.result().scores), direct_scores(small_artifact, user, peers), atol=1e-5)


def test_cpu_and_sim_backends_agree(cpu, sim, small_artifact):
    cfg = small_artifact.model_config
    for seed, m in ((1, 1), (2, 17), (3, 40)):
        request = score_request(rng_features(seed, 1, cfg.user_features), rng_features(seed + 100, m, cfg.peer_features))
        np.testing.assert_allclose(array(sim.scorer.Score(request, timeout=10).scores), array(cpu.scorer.Score(request, timeout=10).scores), atol=1e-6)


def test_user_features_may_be_one_vector(cpu, small_artifact):
    cfg = small_artifact.model_config
    user, peers = rng_features(5, 1, cfg.user_features), rng_features(6, 3, cfg.peer_features)
    as_matrix = cpu.scorer.Score(score_request(user, peers), timeout=10)
    as_vector = cpu.scorer.Score(score_request(user[0], peers), timeout=10)
    np.testing.assert_array_equal(array(as_vector.scores), array(as_matrix.scores))


def upsert(stubs, kind, ids, features) -> pb.UpsertEmbeddingsResponse:
    return stubs.scorer.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=kind, ids=list(ids), features=tensor(features)), timeout=10)


def test_score_by_ids_equals_score_and_score_matrix_equals_per_user_score(cpu, small_artifact):
    cfg = small_artifact.model_config
    user_ids, peer_ids = [10, 11, 12], list(range(100, 137))
    users, peers = rng_features(31, 3, cfg.user_features), rng_features(32, len(peer_ids), cfg.peer_features)
    reply = upsert(cpu, pb.USER, user_ids, users)
    assert (reply.upserted, reply.model_version) == (3, small_artifact.model_version)
    assert upsert(cpu, pb.PEER, peer_ids, peers).upserted == len(peer_ids)
    per_user = [array(cpu.scorer.Score(score_request(users[i : i + 1], peers), timeout=10).scores) for i in range(3)]

    by_ids = cpu.scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=11, peer_ids=peer_ids), timeout=10)
    np.testing.assert_allclose(array(by_ids.scores), per_user[1], atol=1e-5)
    assert list(by_ids.label_names) == list(small_artifact.label_names)

    matrix = cpu.scorer.ScoreMatrix(pb.ScoreMatrixRequest(user_ids=user_ids, peer_ids=peer_ids), timeout=10)
    assert list(matrix.scores.shape) == [3, len(peer_ids), cfg.num_labels]
    np.testing.assert_allclose(array(matrix.scores), np.stack(per_user), atol=1e-5)

    # a peer subset in another order scores the same pairs
    subset = [136, 100, 117]
    reply = cpu.scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=12, peer_ids=subset), timeout=10)
    np.testing.assert_allclose(array(reply.scores), per_user[2][[36, 0, 17]], atol=1e-5)


def packed(ids) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def test_packed_ids_equal_repeated_ids_on_every_rpc_that_takes_many(cpu, small_artifact):
    cfg = small_artifact.model_config
    user_ids, peer_ids = [20, 21], list(range(300, 340))
    users, peers = rng_features(41, 2, cfg.user_features), rng_features(42, len(peer_ids), cfg.peer_features)
    request = pb.UpsertEmbeddingsRequest(kind=pb.USER, ids_packed=packed(user_ids), features=tensor(users))
    assert cpu.scorer.UpsertEmbeddings(request, timeout=10).upserted == 2
    upsert(cpu, pb.PEER, peer_ids, peers)
    by_ids = cpu.scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=21, peer_ids=peer_ids), timeout=10)
    by_packed = cpu.scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=21, peer_ids_packed=packed(peer_ids)), timeout=10)
    np.testing.assert_array_equal(array(by_ids.scores), array(by_packed.scores))
    matrix = cpu.scorer.ScoreMatrix(pb.ScoreMatrixRequest(user_ids=user_ids, peer_ids=peer_ids), timeout=10)
    request = pb.ScoreMatrixRequest(user_ids_packed=packed(user_ids), peer_ids_packed=packed(peer_ids))
    np.testing.assert_array_equal(array(matrix.scores), array(cpu.scorer.ScoreMatrix(request, timeout=10).scores))
    np.testing.assert_allclose(array(matrix.scores)[1], array(by_ids.scores), atol=1e-5)  # matmul vs einsum


@pytest.mark.parametrize(
    "rpc, request_, words",
    [
        ("ScoreByIds", pb.ScoreByIdsRequest(user_id=1, peer_ids=[1], peer_ids_packed=packed([1])), ["peer_ids", "both"]),
        ("ScoreByIds", pb.ScoreByIdsRequest(user_id=1, peer_ids_packed=b"1234567"), ["peer_ids_packed", "7 bytes"]),
        ("ScoreMatrix", pb.ScoreMatrixRequest(user_ids_packed=b"123", peer_ids=[1]), ["user_ids_packed", "3 bytes"]),
        ("UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[1], ids_packed=packed([1]), features=tensor(np.zeros((1, 16), np.float32))), ["ids", "both"]),  # 16: the small artifact's F
    ],
)
def test_packed_ids_that_are_malformed_or_sent_twice_are_invalid_argument_naming_the_field(cpu, rpc, request_, words):
    error = rpc_error(getattr(cpu.scorer, rpc), request_, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and all(w in error.details() for w in words), error.details()


def test_score_matrix_stream_sends_a_matrix_larger_than_one_message_in_blocks_equal_to_the_unary_one(loop_thread, small_artifact):
    cfg = small_artifact.model_config
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=1, max_message_bytes=32 * 1024)
    stubs = Stubs(server.port)
    try:
        user_ids, peer_ids = list(range(MAX_PEERS)), list(range(1000, 1000 + MAX_PEERS))
        upsert(stubs, pb.USER, user_ids, rng_features(51, len(user_ids), cfg.user_features))
        upsert(stubs, pb.PEER, peer_ids, rng_features(52, len(peer_ids), cfg.peer_features))
        request = pb.ScoreMatrixRequest(user_ids=user_ids, peer_ids=peer_ids)  # 64 x 64 x 3 float32: 49 KB > 32 KB
        assert rpc_error(stubs.scorer.ScoreMatrix, request, timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT
        blocks = list(stubs.scorer.ScoreMatrixStream(request, timeout=10))
        assert len(blocks) >= 2 and all(b.ByteSize() < 32 * 1024 for b in blocks)
        assert [b.first_user for b in blocks] == list(np.cumsum([0] + [b.scores.shape[0] for b in blocks[:-1]]))
        whole = np.concatenate([array(b.scores) for b in blocks])
        assert whole.shape == (len(user_ids), len(peer_ids), cfg.num_labels)
        for rows in (slice(0, 30), slice(30, 64)):  # the unary call, on blocks that fit one message
            part = pb.ScoreMatrixRequest(user_ids=user_ids[rows], peer_ids=peer_ids)
            np.testing.assert_allclose(whole[rows], array(stubs.scorer.ScoreMatrix(part, timeout=10).scores), atol=1e-5)
        missing = pb.ScoreMatrixRequest(user_ids=[99999], peer_ids=peer_ids)
        error = rpc_error(lambda r, timeout: list(stubs.scorer.ScoreMatrixStream(r, timeout=timeout)), missing, timeout=10)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "99999" in error.details()
    finally:
        stubs.channel.close()
        loop_thread.run(server.stop(5.0))


def test_upsert_overwrites_an_id(cpu, small_artifact):
    cfg = small_artifact.model_config
    first, second = rng_features(41, 1, cfg.user_features), rng_features(42, 1, cfg.user_features)
    peers = rng_features(43, 4, cfg.peer_features)
    upsert(cpu, pb.PEER, [900, 901, 902, 903], peers)
    for features in (first, second):
        upsert(cpu, pb.USER, [77], features)
        by_ids = cpu.scorer.ScoreByIds(pb.ScoreByIdsRequest(user_id=77, peer_ids=[900, 901, 902, 903]), timeout=10)
        np.testing.assert_allclose(array(by_ids.scores), array(cpu.scorer.Score(score_request(features, peers), timeout=10).scores), atol=1e-5)


# ---- the Open Inference Protocol ---------------------------------------------------------------


@pytest.mark.parametrize("typed", [False, True], ids=["raw_input_contents", "fp32_contents"])
def test_model_infer_equals_score(cpu, small_artifact, typed):
    cfg = small_artifact.model_config
    user, peers = rng_features(51, 1, cfg.user_features), rng_features(52, 21, cfg.peer_features)
    reply = cpu.oip.ModelInfer(infer_request(user, peers, typed=typed), timeout=10)
    assert (reply.model_name, reply.model_version, reply.id) == ("twotower", "1", "req-1")
    (output,) = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("SCORES", "FP32", [21, cfg.num_labels])
    scores = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(tuple(output.shape))
    np.testing.assert_array_equal(scores, array(cpu.scorer.Score(score_request(user, peers), timeout=10).scores))


def test_model_infer_towers_equal_the_reference_embeddings(cpu, reference, small_artifact):
    for model, features, expected in (
        ("user_tower", reference["user_features"], reference["user_embeddings"]),
        ("peer_tower", reference["peer_features"], reference["peer_embeddings"]),
    ):
        request = oip.ModelInferRequest(model_name=model, model_version=small_artifact.model_version)
        request.inputs.add(name="FEATURES", datatype="FP32", shape=features.shape)
        request.raw_input_contents.append(features.astype("<f4").tobytes())
        request.outputs.add(name="EMBEDDINGS")
        reply = cpu.oip.ModelInfer(request, timeout=10)
        assert list(reply.outputs[0].shape) == list(expected.shape)
        np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(expected.shape), expected, atol=1e-5)


def test_oip_server_and_model_metadata(cpu, small_artifact):
    cfg = small_artifact.model_config
    assert cpu.oip.ServerLive(oip.ServerLiveRequest(), timeout=5).live
    assert cpu.oip.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
    assert cpu.oip.ModelReady(oip.ModelReadyRequest(name="twotower"), timeout=5).ready
    assert cpu.oip.ModelReady(oip.ModelReadyRequest(name="peer_tower", version=small_artifact.model_version), timeout=5).ready
    assert not cpu.oip.ModelReady(oip.ModelReadyRequest(name="nope"), timeout=5).ready
    assert cpu.oip.ServerMetadata(oip.ServerMetadataRequest(), timeout=5).name == "neuronserve"
    meta = cpu.oip.ModelMetadata(oip.ModelMetadataRequest(name="twotower"), timeout=5)
    assert list(meta.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("USER_FEATURES", "FP32", [1, cfg.user_features]),
        ("PEER_FEATURES", "FP32", [-1, cfg.peer_features]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("SCORES", "FP32", [-1, cfg.num_labels])]
    tower = cpu.oip.ModelMetadata(oip.ModelMetadataRequest(name="user_tower"), timeout=5)
    assert [list(t.shape) for t in tower.outputs] == [[-1, cfg.num_labels, cfg.label_dim]]
    error = rpc_error(cpu.oip.ModelMetadata, oip.ModelMetadataRequest(name="twotower", version="v0"), timeout=5)
    assert error.code() == grpc.StatusCode.NOT_FOUND and "v0" in error.details()


# ---- bad input ---------------------------------------------------------------------------------

F = 16  # the small artifact's feature width (conftest.SMALL_CONFIG)
GOOD_USER, GOOD_PEERS = rng_features(61, 1, F), rng_features(62, 4, F)
NAN_PEERS = GOOD_PEERS.copy()
NAN_PEERS[2, 5] = np.nan
INF_USER = GOOD_USER.copy()
INF_USER[0, 3] = np.inf
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def _short_bytes() -> pb.ScoreRequest:
    request = score_request(GOOD_USER, GOOD_PEERS)
    request.peer_features.data = request.peer_features.data[:-4]
    return request


def _infer(mutate) -> oip.ModelInferRequest:
    request = infer_request(GOOD_USER, GOOD_PEERS)
    mutate(request)
    return request


def _typed_and_raw(request: oip.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.0] * F)


def _typed_wrong_count() -> oip.ModelInferRequest:
    request = infer_request(GOOD_USER, GOOD_PEERS, typed=True)
    del request.inputs[1].contents.fp32_contents[-1]
    return request


def _asks_classification(request: oip.ModelInferRequest) -> None:  # tritonclient's InferRequestedOutput(class_count=2)
    request.outputs.add(name="SCORES").parameters["classification"].int64_param = 2


def _asks_shared_memory(request: oip.ModelInferRequest) -> None:  # tritonclient's set_shared_memory on an input
    request.inputs[1].parameters["shared_memory_region"].string_param = "peers"


def _typed_negative_dims() -> oip.ModelInferRequest:
    request = infer_request(GOOD_USER, GOOD_PEERS, typed=True)
    request.inputs[1].shape[:] = [-GOOD_PEERS.shape[0], -F]  # their product is the right count
    return request


BAD_INPUTS = [
    # (id, rpc, request, status, words the message must contain)
    ("score-no-user", "Score", pb.ScoreRequest(peer_features=tensor(GOOD_PEERS)), INVALID, ["user_features", "missing"]),
    ("score-two-users", "Score", score_request(rng_features(1, 2, F), GOOD_PEERS), INVALID, ["user_features", f"[1, {F}]", "[2, 16]"]),
    ("score-peer-width", "Score", score_request(GOOD_USER, rng_features(1, 4, F + 1)), INVALID, ["peer_features", f"[rows, {F}]", "[4, 17]"]),
    ("score-peer-rank", "Score", score_request(GOOD_USER, np.zeros((2, 2, F), np.float32)), INVALID, ["peer_features", f"[rows, {F}]"]),
    ("score-bytes", "Score", _short_bytes(), INVALID, ["peer_features", "256 bytes", "252"]),
    ("score-nan", "Score", score_request(GOOD_USER, NAN_PEERS), INVALID, ["peer_features[2, 5]", "nan", "finite"]),
    ("score-inf", "Score", score_request(INF_USER, GOOD_PEERS), INVALID, ["user_features[0, 3]", "inf", "finite"]),
    ("score-overflows-in-the-model", "Score", score_request(GOOD_USER * 1e30, GOOD_PEERS * 1e30), INVALID, ["scores", "not finite", "scaling"]),
    ("upsert-overflows-in-the-model", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[1, 2, 3, 4], features=tensor(np.full((4, F), 3e38, np.float32))), INVALID, ["peer_tower output", "not finite"]),
    ("score-zero-peers", "Score", score_request(GOOD_USER, np.zeros((0, F), np.float32)), INVALID, ["peer_features", "0 rows"]),
    ("score-too-many-peers", "Score", score_request(GOOD_USER, rng_features(1, MAX_PEERS + 1, F)), INVALID, ["peer_features", "65 rows", "max_peers", "64"]),
    ("score-huge-shape", "Score", pb.ScoreRequest(user_features=tensor(GOOD_USER), peer_features=pb.Tensor(shape=[2**32, 2**32])), INVALID, ["peer_features", "bytes", "got 0"]),
    ("upsert-unknown-kind", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=7, ids=[1], features=tensor(GOOD_USER)), INVALID, ["kind", "USER or PEER", "7"]),
    ("upsert-no-kind", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(ids=[1], features=tensor(GOOD_USER)), INVALID, ["kind", "USER or PEER", "ENTITY_KIND_UNSPECIFIED"]),
    ("upsert-ids-rows", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[1, 2], features=tensor(GOOD_PEERS)), INVALID, ["4 rows", "2 ids"]),
    ("upsert-no-ids", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, features=tensor(GOOD_PEERS)), INVALID, ["ids", "empty"]),
    ("upsert-nan", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[1, 2, 3, 4], features=tensor(NAN_PEERS)), INVALID, ["features[2, 5]", "nan"]),
    ("upsert-duplicate-ids", "UpsertEmbeddings", pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[5, 6, 5, 7], features=tensor(GOOD_PEERS)), INVALID, ["5"]),
    ("by-ids-unknown", "ScoreByIds", pb.ScoreByIdsRequest(user_id=123456, peer_ids=[1]), NOT_FOUND, ["user_id", "123456"]),
    ("by-ids-empty", "ScoreByIds", pb.ScoreByIdsRequest(user_id=1), INVALID, ["peer_ids", "empty"]),
    ("by-ids-too-many", "ScoreByIds", pb.ScoreByIdsRequest(user_id=1, peer_ids=list(range(MAX_PEERS + 1))), INVALID, ["peer_ids", "max_peers"]),
    ("matrix-no-users", "ScoreMatrix", pb.ScoreMatrixRequest(peer_ids=[1]), INVALID, ["user_ids", "empty"]),
    ("infer-model", "ModelInfer", _infer(lambda r: setattr(r, "model_name", "threetower")), NOT_FOUND, ["threetower", "twotower"]),
    ("infer-version", "ModelInfer", _infer(lambda r: setattr(r, "model_version", "9")), NOT_FOUND, ["version", "'9'"]),
    ("infer-dtype", "ModelInfer", _infer(lambda r: setattr(r.inputs[1], "datatype", "FP64")), INVALID, ["PEER_FEATURES", "FP32", "FP64"]),
    ("infer-input-name", "ModelInfer", _infer(lambda r: setattr(r.inputs[1], "name", "PEERS")), INVALID, ["PEERS", "USER_FEATURES, PEER_FEATURES"]),
    ("infer-missing", "ModelInfer", _infer(lambda r: (r.inputs.pop(), r.raw_input_contents.pop())), INVALID, ["PEER_FEATURES"]),
    ("infer-raw-count", "ModelInfer", _infer(lambda r: r.raw_input_contents.pop()), INVALID, ["raw_input_contents", "1 entries", "2 inputs"]),
    ("infer-shape-bytes", "ModelInfer", _infer(lambda r: r.inputs[1].shape.__setitem__(0, 5)), INVALID, ["PEER_FEATURES", "320 bytes", "256"]),
    ("infer-user-shape", "ModelInfer", _infer(lambda r: (r.inputs[0].shape.__setitem__(0, F), r.inputs[0].shape.__setitem__(1, 1))), INVALID, ["USER_FEATURES", f"[1, {F}]"]),
    ("infer-output-twice", "ModelInfer", _infer(lambda r: (r.outputs.add(name="SCORES"), r.outputs.add(name="SCORES"))), INVALID, ["SCORES", "once"]),
    ("infer-output", "ModelInfer", _infer(lambda r: r.outputs.add(name="PROBS")), INVALID, ["PROBS", "SCORES"]),
    ("infer-typed-and-raw", "ModelInfer", _infer(_typed_and_raw), INVALID, ["USER_FEATURES", "raw_input_contents"]),
    ("infer-typed-count", "ModelInfer", _typed_wrong_count(), INVALID, ["PEER_FEATURES", "64 values", "63"]),
    ("infer-typed-negative-dims", "ModelInfer", _typed_negative_dims(), INVALID, ["PEER_FEATURES", "negative dimension"]),
    ("infer-classification", "ModelInfer", _infer(_asks_classification), INVALID, ["output 'SCORES'", "classification"]),
    ("infer-shared-memory", "ModelInfer", _infer(_asks_shared_memory), INVALID, ["input 'PEER_FEATURES'", "shared-memory"]),
    ("infer-long-id", "ModelInfer", _infer(lambda r: setattr(r, "id", "j" * 1025)), INVALID, ["id is 1025 bytes", "1024"]),
]


@pytest.mark.parametrize("rpc, request_, status, words", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_its_status_and_a_message_naming_the_field(cpu, rpc, request_, status, words):
    stub = cpu.oip if rpc == "ModelInfer" else cpu.scorer
    error = rpc_error(getattr(stub, rpc), request_, timeout=10)
    assert error.code() == status, error.details()
    for word in words:
        assert word in error.details(), (word, error.details())
    assert "Traceback" not in error.details()
    # ... and the server keeps answering
    assert list(cpu.scorer.Score(score_request(GOOD_USER, GOOD_PEERS), timeout=10).scores.shape) == [4, 3]


def test_a_reply_too_large_for_one_message_is_refused_before_any_work(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=1, max_message_bytes=32 * 1024)
    stubs = Stubs(server.port)
    try:
        features = rng_features(5, 400, F)  # 25.6 KB in; out 400 x 3 x 16 float32 = 76.8 KB
        request = oip.ModelInferRequest(model_name="peer_tower", raw_input_contents=[features.tobytes()])
        request.inputs.add(name="FEATURES", datatype="FP32", shape=features.shape)
        error = rpc_error(stubs.oip.ModelInfer, request, timeout=10)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "400 rows x 48 values of EMBEDDINGS = 76800 bytes" in error.details() and "max_message_bytes of 32768" in error.details()
        matrix = pb.ScoreMatrixRequest(user_ids=list(range(MAX_PEERS)), peer_ids=list(range(MAX_PEERS)))
        error = rpc_error(stubs.scorer.ScoreMatrix, matrix, timeout=10)  # 64 x 64 x 3 float32 = 49 KB
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "use ScoreMatrixStream" in error.details()
        assert server.metrics.statistics("peer_tower").executions == 0  # refused before the cores
        assert stubs.oip.ModelInfer(infer_request(GOOD_USER, GOOD_PEERS), timeout=10).outputs[0].name == "SCORES"
    finally:
        stubs.channel.close()
        loop_thread.run(server.stop(5.0))


# ---- the guard, overload, deadlines, draining: services over a gated stand-in pipeline ----------


class GatedPipeline:
    """Stands in for pipeline.Pipeline under the Runtime: every execution waits for `gate`; outputs zeros."""

    max_batch_rows = 16
    concurrency = 1
    devices = 1

    def __init__(self, num_labels: int, label_dim: int, latency_s: float = 0.0) -> None:
        self.gate = asyncio.Event()
        self.num_labels, self.label_dim, self.latency_s = num_labels, label_dim, latency_s
        self.batch_rows: list = []  # rows of every batch that started

    def estimate_latency_s(self, rows: int) -> float:
        return self.latency_s

    def plan_cost_s(self, stage: str, rows: int) -> float:
        return self.latency_s

    async def score_requests(self, users, peers):
        rows = sum(p.shape[0] for p in peers)
        self.batch_rows.append(rows)
        await self.gate.wait()
        return ScoredBatch(np.zeros((rows, self.num_labels), np.float32), 0.0, self.latency_s, 0.0)

    async def run_stage(self, stage, inputs):
        self.batch_rows.append(inputs[0].shape[0])
        await self.gate.wait()
        return np.zeros((inputs[0].shape[0], self.num_labels, self.label_dim), np.float32)


class BrokenCache:
    def score_by_ids(self, user_id, peer_ids):
        raise RuntimeError("secret internal detail")


class Gated:
    """Scorer + OIP services over a Runtime over a GatedPipeline, on a real grpc.aio server."""

    def __init__(self, loop_thread: LoopThread, manifest, batching: BatchingConfig, latency_s: float = 0.0, cache=None) -> None:
        cfg = manifest.model_config
        self.loop_thread = loop_thread
        self.pipeline = GatedPipeline(cfg.num_labels, cfg.label_dim, latency_s)
        self.metrics = Metrics(version=manifest.model_version, batch_buckets=(1, 4, 16))
        self.state = ServingState()
        info = model_info(manifest, ServerConfig(max_peers=MAX_PEERS, batching=batching), "gated")

        async def start():
            self.runtime = Runtime(self.pipeline, batching, self.metrics)
            self.runtime.start()
            self.server = grpc.aio.server()
            pb_grpc.add_ScorerServicer_to_server(ScorerService(info, self.runtime, cache, self.metrics, self.state), self.server)
            oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(info, self.runtime, cache, self.metrics, self.state), self.server)
            port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            self.state.serving = True
            return port

        self.stubs = Stubs(loop_thread.run(start()))

    def open_gate(self) -> None:
        self.loop_thread.loop.call_soon_threadsafe(self.pipeline.gate.set)

    def queued_rows(self) -> int:
        return self.loop_thread.call(lambda: self.runtime.batchers["twotower"].stats().queued_rows)

    def close(self) -> None:
        self.open_gate()
        self.stubs.channel.close()

        async def stop():
            await self.runtime.close(timeout_s=5.0)
            await self.server.stop(1.0)

        self.loop_thread.run(stop())


@pytest.fixture
def gated(loop_thread, small_artifact):
    made = []

    def make(batching: BatchingConfig = BatchingConfig(), **kwargs) -> Gated:
        made.append(Gated(loop_thread, small_artifact, batching, **kwargs))
        return made[-1]

    yield make
    for g in made:
        g.close()


def peers(rows: int) -> np.ndarray:
    return rng_features(rows, rows, F)


def test_overload_is_resource_exhausted_at_once_and_accepted_requests_still_answer(gated):
    g = gated(BatchingConfig(max_queue_rows=8))
    running = g.stubs.scorer.Score.future(score_request(GOOD_USER, peers(4)), timeout=20)
    wait_until(lambda: g.pipeline.batch_rows == [4])  # in the one batch slot, held by the gate
    queued = g.stubs.scorer.Score.future(score_request(GOOD_USER, peers(8)), timeout=20)
    wait_until(lambda: g.queued_rows() == 8)  # the queue is full
    error = rpc_error(g.stubs.scorer.Score, score_request(GOOD_USER, peers(1)), timeout=20)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_rows=8" in error.details()
    error = rpc_error(g.stubs.oip.ModelInfer, infer_request(GOOD_USER, peers(2)), timeout=20)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    g.open_gate()
    assert list(running.result().scores.shape) == [4, 3]
    assert list(queued.result().scores.shape) == [8, 3]
    assert g.pipeline.batch_rows == [4, 8]


def test_a_deadline_the_latency_model_cannot_meet_is_rejected_before_it_takes_a_core(gated):
    g = gated(latency_s=30.0)
    error = rpc_error(g.stubs.scorer.Score, score_request(GOOD_USER, peers(2)), timeout=5)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "cannot meet its deadline" in error.details()  # the server said so, not the client's timer
    assert g.pipeline.batch_rows == []
    g.open_gate()
    assert list(g.stubs.scorer.Score(score_request(GOOD_USER, peers(2)), timeout=60).scores.shape) == [2, 3]  # no deadline problem


def test_a_request_whose_deadline_passes_in_the_queue_never_runs(gated):
    g = gated()
    running = g.stubs.scorer.Score.future(score_request(GOOD_USER, peers(3)), timeout=20)
    wait_until(lambda: g.pipeline.batch_rows == [3])
    error = rpc_error(g.stubs.scorer.Score, score_request(GOOD_USER, peers(5)), timeout=0.3)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: g.queued_rows() == 0)  # dropped from the queue
    g.open_gate()
    assert list(running.result().scores.shape) == [3, 3]
    assert list(g.stubs.scorer.Score(score_request(GOOD_USER, peers(2)), timeout=20).scores.shape) == [2, 3]
    assert g.pipeline.batch_rows == [3, 2]  # the expired request's 5 rows never ran


def test_duplicate_upsert_ids_are_refused_before_the_tower_runs(gated, small_artifact):
    cfg = small_artifact.model_config
    cache = EmbeddingCache(model_version=small_artifact.model_version, num_labels=cfg.num_labels, label_dim=cfg.label_dim,
                           label_bias=small_artifact.label_bias, max_rows=100)
    g = gated(cache=cache)
    request = pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=[5, 6, 5, 7], features=tensor(GOOD_PEERS))
    error = rpc_error(g.stubs.scorer.UpsertEmbeddings, request, timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "peer id 5 appears more than once" in error.details()
    assert g.pipeline.batch_rows == []  # no core time spent on it


class Aborted(Exception):
    pass


class PastDeadlineContext:
    """A ServicerContext whose deadline passed before the handler ran (the request waited in the transport)."""

    def time_remaining(self) -> float:
        return -0.004

    async def abort(self, code, details):
        raise Aborted(code, details)


def test_a_request_whose_deadline_passed_before_it_was_served_is_refused_at_the_door(small_artifact):
    metrics = Metrics(version=small_artifact.model_version, batch_buckets=(1,))
    state = ServingState()
    state.serving = True
    info = model_info(small_artifact, ServerConfig(max_peers=MAX_PEERS), "none")
    service = ScorerService(info, runtime=None, cache=None, metrics=metrics, state=state)  # nothing below may be called
    with pytest.raises(Aborted) as aborted:
        asyncio.run(service.Score(score_request(GOOD_USER, GOOD_PEERS), PastDeadlineContext()))
    code, details = aborted.value.args
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "passed 4.0 ms before it was served" in details
    assert metrics.outcomes() == {"DEADLINE_EXCEEDED": 1}


def test_draining_answers_every_accepted_request_and_refuses_new_ones(gated, loop_thread):
    g = gated()
    running = g.stubs.scorer.Score.future(score_request(GOOD_USER, peers(3)), timeout=20)
    wait_until(lambda: g.pipeline.batch_rows == [3])
    queued = g.stubs.scorer.Score.future(score_request(GOOD_USER, peers(6)), timeout=20)
    wait_until(lambda: g.queued_rows() == 6)

    async def begin_drain():
        g.state.serving = False
        return asyncio.ensure_future(g.runtime.close(timeout_s=20.0))

    draining = loop_thread.run(begin_drain())
    error = rpc_error(g.stubs.scorer.Score, score_request(GOOD_USER, peers(1)), timeout=20)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
    assert not g.stubs.oip.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
    assert not draining.done()
    g.open_gate()
    assert list(running.result().scores.shape) == [3, 3]
    assert list(queued.result().scores.shape) == [6, 3]
    wait_until(draining.done)


def test_an_unexpected_error_is_internal_with_a_short_message_and_no_details(gated, caplog):
    g = gated(cache=BrokenCache())
    error = rpc_error(g.stubs.scorer.ScoreByIds, pb.ScoreByIdsRequest(user_id=1, peer_ids=[2]), timeout=10)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "Traceback" not in error.details()
    assert "secret internal detail" in caplog.text  # logged server-side, with its traceback
    g.open_gate()
    assert list(g.stubs.scorer.Score(score_request(GOOD_USER, peers(2)), timeout=10).scores.shape) == [2, 3]


# ---- the simulated device: a core fault --------------------------------------------------------


def test_a_core_fault_fails_only_the_request_that_hit_it(sim, sim_server, small_artifact):
    cfg = small_artifact.model_config
    request = score_request(rng_features(71, 1, cfg.user_features), rng_features(72, 9, cfg.peer_features))
    expected = array(sim.scorer.Score(request, timeout=10).scores)
    faults_before = sum(g.faults for g in sim_server.pipeline.stats().groups)
    sim_server.backend.inject_fault(0, "fail")  # the next execution core 0 accepts fails
    outcomes = []
    for _ in range(6):  # a request runs on either core: the first one on core 0 fails, the rest do not
        try:
            outcomes.append(array(sim.scorer.Score(request, timeout=10).scores))
        except grpc.RpcError as error:
            outcomes.append(error)
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(errors) == 1 and errors[0].code() == grpc.StatusCode.UNAVAILABLE, outcomes
    assert "core 0 failed" in errors[0].details()
    assert sum(g.faults for g in sim_server.pipeline.stats().groups) == faults_before + 1
    for scores in outcomes:  # every other request, around the resetting core, got the right answer
        if not isinstance(scores, grpc.RpcError):
            np.testing.assert_array_equal(scores, expected)
    assert sim.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


# ---- health, reflection, metrics ---------------------------------------------------------------


def test_health_serving_and_reflection_lists_every_service(cpu):
    for service in ("", "neuronserve.v1.Scorer", "inference.GRPCInferenceService"):
        assert cpu.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    replies = cpu.reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"neuronserve.v1.Scorer", "inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    replies = cpu.reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="neuronserve.v1.Scorer")]), timeout=5
    )
    assert any(reply.file_descriptor_response.file_descriptor_proto for reply in replies)


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def test_metrics_count_requests_batches_failures_cores_cache_and_process(cpu, cpu_server, small_artifact):
    from neuronserve.bench.report import scrape_metrics

    before = scrape_metrics(f"http://127.0.0.1:{cpu_server.metrics_port}/metrics")
    for _ in range(3):
        cpu.scorer.Score(score_request(GOOD_USER, GOOD_PEERS), timeout=10)
    rpc_error(cpu.scorer.Score, score_request(GOOD_USER, NAN_PEERS), timeout=10)
    upsert(cpu, pb.PEER, [5000, 5001], GOOD_PEERS[:2])
    after = scrape_metrics(f"http://127.0.0.1:{cpu_server.metrics_port}/metrics")
    assert after["nv_inference_request_success"] - before.get("nv_inference_request_success", 0) == 4
    # rows run: 3 x 4, the NaN request's 4 (features are checked per batch, off the event loop), 2 upserted
    assert after["nv_inference_count"] - before.get("nv_inference_count", 0) == 3 * 4 + 4 + 2
    assert after["nv_inference_exec_count"] - before.get("nv_inference_exec_count", 0) >= 4
    assert after["nv_inference_request_failure"] - before.get("nv_inference_request_failure", 0) == 1
    assert after["nv_inference_compute_infer_duration_us"] > before.get("nv_inference_compute_infer_duration_us", 0)
    assert after["nv_inference_queue_duration_us"] >= before.get("nv_inference_queue_duration_us", 0)

    text = scrape(cpu_server.metrics_port)
    version = small_artifact.model_version
    # prometheus-client writes label names sorted
    assert f'nv_inference_request_failure{{model="twotower",reason="INVALID_ARGUMENT",version="{version}"}}' in text
    assert "# TYPE nv_inference_request_success counter" in text
    assert 'neuronserve_batch_rows_bucket{le="+Inf",model="twotower",version="' in text
    for name in (
        'neuronserve_core_group_busy_seconds_total{cores="0",stages="user_tower,peer_tower,pair_scorer,twotower"}',
        'neuronserve_core_group_executions_total{cores="1"',
        'neuronserve_core_group_inline_executions_total{cores="1"',
        "neuronserve_core_group_faults_total",
        'neuronserve_cache_rows{kind="peer",version="' + version + '"}',
        "neuronserve_cache_hits_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as info:
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{cpu_server.metrics_port}/other", timeout=10)
    assert info.value.code == 404


def test_the_metrics_endpoint_survives_oversized_and_garbage_requests(cpu_server, caplog):
    import socket
    import urllib.request

    def exchange(data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", cpu_server.metrics_port), timeout=10) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
            return reply

    assert exchange(b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")  # past the line limit
    assert exchange(b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert exchange(b"GET /metrics HTTP/1.1\r\nX-Long: " + b"b" * 200_000 + b"\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert exchange(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD")
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text
    with urllib.request.urlopen(f"http://127.0.0.1:{cpu_server.metrics_port}/metrics", timeout=10) as reply:
        assert b"process_cpu_seconds_total" in reply.read()  # still serving


@pytest.mark.parametrize("method", ["/neuronserve.v1.Scorer/Score", "/inference.GRPCInferenceService/ModelInfer"])
def test_a_body_that_is_not_protobuf_is_invalid_argument(cpu, method, caplog):
    raw = cpu.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    error = rpc_error(raw, b"\xff\xff\xff\xff", timeout=10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid" in error.details() and "protobuf" in error.details()
    assert "Traceback" not in caplog.text
    assert list(cpu.scorer.Score(score_request(GOOD_USER, GOOD_PEERS), timeout=10).scores.shape) == [4, 3]


def test_rpcs_above_max_concurrent_rpcs_are_resource_exhausted_at_once(loop_thread, small_artifact):
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=1, max_concurrent_rpcs=1)
    stubs = Stubs(server.port)
    try:
        assert list(stubs.scorer.Score(score_request(GOOD_USER, GOOD_PEERS), timeout=10).scores.shape) == [4, 3]
        watch = stubs.health.Watch(health_pb2.HealthCheckRequest(), timeout=30)  # stays open: the one RPC allowed
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        # grpcio >= 1.62 refuses the call above the limit; older ones (the Inf1 image's 1.49) hold it in gRPC
        refuses = grpc_version() >= (1, 62)
        error = rpc_error(stubs.scorer.Score, score_request(GOOD_USER, GOOD_PEERS), timeout=2)
        assert error.code() == (grpc.StatusCode.RESOURCE_EXHAUSTED if refuses else grpc.StatusCode.DEADLINE_EXCEEDED)
        watch.cancel()
        wait_until(lambda: _serves(stubs))  # the slot is free again once the stream ends
    finally:
        stubs.channel.close()
        loop_thread.run(server.stop(5.0))


@pytest.mark.parametrize("max_pending_rpcs", [None, 1])
def test_a_burst_above_max_pending_rpcs_is_partly_refused_by_grpc_at_once(loop_thread, small_artifact, max_pending_rpcs):
    """200 calls at once on one connection: the event loop picks them up one at a time, so most wait in
    gRPC's core. With --max-pending-rpcs 1 (refused while 1 waits) gRPC cancels some at once and
    serves the rest; with gRPC's own bound (1,000), or a grpcio that predates the bound (the Inf1
    image's 1.49 ignores the option), every call is served."""
    server = start_server(loop_thread, small_artifact, backend="cpu", cores=1, max_pending_rpcs=max_pending_rpcs)
    stubs = Stubs(server.port)
    try:
        calls = [stubs.scorer.Score.future(score_request(GOOD_USER, GOOD_PEERS), timeout=60) for _ in range(200)]
        codes = [call.code() for call in calls]  # each waits for its call to end
        served, refused = codes.count(grpc.StatusCode.OK), codes.count(grpc.StatusCode.CANCELLED)
        assert served + refused == len(calls)
        if max_pending_rpcs is None or grpc_version() < PENDING_BOUND_SINCE:
            assert refused == 0
        else:
            assert served > 0 and refused > 0
    finally:
        stubs.channel.close()
        loop_thread.run(server.stop(5.0))


def _serves(stubs) -> bool:
    try:
        return list(stubs.scorer.Score(score_request(GOOD_USER, GOOD_PEERS), timeout=10).scores.shape) == [4, 3]
    except grpc.RpcError:
        return False
