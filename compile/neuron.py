"""Tracing for `--target neuron`: torch.neuron.trace (torch-neuron, Inf1 NeuronCore-v1) with checked compiler flags.

Compile side only: build.py calls `trace_neuron` once per stage and bucket; the graphs it returns are
saved into the artifact, and the runtime's neuron backend loads them onto NeuronCores. torch-neuron is
imported lazily, so the rest of compile/ works without it.

API facts (AWS Neuron SDK docs, archived with torch-neuron):
- torch_neuron.trace(model, example_inputs, **kwargs): compiler_args (list[str] passed to neuron-cc),
  compiler_workdir, compiler_timeout, fallback, dynamic_batch_size, ... ; everything but model and
  example_inputs is a keyword. Returns a torch.jit.ScriptModule.
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/frameworks/torch/torch-neuron/api-compilation-python-api.html
- neuron-cc flags: `--neuroncore-pipeline-cores N` (int, default 1) and `--fast-math` with one or more
  values (below). https://awsdocs-neuron.readthedocs-hosted.com/en/latest/compiler/neuron-cc/command-line-reference.html
"""

from __future__ import annotations

import subprocess

import torch

from neuronserve.errors import ArtifactError, BackendUnavailable, ConfigError

INSTALL_HINT = (
    "--target neuron needs torch-neuron (pip install torch-neuron neuron-cc[tensorflow] "
    "--extra-index-url=https://pip.repos.neuron.amazonaws.com) on an Inf1/DLAMI host; or use --target cpu"
)

# `--fast-math` values, from the neuron-cc CLI reference above. `all` (the compiler's default: FP32
# cast to BF16, fast relayout) and `none` (= fp32-cast-matmult-bf16 no-fast-relayout) are mutually
# exclusive; at most one fp32-cast-* and one of fast-relayout / no-fast-relayout; the specific values
# override the defaults of `all` / `none`. The mixed-precision guide's ladder, fastest first:
# "all", "fp32-cast-matmult", "fp32-cast-matmult no-fast-relayout", "none".
FAST_MATH_PRESETS = ("all", "none")
FAST_MATH_RELAYOUT = ("fast-relayout", "no-fast-relayout")
FAST_MATH_CASTS = (
    "fp32-cast-all",
    "fp32-cast-all-fp16",
    "fp32-cast-matmult",
    "fp32-cast-matmult-bf16",
    "fp32-cast-matmult-fp16",
)
FAST_MATH_VALUES = FAST_MATH_PRESETS + FAST_MATH_RELAYOUT + FAST_MATH_CASTS
# --neuroncore-pipeline-cores shards a graph over N contiguous cores of one instance; the largest Inf1
# (inf1.24xlarge) has 64 NeuronCores.
MAX_PIPELINE_CORES = 64


def fast_math_values(fast_math: str) -> tuple[str, ...]:
    """Split and validate a --fast-math setting ("none", "fp32-cast-matmult no-fast-relayout", ...)."""
    values = tuple(fast_math.replace(",", " ").split())
    if not values:
        raise ConfigError(f"--fast-math is empty; give one or more of: {', '.join(FAST_MATH_VALUES)}")
    unknown = [v for v in values if v not in FAST_MATH_VALUES]
    if unknown:
        raise ConfigError(
            f"--fast-math value(s) {', '.join(unknown)} unknown to neuron-cc; expected some of: {', '.join(FAST_MATH_VALUES)}"
        )
    for group, what in (
        (FAST_MATH_PRESETS, "all/none"),
        (FAST_MATH_RELAYOUT, "fast-relayout/no-fast-relayout"),
        (FAST_MATH_CASTS, "fp32-cast-*"),
    ):
        chosen = [v for v in values if v in group]
        if len(chosen) > 1:
            raise ConfigError(
                f"--fast-math {fast_math!r}: {' and '.join(chosen)} are mutually exclusive ({what}); keep one"
            )
    return values


def compiler_args_for(pipeline_cores: int = 1, fast_math: str | None = None) -> tuple[str, ...]:
    """The neuron-cc arguments for these settings: no flag for the defaults (1 core, compiler's fast-math)."""
    if (
        isinstance(pipeline_cores, bool)
        or not isinstance(pipeline_cores, int)
        or not 1 <= pipeline_cores <= MAX_PIPELINE_CORES
    ):
        raise ConfigError(f"--pipeline-cores must be an integer from 1 to {MAX_PIPELINE_CORES}, got {pipeline_cores!r}")
    args: tuple[str, ...] = ()
    if pipeline_cores > 1:
        args += ("--neuroncore-pipeline-cores", str(pipeline_cores))
    if fast_math is not None:
        args += ("--fast-math",) + fast_math_values(fast_math)
    return args


def _import_torch_neuron():
    try:
        import torch_neuron  # noqa: F401  (registers torch.neuron)
    except ImportError as exc:
        raise BackendUnavailable(f"{INSTALL_HINT} (import torch_neuron failed: {exc})") from None
    return torch_neuron


def trace_neuron(
    module: torch.nn.Module,
    example_inputs: tuple,
    *,
    pipeline_cores: int = 1,
    fast_math: str | None = None,
    workdir: str | None = None,
) -> tuple[torch.jit.ScriptModule, tuple[str, ...]]:
    """Compile `module` at the shapes of `example_inputs` for Inf1 NeuronCores; returns (graph, compiler args).

    fallback=False: every op must compile for the NeuronCore (a CPU partition would run silently on the
    host, and breaks NeuronCore Pipeline); an unsupported op fails here, at compile time.
    dynamic_batch_size=False: each bucket is its own fixed-shape graph.
    """
    compiler_args = compiler_args_for(pipeline_cores, fast_math)
    _import_torch_neuron()
    try:
        traced = torch.neuron.trace(  # type: ignore[attr-defined]  # torch-neuron's plugin adds torch.neuron
            module,
            example_inputs=tuple(example_inputs),
            compiler_args=list(compiler_args),
            compiler_workdir=workdir,
            fallback=False,
            dynamic_batch_size=False,
        )
    except (RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        # AttributeError: an op Neuron does not support (documented for fallback=False);
        # SubprocessError: neuron-cc failed or timed out.
        raise ArtifactError(
            f"torch.neuron.trace failed with compiler_args {list(compiler_args)}: {type(exc).__name__}: {exc}"
            + (
                f"; neuron-cc logs are in {workdir}"
                if workdir
                else "; pass a compiler workdir to keep neuron-cc's logs"
            )
        ) from None
    return traced, compiler_args


def torch_neuron_version() -> str | None:
    """The installed torch-neuron version, or None when it is not importable."""
    try:
        import torch_neuron
    except ImportError:
        return None
    version = getattr(torch_neuron, "__version__", None)
    if version is None:
        from importlib import metadata

        try:
            version = metadata.version("torch-neuron")
        except metadata.PackageNotFoundError:
            return None
    return str(version)
