"""Backends: neuron (torch-neuron on Inf1), cpu (torch.jit), sim (simulated NeuronCores).

`make_backend` is the one place a backend name becomes an object; `auto` picks neuron when
torch-neuron and a NeuronCore are present, else cpu.
"""

from __future__ import annotations

from neuronserve.artifact import Manifest
from neuronserve.backends.base import Backend, StageRunner
from neuronserve.config import SimConfig
from neuronserve.errors import ConfigError

BACKEND_NAMES = ("auto", "cpu", "sim", "neuron")


def make_backend(name: str, manifest: Manifest, sim: SimConfig = SimConfig()) -> Backend:
    if name == "auto":
        from neuronserve.backends import neuron

        name = "neuron" if neuron.available() and manifest.target == "neuron" else "cpu"
    if name == "cpu":
        from neuronserve.backends.cpu import CpuBackend

        return CpuBackend(manifest)
    if name == "sim":
        from neuronserve.backends.sim import SimBackend

        return SimBackend(manifest, sim)
    if name == "neuron":
        from neuronserve.backends.neuron import NeuronBackend

        return NeuronBackend(manifest)
    raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


__all__ = ["Backend", "StageRunner", "make_backend", "BACKEND_NAMES"]
