"""Issue 9's probe, a second reference server for bench (`neuronserve bench --reference probe`): the
minimal grpc.aio OIP server the issue's targets were derived from. One future per request, a
work-conserving batcher (its worker thread takes everything pending the moment it is free) and one
TorchScript call per batch (the artifact's fused graph) on that thread. No validation, admission,
deadlines or metrics: the floor of what this request path can cost in Python, not a server to deploy
(past its capacity its queue keeps what callers gave up on, and it does not recover).

    python -m neuronserve.bench.probe --artifact DIR [--port 0] [--model twotower]

prints `probe ready: port=PORT` on stdout when serving. It answers the `oip` workload only.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import numpy as np

from neuronserve.bench.echo import bench_server, run_server, serve_until_signalled
from neuronserve.bench.plain import metadata_of, model_config_of
from neuronserve.contract import FUSED_STAGE


class _Batcher:
    """The probe's batcher: `submit` (on the loop) queues a request and returns its future; one worker
    thread takes everything pending the moment it is free, runs the graph once on it, and answers the
    futures on the loop."""

    def __init__(self, graph, loop: asyncio.AbstractEventLoop) -> None:
        self._graph, self._loop = graph, loop
        self._pending: list = []
        self._ready = threading.Condition()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, user: np.ndarray, peers: np.ndarray) -> asyncio.Future:
        future = self._loop.create_future()
        with self._ready:
            self._pending.append((user, peers, future))
            self._ready.notify()
        return future

    def _work(self) -> None:
        import torch

        while True:
            with self._ready:
                while not self._pending:
                    self._ready.wait()
                items, self._pending = self._pending, []
            counts = [p.shape[0] for _, p, _ in items]
            index = torch.from_numpy(np.repeat(np.arange(len(items)), counts))
            users = torch.from_numpy(np.concatenate([u for u, _, _ in items]))
            peers = torch.from_numpy(np.concatenate([p for _, p, _ in items]))
            with torch.inference_mode():
                out = self._graph(users, peers, index).numpy()
            self._loop.call_soon_threadsafe(_resolve, items, np.split(out, np.cumsum(counts)[:-1]))


def _resolve(items, outs) -> None:
    for (_, _, future), out in zip(items, outs, strict=True):
        if not future.done():
            future.set_result(out)


def _inference(batcher: _Batcher, cfg, model_name: str):
    """The OIP servicer: the metadata calls as plain's, ModelInfer through the batcher (no validation)."""
    from neuronserve.protos import open_inference_pb2 as oip
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

    metadata = metadata_of(model_name, cfg, "probe")

    class Inference(oip_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):
            return oip.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request, context):
            return oip.ServerMetadataResponse(name="probe", version="1", extensions=["model_configuration"])

        async def ModelMetadata(self, request, context):
            return metadata

        async def ModelConfig(self, request, context):
            return model_config_of(metadata)

        async def ModelInfer(self, request, context):
            raw = dict(zip((t.name for t in request.inputs), request.raw_input_contents, strict=True))
            user = np.frombuffer(raw["USER_FEATURES"], dtype="<f4").reshape(1, cfg.user_features)
            peers = np.frombuffer(raw["PEER_FEATURES"], dtype="<f4").reshape(-1, cfg.peer_features)
            scores = await batcher.submit(user, peers)
            reply = oip.ModelInferResponse(model_name=model_name, model_version="1", id=request.id)
            reply.outputs.add(name="SCORES", datatype="FP32", shape=scores.shape)
            reply.raw_output_contents.append(scores.tobytes())
            return reply

    return Inference()


async def serve(artifact: str, port: int, model_name: str) -> None:
    """Serve `artifact`'s fused graph on `port` (0: any) until SIGTERM or SIGINT."""
    import torch

    from neuronserve.artifact import load_manifest
    from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

    torch.set_num_threads(1)
    manifest = load_manifest(artifact)
    if manifest.target != "cpu" or FUSED_STAGE not in manifest.stages:
        raise SystemExit(f"probe: {artifact} is not a --target cpu artifact with the fused {FUSED_STAGE} stage")
    graph = torch.jit.load(str(manifest.path(manifest.stages[FUSED_STAGE].buckets[-1].file)), map_location="cpu")
    batcher = _Batcher(graph, asyncio.get_running_loop())
    server = bench_server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(_inference(batcher, manifest.model_config, model_name), server)
    await serve_until_signalled(server, port, "probe ready: port={port}")


def main() -> None:
    parser = argparse.ArgumentParser(description="issue 9's probe: a work-conserving batcher on one worker thread")
    parser.add_argument("--artifact", required=True, help="a --target cpu artifact directory")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="twotower", help="the OIP model name it answers to (default twotower)")
    args = parser.parse_args()
    run_server(serve(args.artifact, args.port, args.model), "probe")


if __name__ == "__main__":
    main()
