"""An artifact's graphs: each stage traced for the target (torch.jit.trace for cpu, torch.neuron.trace
for neuron) and checked against the eager model at every bucket. neuron traces each bucket (fixed
shapes); cpu traces once, at the largest bucket, and checks that shape-generic graph at every bucket
(and the fused graph at every (B, U) pair). build.py writes the rest of the artifact around them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from neuronserve.artifact import BucketEntry, ModelConfig, TensorSpec, sha256_file
from neuronserve.compile.model import TwoTowerScorer
from neuronserve.contract import FUSED_STAGE
from neuronserve.errors import ArtifactError

# Max |traced - eager| allowed. CPU tracing replays the same float32 kernels; neuron casts matmuls to
# BF16 by default (8-bit mantissa: ~4e-3 relative), so its tolerance is looser.
PARITY_TOLERANCE = {"cpu": 1e-5, "neuron": 5e-2}
UNCHECKED = float("nan")  # the parity error recorded for a neuron graph that cannot run on the compiling host


def example_inputs(
    specs: Sequence[TensorSpec], batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn((batch_size,) + tuple(s.shape[1:]), generator=generator) for s in specs)


def fused_inputs(
    config: ModelConfig, batch_size: int, user_batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Random users [U, F_u], peers [B, F_p] and a user index [B] in [0, U), every user used when U <= B."""
    index = torch.randint(0, user_batch_size, (batch_size,), generator=generator, dtype=torch.int64)
    index[:user_batch_size] = torch.randperm(user_batch_size, generator=generator)[:batch_size]
    return (
        torch.randn(user_batch_size, config.user_features, generator=generator),
        torch.randn(batch_size, config.peer_features, generator=generator),
        index,
    )


def trace(
    module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], target: str, pipeline_cores: int, fast_math: str | None
):
    """(traced module, compiler args) for the target."""
    if target == "cpu":
        return torch.jit.trace(module, inputs), ()
    from neuronserve.compile.neuron import trace_neuron

    return trace_neuron(module, inputs, pipeline_cores=pipeline_cores, fast_math=fast_math)


def _parity(
    traced, module: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], where: str, target: str
) -> float:
    """Max |traced - eager|; NaN (recorded as "not checked") only when a neuron graph cannot run on this
    host (no NeuronCores). A CPU graph that fails to run is a broken artifact."""
    with torch.no_grad():
        expected = module(*inputs)
        try:
            actual = traced(*inputs)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if target != "neuron":
                raise ArtifactError(f"parity check failed: the traced {where} does not run ({first_line})") from None
            print(
                f"warning: parity not checked for {where}: the traced graph does not run here ({first_line})",
                file=sys.stderr,
            )
            return UNCHECKED
    return float((actual - expected).abs().max())


def _checked(
    traced, module: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], where: str, target: str
) -> float:
    """_parity, raising ArtifactError past the target's tolerance (a NaN output fails too)."""
    error = _parity(traced, module, inputs, where, target)
    tolerance = PARITY_TOLERANCE[target]
    if error is not UNCHECKED and not error <= tolerance:
        raise ArtifactError(
            f"parity check failed: {where} differs from the eager model by {error:.2e} "
            f"(tolerance {tolerance:.0e} for {target}); the traced graph is wrong, do not ship it"
        )
    return error


def compile_stage(
    work: Path,
    stage: str,
    module,
    inputs_spec,
    sizes,
    target,
    pipeline_cores,
    fast_math,
    files: dict[str, str],
    bar,
    generator,
) -> tuple[list[BucketEntry], tuple[str, ...]]:
    """One of the three stages at every bucket: neuron traces each bucket (fixed shapes); cpu traces once,
    at the largest bucket, and checks that graph at every bucket. (entries, the compiler's args)."""
    per_bucket = target == "neuron"
    entries: list[BucketEntry] = []
    traced_by_file: dict[str, torch.jit.ScriptModule] = {}
    compiler_args: tuple[str, ...] = ()
    for batch in sizes:
        bar.set_postfix_str(f"{stage} batch {batch}")
        file_name = f"{stage}_b{batch}.pt" if per_bucket else f"{stage}.pt"
        if file_name not in traced_by_file:
            inputs = example_inputs(inputs_spec, batch if per_bucket else max(sizes), generator)
            with torch.no_grad():
                traced_by_file[file_name], compiler_args = trace(module, inputs, target, pipeline_cores, fast_math)
            torch.jit.save(traced_by_file[file_name], str(work / file_name))
            files[file_name] = sha256_file(work / file_name)
            bar.update(1)
        fresh = example_inputs(inputs_spec, batch, generator)  # not the trace inputs: catches baked-in values
        error = _checked(traced_by_file[file_name], module, fresh, f"{stage} batch {batch}", target)
        entries.append(BucketEntry(batch, file_name, error))
    if not per_bucket and (rows := max(sizes) - 1) not in sizes and rows >= 1:  # served at exact rows too
        odd = example_inputs(inputs_spec, rows, torch.Generator().manual_seed(rows))
        _checked(traced_by_file[file_name], module, odd, f"{stage} batch {rows} (no bucket)", target)
    return entries, compiler_args


def compile_fused(
    work: Path, model: TwoTowerScorer, pairs, target, pipeline_cores, fast_math, files: dict[str, str], bar
) -> list[BucketEntry]:
    """FUSED_STAGE at every (B, U) pair: neuron traces each pair (fixed shapes); cpu traces once, at
    the largest B with the smallest U (distinct when there are two buckets, so a graph that assumed
    U == B fails), and checks that one graph at every pair. Parity: against the original eager model
    on the gathered rows, model(users[user_index], peers), not only against the module traced."""
    fused = model.fused()
    generator = torch.Generator().manual_seed(
        4321
    )  # its own: the three stages' inputs and reference.npz stay as they were

    def eager(users: torch.Tensor, peers: torch.Tensor, user_index: torch.Tensor) -> torch.Tensor:
        return model(users.index_select(0, user_index), peers)

    traced_by_file: dict[str, object] = {}
    entries = []
    for batch, users in pairs:
        bar.set_postfix_str(f"{FUSED_STAGE} batch {batch} users {users}")
        file_name = f"{FUSED_STAGE}_b{batch}_u{users}.pt" if target == "neuron" else f"{FUSED_STAGE}.pt"
        if file_name not in traced_by_file:
            shape = (batch, users) if target == "neuron" else (max(b for b, _ in pairs), min(u for _, u in pairs))
            with torch.no_grad():
                traced, _ = trace(
                    fused, fused_inputs(model.config, *shape, generator), target, pipeline_cores, fast_math
                )
            torch.jit.save(traced, str(work / file_name))
            files[file_name] = sha256_file(work / file_name)
            traced_by_file[file_name] = traced
            bar.update(1)
        fresh = fused_inputs(model.config, batch, users, generator)
        where = f"{FUSED_STAGE} batch {batch} users {users}"
        error = _checked(traced_by_file[file_name], eager, fresh, where, target)
        entries.append(BucketEntry(batch, file_name, error, users))
    rows = max(b for b, _ in pairs) - 1
    if target == "cpu" and rows >= 3 and rows not in {b for b, _ in pairs}:  # served at exact rows too
        odd = fused_inputs(model.config, rows, 3, torch.Generator().manual_seed(rows))
        _checked(traced_by_file[file_name], eager, odd, f"{FUSED_STAGE} batch {rows} users 3 (no bucket)", target)
    return entries
