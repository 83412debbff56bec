"""The `sim` backend: simulated Inf1 NeuronCores over the CPU-traced stages, below the pipeline.

Contract: outputs exact (the CPU-traced graphs); compiled shapes only; per core at most
`in_flight_per_core` executions, device phases never overlapping, each lasting the latency model's
time; injected faults fail exactly one execution and take the core out of rotation for reset_s. Time
is injectable (`clock`, `sleep`) so tests run on a fake clock. The execution model, the faults and the
derivation of the constants: docs/sim.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import numpy as np

from neuronserve.artifact import Manifest, ModelConfig
from neuronserve.backends.base import Backend, FusedRunner, StageRunner
from neuronserve.config import CoreGroup, SimConfig
from neuronserve.errors import ConfigError, CoreFault, CoreResetting, InvalidInput, NeuronServeError
from neuronserve.contract import FUSED_STAGE, PAIR_SCORER, PEER_TOWER, STAGES, TICK_GRAPH, USER_TOWER
from neuronserve.tick_device import TickDevice

# Latency model defaults from published Inf1 figures (derivation: docs/sim.md); an estimate, not a measurement.
NEURONCORE_MACS_PER_S = 3.3e12
EXECUTION_OVERHEAD_S = 0.5e-3
HOST_DEVICE_BYTES_PER_S = 1.0e9
FAULT_KINDS = ("fail", "hang")
IN_FLIGHT_PER_CORE = 2  # executions a simulated core accepts at once: one on the device, one being prepared


@dataclass(frozen=True)
class StageLatency:
    """latency_s(batch) = fixed_s + per_row_s * batch, in modelled device seconds."""

    fixed_s: float
    per_row_s: float

    def latency_s(self, batch_size: int) -> float:
        return self.fixed_s + self.per_row_s * batch_size


@dataclass(frozen=True)
class FusedLatency:
    """FUSED_STAGE, one execution: latency_s(B, U) = fixed_s + user_row_s * U + peer_row_s * B, in
    modelled device seconds (U user rows through the user tower; B peer rows through the peer tower
    and the pair scorer)."""

    fixed_s: float
    user_row_s: float
    peer_row_s: float

    def latency_s(self, batch_size: int, user_batch_size: int) -> float:
        return self.fixed_s + self.user_row_s * user_batch_size + self.peer_row_s * batch_size

    @classmethod
    def from_stages(cls, stages: Mapping[str, StageLatency]) -> FusedLatency:
        """From the three stages' figures: one execution overhead (the user tower's), the user tower's
        per-row cost per user row, the peer tower's plus the pair scorer's per peer row. It counts each
        stage's own I/O, so it overstates a graph that keeps tower outputs on the device."""
        user, peer, pair = (stages[s] for s in STAGES)
        return cls(user.fixed_s, user.per_row_s, peer.per_row_s + pair.per_row_s)


@dataclass(frozen=True)
class LatencyModel:
    """Modelled device seconds of one execution per stage and bucket (before SimConfig.latency_scale).
    `fused` None: FusedLatency.from_stages(stages)."""

    stages: dict[str, StageLatency]
    fused: FusedLatency | None = None

    def fused_latency(self) -> FusedLatency:
        return self.fused if self.fused is not None else FusedLatency.from_stages(self.stages)

    def latency_s(self, stage: str, batch_size: int, user_batch_size: int | None = None) -> float:
        """`user_batch_size` (U) is required for FUSED_STAGE and ignored otherwise."""
        if stage == FUSED_STAGE:
            if user_batch_size is None:
                raise ValueError(f"{FUSED_STAGE} latency needs the user batch size")
            return self.fused_latency().latency_s(batch_size, user_batch_size)
        return self.stages[stage].latency_s(batch_size)

    @classmethod
    def estimate(cls, config: ModelConfig) -> LatencyModel:
        """Per row: its multiply-accumulates at NEURONCORE_MACS_PER_S plus the bytes (float32; int64
        index) the execution copies between host and device at HOST_DEVICE_BYTES_PER_S; per execution:
        EXECUTION_OVERHEAD_S. The fused graph copies only its own inputs and outputs (features in,
        user index in, scores out): tower outputs stay on the device."""
        projected = config.num_labels * config.label_dim

        def tower_macs(features: int) -> int:
            widths = (features,) + config.hidden_sizes + (config.embedding_dim,)
            return sum(a * b for a, b in zip(widths, widths[1:], strict=False)) + config.embedding_dim * projected

        def tower(features: int) -> StageLatency:
            io_bytes = 4 * (features + projected)
            return StageLatency(
                EXECUTION_OVERHEAD_S, tower_macs(features) / NEURONCORE_MACS_PER_S + io_bytes / HOST_DEVICE_BYTES_PER_S
            )

        scorer_bytes = 4 * (2 * projected + config.num_labels)
        fused_peer_bytes = 4 * config.peer_features + 8 + 4 * config.num_labels
        return cls(
            {
                USER_TOWER: tower(config.user_features),
                PEER_TOWER: tower(config.peer_features),
                PAIR_SCORER: StageLatency(
                    EXECUTION_OVERHEAD_S, projected / NEURONCORE_MACS_PER_S + scorer_bytes / HOST_DEVICE_BYTES_PER_S
                ),
            },
            FusedLatency(
                EXECUTION_OVERHEAD_S,
                tower_macs(config.user_features) / NEURONCORE_MACS_PER_S
                + 4 * config.user_features / HOST_DEVICE_BYTES_PER_S,
                (tower_macs(config.peer_features) + projected) / NEURONCORE_MACS_PER_S
                + fused_peer_bytes / HOST_DEVICE_BYTES_PER_S,
            ),
        )


@dataclass(frozen=True)
class SimCoreStats:
    core: int
    busy_s: float  # modelled device seconds of completed executions (not scaled by latency_scale)
    executions: int
    faults: int
    healthy: bool
    in_flight: int  # executions accepted and not yet returned (host or device phase)


@dataclass(frozen=True)
class SimStats:
    """The simulated clock. If the busiest core never idled, the device finished its work in
    `busiest_core_s` modelled seconds: throughput in device time = work / busiest_core_s.
    Utilisation over a window: `busy_fractions(earlier)`, device time / clock time per core."""

    cores: tuple[SimCoreStats, ...]
    executions: dict[str, int]  # per stage, completed
    peak_in_flight: int  # most executions accepted at the same moment (host or device phase), device-wide
    clock_s: float  # the backend's clock when the snapshot was taken
    latency_scale: float  # SimConfig.latency_scale: clock seconds per modelled second

    @property
    def busy_s(self) -> float:
        return sum(c.busy_s for c in self.cores)

    @property
    def busiest_core_s(self) -> float:
        return max(c.busy_s for c in self.cores)

    def busy_fractions(self, since: SimStats) -> tuple[float, ...]:
        """Per core, the share of the clock window since `since` its device spent running executions
        (completed ones; so up to one execution per core off at either edge of the window)."""
        window_s = self.clock_s - since.clock_s
        if window_s <= 0:
            raise ValueError("busy_fractions needs a later snapshot than `since`")
        return tuple(
            (now.busy_s - before.busy_s) * self.latency_scale / window_s
            for now, before in zip(self.cores, since.cores, strict=False)
        )

    def utilisation(self, since: SimStats) -> float:
        """The device's mean busy fraction over the window since `since` (see busy_fractions)."""
        fractions = self.busy_fractions(since)
        return sum(fractions) / len(fractions)


class _Core:
    """Mutable state of one simulated core; guarded by SimBackend._lock. Times are on the backend's clock."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.device_free_s = -math.inf  # when the device phases reserved so far end
        self.busy_s = 0.0
        self.executions = 0
        self.faults = 0
        self.pending: deque[str] = deque()  # injected fault kinds, for the next executions
        self.down_from_s = -math.inf  # the last fault showed at this time ...
        self.out_until_s = -math.inf  # ... and the core is back in rotation at this one

    def out_of_rotation(self, now: float) -> bool:
        return self.down_from_s <= now < self.out_until_s


class SimBackend(Backend):
    """Simulated NeuronCores. `latency` defaults to LatencyModel.estimate(manifest.model_config);
    `inner` (the backend computing exact outputs) defaults to CpuBackend(manifest);
    `in_flight_per_core`: executions each core accepts at once; `clock`/`sleep`: the time source."""

    name = "sim"

    def __init__(
        self,
        manifest: Manifest,
        sim: SimConfig = SimConfig(),
        latency: LatencyModel | None = None,
        inner: Backend | None = None,
        in_flight_per_core: int = IN_FLIGHT_PER_CORE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(manifest)
        if in_flight_per_core < 1:
            raise ConfigError(f"sim in_flight_per_core must be >= 1, got {in_flight_per_core}")
        if inner is None:
            from neuronserve.backends.cpu import CpuBackend

            inner = CpuBackend(manifest)
        self.sim = sim
        self.latency = latency if latency is not None else LatencyModel.estimate(manifest.model_config)
        self.in_flight_per_core = in_flight_per_core
        self._clock = clock
        self._sleep = sleep
        self._inner = inner
        self._lock = threading.Lock()
        self._cores = [_Core() for _ in range(sim.num_cores)]
        self._stage_executions = {stage: 0 for stage in STAGES + (FUSED_STAGE, TICK_GRAPH)}
        self._tick: TickDevice | None = None
        self._in_flight = 0
        self._peak_in_flight = 0

    def load(self, stage: str, cores: CoreGroup) -> StageRunner | FusedRunner:
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
        inner = self._inner.load(stage, cores)
        if stage == FUSED_STAGE:  # the inner runner may be a wrapper (tests), so by name, not isinstance
            return SimFusedRunner(self, cores, cast(FusedRunner, inner))
        return SimRunner(self, stage, cores, cast(StageRunner, inner))

    def full_bucket_s(self, stage: str, user_batch_size: int | None = None) -> float:
        """Clock seconds (latency model x latency_scale) of one execution of `stage` at its largest
        compiled bucket. FUSED_STAGE: at the smallest compiled user batch U >= `user_batch_size`
        (None: the smallest compiled U) for that bucket."""
        spec = self.manifest.stage(stage)
        batch = spec.batch_sizes[-1]
        users = None
        if stage == FUSED_STAGE:
            compiled = spec.user_batch_sizes(batch)
            users = (
                compiled[0]
                if user_batch_size is None
                else next((u for u in compiled if u >= user_batch_size), compiled[-1])
            )
        return self.latency.latency_s(stage, batch, users) * self.sim.latency_scale

    def ideal_rows_per_s(self, stage: str, num_cores: int | None = None, user_batch_size: int | None = None) -> float:
        """The device's ideal throughput in rows (peer rows for FUSED_STAGE) per clock second: every
        core (`num_cores`, default all) running full buckets back to back, i.e. cores x largest
        bucket / full_bucket_s. Infinite at latency_scale 0."""
        cores = self.sim.num_cores if num_cores is None else num_cores
        seconds = self.full_bucket_s(stage, user_batch_size)
        return math.inf if seconds <= 0 else cores * self.manifest.stage(stage).batch_sizes[-1] / seconds

    def inject_fault(self, core: int, kind: str, count: int = 1) -> None:
        """The next `count` executions accepted on `core` fail ("fail") or hang past core_timeout_s ("hang")."""
        if not 0 <= core < self.sim.num_cores:
            raise InvalidInput(f"fault core must be in 0-{self.sim.num_cores - 1}, got {core}")
        if kind not in FAULT_KINDS:
            raise InvalidInput(f"fault kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        if count < 1:
            raise InvalidInput(f"fault count must be >= 1, got {count}")
        with self._lock:
            self._cores[core].pending.extend([kind] * count)

    def stats(self) -> SimStats:
        with self._lock:
            now = self._clock()
            return SimStats(
                cores=tuple(
                    SimCoreStats(i, c.busy_s, c.executions, c.faults, not c.out_of_rotation(now), c.in_flight)
                    for i, c in enumerate(self._cores)
                ),
                executions=dict(self._stage_executions),
                peak_in_flight=self._peak_in_flight,
                clock_s=now,
                latency_scale=self.sim.latency_scale,
            )

    def healthy(self, cores: CoreGroup) -> bool:
        with self._lock:
            now = self._clock()
            return not any(self._cores[c].out_of_rotation(now) for c in cores.cores)

    def _execute(
        self, stage: str, cores: CoreGroup, modelled_s: float, compute: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """One execution on `cores`: accept it on a core, run `compute` (the host phase), then the
        device phase of `modelled_s` modelled seconds; blocking (see the module docstring)."""
        with self._lock:
            accepted_s = self._clock()
            for c in cores.cores:
                if self._cores[c].out_of_rotation(accepted_s):
                    raise CoreResetting(
                        f"core {c} is resetting after a fault (back in {self._cores[c].out_until_s - accepted_s:.2f} s); "
                        f"it cannot run {stage} until then"
                    )
            free = [c for c in cores.cores if self._cores[c].in_flight < self.in_flight_per_core]
            if not free:
                raise NeuronServeError(
                    f"core group {cores} already runs {cores.count * self.in_flight_per_core} execution(s), its maximum: "
                    "the caller oversubscribed it"
                )
            faulty = [c for c in free if self._cores[c].pending]
            core = (
                faulty[0]
                if faulty
                else min(free, key=lambda c: (self._cores[c].in_flight, self._cores[c].device_free_s, c))
            )
            state = self._cores[core]
            fault = state.pending.popleft() if faulty else None
            state.in_flight += 1
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
        try:
            try:
                out = compute()
            except BaseException:
                if fault is not None:
                    with self._lock:
                        state.pending.appendleft(fault)  # never reached the device: it stays for the next execution
                raise
            with self._lock:
                ready_s = self._clock()
                start_s = max(ready_s, state.device_free_s)
                error: CoreFault | None = None
                if fault is not None:
                    wake_s = start_s + (self.sim.core_timeout_s if fault == "hang" else 0.0)
                    state.faults += 1
                    state.down_from_s = wake_s
                    state.out_until_s = state.device_free_s = wake_s + self.sim.reset_s
                    what = f"hung past its timeout of {self.sim.core_timeout_s:g} s" if fault == "hang" else "failed"
                    error = CoreFault(
                        f"core {core} {what} running {stage}; it is out of rotation for its reset ({self.sim.reset_s:g} s)"
                    )
                else:
                    wake_s = state.device_free_s = start_s + modelled_s * self.sim.latency_scale
            remaining_s = wake_s - self._clock()
            if remaining_s > 0:
                self._sleep(remaining_s)
            if error is not None:
                raise error
            self._count(state, stage, modelled_s)
            return out
        finally:
            with self._lock:
                state.in_flight -= 1
                self._in_flight -= 1

    def tick_device(self) -> TickDevice:
        from neuronserve.backends.tick_runners import SimTick

        with self._lock:
            self._tick = self._tick or SimTick(self)
            return self._tick

    def device_phase(self, stage: str, modelled_s: float) -> None:
        """A device phase of `modelled_s` on the core whose device frees first, without an in-flight slot
        (the tick's executions: they delay the pipeline's on that core, as on a shared device); blocking."""
        with self._lock:
            state = min(self._cores, key=lambda c: c.device_free_s)
            wake_s = state.device_free_s = max(self._clock(), state.device_free_s) + modelled_s * self.sim.latency_scale
        remaining_s = wake_s - self._clock()
        if remaining_s > 0:
            self._sleep(remaining_s)
        self._count(state, stage, modelled_s)

    def _count(self, state: _Core, stage: str, modelled_s: float) -> None:
        """A completed device phase of `stage` on core `state`."""
        with self._lock:
            state.busy_s += modelled_s
            state.executions += 1
            self._stage_executions[stage] += 1

    def close(self) -> None:
        self._inner.close()


class SimRunner(StageRunner):
    """One stage on one simulated core group: checks shapes as the device does, then runs the
    CPU-traced graph as a simulated execution. Holds IN_FLIGHT_PER_CORE executions per core."""

    def __init__(self, device: SimBackend, stage: str, cores: CoreGroup, inner: StageRunner) -> None:
        self.stage = stage
        self.cores = cores
        self.batch_sizes = tuple(inner.batch_sizes)
        self.max_in_flight = cores.count * device.in_flight_per_core
        self._device = device
        self._inner = inner
        self._shapes = tuple(inner.input_shapes())

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch_size = self.check_inputs(inputs)
        arrays: list[np.ndarray] = list(inputs)
        modelled_s = self._device.latency.latency_s(self.stage, batch_size)
        return self._device._execute(self.stage, self.cores, modelled_s, lambda: self._inner.run(arrays))

    def healthy(self) -> bool:
        return self._device.healthy(self.cores)

    def latency_s(self, batch_size: int) -> float | None:
        """Device seconds of one execution (the model x latency_scale); host time not included."""
        return self._device.latency.latency_s(self.stage, batch_size) * self._device.sim.latency_scale

    def close(self) -> None:
        self._inner.close()


class SimFusedRunner(FusedRunner):
    """FUSED_STAGE on one simulated core group: the inner (CPU) fused runner's compiled (B, U) pairs,
    checked as the device does, run as one simulated execution with FusedLatency."""

    def __init__(self, device: SimBackend, cores: CoreGroup, inner: FusedRunner) -> None:
        super().__init__(cores, inner.pairs, inner.input_shapes())
        self.max_in_flight = cores.count * device.in_flight_per_core
        self._device = device
        self._inner = inner

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch_size, user_batch_size = self.check_inputs(inputs)
        arrays: list[np.ndarray] = list(inputs)
        modelled_s = self._device.latency.latency_s(self.stage, batch_size, user_batch_size)
        return self._device._execute(self.stage, self.cores, modelled_s, lambda: self._inner.run(arrays))

    def healthy(self) -> bool:
        return self._device.healthy(self.cores)

    def latency_s(self, batch_size: int, user_batch_size: int) -> float | None:
        """Device seconds of one execution at (B, U) (the model x latency_scale); host time not included."""
        return self._device.latency.latency_s(self.stage, batch_size, user_batch_size) * self._device.sim.latency_scale

    def close(self) -> None:
        self._inner.close()
