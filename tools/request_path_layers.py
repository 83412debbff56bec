"""Host CPU of neuronserve's own request path, layer by layer, in one process, without gRPC and without
the model (for profiling, not a benchmark of the server): the cpu backend's fused graph is replaced
by a stub that returns zeros of the right shape (swapped into the started server's fused runner), so
what is left is the service, the batcher, the pipeline and the launcher: a lone request takes the
lone-request lane (Pipeline.score_now), `score_requests` the batch path, both running the stub on the
loop. One request of 1 user x 128 peers at a time, then 64 callers at once (the stub runs on the loop,
so each of them too finds the batcher idle: no batching).

    python tools/request_path_layers.py ARTIFACT     # a --target cpu artifact with the fused graph
"""

import asyncio
import sys
import time

import numpy as np
import torch

from neuronserve.config import ServerConfig
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.server import Server


class _Context:
    def time_remaining(self):
        return None

    async def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


def _stub(user, peer, index):
    """The stand-in for the fused graph: zeros of the output's shape."""
    return torch.zeros((peer.shape[0], 4))


def _request() -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="twotower")
    request.inputs.add(name="USER_FEATURES", datatype="FP32", shape=[1, 64])
    request.inputs.add(name="PEER_FEATURES", datatype="FP32", shape=[128, 64])
    request.raw_input_contents.extend([np.zeros((1, 64), np.float32).tobytes(), np.zeros((128, 64), np.float32).tobytes()])
    return request


async def main(artifact: str) -> None:
    # inline_below 0.99: the launcher stays inline (a tight loop reads as a busy loop and would hand off)
    server = Server(ServerConfig(artifact=artifact, port=0, metrics_port=None, backend="cpu", inline_below=0.99))
    await server.start()
    runner = server.pipeline._groups[0].runners["twotower"]
    runner._graphs = {key: _stub for key in runner._graphs}  # what the loop runs (inline and the lane)
    service, request, context = server._servicers[1], _request(), _Context()
    user, peers = np.zeros((1, 64), np.float32), np.zeros((128, 64), np.float32)
    loop, executor = asyncio.get_running_loop(), server.pipeline._groups[0].executor

    async def per_call(label, call, n=3000):
        for _ in range(200):
            await call()
        start = time.process_time()
        for _ in range(n):
            await call()
        print(f"{label:44s} {1e6 * (time.process_time() - start) / n:7.1f} us CPU per request")

    await per_call("one thread hop (run_in_executor of a no-op)", lambda: loop.run_in_executor(executor, int))
    await per_call("pipeline.score_requests, 1 request", lambda: server.pipeline.score_requests([user], [peers]))
    await per_call("runtime.score (batcher + pipeline)", lambda: server.runtime.score(user, peers, None))
    await per_call("ModelInfer (service + the above)", lambda: service.ModelInfer(request, context))
    done = 0

    async def caller(stop_s):
        nonlocal done
        while time.monotonic() < stop_s:
            await service.ModelInfer(request, context)
            done += 1

    start = time.process_time()
    await asyncio.gather(*(caller(time.monotonic() + 3.0) for _ in range(64)))
    print(f"{'ModelInfer, 64 callers at once':44s} {1e6 * (time.process_time() - start) / done:7.1f} us CPU per request")
    await server.stop(grace_period_s=1.0)


if __name__ == "__main__":
    import uvloop

    uvloop.install()
    asyncio.run(main(sys.argv[1]))
