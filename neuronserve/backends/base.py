"""The one Backend interface: load a stage on a core group, run a batch at a compiled bucket.

The pipeline (above) calls a StageRunner from the executor thread that owns its core group;
everything below (torch, torch-neuron, the simulated device) stays behind this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import numpy as np

from neuronserve.artifact import Manifest
from neuronserve.config import CoreGroup
from neuronserve.errors import InvalidInput


class StageRunner(ABC):
    """One traced stage loaded on one core group, at every compiled bucket.

    `run` is blocking and is called from the group's executor thread(s); at most `max_in_flight`
    calls run at once (1, or N for a graph compiled with --neuroncore-pipeline-cores N).
    Inputs are C-contiguous float32 arrays whose first dimension is exactly one of `batch_sizes`;
    any other shape is an InvalidInput error, as on the device. Returns a float32 array.
    """

    stage: str
    cores: CoreGroup
    batch_sizes: Tuple[int, ...]
    max_in_flight: int = 1

    @abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray: ...

    def warmup(self) -> None:
        """Run every bucket once on zeros (loads the graph onto the core)."""
        spec_shapes = self.input_shapes()
        for batch in self.batch_sizes:
            self.run([np.zeros((batch,) + shape, dtype=np.float32) for shape in spec_shapes])

    @abstractmethod
    def input_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        """Per input, the shape without the batch dimension."""

    def check_inputs(self, inputs: Sequence[np.ndarray]) -> int:
        """The batch size, after checking `inputs` are compiled shapes (as the device requires): one
        C-contiguous float32 array per input, the same batch B for all, B one of `batch_sizes`."""
        shapes = self.input_shapes()
        if len(inputs) != len(shapes):
            raise InvalidInput(f"{self.stage} takes {len(shapes)} input(s), got {len(inputs)}")
        batch_size = inputs[0].shape[0] if inputs[0].ndim else -1
        for i, (array, shape) in enumerate(zip(inputs, shapes)):
            if array.dtype != np.float32 or not array.flags.c_contiguous:
                raise InvalidInput(f"{self.stage} input {i} must be a C-contiguous float32 array, got {array.dtype}")
            if array.shape != (batch_size,) + tuple(shape) or batch_size not in self.batch_sizes:
                raise InvalidInput(
                    f"{self.stage} input {i} has shape {tuple(array.shape)}; the device runs only compiled shapes "
                    f"(B, {', '.join(map(str, shape))}) with B in {list(self.batch_sizes)}, the same B for every input"
                )
        return batch_size

    def healthy(self) -> bool:
        """False while the core group is out of rotation (faulted, resetting): the pipeline routes around it."""
        return True

    def latency_s(self, batch_size: int) -> Optional[float]:
        """Expected seconds of one execution at `batch_size` (a bucket) if the backend models its device
        (sim); None: unknown, and the pipeline times one run per bucket at start-up instead."""
        return None

    def close(self) -> None:
        """Release the core group (default: nothing to release)."""


class Backend(ABC):
    """A way to run an artifact's stages: cpu (torch.jit), neuron (torch-neuron), sim (simulated cores)."""

    name: str

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    @abstractmethod
    def load(self, stage: str, cores: CoreGroup) -> StageRunner:
        """Load `stage` at every compiled bucket onto `cores`."""

    def buckets(self, stage: str) -> Tuple[int, ...]:
        return self.manifest.stage(stage).batch_sizes

    def close(self) -> None:
        """Release everything the backend holds."""
