"""What the gRPC servicers share: the top of the request path, and the only place that knows gRPC status
codes. The servicers themselves: scorer_service.py (neuronserve.v1.Scorer) and oip_service.py (the Open
Inference Protocol, KServe v2, inference.GRPCInferenceService); their registration: registration.py.
Here: the model's description (ModelInfo), the door (ServingState), the tensor codec and the error
mapping (Servicer._answer).

Down: proto -> validated float32 arrays (np.frombuffer, never a Python object per element) -> the
injected Runtime (batcher -> pipeline -> backend) or the EmbeddingCache, with the gRPC deadline turned
into the batcher's absolute deadline. Up: array -> little-endian float32 bytes. Errors: a
NeuronServeError answers with its `status` (a grpc.StatusCode) and its message; any other
exception answers INTERNAL with a short message and is logged here with its traceback, never sent.
Client strings quoted in an error message are cut to ECHO_CHARS (see echo), every message to
MAX_DETAILS_CHARS, so a reply always fits gRPC's metadata limits.
Every inference RPC passes the door (ServingState) first: closed while warming up and while draining,
so a request the server will not finish is refused with UNAVAILABLE instead of accepted and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
import numpy as np

from neuronserve.contract import MODEL_STAGES
from neuronserve.contract import TOWERS, TWOTOWER  # noqa: F401  (re-exported: the servicers' model names)
from neuronserve.errors import DeadlineExceeded, InvalidInput, NeuronServeError, Unavailable
from neuronserve.memory_budget import ScoringGate
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import scorer_pb2 as pb

INTERNAL_MESSAGE = "internal error in neuronserve; the server log has the details"

log = logging.getLogger(__name__)

# Model names: the OIP models and the metrics' `model` label.
CACHED = "twotower_cached"  # ScoreByIds and ScoreMatrix: cached tower outputs, no tower run (metrics only)
FP32 = "FP32"
TRITON_EXTENSIONS = ("model_configuration", "statistics")  # the Triton RPCs beyond the OIP served here
F32_LE = np.dtype("<f4")
_RESPONSE_HEADROOM_BYTES = 4096  # room for a reply's non-tensor fields under max_message_bytes
MAX_REQUEST_ID_BYTES = 1024  # OIP's request id, echoed in the reply: bounded so the headroom above holds
UNKNOWN_MODEL = "_unknown"  # the metrics' model label of a request naming no model served, or whose body does not parse
ECHO_CHARS = 64  # a client string quoted in an error message: at most this many characters of it (see echo)
MAX_DIMS = 8  # dimensions of a request tensor (every input here has 1 or 2); more is refused before any work
MAX_DETAILS_CHARS = 1024  # an error message's bound: gRPC refuses status details near 8 KiB (metadata limit)
# shutdown: gRPC's backlog (calls sent before the drain that no handler has seen yet) has run dry once no
# call reached a handler for BACKLOG_QUIET_S; waited for at most BACKLOG_MAX_S (later calls are new ones)
BACKLOG_QUIET_S, BACKLOG_MAX_S = 0.05, 1.0


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
    label_names: tuple[str, ...]
    max_peers: int  # M per Score / ScoreByIds / ScoreMatrix / OIP twotower request
    max_tower_rows: int  # rows per UpsertEmbeddings / OIP tower request
    max_message_bytes: int
    platform: str = "neuronserve"  # the server puts the backend in it, e.g. neuronserve_cpu
    oip_version: str = "1"  # oip_version_of(version)
    max_tick_ids: int = 20_000  # people in a ScoreTick pool (or users, or peers)

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


def bounded(message: str) -> str:
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

    async def score(self, user_features: np.ndarray, peer_features: np.ndarray, deadline_s: float | None) -> np.ndarray:
        """[1, F_u] and [M, F_p] float32 -> logits [M, K]; deadline_s absolute on time.monotonic()."""

    async def embed(self, tower: str, features: np.ndarray, deadline_s: float | None) -> np.ndarray:
        """`tower` in TOWERS, [N, F] float32 -> tower outputs [N, K, D]."""


class ServingState:
    """The door: open only between the end of warm-up and the start of a drain. `in_flight` counts the
    inference calls inside a handler, so a drain knows when every accepted one has its answer.
    `stages_down`: the stages no core group can run now (the server's health.DeviceWatcher keeps it);
    `loaded`: some model version is served (false after RepositoryModelUnload of every version, until a
    load; health.ServerHealth.versions_changed keeps it). ServerReady answers `ready` (serving, not
    draining, a version loaded, every stage up); ModelReady `model_ready` (the model's own stages up).
    The door looks at neither: ScoreByIds and ScoreMatrix need no core, a call that does gets
    UNAVAILABLE from the pipeline, and one to an unloaded model from the version table's stand-in."""

    def __init__(self, scoring: ScoringGate | None = None) -> None:
        self.scoring = ScoringGate() if scoring is None else scoring  # the heavy calls' byte budget
        self.serving = False
        self.stages_down: frozenset[str] = frozenset()
        self.loaded = True
        self.draining = False  # stop() began: not ready, though the door may stay open for the drain delay
        self.in_flight = 0
        self.arrived = 0  # inference calls that reached a handler, ever: a drain sees gRPC's backlog run dry

    @property
    def ready(self) -> bool:
        return self.serving and self.loaded and not self.stages_down and not self.draining

    def model_ready(self, model: str) -> bool:
        return self.serving and self.loaded and not self.draining and not MODEL_STAGES[model] & self.stages_down

    def check(self) -> None:
        if not self.serving:
            raise Unavailable("the server is not serving (warming up or shutting down); retry, e.g. on another replica")

    async def answered(self, end_s: float) -> None:
        """Until `end_s` (on the loop's clock), during a drain: every call in a handler has its answer
        (ScoreByIds, ScoreMatrix: outside the batchers), and every call gRPC still holds has reached a
        handler, to be refused UNAVAILABLE at the closed door (gRPC's stop would cancel it: CANCELLED,
        which clients do not retry)."""
        loop = asyncio.get_running_loop()
        backlog_end_s = min(end_s, loop.time() + BACKLOG_MAX_S)
        seen, quiet_since_s = -1, 0.0
        while (now_s := loop.time()) < end_s:
            if self.arrived != seen:
                seen, quiet_since_s = self.arrived, now_s
            if not self.in_flight and (now_s - quiet_since_s >= BACKLOG_QUIET_S or now_s >= backlog_end_s):
                return
            await asyncio.sleep(0.01)


# ---- tensors: decode and encode, shared by both APIs -------------------------------------------


def array_from_bytes(data: bytes, shape: Sequence[int], field: str) -> np.ndarray:
    """Little-endian float32 bytes + shape -> a read-only array viewing `data` (no copy)."""
    check_dims(shape, field)
    shape = tuple(shape)  # a repeated int64 field: Python ints already (C-level conversion)
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around to a small count
    if len(data) != 4 * count:
        raise InvalidInput(
            f"{field}: shape {list(shape)} needs {4 * count} bytes of little-endian float32, got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=F32_LE).reshape(shape)


def check_dims(shape: Sequence[int], field: str) -> None:
    """At most MAX_DIMS dimensions (numpy refuses more than 64: an INTERNAL error, if not caught here), none
    negative (two would make a positive count)."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(
            f"{field}: shape {shape_text(shape)} has more than {MAX_DIMS} dimensions; inputs here have 1 or 2"
        )
    if shape and min(shape) < 0:
        raise InvalidInput(f"{field}: shape {list(shape)} has a negative dimension")


def tensor_array(tensor: pb.Tensor, field: str) -> np.ndarray:
    if not tensor.shape:
        raise InvalidInput(f"{field} is missing: send a Tensor with its shape and float32 data")
    return array_from_bytes(tensor.data, tensor.shape, field)


def tensor_proto(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=np.ascontiguousarray(array, dtype=F32_LE).tobytes(), shape=array.shape)


def fp32_contents(contents: oip.InferTensorContents, field: str) -> np.ndarray:
    """contents.fp32_contents as an array, without a Python float per element: proto3 packs a repeated
    float, so an InferTensorContents holding only field 6 serializes as tag 0x32, a varint byte length,
    then the little-endian float32 values."""
    others = [f.name for f, _ in contents.ListFields() if f.name != "fp32_contents"]
    if others:
        raise InvalidInput(
            f"{field}: datatype FP32 takes its values in contents.fp32_contents, got {', '.join(others)}"
        )
    wire = contents.SerializeToString()
    if not wire:
        return np.empty(0, dtype=F32_LE)
    length, shift, pos = 0, 0, 1
    while pos < len(wire):
        byte = wire[pos]
        length |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
        if byte < 0x80:
            break
    if wire[0] != 0x32 or pos + length != len(wire) or length % 4:
        return np.asarray(contents.fp32_contents, dtype=F32_LE)  # not the packed layout: decode the slow way
    return np.frombuffer(wire, dtype=F32_LE, offset=pos, count=length // 4)


def check_reply_size(values: int, what: str, advice: str, max_message_bytes: int) -> None:
    """Refuse, before any work, a request whose float32 reply would not fit in one message."""
    reply_bytes = 4 * values
    if reply_bytes > max_message_bytes - _RESPONSE_HEADROOM_BYTES:
        raise InvalidInput(
            f"{what} = {reply_bytes} bytes of float32 in the reply, above the server's max_message_bytes of {max_message_bytes}; {advice}"
        )


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
        for array, field in zip(inputs, fields, strict=False):
            check_finite(array, field)
        finite_output(scores, "scores")
    return scores


def feature_rows(
    array: np.ndarray, field: str, width: int, max_rows: int, limit: str, finite: bool = True
) -> np.ndarray:
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


def id_list(
    repeated: Sequence[int],
    packed: bytes,
    field: str,
    max_ids: int,
    limit: str,
    *,
    required: bool = True,
    distinct: bool = False,
) -> np.ndarray | None:
    """Ids sent as `field` (repeated int64) or `field`_packed (little-endian int64 bytes, decoded with no
    Python int per id), exactly one of the two; None when neither is sent and not `required`."""
    if len(repeated) and len(packed):
        raise InvalidInput(f"{field} and {field}_packed are both set; send the ids in one of them")
    if len(packed):
        if len(packed) % 8:
            raise InvalidInput(
                f"{field}_packed has {len(packed)} bytes; it holds little-endian int64 ids, 8 bytes each"
            )
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
    if distinct:
        ordered = np.sort(ids)
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if dup.size:
            raise InvalidInput(f"{field} must hold distinct ids; {int(dup[0])} appears more than once")
    return ids


def ids_required(repeated: Sequence[int], packed: bytes, field: str, max_ids: int, limit: str) -> np.ndarray:
    """id_list for a list that must be sent."""
    ids = id_list(repeated, packed, field, max_ids, limit)
    assert ids is not None  # required: id_list raised otherwise
    return ids


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The gRPC deadline as an absolute time.monotonic() value (None: the caller set none)."""
    remaining_s = context.time_remaining()
    return None if remaining_s is None else time.monotonic() + remaining_s


# ---- the common guard --------------------------------------------------------------------------


class Servicer:
    """`runtime` may be attached after construction (the server serves, door closed, during its warm-up).

    Versions (versions.py): `served` is the version a request naming none gets (a plain attribute the
    VersionTable keeps current: one read per request); `versions.resolve(name)` the one it names.
    `info` holds what every served version shares (shapes, limits: model_control refuses a version
    whose shapes differ); a reply names `served.info`'s version. `runtime` and `cache` are the
    current version's."""

    def __init__(
        self, info: ModelInfo, runtime: Runtime | None, cache, metrics, state: ServingState, versions=None
    ) -> None:
        from neuronserve.versions import ServedVersion, VersionTable

        self.info = info
        self.metrics = metrics
        self.state = state
        self.served = ServedVersion(int(info.oip_version), info, runtime, cache)
        self.versions = VersionTable(self.served) if versions is None else versions
        self.versions.listen(self._serve)

    def _serve(self, served) -> None:
        self.served = served

    @property
    def runtime(self) -> Runtime | None:
        return self.served.runtime

    @runtime.setter
    def runtime(self, runtime: Runtime | None) -> None:
        self.served.runtime = runtime

    @property
    def cache(self):
        return self.served.cache

    def _pass_door(self, context: grpc.aio.ServicerContext) -> None:
        """Unavailable while the door is closed; DeadlineExceeded for a request whose deadline already
        passed (a backlog shed at the door: nobody waits for it)."""
        self.state.check()
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s <= 0:
            raise DeadlineExceeded(
                f"the request's deadline passed {-remaining_s * 1e3:.1f} ms before it was served; the server is overloaded"
            )

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
        self.state.arrived += inference
        try:
            if inference:
                self._pass_door(context)
            reply = await handler(request, context)
        except NeuronServeError as exc:
            code = exc.status.code
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
        await context.abort(code, bounded(message))
