"""Backends: neuron (torch-neuron on Inf1), cpu (torch.jit), sim (simulated NeuronCores).

Each loads a stage onto a core group as a runner: a StageRunner for the three pipelining stages, a
FusedRunner for the fused "twotower" graph (artifact.FUSED_STAGE) when the artifact has it.

`make_backend` is the one place a backend name becomes an object; `auto` picks neuron when
torch-neuron and a NeuronCore are present and the artifact targets neuron, else cpu. `core_span`
says which cores a process serves.
"""

from __future__ import annotations

import os

from neuronserve.artifact import Manifest
from neuronserve.backends.base import Backend, FusedRunner, Runner, StageRunner
from neuronserve.config import VISIBLE_CORES_ENV, CoreGroup, SimConfig, parse_visible_cores
from neuronserve.errors import ConfigError
from neuronserve.thread_placement import usable_cpus

BACKEND_NAMES = ("auto", "cpu", "sim", "neuron")


def resolve_backend(name: str, manifest: Manifest) -> str:
    """`auto` -> neuron when torch-neuron and a NeuronCore are present and the artifact targets them, else cpu."""
    if name != "auto":
        return name
    from neuronserve.backends import neuron

    return "neuron" if neuron.available() and manifest.target == "neuron" else "cpu"


def default_cores(name: str) -> int:
    """Cores to serve on when none are configured. neuron and sim: 4, one Inferentia chip (inf1.xlarge,
    inf1.2xlarge). cpu: one executor (one torch thread) per CPU this process may use, less the one the
    event loop needs, at least one (gRPC's loop is the critical path; docs/benchmarks.md measures it)."""
    return max(1, len(usable_cpus()) - 1) if name == "cpu" else SimConfig.num_cores


def default_workers(name: str, cores: int, usable_cpus: int) -> int:
    """Serving processes when none are configured. cpu: 1 (on 2 CPUs a second worker bought at most
    ~1.2x closed-loop throughput and cost 15-30% more CPU per request: docs/workers.md). neuron and sim:
    one per Inferentia chip (4 NeuronCores), as AWS runs a process per model copy, while each worker
    keeps 4 host CPUs (~1 ms of host CPU per request, so a worker feeds ~1,000 requests/s); at least 1."""
    return 1 if name == "cpu" else max(1, min(cores // 4, usable_cpus // 4))


def core_span(name: str, cores: int | None) -> CoreGroup:
    """The cores this process serves, as one range. neuron: NEURON_RT_VISIBLE_CORES when the operator
    (or the Kubernetes device plugin) set it, since other processes hold the other cores; `cores`, if
    given, must then agree with it. Otherwise 0..cores-1 (`cores` None: the backend's default)."""
    preset = os.environ.get(VISIBLE_CORES_ENV, "").strip() if name == "neuron" else ""
    if preset:
        span = parse_visible_cores(preset)
        if cores is not None and cores != span.count:
            raise ConfigError(
                f"--cores {cores} disagrees with {VISIBLE_CORES_ENV}={preset} ({span.count} cores, set for this "
                "process); drop --cores or change the variable"
            )
        return span
    return CoreGroup(0, cores or default_cores(name))


def make_backend(
    name: str,
    manifest: Manifest,
    sim: SimConfig = SimConfig(),
    visible_cores: CoreGroup | None = None,
    model_process: bool = False,
    inline_below: float = 0.0,
) -> Backend:
    """`visible_cores`: the span of NeuronCores this process serves (core_span); the neuron runtime pins
    it at the first load (NEURON_RT_VISIBLE_CORES). None: the neuron backend pins the environment's
    value, or the first group it loads. `model_process`, `inline_below`: cpu only (ServerConfig says what)."""
    name = resolve_backend(name, manifest)
    if name == "cpu":
        from neuronserve.backends.cpu import CpuBackend

        return CpuBackend(manifest, model_process=model_process, inline_below=inline_below)
    if name == "sim":
        from neuronserve.backends.sim import SimBackend

        return SimBackend(manifest, sim)
    if name == "neuron":
        from neuronserve.backends.neuron import NeuronBackend

        return NeuronBackend(manifest, visible_cores=visible_cores)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


__all__ = [
    "Backend",
    "Runner",
    "StageRunner",
    "FusedRunner",
    "make_backend",
    "resolve_backend",
    "default_cores",
    "default_workers",
    "core_span",
    "BACKEND_NAMES",
]
