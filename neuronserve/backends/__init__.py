"""Backends: neuron (torch-neuron on Inf1), cpu (torch.jit), sim (simulated NeuronCores).

`make_backend` is the one place a backend name becomes an object; `auto` picks neuron when
torch-neuron and a NeuronCore are present, else cpu.
"""

from __future__ import annotations

import os
from typing import Optional

from neuronserve.artifact import Manifest
from neuronserve.backends.base import Backend, StageRunner
from neuronserve.config import CoreGroup, SimConfig
from neuronserve.errors import ConfigError

BACKEND_NAMES = ("auto", "cpu", "sim", "neuron")


def resolve_backend(name: str, manifest: Manifest) -> str:
    """`auto` -> neuron when torch-neuron and a NeuronCore are present and the artifact targets them, else cpu."""
    if name != "auto":
        return name
    from neuronserve.backends import neuron

    return "neuron" if neuron.available() and manifest.target == "neuron" else "cpu"


def default_cores(name: str) -> int:
    """Cores to serve on when none are configured. neuron and sim: 4, one Inferentia chip (inf1.xlarge,
    inf1.2xlarge). cpu: one executor (one torch thread) per CPU this process may use, the usual rule
    for CPU inference; docs/benchmarks.md compares it with 4 on a 2-CPU host."""
    return len(os.sched_getaffinity(0)) if name == "cpu" else SimConfig.num_cores


def make_backend(name: str, manifest: Manifest, sim: SimConfig = SimConfig(), num_cores: Optional[int] = None) -> Backend:
    """`num_cores`: the NeuronCores this process serves (0..num_cores-1); the neuron runtime pins that span
    at the first load (NEURON_RT_VISIBLE_CORES), unless the environment already pins one."""
    name = resolve_backend(name, manifest)
    if name == "cpu":
        from neuronserve.backends.cpu import CpuBackend

        return CpuBackend(manifest)
    if name == "sim":
        from neuronserve.backends.sim import SimBackend

        return SimBackend(manifest, sim)
    if name == "neuron":
        from neuronserve.backends.neuron import NeuronBackend

        return NeuronBackend(manifest, visible_cores=CoreGroup(0, num_cores) if num_cores else None)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


__all__ = ["Backend", "StageRunner", "make_backend", "resolve_backend", "default_cores", "BACKEND_NAMES"]
