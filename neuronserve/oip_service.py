"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2) plus Triton's ModelConfig and
ModelStatistics, which perf_analyzer calls. Built on service.py's guard and codec."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from neuronserve import __version__
from neuronserve.experiments import DEFAULT
from neuronserve.errors import InvalidInput, ModelControlError, NotFound
from neuronserve.pool_stats import PoolStatistics, worker_scope
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.service import (
    F32_LE,
    FP32,
    MAX_REQUEST_ID_BYTES,
    TOWERS,
    TRITON_EXTENSIONS,
    TWOTOWER,
    UNKNOWN_MODEL,
    ModelInfo,
    Runtime,
    Servicer,
    ServingState,
    array_from_bytes,
    check_dims,
    check_reply_size,
    deadline_of,
    echo,
    feature_rows,
    finite_output,
    fp32_contents,
    one_user,
    scores_checked,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OipTensor:
    name: str
    shape: tuple[int, ...]  # -1 marks a variable dimension (ModelMetadata reports it so)


@dataclass(frozen=True)
class OipModel:
    name: str
    inputs: tuple[OipTensor, ...]
    outputs: tuple[OipTensor, ...]

    @functools.cached_property
    def input_fields(self) -> tuple[str, ...]:
        """How errors name the inputs, in order."""
        return tuple(f"input {t.name}" for t in self.inputs)

    @functools.cached_property
    def input_index(self) -> dict[str, int]:
        """Input name -> its position in `inputs`."""
        return {t.name: i for i, t in enumerate(self.inputs)}

    @functools.cached_property
    def output_row_values(self) -> int:
        """Values per row of the one output (the product of its shape past the variable first dimension)."""
        return math.prod(self.outputs[0].shape[1:])


def oip_models(info: ModelInfo) -> dict[str, OipModel]:
    k, d = info.num_labels, info.label_dim
    return {
        TWOTOWER: OipModel(
            TWOTOWER,
            (OipTensor("USER_FEATURES", (1, info.user_features)), OipTensor("PEER_FEATURES", (-1, info.peer_features))),
            (OipTensor("SCORES", (-1, k)),),
        ),
        TOWERS[0]: OipModel(
            TOWERS[0], (OipTensor("FEATURES", (-1, info.user_features)),), (OipTensor("EMBEDDINGS", (-1, k, d)),)
        ),
        TOWERS[1]: OipModel(
            TOWERS[1], (OipTensor("FEATURES", (-1, info.peer_features)),), (OipTensor("EMBEDDINGS", (-1, k, d)),)
        ),
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


def user_id_of(parameters) -> int | None:
    """ModelInfer's request parameter `user_id` (int64, or a decimal string of one) for an A/B
    experiment; None when unset (the request is outside an A/B)."""
    if "user_id" not in parameters:
        return None
    parameter = parameters["user_id"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return int(parameter.int64_param)
    if kind == "string_param":
        try:
            value = int(parameter.string_param)
        except ValueError:
            value = None
        if value is not None and -(2**63) <= value < 2**63:
            return value
    raise InvalidInput(f"parameter user_id must be an int64 (or a decimal string of one), got {echo(str(parameter))}")


class InferenceService(Servicer, oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: models `twotower` (SCORES [M, K] logits) and the two towers;
    the OIP's six RPCs plus Triton's ModelConfig and ModelStatistics, which perf_analyzer calls."""

    def __init__(
        self,
        info: ModelInfo,
        runtime: Runtime | None,
        cache,
        metrics,
        state: ServingState,
        peer_addresses: Callable[[], list[str]] | None = None,
        versions=None,
    ) -> None:
        """`peer_addresses`: a pool's other workers, whose counters ModelStatistics adds (pool_stats.py);
        `versions`: the server's VersionTable (default: one of this runtime and cache)."""
        super().__init__(info, runtime, cache, metrics, state, versions)
        self.models = oip_models(info)
        self.pool = PoolStatistics(peer_addresses) if peer_addresses is not None else None

    async def ServerLive(self, request, context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.state.ready)

    async def ModelReady(self, request: oip.ModelReadyRequest, context) -> oip.ModelReadyResponse:
        known = (
            request.name in self.models
            and self.versions.loaded
            and (not request.version or self.versions.serves(request.version))
        )
        return oip.ModelReadyResponse(ready=known and self.state.model_ready(request.name))

    async def ServerMetadata(self, request, context) -> oip.ServerMetadataResponse:
        extensions = list(TRITON_EXTENSIONS) + (["model_repository"] if self.control is not None else [])
        return oip.ServerMetadataResponse(name="neuronserve", version=__version__, extensions=extensions)

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        return await self._answer(context, self._label(request.name), self._metadata, request, inference=False)

    async def ModelInfer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        return await self._answer(context, self._label(request.model_name), self._infer, request)

    async def ModelConfig(self, request: oip.ModelConfigRequest, context) -> oip.ModelConfigResponse:
        return await self._answer(context, self._label(request.name), self._config, request, inference=False)

    async def ModelStatistics(self, request: oip.ModelStatisticsRequest, context) -> oip.ModelStatisticsResponse:
        return await self._answer(context, self._label(request.name), self._statistics, request, inference=False)

    # Triton's model repository extension: model_control.ModelControl answers (`control`, set by the
    # server; None: a server without a repository's control answers FAILED_PRECONDITION).
    control = None
    admin = None  # admin_auth.AdminGuard when --admin-token-file is set: the repository RPCs need the token
    pool_loads = None  # pool_loads.PoolLoads of a pool's worker: loads and unloads reach the other workers
    carry = None  # pool_carry.CarriedStatistics of a pool's worker: its predecessor's counts

    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context) -> oip.RepositoryIndexResponse:
        return await self._answer(context, UNKNOWN_MODEL, self._repository_index, request, inference=False)

    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context
    ) -> oip.RepositoryModelLoadResponse:
        return await self._answer(context, UNKNOWN_MODEL, self._repository_load, request, inference=False)

    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context
    ) -> oip.RepositoryModelUnloadResponse:
        return await self._answer(context, UNKNOWN_MODEL, self._repository_unload, request, inference=False)

    def _control(self, context):
        if self.admin is not None:
            self.admin.check(context)
        if self.control is None:
            raise ModelControlError(
                "this server has no model repository control; serve with --model-repository DIR (and --model-control explicit to load and unload)"
            )
        return self.control

    async def _repository_index(self, request, context) -> oip.RepositoryIndexResponse:
        entry = oip.RepositoryIndexResponse.ModelIndex
        rows = self._control(context).index(ready_only=request.ready)
        return oip.RepositoryIndexResponse(
            models=[entry(name=r.model, version=str(r.version), state=r.state, reason=r.reason) for r in rows]
        )

    async def _repository_load(self, request, context) -> oip.RepositoryModelLoadResponse:
        config = request.parameters["config"].string_param if "config" in request.parameters else ""
        await self._control(context).load(request.model_name, config or None)
        await self._to_pool("RepositoryModelLoad", request, context)
        return oip.RepositoryModelLoadResponse()

    async def _repository_unload(self, request, context) -> oip.RepositoryModelUnloadResponse:
        version = request.parameters.get("version")  # beyond Triton: one version
        text = (
            ""
            if version is None
            else (version.string_param or (str(version.int64_param) if version.int64_param else ""))
        )
        await self._control(context).unload(request.model_name, text)
        await self._to_pool("RepositoryModelUnload", request, context)
        return oip.RepositoryModelUnloadResponse()

    async def _to_pool(self, method: str, request, context) -> None:
        """A client's load or unload, applied here, goes to the pool's other workers too."""
        if self.pool_loads is not None and not worker_scope(context):
            await self.pool_loads.forward(method, request, context)

    def _label(self, name: str) -> str:
        """A model name as the metrics and the log name it: a model served, else UNKNOWN_MODEL (a client's
        string never becomes a label or a log line)."""
        return name if name in self.models else UNKNOWN_MODEL

    def _model(self, name: str, version: str) -> OipModel:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"unknown model {echo(name)}; this server serves {', '.join(self.models)}")
        if version and not self.versions.serves(version):
            served = ", ".join(
                f"{s.info.oip_version!r} (artifact version {s.info.version!r}, also accepted)"
                for s in self.versions.all()
            )
            raise NotFound(f"model {name} has no version {echo(version)}; it serves version {served}, or send none")
        return model

    async def _metadata(self, request: oip.ModelMetadataRequest, context) -> oip.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        served = self.versions.resolve(request.version)
        meta = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[s.info.oip_version for s in self.versions.all()],
            platform=served.info.oip_platform,
            inputs=[meta(name=t.name, datatype=FP32, shape=t.shape) for t in model.inputs],
            outputs=[meta(name=t.name, datatype=FP32, shape=t.shape) for t in model.outputs],
        )

    async def _config(self, request: oip.ModelConfigRequest, context) -> oip.ModelConfigResponse:
        """Triton's model configuration: max_batch_size 0 because batching is inside the server, on rows
        (peers), so shapes are given whole, as in ModelMetadata."""
        model = self._model(request.name, request.version)
        config = oip.ModelConfig(
            name=model.name,
            platform=self.versions.resolve(request.version).info.oip_platform,
            backend="neuronserve",
            max_batch_size=0,
        )
        config.input.extend(oip.ModelInput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in model.inputs)
        config.output.extend(oip.ModelOutput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in model.outputs)
        return oip.ModelConfigResponse(config=config)

    async def _statistics(self, request: oip.ModelStatisticsRequest, context) -> oip.ModelStatisticsResponse:
        """Cumulative counters of one model, or of every OIP model when no name is given. `twotower`
        counts the scorer API's Score too: it is the same model."""
        names = [self._model(request.name, request.version).name] if request.name else list(self.models)
        reply = self.own_statistics(names, request.version)
        if self.pool is not None and not worker_scope(context):
            await self.pool.add_peers(reply, request)
        return reply

    def own_statistics(self, names: list[str] | None = None, version: str = "") -> oip.ModelStatisticsResponse:
        """This process's counters of `names` (default: every model) for `version` (default: the current
        one), with what a pool worker carried over its predecessor's exit (pool_carry.py)."""
        number = self.versions.resolve(version).info.oip_version
        reply = oip.ModelStatisticsResponse(
            model_stats=[model_statistics(self.metrics.statistics(n), number) for n in names or self.models]
        )
        if self.carry is not None:
            self.carry.add_to(reply)
        return reply

    async def _infer(self, request: oip.ModelInferRequest, context) -> oip.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        if (id_bytes := len(request.id.encode())) > MAX_REQUEST_ID_BYTES:
            raise InvalidInput(
                f"id is {id_bytes} bytes, above {MAX_REQUEST_ID_BYTES}: the reply echoes it; send a shorter id"
            )
        user_id = user_id_of(request.parameters) if self.versions.experiment is not None else None
        route = self.versions.route(request.model_version, user_id)
        served = route.served
        _refuse_extensions(request)
        arrays = self._inputs(model, request)
        output = model.outputs[0].name  # each model has one output; a request may name it, once
        if request.outputs:
            names = [o.name for o in request.outputs]
            for name in names:
                if name != output:
                    raise InvalidInput(f"model {model.name} has no output {echo(name)}; its outputs are {output}")
            if len(names) > 1:
                raise InvalidInput(
                    f"outputs: each output may be requested once, got {len(names)}: {', '.join(map(echo, names[:8]))}"
                )
        rows = arrays[-1].shape[0]  # PEER_FEATURES or FEATURES: the variable dimension of the one output
        per_row = model.output_row_values
        check_reply_size(
            rows * per_row,
            f"{rows} rows x {per_row} values of {model.outputs[0].name}",
            "send fewer rows per request",
            self.info.max_message_bytes,
        )
        deadline_s = deadline_of(context)
        if model.name == TWOTOWER:
            out = await served.runtime.score(arrays[0], arrays[1], deadline_s)
            scores_checked(out, arrays, model.input_fields)
        else:
            out = finite_output(await served.runtime.embed(model.name, arrays[0], deadline_s), model.outputs[0].name)
        data = np.ascontiguousarray(out, dtype=F32_LE).tobytes()
        # raw contents, as Triton answers
        response = oip.ModelInferResponse(model_name=model.name, model_version=served.info.oip_version, id=request.id)
        if route.arm != DEFAULT:  # explicit | control | candidate; absent: default (a reply as Triton's)
            response.parameters["arm"].string_param = route.arm
        if route.burn_in:  # switch-back: in the burn-in after a switch
            response.parameters["burn_in"].bool_param = True
        response.outputs.add(name=output, datatype=FP32, shape=out.shape)  # (nested kwargs: 2x slower)
        response.raw_output_contents.append(data)
        return response

    def _inputs(self, model: OipModel, request: oip.ModelInferRequest) -> list[np.ndarray]:
        """The request's inputs in the model's order, decoded from raw_input_contents or typed contents."""
        raw, tensors = request.raw_input_contents, request.inputs
        if raw and len(raw) != len(tensors):
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs; send one per input, in order"
            )
        order = model.input_index
        arrays: list[np.ndarray | None] = [None] * len(model.inputs)
        for position, tensor in enumerate(tensors):
            name = tensor.name
            index = order.get(name)
            if index is None:
                raise InvalidInput(f"model {model.name} has no input {echo(name)}; its inputs are {', '.join(order)}")
            field = model.input_fields[index]
            if arrays[index] is not None:
                raise InvalidInput(f"{field} is given twice")
            if tensor.datatype != FP32:
                raise InvalidInput(f"{field}: datatype must be FP32, got {echo(tensor.datatype)}")
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidInput(
                        f"{field}: contents must be empty when raw_input_contents is used (one or the other)"
                    )
                array = array_from_bytes(raw[position], tensor.shape, field)
            else:
                check_dims(tensor.shape, field)
                flat = fp32_contents(tensor.contents, field)
                count = math.prod(tensor.shape)
                if flat.size != count:
                    raise InvalidInput(
                        f"{field}: shape {list(tensor.shape)} needs {count} values in contents.fp32_contents, got {flat.size}"
                    )
                array = flat.reshape(tuple(tensor.shape))
            arrays[index] = self._check(model.inputs[index], array, field)
        missing = [t.name for t, a in zip(model.inputs, arrays, strict=False) if a is None]
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


UNSUPPORTED_PARAMETERS = {  # Triton's extensions a tensor's parameters may ask for, not served here
    "classification": "the classification extension (class_count)",
    "shared_memory_region": "the shared-memory extensions",
}


def _refuse_extensions(request: oip.ModelInferRequest) -> None:
    """INVALID_ARGUMENT for a tensor asking for an extension this server does not serve, rather than an
    answer that silently ignores it (plain scores where top classes were asked for)."""
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            if not tensor.parameters:  # the usual case: one cheap check
                continue
            for key, what in UNSUPPORTED_PARAMETERS.items():
                if key in tensor.parameters:
                    raise InvalidInput(
                        f"{kind} {echo(tensor.name)}: parameter {key!r} asks for {what}, which this server does not "
                        "serve; send the tensor's data in the request and read the full output"
                    )
