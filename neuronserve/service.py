"""gRPC servicers: the scorer API (neuronserve.v1.Scorer) and the Open Inference Protocol (KServe v2,
inference.GRPCInferenceService). The top of the request path, and the only place that knows gRPC status codes.

Down: proto -> validated float32 arrays (np.frombuffer, never a Python object per element) -> the
injected Runtime (batcher -> pipeline -> backend) or the EmbeddingCache, with the gRPC deadline turned
into the batcher's absolute deadline. Up: array -> little-endian float32 bytes. Errors: a
NeuronServeError answers with its `status` (a grpc.StatusCode name) and its message; any other
exception answers INTERNAL with a short message and is logged here with its traceback, never sent.
Every RPC the server registers (these two services, health, reflection) goes through add_service: a
body that does not parse is INVALID_ARGUMENT with one line, counted in the metrics, never a traceback;
client strings quoted in an error message are cut to ECHO_CHARS (see echo), every message to
MAX_DETAILS_CHARS, so a reply always fits gRPC's metadata limits.
Every inference RPC passes the door (ServingState) first: closed while warming up and while draining,
so a request the server will not finish is refused with UNAVAILABLE instead of accepted and dropped.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from neuronserve import __version__
from neuronserve import tick
from neuronserve.pool_stats import PoolStatistics, worker_scope
from neuronserve.errors import DeadlineExceeded, InvalidInput, NeuronServeError, NotFound, Unavailable
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc

INTERNAL_MESSAGE = "internal error in neuronserve; the server log has the details"
log = logging.getLogger(__name__)

# Model names: the OIP models and the metrics' `model` label.
TWOTOWER = "twotower"  # Score and OIP twotower: features -> towers -> pair scorer
TOWERS = ("user_tower", "peer_tower")  # UpsertEmbeddings and the OIP tower models
CACHED = "twotower_cached"  # ScoreByIds and ScoreMatrix: cached tower outputs, no tower run (metrics only)
FP32 = "FP32"
TRITON_EXTENSIONS = ("model_configuration", "statistics")  # the Triton RPCs beyond the OIP served here
_F32 = np.dtype("<f4")
_RESPONSE_HEADROOM_BYTES = 4096  # room for a reply's non-tensor fields under max_message_bytes
UNKNOWN_MODEL = "_unknown"  # the metrics' model label of a request naming no model served, or whose body does not parse
ECHO_CHARS = 64  # a client string quoted in an error message: at most this many characters of it (see echo)
MAX_DIMS = 8  # dimensions of a request tensor (every input here has 1 or 2); more is refused before any work
MAX_BLOCKED_PAIRS = 1 << 20  # ScoreTick: blocked pairs per request
MAX_DETAILS_CHARS = 1024  # an error message's bound: gRPC refuses status details near 8 KiB (metadata limit)


@dataclass(frozen=True)
class ModelInfo:
    """What the services validate against and report; built by the server from the manifest and config.

    Versions: `version` is the artifact's (its content hash unless compile named one): the scorer API's
    replies and the embedding cache carry it. The OIP serves the same model as the integer version
    `oip_version` (see oip_version_of), because Triton's tools parse versions as integers; the artifact
    version stays visible there in the platform string (`oip_platform`) and is accepted in requests."""

    name: str  # the artifact's model name (ServerMetadata)
    version: str  # the artifact's model version: the only version served
    user_features: int
    peer_features: int
    num_labels: int
    label_dim: int
    label_names: Tuple[str, ...]
    max_peers: int  # M per Score / ScoreByIds / ScoreMatrix / OIP twotower request
    max_tower_rows: int  # rows per UpsertEmbeddings / OIP tower request
    max_message_bytes: int
    platform: str = "neuronserve"  # the server puts the backend in it, e.g. neuronserve_cpu
    oip_version: str = "1"  # oip_version_of(version)

    @property
    def oip_platform(self) -> str:
        """ModelMetadata.platform and ModelConfig.platform: `<platform>@<artifact version>`."""
        return f"{self.platform}@{self.version}"


def echo(text: str) -> str:
    """A client's string as an error message quotes it: repr (quoted, newlines escaped: one line), at most
    ECHO_CHARS characters of it, then "..." and its length. A client string is never echoed whole: a
    20,000-character model name would make the status details exceed gRPC's metadata limit."""
    if len(text) <= ECHO_CHARS:
        return repr(text)
    return f"{text[:ECHO_CHARS]!r}... ({len(text)} characters)"


def shape_text(shape: Sequence[int]) -> str:
    """A client's tensor shape as an error message shows it: the list, its first MAX_DIMS dimensions."""
    if len(shape) <= MAX_DIMS:
        return str([int(d) for d in shape])
    return f"[{', '.join(str(int(d)) for d in shape[:MAX_DIMS])}, ...] ({len(shape)} dimensions)"


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_DETAILS_CHARS else message[: MAX_DETAILS_CHARS - 3] + "..."


def oip_version_of(artifact_version: str) -> str:
    """The integer version the OIP serves for an artifact version: the artifact version itself when it
    is a positive decimal integer below 2**63 (compile --model-version 7), canonical (no leading zeros);
    else "1" (a content hash, or a name such as 2024-06-01)."""
    if artifact_version.isascii() and artifact_version.isdigit() and 0 < int(artifact_version) < 2**63:
        return str(int(artifact_version))
    return "1"


class Runtime(Protocol):
    """What the services call below them (server.Runtime: batchers over the pipeline)."""

    async def score(self, user_features: np.ndarray, peer_features: np.ndarray, deadline_s: Optional[float]) -> np.ndarray:
        """[1, F_u] and [M, F_p] float32 -> logits [M, K]; deadline_s absolute on time.monotonic()."""

    async def embed(self, tower: str, features: np.ndarray, deadline_s: Optional[float]) -> np.ndarray:
        """`tower` in TOWERS, [N, F] float32 -> tower outputs [N, K, D]."""


class ServingState:
    """The door: open only between the end of warm-up and the start of a drain. `in_flight` counts the
    inference calls inside a handler, so a drain knows when every accepted one has its answer.
    `devices_ready`: some core group can run every stage (the server's health.DeviceWatcher keeps it);
    ServerReady and ModelReady answer `ready`: serving, devices ready and not draining. The door does not look at the devices: ScoreByIds
    and ScoreMatrix need no core, and a call that does gets UNAVAILABLE from the pipeline."""

    def __init__(self) -> None:
        self.serving = False
        self.devices_ready = True
        self.draining = False  # stop() began: not ready, though the door may stay open for the drain delay
        self.in_flight = 0

    @property
    def ready(self) -> bool:
        return self.serving and self.devices_ready and not self.draining

    def check(self) -> None:
        if not self.serving:
            raise Unavailable("the server is not serving (warming up or shutting down); retry, e.g. on another replica")


# ---- tensors: decode and encode, shared by both APIs -------------------------------------------


def array_from_bytes(data: bytes, shape: Sequence[int], field: str) -> np.ndarray:
    """Little-endian float32 bytes + shape -> a read-only array viewing `data` (no copy)."""
    check_dims(shape, field)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small count
    if len(data) != 4 * count:
        raise InvalidInput(
            f"{field}: shape {list(shape)} needs {4 * count} bytes of little-endian float32, got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=_F32).reshape(shape)


def check_dims(shape: Sequence[int], field: str) -> None:
    """At most MAX_DIMS dimensions: numpy refuses more than 64 (an INTERNAL error, if not caught here)."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"{field}: shape {shape_text(shape)} has more than {MAX_DIMS} dimensions; inputs here have 1 or 2")


def tensor_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    if not tensor.shape:
        raise InvalidInput(f"{field} is missing: send a Tensor with its shape and float32 data")
    return array_from_bytes(tensor.data, tensor.shape, field)


def tensor_proto(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=np.ascontiguousarray(array, dtype=_F32).tobytes(), shape=array.shape)


def fp32_contents(contents: oip.InferTensorContents, field: str) -> np.ndarray:
    """contents.fp32_contents as an array, without a Python float per element: proto3 packs a repeated
    float, so an InferTensorContents holding only field 6 serializes as tag 0x32, a varint byte length,
    then the little-endian float32 values."""
    others = [f.name for f, _ in contents.ListFields() if f.name != "fp32_contents"]
    if others:
        raise InvalidInput(f"{field}: datatype FP32 takes its values in contents.fp32_contents, got {', '.join(others)}")
    wire = contents.SerializeToString()
    if not wire:
        return np.empty(0, dtype=_F32)
    length, shift, pos = 0, 0, 1
    while pos < len(wire):
        byte = wire[pos]
        length |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if byte < 0x80:
            break
    if wire[0] != 0x32 or pos + length != len(wire) or length % 4:
        return np.asarray(contents.fp32_contents, dtype=_F32)  # not the packed layout: decode the slow way
    return np.frombuffer(wire, dtype=_F32, offset=pos, count=length // 4)


def check_reply_size(values: int, what: str, advice: str, max_message_bytes: int) -> None:
    """Refuse, before any work, a request whose float32 reply would not fit in one message."""
    reply_bytes = 4 * values
    if reply_bytes > max_message_bytes - _RESPONSE_HEADROOM_BYTES:
        raise InvalidInput(f"{what} = {reply_bytes} bytes of float32 in the reply, above the server's max_message_bytes of {max_message_bytes}; {advice}")


def finite_output(array: np.ndarray, what: str) -> np.ndarray:
    """Never answer OK with NaN or Inf: finite features far outside the training range can overflow
    inside the model (e.g. 1e20), and such scores or embeddings must not reach a caller or the cache."""
    if not np.isfinite(array).all():
        row = int(np.argwhere(~np.isfinite(array))[0][0])
        raise InvalidInput(
            f"the model's {what} for row {row} is not finite (NaN or Inf): its features are far outside the range "
            "the model was trained on; check their scaling"
        )
    return array


def check_finite(array: np.ndarray, field: str) -> None:
    if not np.isfinite(array).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise InvalidInput(f"{field}{list(index)} is {array[index]}: features must be finite (no NaN or Inf)")


def scores_checked(scores: np.ndarray, inputs: Sequence[np.ndarray], fields: Sequence[str]) -> np.ndarray:
    """The score path checks finiteness once, on its output (its inputs are checked per batch, off the
    event loop: the pipeline turns the scores of every row with a non-finite feature into NaN). So a
    finite output means finite inputs; otherwise the error names the input at fault, else the output."""
    if not np.isfinite(scores).all():
        for array, field in zip(inputs, fields):
            check_finite(array, field)
        finite_output(scores, "scores")
    return scores


def feature_rows(array: np.ndarray, field: str, width: int, max_rows: int, limit: str, finite: bool = True) -> np.ndarray:
    """A [rows, width] feature matrix with 1 <= rows <= max_rows (`limit` names the setting), all finite
    (unless finite=False: the score path checks its output instead, see scores_checked)."""
    if array.ndim != 2 or array.shape[1] != width:
        raise InvalidInput(f"{field} must have shape [rows, {width}], got {list(array.shape)}")
    rows = array.shape[0]
    if rows < 1:
        raise InvalidInput(f"{field} has 0 rows; send between 1 and {max_rows}")
    if rows > max_rows:
        raise InvalidInput(f"{field} has {rows} rows, above the server's {limit} of {max_rows}; split the request")
    if finite:
        check_finite(array, field)
    return array


def one_user(array: np.ndarray, field: str, width: int, allow_vector: bool) -> np.ndarray:
    """One user's features as [1, width] (the scorer API also takes [width]); finiteness: scores_checked."""
    if array.shape != (1, width) and not (allow_vector and array.shape == (width,)):
        raise InvalidInput(f"{field} must have shape [1, {width}] (one user), got {list(array.shape)}")
    return array.reshape(1, width)


def id_array(values: Sequence[int], field: str, max_ids: int, limit: str) -> np.ndarray:
    ids = np.fromiter(values, dtype=np.int64, count=len(values))
    if ids.size < 1:
        raise InvalidInput(f"{field} is empty; send between 1 and {max_ids} ids")
    if ids.size > max_ids:
        raise InvalidInput(f"{field} has {ids.size} ids, above the server's {limit} of {max_ids}; split the request")
    return ids


def deadline_of(context: grpc.aio.ServicerContext) -> Optional[float]:
    """The gRPC deadline as an absolute time.monotonic() value (None: the caller set none)."""
    remaining_s = context.time_remaining()
    return None if remaining_s is None else time.monotonic() + remaining_s


# ---- registration: a body that is not protobuf is INVALID_ARGUMENT ------------------------------


@dataclass(frozen=True)
class _Malformed:
    error: str


def add_service(server: grpc.aio.Server, servicer, service, messages, metrics=None) -> None:
    """Register `servicer` for `service` (a ServiceDescriptor; request and response classes from the
    generated module `messages`) as the generated add_*_to_server does, except that a request body that
    does not parse is answered INVALID_ARGUMENT with one line and counted in `metrics` (default: the
    servicer's) as a failure of model UNKNOWN_MODEL. (The generated deserializer raises inside gRPC:
    the client sees UNKNOWN, and the server logs a traceback per request.) Any cardinality: unary or
    streaming requests (each message of a stream is checked as it is read), unary or streaming replies
    (an async generator, or a coroutine writing with context.write, as grpc_health's Watch)."""
    metrics = getattr(servicer, "metrics", None) if metrics is None else metrics

    def lenient(parse):
        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                return _Malformed(str(exc))

        return deserialize

    async def refuse(request: _Malformed, type_name: str, context) -> None:
        if metrics is not None:
            metrics.request(UNKNOWN_MODEL, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _bounded(f"the request body is not a valid {type_name} protobuf ({request.error})"))

    def checked(requests, type_name: str, context):
        async def each():
            async for request in requests:
                if isinstance(request, _Malformed):
                    await refuse(request, type_name, context)
                yield request

        return each()

    def guarded(handler, method):
        type_name = method.input_type.full_name
        if method.client_streaming:  # the handler reads the stream: each message is checked as it comes
            if inspect.isasyncgenfunction(handler):
                async def call(requests, context):
                    async for reply in handler(checked(requests, type_name, context), context):
                        yield reply
            else:
                async def call(requests, context):
                    return await handler(checked(requests, type_name, context), context)
        elif inspect.isasyncgenfunction(handler):
            async def call(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, type_name, context)
                async for reply in handler(request, context):
                    yield reply
        else:
            async def call(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, type_name, context)
                reply = handler(request, context)  # (a coroutine, or a generated base class's sync stub)
                return await reply if inspect.isawaitable(reply) else reply

        return call

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        method.name: kinds[method.client_streaming, method.server_streaming](
            guarded(getattr(servicer, method.name), method),
            request_deserializer=lenient(getattr(messages, method.input_type.name).FromString),
            response_serializer=getattr(messages, method.output_type.name).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


# ---- the common guard --------------------------------------------------------------------------


class _Servicer:
    """`runtime` may be attached after construction (the server serves, door closed, during its warm-up)."""

    def __init__(self, info: ModelInfo, runtime: Optional[Runtime], cache, metrics, state: ServingState) -> None:
        self.info = info
        self.runtime = runtime
        self.cache = cache
        self.metrics = metrics
        self.state = state

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        model: str,
        handler: Callable[..., Awaitable],
        request,
        *,
        inference: bool = True,
    ):
        """Run `handler(request, context)`; map errors to status codes. Inference calls pass the door
        and are counted in the metrics under `model`."""
        start = time.perf_counter()
        self.state.in_flight += inference
        try:
            if inference:
                self.state.check()
                remaining_s = context.time_remaining()
                if remaining_s is not None and remaining_s <= 0:  # shed a backlog at the door: nobody waits for it
                    raise DeadlineExceeded(f"the request's deadline passed {-remaining_s * 1e3:.1f} ms before it was served; the server is overloaded")
            reply = await handler(request, context)
        except NeuronServeError as exc:
            code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL)
            message = str(exc) or type(exc).__name__
            if code == grpc.StatusCode.INTERNAL:  # a bug below us, reduced to a message: logged, not sent
                log.error("%s: internal error answering %s: %s", model, type(request).__name__, message, exc_info=True)
                message = INTERNAL_MESSAGE
        except asyncio.CancelledError:  # the caller went away or its deadline passed: nobody to answer
            if inference:
                self.metrics.request(model, "CANCELLED", time.perf_counter() - start)
            raise
        except Exception:
            log.exception("%s: unexpected error answering %s", model, type(request).__name__)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
        else:
            if inference:
                self.metrics.request(model, "OK", time.perf_counter() - start)
            return reply
        finally:
            self.state.in_flight -= inference
        if inference:
            self.metrics.request(model, code.name, time.perf_counter() - start)
        await context.abort(code, _bounded(message))


# ---- the scorer API ----------------------------------------------------------------------------


class ScorerService(_Servicer, pb_grpc.ScorerServicer):
    """neuronserve.v1.Scorer: score by features (through the towers) or by cached tower outputs."""

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        return await self._answer(context, TWOTOWER, self._score, request)

    async def UpsertEmbeddings(self, request: pb.UpsertEmbeddingsRequest, context) -> pb.UpsertEmbeddingsResponse:
        model = {pb.USER: TOWERS[0], pb.PEER: TOWERS[1]}.get(request.kind, TOWERS[0])
        return await self._answer(context, model, self._upsert, request)

    async def ScoreByIds(self, request: pb.ScoreByIdsRequest, context) -> pb.ScoreResponse:
        return await self._answer(context, CACHED, self._score_by_ids, request)

    async def ScoreMatrix(self, request: pb.ScoreMatrixRequest, context) -> pb.ScoreMatrixResponse:
        return await self._answer(context, CACHED, self._score_matrix, request)

    async def ScoreTick(self, request: pb.ScoreTickRequest, context) -> pb.ScoreTickResponse:
        return await self._answer(context, CACHED, self._score_tick, request)

    async def _score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        info = self.info
        user = one_user(tensor_array(request.user_features, "user_features"), "user_features", info.user_features, True)
        peers = feature_rows(
            tensor_array(request.peer_features, "peer_features"), "peer_features", info.peer_features, info.max_peers, "max_peers", False
        )
        scores = await self.runtime.score(user, peers, deadline_of(context))
        scores_checked(scores, (user, peers), ("user_features", "peer_features"))
        return pb.ScoreResponse(scores=tensor_proto(scores), label_names=info.label_names, model_version=info.version)

    async def _upsert(self, request: pb.UpsertEmbeddingsRequest, context) -> pb.UpsertEmbeddingsResponse:
        info = self.info
        if request.kind not in (pb.USER, pb.PEER):
            name = pb.EntityKind.Name(request.kind) if request.kind in pb.EntityKind.values() else str(request.kind)
            raise InvalidInput(f"kind must be USER or PEER, got {name}")
        kind, tower, width = ("user", TOWERS[0], info.user_features) if request.kind == pb.USER else ("peer", TOWERS[1], info.peer_features)
        ids = id_array(request.ids, "ids", info.max_tower_rows, "max_queue_rows")
        features = feature_rows(tensor_array(request.features, "features"), "features", width, info.max_tower_rows, "max_queue_rows")
        if features.shape[0] != ids.size:
            raise InvalidInput(f"features has {features.shape[0]} rows for {ids.size} ids; send one row of {width} features per id")
        self.cache.check_upsert(kind, ids)  # before the tower run: a bad request costs no core time
        vectors = finite_output(await self.runtime.embed(tower, features, deadline_of(context)), f"{tower} output")
        # in a worker thread: an upsert copies the kind's table (~1 ms per 2,500 cached rows), which must
        # not stall the event loop; writers take the cache's lock, readers keep their snapshot
        rows = await asyncio.to_thread(self.cache.upsert, kind, ids, vectors, info.version)
        return pb.UpsertEmbeddingsResponse(upserted=ids.size, cache_rows=rows, model_version=info.version)

    async def _score_by_ids(self, request: pb.ScoreByIdsRequest, context) -> pb.ScoreResponse:
        peer_ids = id_array(request.peer_ids, "peer_ids", self.info.max_peers, "max_peers")
        labels = self.info.num_labels
        check_reply_size(peer_ids.size * labels, f"{peer_ids.size} peer_ids x {labels} labels", "send fewer peer_ids", self.info.max_message_bytes)
        start = time.perf_counter()
        scores = self.cache.score_by_ids(int(request.user_id), peer_ids)  # [M, K, D] gather + one einsum: ~0.1 ms
        finite_output(scores, "scores")
        self.metrics.execution(CACHED, rows=peer_ids.size, requests=1, compute_s=time.perf_counter() - start)
        return pb.ScoreResponse(scores=tensor_proto(scores), label_names=self.info.label_names, model_version=self.info.version)

    async def _score_matrix(self, request: pb.ScoreMatrixRequest, context) -> pb.ScoreMatrixResponse:
        """A whole tick, N users x M peers, on the host's BLAS: per label one [N, D] x [D, M] matmul over
        the cached tower outputs. Not on the cores: pair_scorer scores row-aligned pairs, so it would need
        N*M rows of [K, D] materialised for both sides (N*M*K*D*8 bytes in, e.g. 100 x 1000 x 4 x 64 x 8 =
        205 MB) plus the round trip, where the matmul reads (N + M)*K*D floats and does N*M*K*D MACs
        (26 M for that tick: a few ms on one host core). Runs in a worker thread (BLAS releases the GIL),
        so the event loop keeps serving; the cache swaps whole arrays on upsert, so readers stay consistent."""
        info = self.info
        user_ids = id_array(request.user_ids, "user_ids", info.max_peers, "max_peers")
        peer_ids = id_array(request.peer_ids, "peer_ids", info.max_peers, "max_peers")
        check_reply_size(
            user_ids.size * peer_ids.size * info.num_labels,
            f"{user_ids.size} user_ids x {peer_ids.size} peer_ids x {info.num_labels} labels",
            "split the tick into smaller blocks",
            info.max_message_bytes,
        )
        start = time.perf_counter()
        scores = await asyncio.get_running_loop().run_in_executor(None, self.cache.score_matrix, user_ids, peer_ids)
        self.metrics.execution(CACHED, rows=user_ids.size * peer_ids.size, requests=1, compute_s=time.perf_counter() - start)
        return pb.ScoreMatrixResponse(scores=tensor_proto(finite_output(scores, "scores")), label_names=info.label_names, model_version=info.version)


    async def _score_tick(self, request: pb.ScoreTickRequest, context) -> pb.ScoreTickResponse:
        """A matching tick (docs/tick.md): top-k per person from the cached vectors, in a worker thread."""
        info, req = self.info, pb.ScoreTickRequest
        limit = (info.max_peers, "max_peers")
        pool = tick_ids(request.pool_ids, request.pool_ids_packed, "pool_ids", *limit, required=False)
        users = tick_ids(request.user_ids, request.user_ids_packed, "user_ids", *limit, required=False)
        peers = tick_ids(request.peer_ids, request.peer_ids_packed, "peer_ids", *limit, required=False)
        if (pool is None) == (users is None and peers is None):
            raise InvalidInput("send either pool_ids (or pool_ids_packed) or user_ids and peer_ids (or their _packed forms), not both or neither")
        if pool is None and (users is None or peers is None):
            raise InvalidInput(f"{'peer_ids' if peers is None else 'user_ids'} is missing: users x peers mode needs both user_ids and peer_ids")
        blocked_a = tick_ids(request.blocked_user_ids, request.blocked_user_ids_packed, "blocked_user_ids", MAX_BLOCKED_PAIRS, "bound on blocked pairs", required=False)
        blocked_b = tick_ids(request.blocked_peer_ids, request.blocked_peer_ids_packed, "blocked_peer_ids", MAX_BLOCKED_PAIRS, "bound on blocked pairs", required=False)
        if (0 if blocked_a is None else blocked_a.size) != (0 if blocked_b is None else blocked_b.size):
            raise InvalidInput(f"blocked_user_ids and blocked_peer_ids are parallel lists: got {0 if blocked_a is None else blocked_a.size} "
                               f"and {0 if blocked_b is None else blocked_b.size} ids")
        spaces = {req.PROBABILITY: tick.PROBABILITY, req.LOGIT: tick.LOGIT}
        mutuals = {req.ONE_WAY: tick.ONE_WAY, req.PRODUCT: tick.PRODUCT, req.MINIMUM: tick.MINIMUM, req.HARMONIC_MEAN: tick.HARMONIC_MEAN}
        if request.label_space not in spaces:
            raise InvalidInput(f"label_space must be PROBABILITY or LOGIT, got {request.label_space}")
        if request.mutual not in mutuals:
            raise InvalidInput(f"mutual must be ONE_WAY, PRODUCT, MINIMUM or HARMONIC_MEAN, got {request.mutual}")
        rows, cols = (pool, pool) if pool is not None else (users, peers)
        candidates = rows.size - 1 if pool is not None else cols.size
        spec = tick.make_spec(request.k, list(request.weights), info.num_labels, candidates, label_space=spaces[request.label_space],
                              mutual=mutuals[request.mutual], include_label_scores=request.include_label_scores,
                              candidates_what="pool size - 1" if pool is not None else "peer_ids")
        mutual = spec.mutual != tick.ONE_WAY
        per_pair = 12 + (4 * info.num_labels * (1 + mutual) if spec.include_label_scores else 0)  # id + value (+ label scores)
        check_reply_size(rows.size * spec.k * per_pair // 4, f"{rows.size} persons x k={spec.k} x {per_pair} bytes", "send a smaller k or split the tick", info.max_message_bytes)
        start = time.perf_counter()
        result = await asyncio.to_thread(self._tick, pool, rows, cols, blocked_a, blocked_b, spec)
        self.metrics.execution(CACHED, rows=rows.size * cols.size, requests=1, compute_s=time.perf_counter() - start)
        counts = result.counts
        valid = np.arange(spec.k)[None, :] < counts[:, None]
        finite_output(result.values[valid], "tick values")
        reply = pb.ScoreTickResponse(
            ids=result.ids.astype("<i8", copy=False).tobytes(), values=tensor_proto(result.values), counts=counts.astype("<i4").tobytes(),
            k=spec.k, label_names=info.label_names, model_version=info.version)
        if result.label_scores is not None:
            reply.label_scores.CopyFrom(tensor_proto(result.label_scores))
        if result.reverse_label_scores is not None:
            reply.reverse_label_scores.CopyFrom(tensor_proto(result.reverse_label_scores))
        return reply

    def _tick(self, pool, rows, cols, blocked_a, blocked_b, spec) -> "tick.TickResult":
        """The tick's work, off the event loop: one snapshot of the vectors, exclusions, score_tick."""
        mutual = spec.mutual != tick.ONE_WAY
        order = np.argsort(cols, kind="stable")
        col_ids = cols[order]
        if pool is not None:
            user_vectors, peer_vectors = self.cache.lookup_many([("user", rows, "pool_ids"), ("peer", rows, "pool_ids")])
            rows_user, rows_peer, cols_peer, cols_user = user_vectors, peer_vectors, peer_vectors[order], user_vectors[order]
        else:
            wanted = [("user", rows, "user_ids"), ("peer", col_ids, "peer_ids")]
            if mutual:  # c(v->u): each peer's user vector and each user's peer vector
                wanted += [("user", col_ids, "peer_ids (as users, for mutual)"), ("peer", rows, "user_ids (as peers, for mutual)")]
            got = self.cache.lookup_many(wanted)
            rows_user, cols_peer = got[0], got[1]
            cols_user, rows_peer = (got[2], got[3]) if mutual else (None, None)
        excluded = tick.exclusions(rows, col_ids, exclude_self=pool is not None, blocked_rows=blocked_a, blocked_cols=blocked_b, symmetric=pool is not None)
        return tick.score_tick(rows, col_ids, rows_user, cols_peer, self.cache.label_bias, spec, rows_peer=rows_peer, cols_user=cols_user, excluded=excluded)


def tick_ids(repeated: Sequence[int], packed: bytes, field: str, max_ids: int, limit: str, *, required: bool = True) -> Optional[np.ndarray]:
    """A list of distinct ids sent as `field` (repeated int64) or `field`_packed (little-endian int64
    bytes), exactly one of the two; None when neither is sent and not `required`."""
    if len(repeated) and len(packed):
        raise InvalidInput(f"{field} and {field}_packed are both set; send the ids in one of them")
    if len(packed):
        if len(packed) % 8:
            raise InvalidInput(f"{field}_packed has {len(packed)} bytes; it holds little-endian int64 ids, 8 bytes each")
        ids = np.frombuffer(packed, dtype="<i8").astype(np.int64, copy=False)
        field = f"{field}_packed"
    elif len(repeated):
        ids = np.fromiter(repeated, dtype=np.int64, count=len(repeated))
    elif required:
        raise InvalidInput(f"{field} is empty; send between 1 and {max_ids} ids")
    else:
        return None
    if ids.size > max_ids:
        raise InvalidInput(f"{field} has {ids.size} ids, above the server's {limit} of {max_ids}; split the request")
    if not field.startswith("blocked_"):
        ordered = np.sort(ids)
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if dup.size:
            raise InvalidInput(f"{field} must hold distinct ids; {int(dup[0])} appears more than once")
    return ids


# ---- the Open Inference Protocol ---------------------------------------------------------------


@dataclass(frozen=True)
class OipTensor:
    name: str
    shape: Tuple[int, ...]  # -1 marks a variable dimension (ModelMetadata reports it so)


@dataclass(frozen=True)
class OipModel:
    name: str
    inputs: Tuple[OipTensor, ...]
    outputs: Tuple[OipTensor, ...]

    @functools.cached_property
    def input_fields(self) -> Tuple[str, ...]:
        """How errors name the inputs, in order."""
        return tuple(f"input {t.name}" for t in self.inputs)


def oip_models(info: ModelInfo) -> Dict[str, OipModel]:
    k, d = info.num_labels, info.label_dim
    return {
        TWOTOWER: OipModel(
            TWOTOWER,
            (OipTensor("USER_FEATURES", (1, info.user_features)), OipTensor("PEER_FEATURES", (-1, info.peer_features))),
            (OipTensor("SCORES", (-1, k)),),
        ),
        TOWERS[0]: OipModel(TOWERS[0], (OipTensor("FEATURES", (-1, info.user_features)),), (OipTensor("EMBEDDINGS", (-1, k, d)),)),
        TOWERS[1]: OipModel(TOWERS[1], (OipTensor("FEATURES", (-1, info.peer_features)),), (OipTensor("EMBEDDINGS", (-1, k, d)),)),
    }


def model_statistics(stats, version: str) -> oip.ModelStatistics:
    """From a metrics.ModelStats (injected with the metrics: the service does not import metrics), for
    the OIP `version`. Triton's semantics: queue and the three compute durations have one count each,
    the successful requests, so perf_analyzer finds them equal."""
    def duration(count: int, seconds: float) -> oip.StatisticDuration:
        return oip.StatisticDuration(count=count, ns=int(seconds * 1e9))

    return oip.ModelStatistics(
        name=stats.model,
        version=version,
        last_inference=stats.last_request_ms,
        inference_count=stats.inferences,
        execution_count=stats.executions,
        inference_stats=oip.InferStatistics(
            success=duration(stats.success, stats.success_s),
            fail=duration(stats.failure, stats.failure_s),
            queue=duration(stats.success, stats.queue_s),
            compute_input=duration(stats.success, stats.compute_input_s),
            compute_infer=duration(stats.success, stats.compute_infer_s),
            compute_output=duration(stats.success, stats.compute_output_s),
        ),
    )


class InferenceService(_Servicer, oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: models `twotower` (SCORES [M, K] logits) and the two towers;
    the OIP's six RPCs plus Triton's ModelConfig and ModelStatistics, which perf_analyzer calls."""

    def __init__(
        self,
        info: ModelInfo,
        runtime: Optional[Runtime],
        cache,
        metrics,
        state: ServingState,
        peer_addresses: Optional[Callable[[], List[str]]] = None,
    ) -> None:
        """`peer_addresses`: a pool's other workers, whose counters ModelStatistics adds (pool_stats.py)."""
        super().__init__(info, runtime, cache, metrics, state)
        self.models = oip_models(info)
        self.pool = PoolStatistics(peer_addresses) if peer_addresses is not None else None

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        known = request.name in self.models and request.version in ("", self.info.oip_version, self.info.version)
        return oip.ModelReadyResponse(ready=known and self.state.ready)

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="neuronserve", version=__version__, extensions=list(TRITON_EXTENSIONS))

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        return await self._answer(context, self._label(request.name), self._metadata, request, inference=False)

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        return await self._answer(context, self._label(request.model_name), self._infer, request)

    async def ModelConfig(self, request: oip.ModelConfigRequest, context) -> oip.ModelConfigResponse:
        return await self._answer(context, self._label(request.name), self._config, request, inference=False)

    async def ModelStatistics(self, request: oip.ModelStatisticsRequest, context) -> oip.ModelStatisticsResponse:
        return await self._answer(context, self._label(request.name), self._statistics, request, inference=False)

    def _label(self, name: str) -> str:
        """A model name as the metrics and the log name it: a model served, else UNKNOWN_MODEL (a client's
        string never becomes a label or a log line)."""
        return name if name in self.models else UNKNOWN_MODEL

    def _model(self, name: str, version: str) -> OipModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {echo(name)}; this server serves {', '.join(self.models)}")
        if version not in ("", self.info.oip_version, self.info.version):
            raise NotFound(
                f"model {name} has no version {echo(version)}; it serves version {self.info.oip_version!r} "
                f"(artifact version {self.info.version!r}, also accepted), or send none"
            )
        return model

    async def _metadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        meta = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[self.info.oip_version],
            platform=self.info.oip_platform,
            inputs=[meta(name=t.name, datatype=FP32, shape=t.shape) for t in model.inputs],
            outputs=[meta(name=t.name, datatype=FP32, shape=t.shape) for t in model.outputs],
        )

    async def _config(self, request: oip.ModelConfigRequest, context) -> oip.ModelConfigResponse:
        """Triton's model configuration: max_batch_size 0 because batching is inside the server, on rows
        (peers), so shapes are given whole, as in ModelMetadata."""
        model = self._model(request.name, request.version)
        config = oip.ModelConfig(name=model.name, platform=self.info.oip_platform, backend="neuronserve", max_batch_size=0)
        config.input.extend(oip.ModelInput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in model.inputs)
        config.output.extend(oip.ModelOutput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in model.outputs)
        return oip.ModelConfigResponse(config=config)

    async def _statistics(self, request: oip.ModelStatisticsRequest, context) -> oip.ModelStatisticsResponse:
        """Cumulative counters of one model, or of every OIP model when no name is given. `twotower`
        counts the scorer API's Score too: it is the same model."""
        names = [self._model(request.name, request.version).name] if request.name else list(self.models)
        version = self.info.oip_version
        reply = oip.ModelStatisticsResponse(model_stats=[model_statistics(self.metrics.statistics(n), version) for n in names])
        if self.pool is not None and not worker_scope(context):
            await self.pool.add_peers(reply, request)
        return reply

    async def _infer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        arrays = self._inputs(model, request)
        output = model.outputs[0].name  # each model has one output; a request may name it, once
        if request.outputs:
            names = [o.name for o in request.outputs]
            for name in names:
                if name != output:
                    raise InvalidInput(f"model {model.name} has no output {echo(name)}; its outputs are {output}")
            if len(names) > 1:
                raise InvalidInput(f"outputs: each output may be requested once, got {len(names)}: {', '.join(map(echo, names[:8]))}")
        rows = arrays[-1].shape[0]  # PEER_FEATURES or FEATURES: the variable dimension of the one output
        per_row = math.prod(model.outputs[0].shape[1:])
        check_reply_size(rows * per_row, f"{rows} rows x {per_row} values of {model.outputs[0].name}", "send fewer rows per request", self.info.max_message_bytes)
        deadline_s = deadline_of(context)
        if model.name == TWOTOWER:
            out = await self.runtime.score(arrays[0], arrays[1], deadline_s)
            scores_checked(out, arrays, model.input_fields)
        else:
            out = finite_output(await self.runtime.embed(model.name, arrays[0], deadline_s), model.outputs[0].name)
        data = np.ascontiguousarray(out, dtype=_F32).tobytes()
        # raw contents, as Triton answers
        response = oip.ModelInferResponse(model_name=model.name, model_version=self.info.oip_version, id=request.id)
        response.outputs.add(name=output, datatype=FP32, shape=out.shape)  # (nested kwargs: 2x slower)
        response.raw_output_contents.append(data)
        return response

    def _inputs(self, model: OipModel, request: oip.ModelInferRequest) -> List[np.ndarray]:
        """The request's inputs in the model's order, decoded from raw_input_contents or typed contents."""
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in order")
        order = {t.name: i for i, t in enumerate(model.inputs)}
        arrays: List[Optional[np.ndarray]] = [None] * len(model.inputs)
        for position, tensor in enumerate(request.inputs):
            field = f"input {tensor.name}"
            index = order.get(tensor.name)
            if index is None:
                raise InvalidInput(f"model {model.name} has no input {echo(tensor.name)}; its inputs are {', '.join(order)}")
            if arrays[index] is not None:
                raise InvalidInput(f"{field} is given twice")
            if tensor.datatype != FP32:
                raise InvalidInput(f"{field}: datatype must be FP32, got {echo(tensor.datatype)}")
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInput(f"{field}: contents must be empty when raw_input_contents is used (one or the other)")
                array = array_from_bytes(raw[position], tensor.shape, field)
            else:
                check_dims(tensor.shape, field)
                flat = fp32_contents(tensor.contents, field)
                count = math.prod(tensor.shape)
                if any(d < 0 for d in tensor.shape) or flat.size != count:
                    raise InvalidInput(
                        f"{field}: shape {list(tensor.shape)} needs {max(count, 0)} values in contents.fp32_contents, got {flat.size}"
                    )
                array = flat.reshape(tuple(tensor.shape))
            arrays[index] = self._check(model.inputs[index], array, field)
        missing = [t.name for t, a in zip(model.inputs, arrays) if a is None]
        if missing:
            raise InvalidInput(f"model {model.name} needs input(s) {', '.join(missing)}")
        return arrays  # type: ignore[return-value]

    def _check(self, spec: OipTensor, array: np.ndarray, field: str) -> np.ndarray:
        rows, width = spec.shape
        if rows == 1:
            return one_user(array, field, width, allow_vector=False)
        if spec.name == "PEER_FEATURES":  # finiteness: scores_checked
            return feature_rows(array, field, width, self.info.max_peers, "max_peers", finite=False)
        return feature_rows(array, field, width, self.info.max_tower_rows, "max_queue_rows")
