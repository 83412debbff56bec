"""The `neuron` backend: Neuron-compiled stages on Inf1 NeuronCores through torch-neuron.

Below the pipeline, like cpu and sim: `load` puts a stage's graphs (one per compiled bucket; for
FUSED_STAGE one per compiled (B, U) pair, fixed shapes) on a core group; the runner's `run` executes
one bucket-sized batch there. torch-neuron is imported lazily, and
before any torch.jit.load (else TorchScript cannot resolve the graphs' `neuron::forward_*` ops).

How cores are pinned (AWS Neuron SDK, torch-neuron core placement guide and runtime configuration):
- The Neuron runtime of a process reserves the cores in NEURON_RT_VISIBLE_CORES (a contiguous range,
  "2" or "0-3"; unset: every core on the host) when it initialises, at the first model load, and holds
  them until the process exits; setting the variable later changes nothing. One process therefore
  pins one range, once: `_PROCESS` records it.
- Within that range, `torch_neuron.experimental.neuron_cores_context(start_nc, nc_count)` places a
  model at load time on cores numbered relative to the range; nc_count a multiple of the model's
  pipeline cores replicates it (round-robin executions). NEURONCORE_GROUP_SIZES, the older way to
  split a process's cores into groups (models fill groups in load order), is deprecated and no longer
  supported since Neuron 1.20; we do not use it.
So: the first load pins NEURON_RT_VISIBLE_CORES to `NeuronBackend(visible_cores=...)` if given (the
span of every group this process will serve), else to a value already in the environment (set by the
operator or the Kubernetes device plugin), else to the first group loaded. Every group is then placed
explicitly inside that range; a group outside it is a ConfigError (run one process per core range, or
pass the span). CoreGroup numbers are absolute core indices, as in NEURON_RT_VISIBLE_CORES.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np
import torch

from neuronserve.artifact import Manifest
from neuronserve.contract import FUSED_STAGE
from neuronserve.backends.base import Backend, FusedRunner, StageRunner
from neuronserve.backends.cpu import as_tensor
from neuronserve.config import VISIBLE_CORES_ENV, CoreGroup, parse_visible_cores
from neuronserve.errors import BackendUnavailable, ConfigError, CoreFault
from neuronserve.tick_device import TickDevice

# Executions a group accepts per NeuronCore: AWS's guidance for torch-neuron is two threads per model copy
# (torch.neuron.DataParallel's default), so the host prepares the next batch while the device runs one;
# one per core leaves the device idle during host work (docs/pipeline.md). One thread per execution.
IN_FLIGHT_PER_CORE = 2

INSTALL_HINT = (
    "install torch-neuron on an Inf1 host (pip install torch-neuron --extra-index-url=https://pip.repos.neuron.amazonaws.com, "
    "or use an Inf1 Neuron DLAMI or the pytorch-inference-neuron image), or serve a --target cpu artifact with --backend cpu or sim"
)


def neuron_devices() -> list[str]:
    """The Neuron device files of this host (/dev/neuron0, ...): one per Inferentia chip, 4 NeuronCores each."""
    return sorted(glob.glob("/dev/neuron*"))


def _torch_neuron_importable() -> bool:
    try:
        return importlib.util.find_spec("torch_neuron") is not None
    except (ImportError, ValueError):
        return False


def available() -> bool:
    """True when torch-neuron is importable and a NeuronCore is present. Never raises."""
    try:
        return _torch_neuron_importable() and bool(neuron_devices())
    except Exception:  # noqa: BLE001 - a probe: any failure means "not available"
        return False


@dataclass
class _ProcessCores:
    """The core range this process's Neuron runtime reserved (None until the first load)."""

    pinned: CoreGroup | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # loads and placement contexts are not thread-safe


_PROCESS = _ProcessCores()


class NeuronBackend(Backend):
    """Runs a `--target neuron` artifact on this host's NeuronCores."""

    name = "neuron"

    def __init__(self, manifest: Manifest, visible_cores: CoreGroup | None = None) -> None:
        super().__init__(manifest)
        if manifest.target != "neuron":
            raise BackendUnavailable(
                f"artifact {manifest.directory} was compiled for target {manifest.target!r}; the neuron backend runs only "
                f"Neuron-compiled graphs: recompile with --target neuron, or serve it with --backend cpu or sim"
            )
        try:
            self._torch_neuron = importlib.import_module("torch_neuron")
        except ImportError as exc:
            raise BackendUnavailable(
                f"the neuron backend needs torch-neuron, which is not importable ({exc}): {INSTALL_HINT}"
            ) from None
        if not neuron_devices():
            raise BackendUnavailable(
                "the neuron backend found no NeuronCore (no /dev/neuron* device): run on an Inf1 instance with the "
                "aws-neuronx-dkms driver loaded (check with neuron-ls), or serve a --target cpu artifact with --backend cpu or sim"
            )
        self.visible_cores = visible_cores
        self._tick: TickDevice | None = None
        self._tick_lock = threading.Lock()

    def load(self, stage: str, cores: CoreGroup) -> StageRunner | FusedRunner:
        spec = self.manifest.stage(stage)
        pipeline_cores = self.manifest.pipeline_cores
        if cores.count % pipeline_cores:
            raise ConfigError(
                f"cannot load {stage} on cores {cores}: it was compiled with pipeline_cores={pipeline_cores}, "
                f"so its core group needs a multiple of {pipeline_cores} cores, not {cores.count}"
            )
        graphs = self.load_files([bucket.file for bucket in spec.buckets], cores)
        modules = {bucket.key: graphs[bucket.file] for bucket in spec.buckets}  # (B, U or 0) -> graph
        if stage == FUSED_STAGE:
            return NeuronFusedRunner(cores, modules, tuple(tuple(t.shape[1:]) for t in spec.inputs[:2]))
        shapes = tuple(tuple(t.shape[1:]) for t in spec.inputs)
        return NeuronRunner(stage, cores, {batch: module for (batch, _), module in modules.items()}, shapes)

    def load_files(self, files: Sequence[str], cores: CoreGroup) -> dict[str, torch.jit.ScriptModule]:
        """The artifact's graph files loaded onto `cores` (placed relative to the pinned range; nc_count the
        whole group: replicas when it exceeds a graph's pipeline cores), from their checked bytes."""
        with _PROCESS.lock:
            pinned = self._pin(cores)
            placement = self._torch_neuron.experimental.neuron_cores_context(
                start_nc=cores.first - pinned.first, nc_count=cores.count
            )
            modules = {}
            with placement:
                for name in files:
                    stream = self.manifest.file_stream(name)  # the checked bytes, not the path again
                    try:
                        modules[name] = torch.jit.load(stream)
                    except RuntimeError as exc:
                        raise BackendUnavailable(
                            f"cannot load {self.manifest.path(name)} onto NeuronCores {cores}: {_first_line(exc)}; check "
                            "that no other process holds these cores (neuron-ls) and that the artifact was compiled by "
                            "this torch-neuron"
                        ) from None
        return modules

    def tick_device(self) -> TickDevice | None:
        """The artifact's tick graphs over this process's whole core range; None (the host runs the
        tick) for an artifact compiled without them."""
        if not self.manifest.tick_graphs:
            return None
        with _PROCESS.lock:
            cores = _PROCESS.pinned or self.visible_cores
        with self._tick_lock:
            if self._tick is None and cores is not None:
                from neuronserve.backends.tick_runners import NeuronTick

                self._tick = NeuronTick(self, cores)
            return self._tick

    def _pin(self, cores: CoreGroup) -> CoreGroup:
        """The process's core range, pinning it on the first load (see the module docstring). Holds _PROCESS.lock."""
        if _PROCESS.pinned is None:
            preset = os.environ.get(VISIBLE_CORES_ENV)
            if self.visible_cores is not None:
                pinned = self.visible_cores
            elif preset:
                pinned = parse_visible_cores(preset)
            else:
                pinned = cores
            os.environ[VISIBLE_CORES_ENV] = pinned.visible_cores()
            _PROCESS.pinned = pinned
        pinned = _PROCESS.pinned
        if self.visible_cores is not None and self.visible_cores != pinned:
            raise ConfigError(
                f"this process's Neuron runtime already holds cores {pinned} ({VISIBLE_CORES_ENV}); it cannot switch to "
                f"{self.visible_cores}: run one process per core range"
            )
        if cores.first < pinned.first or cores.last > pinned.last:
            raise ConfigError(
                f"cannot load on cores {cores}: this process's Neuron runtime holds only cores {pinned} "
                f"({VISIBLE_CORES_ENV}, fixed at its first model load); run one process per core range, or give "
                f"NeuronBackend(visible_cores=...) the span of all groups before the first load"
            )
        return pinned


class NeuronRunner(StageRunner):
    """One stage's bucket graphs on one NeuronCore group. Thread-safe: up to `max_in_flight` concurrent runs
    (a graph pipelined over N cores streams N executions; extra cores in the group hold replicas)."""

    def __init__(
        self,
        stage: str,
        cores: CoreGroup,
        modules: dict[int, torch.jit.ScriptModule],
        shapes: tuple[tuple[int, ...], ...],
    ) -> None:
        self.stage = stage
        self.cores = cores
        self.batch_sizes = tuple(sorted(modules))
        self.max_in_flight = IN_FLIGHT_PER_CORE * cores.count
        self._modules = modules
        self._shapes = shapes

    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch_size = self.check_inputs(inputs)
        tensors = [as_tensor(array) for array in inputs]
        try:
            with torch.inference_mode():
                out = self._modules[batch_size](*tensors)
        except RuntimeError as exc:
            raise CoreFault(
                f"NeuronCores {self.cores} failed running {self.stage} at batch {batch_size}: {_first_line(exc)}"
            ) from None
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def close(self) -> None:
        self._modules = {}  # the runtime unloads a graph when its module is freed


class NeuronFusedRunner(FusedRunner):
    """FUSED_STAGE on one NeuronCore group: one fixed-shape graph per compiled (B, U) pair, one
    execution per batch (the user gather runs on the device). Thread-safe like NeuronRunner."""

    def __init__(
        self,
        cores: CoreGroup,
        modules: dict[tuple[int, int], torch.jit.ScriptModule],
        shapes: Sequence[tuple[int, ...]],
    ) -> None:
        super().__init__(cores, modules, shapes)
        self.max_in_flight = IN_FLIGHT_PER_CORE * cores.count
        self._modules = modules  # (B, U) -> graph

    def run(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        batch_size, user_batch_size = self.check_inputs(inputs)
        tensors = [as_tensor(array) for array in inputs]
        try:
            with torch.inference_mode():
                out = self._modules[(batch_size, user_batch_size)](*tensors)
        except RuntimeError as exc:
            raise CoreFault(
                f"NeuronCores {self.cores} failed running {self.stage} at batch {batch_size} (users {user_batch_size}): {_first_line(exc)}"
            ) from None
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def close(self) -> None:
        self._modules = {}  # the runtime unloads a graph when its module is freed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
