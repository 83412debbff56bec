"""Issue 9's probe, for comparison only (not on the serving path): a minimal grpc.aio OIP server with one
future per request, a work-conserving batcher (the worker thread takes everything pending the moment
it is free) and one TorchScript call per batch (the artifact's fused graph) on one worker thread.
No validation, no metrics, no deadlines: the floor of what this request path can cost in Python.

    python tools/probe_server.py ARTIFACT PORT     # prints "probe ready: port=PORT"
"""

import asyncio
import sys
import threading

import numpy as np
import torch

from neuronserve.artifact import load_manifest
from neuronserve.bench.echo import bench_server, serve_until_signalled
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc


async def main(artifact: str, port: int) -> None:
    torch.set_num_threads(1)
    manifest = load_manifest(artifact)
    graph = torch.jit.load(str(manifest.path(manifest.stages["twotower"].buckets[-1].file)), map_location="cpu")
    cfg = manifest.model_config
    loop = asyncio.get_running_loop()
    pending: list = []
    ready = threading.Condition()

    def resolve(items, outs) -> None:
        for (_, _, future), out in zip(items, outs):
            if not future.done():
                future.set_result(out)

    def worker() -> None:
        while True:
            with ready:
                while not pending:
                    ready.wait()
                items = pending[:]
                pending.clear()
            counts = [p.shape[0] for _, p, _ in items]
            index = torch.from_numpy(np.repeat(np.arange(len(items)), counts))
            users = torch.from_numpy(np.concatenate([u for u, _, _ in items]))
            peers = torch.from_numpy(np.concatenate([p for _, p, _ in items]))
            with torch.inference_mode():
                out = graph(users, peers, index).numpy()
            loop.call_soon_threadsafe(resolve, items, np.split(out, np.cumsum(counts)[:-1]))

    threading.Thread(target=worker, daemon=True).start()
    meta = oip.ModelMetadataResponse.TensorMetadata
    inputs = [meta(name="USER_FEATURES", datatype="FP32", shape=[1, cfg.user_features]), meta(name="PEER_FEATURES", datatype="FP32", shape=[-1, cfg.peer_features])]
    outputs = [meta(name="SCORES", datatype="FP32", shape=[-1, cfg.num_labels])]

    class Inference(oip_grpc.GRPCInferenceServiceServicer):
        async def ServerReady(self, request, context):
            return oip.ServerReadyResponse(ready=True)

        async def ServerMetadata(self, request, context):
            return oip.ServerMetadataResponse(name="probe", version="1")

        async def ModelMetadata(self, request, context):
            return oip.ModelMetadataResponse(name="twotower", versions=["1"], platform="probe", inputs=inputs, outputs=outputs)

        async def ModelConfig(self, request, context):
            config = oip.ModelConfig(name="twotower", platform="probe", max_batch_size=0)
            config.input.extend(oip.ModelInput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in inputs)
            config.output.extend(oip.ModelOutput(name=t.name, data_type=oip.TYPE_FP32, dims=t.shape) for t in outputs)
            return oip.ModelConfigResponse(config=config)

        async def ModelInfer(self, request, context):
            raw = dict(zip((t.name for t in request.inputs), request.raw_input_contents))
            user = np.frombuffer(raw["USER_FEATURES"], dtype="<f4").reshape(1, cfg.user_features)
            peers = np.frombuffer(raw["PEER_FEATURES"], dtype="<f4").reshape(-1, cfg.peer_features)
            future = loop.create_future()
            with ready:
                pending.append((user, peers, future))
                ready.notify()
            scores = await future
            reply = oip.ModelInferResponse(model_name="twotower", model_version="1", id=request.id)
            reply.outputs.add(name="SCORES", datatype="FP32", shape=scores.shape)
            reply.raw_output_contents.append(scores.tobytes())
            return reply

    server = bench_server()
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), server)
    await serve_until_signalled(server, port, "probe ready: port={port}")


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
