"""The `sim` backend: simulated Inf1 NeuronCores over the CPU-traced stages.

Sits where the neuron backend sits, below the pipeline: the pipeline cannot tell them apart.
Outputs are exact (each stage runs its CPU-traced graph through CpuBackend's runner); the device is
emulated: `SimConfig.num_cores` cores, compiled shapes only, at most one execution per core at a
time (a group of N cores, e.g. a graph compiled with --neuroncore-pipeline-cores N, holds N), a
per-bucket latency model that every execution takes at least, injectable faults (a core that fails
or hangs, then resets), and a simulated clock: modelled busy seconds per core, so tests and reports
compute throughput in device time rather than on a noisy CPU's wall clock.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from neuronserve.artifact import Manifest, ModelConfig
from neuronserve.backends.base import Backend, StageRunner
from neuronserve.config import STAGES, CoreGroup, SimConfig
from neuronserve.errors import ConfigError, CoreFault, InvalidInput, NeuronServeError

# Latency model defaults, from published Inf1 figures (AWS Neuron SDK performance pages); an estimate, not a measurement.
# - Compute rate: BERT-base data parallel at batch 6 on inf1.xlarge runs 1,181 seq/s over 4 cores,
#   295 seq/s per core; one 128-token sequence is ~11.2 GMAC (85M encoder weights x 128 tokens plus
#   attention), so a NeuronCore-v1 sustains ~3.3e12 MAC/s on a large model.
# - Fixed cost per execution: BERT-base real time at batch 3 has p99 10.7 ms; its compute at that rate
#   is 3 x 11.2e9 / 3.3e12 = 10.2 ms, which leaves ~0.5 ms for the runtime's per-execution overhead.
# - Host<->device copies: BERT's inputs are a few KiB, so its figures say nothing about bandwidth; we
#   assume an effective 1 GB/s for a framework's small per-execution copies (PCIe Gen3 peaks far higher).
# For the demo two-tower MLP (64 -> 256 -> 128 -> 4x64) a tower row is 82 kMAC (25 ns at that rate)
# and 1.3 KiB of I/O (1.3 us): a small model is I/O- and overhead-bound, ~0.5 ms + 1.3 us per row.
NEURONCORE_MACS_PER_S = 3.3e12
EXECUTION_OVERHEAD_S = 0.5e-3
HOST_DEVICE_BYTES_PER_S = 1.0e9
FAULT_KINDS = ("fail", "hang")


@dataclass(frozen=True)
class StageLatency:
    """latency_s(batch) = fixed_s + per_row_s * batch, in modelled device seconds."""

    fixed_s: float
    per_row_s: float

    def latency_s(self, batch_size: int) -> float:
        return self.fixed_s + self.per_row_s * batch_size


@dataclass(frozen=True)
class LatencyModel:
    """Modelled device seconds of one execution per stage and bucket (before SimConfig.latency_scale)."""

    stages: Dict[str, StageLatency]

    def latency_s(self, stage: str, batch_size: int) -> float:
        return self.stages[stage].latency_s(batch_size)

    @classmethod
    def estimate(cls, config: ModelConfig) -> "LatencyModel":
        """Per row: its multiply-accumulates at NEURONCORE_MACS_PER_S plus its input and output bytes
        (float32) at HOST_DEVICE_BYTES_PER_S; per execution: EXECUTION_OVERHEAD_S."""
        projected = config.num_labels * config.label_dim

        def tower(features: int) -> StageLatency:
            widths = (features,) + config.hidden_sizes + (config.embedding_dim,)
            macs = sum(a * b for a, b in zip(widths, widths[1:])) + config.embedding_dim * projected
            io_bytes = 4 * (features + projected)
            return StageLatency(EXECUTION_OVERHEAD_S, macs / NEURONCORE_MACS_PER_S + io_bytes / HOST_DEVICE_BYTES_PER_S)

        scorer_bytes = 4 * (2 * projected + config.num_labels)
        return cls(
            {
                "user_tower": tower(config.user_features),
                "peer_tower": tower(config.peer_features),
                "pair_scorer": StageLatency(
                    EXECUTION_OVERHEAD_S, projected / NEURONCORE_MACS_PER_S + scorer_bytes / HOST_DEVICE_BYTES_PER_S
                ),
            }
        )


@dataclass(frozen=True)
class SimCoreStats:
    core: int
    busy_s: float  # modelled device seconds of completed executions (not scaled by latency_scale)
    executions: int
    faults: int
    healthy: bool


@dataclass(frozen=True)
class SimStats:
    """The simulated clock. If the busiest core never idled, the device finished its work in
    `busiest_core_s` modelled seconds: throughput in device time = work / busiest_core_s."""

    cores: Tuple[SimCoreStats, ...]
    executions: Dict[str, int]  # per stage, completed
    peak_in_flight: int  # most executions running at the same moment, device-wide

    @property
    def busy_s(self) -> float:
        return sum(c.busy_s for c in self.cores)

    @property
    def busiest_core_s(self) -> float:
        return max(c.busy_s for c in self.cores)


class _Core:
    """Mutable state of one simulated core; guarded by SimBackend._lock."""

    def __init__(self) -> None:
        self.busy = False
        self.busy_s = 0.0
        self.executions = 0
        self.faults = 0
        self.pending: Deque[str] = deque()  # injected fault kinds, for the next executions
        self.out_until_s = 0.0  # time.monotonic() when a faulted core is back in rotation


class SimBackend(Backend):
    """Simulated NeuronCores. `latency` defaults to LatencyModel.estimate(manifest.model_config);
    `inner` (the backend computing exact outputs) defaults to CpuBackend(manifest)."""

    name = "sim"

    def __init__(
        self,
        manifest: Manifest,
        sim: SimConfig = SimConfig(),
        latency: Optional[LatencyModel] = None,
        inner: Optional[Backend] = None,
    ) -> None:
        super().__init__(manifest)
        if inner is None:
            from neuronserve.backends.cpu import CpuBackend

            inner = CpuBackend(manifest)
        self.sim = sim
        self.latency = latency if latency is not None else LatencyModel.estimate(manifest.model_config)
        self._inner = inner
        self._lock = threading.Lock()
        self._cores = [_Core() for _ in range(sim.num_cores)]
        self._stage_executions = {stage: 0 for stage in STAGES}
        self._in_flight = 0
        self._peak_in_flight = 0

    def load(self, stage: str, cores: CoreGroup) -> StageRunner:
        if cores.last >= self.sim.num_cores:
            raise ConfigError(
                f"cannot load {stage} on cores {cores}: the simulated device has cores 0-{self.sim.num_cores - 1} (sim num_cores={self.sim.num_cores})"
            )
        pipeline_cores = self.manifest.pipeline_cores
        if cores.count % pipeline_cores:
            raise ConfigError(
                f"cannot load {stage} on cores {cores}: it was compiled with pipeline_cores={pipeline_cores}, "
                f"so its core group needs a multiple of {pipeline_cores} cores, not {cores.count}"
            )
        return SimRunner(self, stage, cores, self._inner.load(stage, cores))

    def inject_fault(self, core: int, kind: str, count: int = 1) -> None:
        """The next `count` executions touching `core` fail ("fail") or hang past core_timeout_s ("hang")."""
        if not 0 <= core < self.sim.num_cores:
            raise InvalidInput(f"fault core must be in 0-{self.sim.num_cores - 1}, got {core}")
        if kind not in FAULT_KINDS:
            raise InvalidInput(f"fault kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        if count < 1:
            raise InvalidInput(f"fault count must be >= 1, got {count}")
        with self._lock:
            self._cores[core].pending.extend([kind] * count)

    def stats(self) -> SimStats:
        now = time.monotonic()
        with self._lock:
            return SimStats(
                cores=tuple(
                    SimCoreStats(i, c.busy_s, c.executions, c.faults, c.out_until_s <= now) for i, c in enumerate(self._cores)
                ),
                executions=dict(self._stage_executions),
                peak_in_flight=self._peak_in_flight,
            )

    def healthy(self, cores: CoreGroup) -> bool:
        now = time.monotonic()
        with self._lock:
            return all(self._cores[c].out_until_s <= now for c in cores.cores)

    def _execute(
        self, stage: str, cores: CoreGroup, batch_size: int, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """Run `compute` as one execution on `cores`, taking at least the modelled time; blocking."""
        with self._lock:
            now = time.monotonic()
            for c in cores.cores:
                if self._cores[c].out_until_s > now:
                    raise CoreFault(
                        f"core {c} is resetting after a fault (back in {self._cores[c].out_until_s - now:.2f} s); "
                        f"it cannot run {stage} until then"
                    )
            core = next((c for c in cores.cores if not self._cores[c].busy), None)
            if core is None:
                raise NeuronServeError(
                    f"core group {cores} already runs {cores.count} execution(s), its maximum: the caller oversubscribed it"
                )
            fault_core = next((c for c in cores.cores if self._cores[c].pending), None)
            fault = self._cores[fault_core].pending.popleft() if fault_core is not None else None
            self._cores[core].busy = True
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        try:
            if fault is not None:
                self._fault(fault_core, fault, stage, batch_size)
            modelled_s = self.latency.latency_s(stage, batch_size)
            start = time.perf_counter()
            out = compute()
            remaining_s = modelled_s * self.sim.latency_scale - (time.perf_counter() - start)
            if remaining_s > 0:
                time.sleep(remaining_s)
            with self._lock:
                self._cores[core].busy_s += modelled_s
                self._cores[core].executions += 1
                self._stage_executions[stage] += 1
            return out
        finally:
            with self._lock:
                self._cores[core].busy = False
                self._in_flight -= 1

    def _fault(self, core: int, kind: str, stage: str, batch_size: int) -> None:
        if kind == "hang":
            time.sleep(self.sim.core_timeout_s)
            message = f"core {core} hung past its timeout of {self.sim.core_timeout_s:g} s running {stage} at batch {batch_size}"
        else:
            message = f"core {core} failed running {stage} at batch {batch_size}"
        with self._lock:
            self._cores[core].faults += 1
            self._cores[core].out_until_s = time.monotonic() + self.sim.reset_s
        raise CoreFault(f"{message}; it is out of rotation for its reset ({self.sim.reset_s:g} s)")

    def close(self) -> None:
        self._inner.close()


class SimRunner(StageRunner):
    """One stage on one simulated core group: checks shapes as the device does, then runs the
    CPU-traced graph as a simulated execution."""

    def __init__(self, device: SimBackend, stage: str, cores: CoreGroup, inner: StageRunner) -> None:
        self.stage = stage
        self.cores = cores
        self.batch_sizes = tuple(inner.batch_sizes)
        self.max_in_flight = cores.count
        self._device = device
        self._inner = inner
        self._shapes = tuple(inner.input_shapes())

    def input_shapes(self) -> Tuple[Tuple[int, ...], ...]:
        return self._shapes

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch_size = self.check_inputs(inputs)
        arrays: List[np.ndarray] = list(inputs)
        return self._device._execute(self.stage, self.cores, batch_size, lambda: self._inner.run(arrays))

    def healthy(self) -> bool:
        return self._device.healthy(self.cores)

    def latency_s(self, batch_size: int) -> Optional[float]:
        return self._device.latency.latency_s(self.stage, batch_size) * self._device.sim.latency_scale

    def close(self) -> None:
        self._inner.close()
