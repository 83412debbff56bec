"""The `cpu` backend: CPU-traced stages (torch.jit) run on the host, one torch thread per executor.

Below the pipeline, like the neuron backend: it loads each stage's graph at every compiled bucket and
runs only those shapes, so the CPU path exercises exactly what the device path does. The `sim`
backend wraps it for exact outputs.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from neuronserve.artifact import Manifest
from neuronserve.backends.base import Backend, StageRunner
from neuronserve.config import CoreGroup
from neuronserve.errors import BackendUnavailable


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, manifest: Manifest) -> None:
        if manifest.target != "cpu":
            raise BackendUnavailable(
                f"artifact {manifest.directory} was compiled for {manifest.target}; the cpu backend runs --target cpu artifacts "
                "(recompile with `neuronserve compile --target cpu`)"
            )
        super().__init__(manifest)
        # One thread per execution: the pipeline runs one executor thread per core group, and on a small
        # host intra-op threads of concurrent executions would only fight over the same cores.
        torch.set_num_threads(1)

    def load(self, stage: str, cores: CoreGroup) -> "CpuRunner":
        spec = self.manifest.stage(stage)
        graphs = {b.batch_size: torch.jit.load(str(self.manifest.path(b.file)), map_location="cpu") for b in spec.buckets}
        shapes = tuple(tuple(t.shape[1:]) for t in spec.inputs)
        return CpuRunner(stage, cores, graphs, shapes)


class CpuRunner(StageRunner):
    def __init__(self, stage: str, cores: CoreGroup, graphs: Dict[int, torch.jit.ScriptModule], shapes: Tuple[Tuple[int, ...], ...]) -> None:
        self.stage = stage
        self.cores = cores
        self.batch_sizes = tuple(sorted(graphs))
        self._graphs = graphs
        self._shapes = shapes

    def input_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        return self._shapes

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        graph = self._graphs[self.check_inputs(inputs)]
        # torch wants writable memory; a request's rows may be a read-only view of the message bytes.
        tensors = [torch.from_numpy(x if x.flags.writeable else x.copy()) for x in inputs]
        with torch.inference_mode():
            out = graph(*tensors)
        return out.numpy()
