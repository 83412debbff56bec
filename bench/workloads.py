"""Workloads: what one benchmark request is, built once as serialized bytes before the load starts.

The client side, outside the server's request path. `prepare_workload` asks the server for the
model's feature sizes (the Open Inference Protocol's ModelMetadata, so no artifact is needed),
seeds the embedding cache for the id workloads, sends one request through the generated stubs to
check the reply's shape, and returns a few serialized requests for the load generator to send in
turn. Workloads: `score` (1 user x M peers by features), `score-ids` (cached embeddings),
`matrix` (N users x M peers, one tick), `oip` (`score` through ModelInfer; works against Triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuronserve.errors import ConfigError, InvalidInput, Unavailable

WORKLOADS = ("score", "score-ids", "matrix", "oip")
DEFAULT_PEERS = {"score": 128, "score-ids": 1000, "matrix": 1000, "oip": 128}
SCORER = "/neuronserve.v1.Scorer/"
OIP = "/inference.GRPCInferenceService/"
UPSERT_CHUNK_ROWS = 1024
DISTINCT_REQUESTS = 16


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    peers: int  # M
    users: int = 1  # N (matrix only)
    pool_users: int = 1000  # ids seeded in the cache (score-ids, matrix)
    pool_peers: int = 5000
    model: str = "twotower"  # the OIP model name
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ConfigError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.name!r}")
        if self.peers < 1 or self.users < 1:
            raise ConfigError(f"--peers and --users must be >= 1, got {self.peers} and {self.users}")
        if self.name in ("score-ids", "matrix") and (self.peers > self.pool_peers or self.users > self.pool_users):
            raise ConfigError(
                f"--peers {self.peers} / --users {self.users} exceed the seeded pool ({self.pool_peers} peers: --cached-peers; {self.pool_users} users)"
            )


@dataclass(frozen=True)
class Workload:
    """Ready-to-send requests plus what the report needs to know about them."""

    spec: WorkloadSpec
    method: str
    payloads: tuple[bytes, ...]
    pairs_per_request: int
    request_bytes: int
    response_bytes: int
    user_features: int
    peer_features: int
    num_labels: int

    def describe(self) -> dict:
        return {
            "workload": self.spec.name,
            "users": self.spec.users if self.spec.name == "matrix" else 1,
            "peers": self.spec.peers,
            "pairs_per_request": self.pairs_per_request,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "features": [self.user_features, self.peer_features],
            "labels": self.num_labels,
        }


def prepare_workload(target: str, spec: WorkloadSpec, timeout_s: float = 10.0) -> Workload:
    import grpc

    try:
        with grpc.insecure_channel(
            target,
            options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
        ) as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
            return _prepare(channel, spec, timeout_s)
    except grpc.FutureTimeoutError:
        raise Unavailable(f"--target {target}: no gRPC server answered within {timeout_s:.0f} s") from None
    except grpc.RpcError as exc:
        raise Unavailable(
            f"--target {target}: preparing workload {spec.name} failed: {exc.code().name}: {exc.details()}"
        ) from None


def _model_shape(channel, model: str, timeout_s: float) -> tuple[int, int, int]:
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

    meta = oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        oip.ModelMetadataRequest(name=model), timeout=timeout_s
    )
    shapes = {t.name: list(t.shape) for t in list(meta.inputs) + list(meta.outputs)}
    try:
        return int(shapes["USER_FEATURES"][-1]), int(shapes["PEER_FEATURES"][-1]), int(shapes["SCORES"][-1])
    except (KeyError, IndexError):
        raise InvalidInput(
            f"model {model!r} metadata has tensors {shapes}; expected USER_FEATURES, PEER_FEATURES and SCORES"
        ) from None


def _tensor(array: np.ndarray):
    from neuronserve.protos import scorer_pb2 as pb

    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=list(array.shape))


def _check_shape(what: str, shape, expected) -> None:
    if list(shape) != list(expected):
        raise InvalidInput(f"workload probe: {what} came back with shape {list(shape)}, expected {list(expected)}")


def _prepare(channel, spec: WorkloadSpec, timeout_s: float) -> Workload:
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
    from neuronserve.protos import scorer_pb2 as pb
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    f_u, f_p, k = _model_shape(channel, spec.model, timeout_s)
    rng = np.random.default_rng(spec.seed)
    m, n = spec.peers, spec.users
    requests = []
    if spec.name in ("score", "oip"):
        for _ in range(DISTINCT_REQUESTS):
            user = rng.standard_normal((1, f_u), dtype=np.float32)
            peers = rng.standard_normal((m, f_p), dtype=np.float32)
            if spec.name == "score":
                requests.append(pb.ScoreRequest(user_features=_tensor(user), peer_features=_tensor(peers)))
            else:
                requests.append(
                    oip.ModelInferRequest(
                        model_name=spec.model,
                        inputs=[
                            oip.ModelInferRequest.InferInputTensor(
                                name="USER_FEATURES", datatype="FP32", shape=[1, f_u]
                            ),
                            oip.ModelInferRequest.InferInputTensor(
                                name="PEER_FEATURES", datatype="FP32", shape=[m, f_p]
                            ),
                        ],
                        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="SCORES")],
                        raw_input_contents=[user.astype("<f4").tobytes(), peers.astype("<f4").tobytes()],
                    )
                )
    else:
        stub = pb_grpc.ScorerStub(channel)
        for kind, count, features in ((pb.USER, spec.pool_users, f_u), (pb.PEER, spec.pool_peers, f_p)):
            for lo in range(0, count, UPSERT_CHUNK_ROWS):
                ids = np.arange(lo, min(count, lo + UPSERT_CHUNK_ROWS), dtype=np.int64)
                feats = rng.standard_normal((len(ids), features), dtype=np.float32)
                stub.UpsertEmbeddings(
                    pb.UpsertEmbeddingsRequest(kind=kind, ids_packed=_packed(ids), features=_tensor(feats)),
                    timeout=timeout_s,
                )
        for _ in range(DISTINCT_REQUESTS):  # ids packed: 8 little-endian bytes each, no varint per id
            peer_ids = _packed(rng.choice(spec.pool_peers, size=m, replace=False))
            if spec.name == "score-ids":
                user_id = int(rng.integers(spec.pool_users))
                requests.append(pb.ScoreByIdsRequest(user_id=user_id, peer_ids_packed=peer_ids))
            else:
                user_ids = _packed(rng.choice(spec.pool_users, size=n, replace=False))
                requests.append(pb.ScoreMatrixRequest(user_ids_packed=user_ids, peer_ids_packed=peer_ids))

    if spec.name == "oip":
        method = OIP + "ModelInfer"
        reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(requests[0], timeout=timeout_s)
        _check_shape("SCORES", reply.outputs[0].shape, [m, k])
    else:
        rpc = {"score": "Score", "score-ids": "ScoreByIds", "matrix": "ScoreMatrix"}[spec.name]
        method = SCORER + rpc
        reply = getattr(pb_grpc.ScorerStub(channel), rpc)(requests[0], timeout=timeout_s)
        _check_shape("scores", reply.scores.shape, [n, m, k] if spec.name == "matrix" else [m, k])
    payloads = tuple(r.SerializeToString() for r in requests)
    return Workload(
        spec=spec,
        method=method,
        payloads=payloads,
        pairs_per_request=m * (n if spec.name == "matrix" else 1),
        request_bytes=max(len(p) for p in payloads),
        response_bytes=len(reply.SerializeToString()),
        user_features=f_u,
        peer_features=f_p,
        num_labels=k,
    )


def _packed(ids: np.ndarray) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()
