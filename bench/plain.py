"""The plain reference server: the obvious grpc.aio server a user would write for the same artifact.

Not on the serving path: `neuronserve bench --reference plain` starts it in a subprocess (reference.py)
and measures it with the same generator, so neuronserve's result can be given as a ratio of it. It
answers what the `score` and `oip` workloads send (Scorer/Score, ModelInfer of the two-tower model,
with ModelMetadata and ServerReady) with the same reply shapes, by running the artifact's CPU
TorchScript model once per request on the event loop (its fused `twotower` graph if it has one,
else the three stages): no batching, no executor, one torch thread. Run:
`python -m neuronserve.bench.plain --artifact DIR [--port 0] [--model twotower] [--three-stages]`;
it prints `plain ready: port=PORT pid=PID` on stdout when serving.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from neuronserve.bench.echo import bench_server, run_server, serve_until_signalled
from neuronserve.contract import FUSED_STAGE, STAGES

FUSED = FUSED_STAGE  # the artifact's one-graph stage, when it has one


Score = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (user [1, F_u], peers [M, F_p]) -> scores [M, K]


def load_model(manifest, fused: bool = True) -> Score:
    """score(user [1, F_u], peers [M, F_p]) -> scores [M, K]: the fused stage if asked for and there,
    else user_tower, peer_tower and pair_scorer; each graph from its largest bucket (CPU-traced graphs
    take any batch size)."""
    import torch

    torch.set_num_threads(1)

    def graph(stage: str):
        return torch.jit.load(str(manifest.path(manifest.stages[stage].buckets[-1].file)), map_location="cpu")

    if fused and FUSED in manifest.stages:
        twotower = graph(FUSED)

        def score_fused(user: np.ndarray, peers: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                index = torch.zeros(peers.shape[0], dtype=torch.int64)  # every peer row meets user 0
                return twotower(torch.from_numpy(user), torch.from_numpy(peers), index).numpy()

        return score_fused
    user_tower, peer_tower, pair_scorer = (graph(s) for s in STAGES)

    def score(user: np.ndarray, peers: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            u = user_tower(torch.from_numpy(user))
            p = peer_tower(torch.from_numpy(peers))
            return pair_scorer(u.expand(p.shape[0], -1, -1), p).numpy()

    return score


async def serve(artifact: str, port: int, model_name: str, fused: bool) -> None:
    """Serve `artifact`'s model on `port` (0: any) until SIGTERM or SIGINT; prints the ready line when serving."""
    from neuronserve.artifact import load_manifest
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    manifest = load_manifest(artifact)
    if manifest.target != "cpu":
        raise SystemExit(
            f"plain server: {artifact} is a {manifest.target} artifact; it runs --target cpu artifacts only"
        )
    score = load_model(manifest, fused)
    server = bench_server()
    pb_grpc.add_ScorerServicer_to_server(_scorer(score, manifest.model_config, manifest.model_version), server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(_inference(score, manifest.model_config, model_name), server)
    await serve_until_signalled(server, port, "plain ready: port={port} pid=" + str(os.getpid()))


def _features(data: bytes, shape, width: int) -> np.ndarray | None:
    """Float32 rows of `width`, writable (torch wants it); None when the bytes do not fit the shape."""
    shape = tuple(shape)
    if len(shape) != 2 or shape[1] != width or shape[0] < 1 or len(data) != 4 * shape[0] * width:
        return None
    return np.frombuffer(data, dtype="<f4").reshape(shape).copy()


async def _invalid(context, what: str) -> None:
    """Abort the call: INVALID_ARGUMENT naming the expected inputs."""
    import grpc

    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"{what}: expected float32 [rows, features] of the model's widths"
    )


async def _check_model(context, name: str, model_name: str) -> None:
    """Abort the call with NOT_FOUND unless it names the model this server answers to."""
    import grpc

    if name != model_name:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves {model_name}")


def _scorer(score: Score, cfg, version: str):
    """The Scorer servicer: Score, one user against M peers, the model once per request."""
    from neuronserve.protos import scorer_pb2 as pb
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    class Scorer(pb_grpc.ScorerServicer):
        async def Score(self, request, context):
            user = _features(request.user_features.data, request.user_features.shape, cfg.user_features)
            peers = _features(request.peer_features.data, request.peer_features.shape, cfg.peer_features)
            if user is None or user.shape[0] != 1 or peers is None:
                await _invalid(context, "user_features [1, F_u] and peer_features [M, F_p]")
            scores = score(user, peers)
            return pb.ScoreResponse(
                scores=pb.Tensor(data=scores.tobytes(), shape=scores.shape),
                label_names=cfg.label_names,
                model_version=version,
            )

    return Scorer()


def metadata_of(model_name: str, cfg, platform: str = "plain"):
    """The OIP ModelMetadataResponse of the two-tower model: USER_FEATURES, PEER_FEATURES -> SCORES."""
    from neuronserve.protos import open_inference_pb2 as oip

    meta = oip.ModelMetadataResponse.TensorMetadata
    return oip.ModelMetadataResponse(
        name=model_name,
        versions=["1"],  # an integer, as Triton's tools expect
        platform=platform,
        inputs=[
            meta(name="USER_FEATURES", datatype="FP32", shape=[1, cfg.user_features]),
            meta(name="PEER_FEATURES", datatype="FP32", shape=[-1, cfg.peer_features]),
        ],
        outputs=[meta(name="SCORES", datatype="FP32", shape=[-1, cfg.num_labels])],
    )


def model_config_of(metadata):
    """Triton's model configuration of the model in `metadata`, which perf_analyzer reads first."""
    from neuronserve.protos import open_inference_pb2 as oip

    config = oip.ModelConfig(name=metadata.name, platform=metadata.platform, max_batch_size=0)
    config.input.extend(oip.ModelInput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in metadata.inputs)
    config.output.extend(oip.ModelOutput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in metadata.outputs)
    return oip.ModelConfigResponse(config=config)


def _inference(score: Score, cfg, model_name: str):
    """The OIP servicer: ServerReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer of `model_name`."""
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

    metadata = metadata_of(model_name, cfg)

    class Inference(oip_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):
            return oip.ServerReadyResponse(ready=True)

        async def ModelMetadata(self, request, context):
            await _check_model(context, request.name, model_name)
            return metadata

        async def ServerMetadata(self, request, context):
            return oip.ServerMetadataResponse(name="plain", version="1", extensions=["model_configuration"])

        async def ModelConfig(self, request, context):
            return model_config_of(metadata)

        async def ModelInfer(self, request, context):
            await _check_model(context, request.model_name, model_name)
            raw = dict(zip((t.name for t in request.inputs), request.raw_input_contents, strict=False))
            shapes = {t.name: t.shape for t in request.inputs}
            user = _features(raw.get("USER_FEATURES", b""), shapes.get("USER_FEATURES", ()), cfg.user_features)
            peers = _features(raw.get("PEER_FEATURES", b""), shapes.get("PEER_FEATURES", ()), cfg.peer_features)
            if user is None or user.shape[0] != 1 or peers is None:
                await _invalid(context, "USER_FEATURES [1, F_u] and PEER_FEATURES [M, F_p] in raw_input_contents")
            scores = score(user, peers)
            response = oip.ModelInferResponse(model_name=model_name, model_version="1", id=request.id)
            response.outputs.add(name="SCORES", datatype="FP32", shape=scores.shape)
            response.raw_output_contents.append(scores.tobytes())
            return response

    return Inference()


def main() -> None:
    parser = argparse.ArgumentParser(
        description="plain reference gRPC server: the model once per request on the event loop, no batching"
    )
    parser.add_argument("--artifact", required=True, help="a --target cpu artifact directory")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="twotower", help="the OIP model name it answers to (default twotower)")
    parser.add_argument(
        "--three-stages",
        action="store_true",
        help="run user_tower, peer_tower, pair_scorer even if the artifact has the fused stage",
    )
    args = parser.parse_args()
    run_server(serve(args.artifact, args.port, args.model, not args.three_stages), "plain server")


if __name__ == "__main__":
    main()
