"""Which NeuronCores (or executor threads) and host CPUs each worker of a `serve --workers N` pool owns.

A leaf of workers.py: the plan is made once, before any fork, and each worker reads its own share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from neuronserve.config import CoreGroup, ServerConfig
from neuronserve.errors import ConfigError


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    cores: CoreGroup  # neuron: absolute NeuronCores (its NEURON_RT_VISIBLE_CORES); sim: simulated cores; cpu: executor threads
    cpus: tuple[int, ...] | None = None  # host CPUs it is pinned to (--cpu-affinity split)


def plan_workers(
    config: ServerConfig, backend: str, pipeline_cores: int, usable_cpus: tuple[int, ...]
) -> list[WorkerPlan]:
    """Split the cores evenly over config.workers workers. neuron/sim: the span core_span gives (the device
    plugin's NEURON_RT_VISIBLE_CORES, --cores, or one chip), in contiguous ranges of a multiple of the
    artifact's pipeline cores. cpu: --cores executor threads in all, by default one per usable CPU less one
    per worker (its event loop), at least one each."""
    from neuronserve.backends import core_span

    n = config.workers
    assert n is not None, "serve.with_workers resolves the worker count before a pool is planned"
    if backend == "cpu":
        total = config.cores or max(n, len(usable_cpus) - n) // n * n
        if total < n or total % n:
            raise ConfigError(
                f"--cores {total} executors do not split evenly over --workers {n}; use a multiple of {n}"
            )
        spans = [CoreGroup(0, total // n)] * n
    else:
        span = core_span(backend, config.cores)
        per = span.count // n
        if span.count % n or per % pipeline_cores:
            raise ConfigError(
                f"{span.count} cores ({span}) do not split evenly over --workers {n} in groups of {pipeline_cores} "
                "(the artifact's pipeline cores); choose --workers dividing the cores"
            )
        spans = [CoreGroup(span.first + i * per, per) if backend == "neuron" else CoreGroup(0, per) for i in range(n)]
    cpus: list[tuple[int, ...] | None] = [None] * n
    if config.cpu_affinity == "split":
        if len(usable_cpus) < n:
            raise ConfigError(
                f"--cpu-affinity split needs a CPU per worker: {len(usable_cpus)} usable CPUs for --workers {n}"
            )
        share = len(usable_cpus) // n
        cpus = [tuple(usable_cpus[i * share : (i + 1) * share]) for i in range(n)]
    return [WorkerPlan(i, spans[i], cpus[i]) for i in range(n)]


def member_config(config: ServerConfig, plan: WorkerPlan) -> ServerConfig:
    """The configuration a worker serves with: its own cores, one process, no affinity of its own to set,
    and the lane's batching (lane_batching: the workers' loops share the CPUs). `config.backend` is
    resolved (the supervisor resolves it before the fork)."""
    return lane_batching(dataclasses.replace(config, cores=plan.cores.count, workers=1, cpu_affinity="none"))


def lane_batching(config: ServerConfig) -> ServerConfig:
    """Unless set, --inline-below 0 (config.INLINE_BELOW says why) and, on the cpu backend, one batch in
    flight per executor (core group), not two: with one, a batch lane (docs/pipeline.md). For a serving
    process whose event loop shares its CPUs, a pool's worker or one process with one usable CPU (serve.py):
    the next batch forms while the running one has the CPU, so it is bigger. `config.backend` is resolved."""
    batching = config.batching
    if config.backend == "cpu" and batching.max_in_flight_batches is None:
        batching = dataclasses.replace(batching, max_in_flight_batches=config.cores or 1)
    inline_below = 0.0 if config.inline_below is None else config.inline_below
    return dataclasses.replace(config, inline_below=inline_below, batching=batching)
