"""The tick's direction graph on a backend's cores (tick_device.TickDevice), one block per execution.

SimTick: the host computes the block exactly as the cpu path does (tick.HostDirection, so values and
ties equal the host tick's), then a device phase of tick_latency_s on the simulated core that frees
first. NeuronTick: the artifact's tick graphs (contract.TICK_GRAPH_FILES) replicated over the process's
NeuronCores. Why the work splits this way, and the block: docs/tick.md, "On NeuronCores".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from neuronserve.backends.sim import EXECUTION_OVERHEAD_S, HOST_DEVICE_BYTES_PER_S, NEURONCORE_MACS_PER_S
from neuronserve.config import CoreGroup
from neuronserve.contract import TICK_BLOCK, TICK_GRAPH
from neuronserve.errors import CoreFault
from neuronserve.tick import LOGIT, PROBABILITY, HostDirection, TickSpec

if TYPE_CHECKING:
    from neuronserve.backends.neuron import NeuronBackend
    from neuronserve.backends.sim import SimBackend


def tick_latency_s(k: int, d: int, rows: int, columns: int) -> float:
    """Modelled device seconds of one tick execution of K labels of D: the execution overhead, rows x
    columns x K x D multiply-accumulates, and the copies (both sides' vectors in, one float32 per pair out)."""
    copied_bytes = 4 * ((rows + columns) * k * d + 2 * k + rows * columns)
    return (
        EXECUTION_OVERHEAD_S + rows * columns * k * d / NEURONCORE_MACS_PER_S + copied_bytes / HOST_DEVICE_BYTES_PER_S
    )


class SimTick:
    """The tick on the simulated cores: `executions` = cores x in-flight per core, block TICK_BLOCK."""

    def __init__(self, backend: SimBackend, block: tuple[int, int] = TICK_BLOCK) -> None:
        self.rows, self.columns = block
        self.executions = backend.sim.num_cores * backend.in_flight_per_core
        config = backend.manifest.model_config
        self.modelled_s = tick_latency_s(config.num_labels, config.label_dim, *block)
        self._backend = backend

    def run(
        self, left: np.ndarray, right: np.ndarray, bias: np.ndarray, weights: np.ndarray, logit: bool
    ) -> np.ndarray:
        spec = TickSpec(1, weights, LOGIT if logit else PROBABILITY)
        out = np.empty((self.rows, self.columns), np.float32)
        HostDirection(left, right, bias, spec).block(0, self.rows, out)
        self._backend.device_phase(TICK_GRAPH, self.modelled_s)
        return out


class NeuronTick:
    """The artifact's tick graphs on `cores` (replicas, round-robin executions); two executions in
    flight per core, so the host prepares the next block while the device runs one."""

    def __init__(self, backend: NeuronBackend, cores: CoreGroup) -> None:
        graphs = backend.manifest.tick_graphs
        self.rows, self.columns = backend.manifest.tick_block
        self.executions = 2 * cores.count
        self.cores = cores
        modules = backend.load_files(list(graphs.values()), cores)
        self._modules = {space: modules[name] for space, name in graphs.items()}

    def run(
        self, left: np.ndarray, right: np.ndarray, bias: np.ndarray, weights: np.ndarray, logit: bool
    ) -> np.ndarray:
        graph = self._modules[LOGIT if logit else PROBABILITY]
        tensors = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in (left, right, bias, weights)]
        try:
            with torch.inference_mode():
                out = graph(*tensors)
        except RuntimeError as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CoreFault(f"NeuronCores {self.cores} failed running the tick graph: {first_line}") from None
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)
