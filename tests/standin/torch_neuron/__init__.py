"""A stand-in for torch-neuron (Inf1), for tests only: it checks calls against AWS's documented API.

The real package cannot be installed here. Tests put tests/standin on sys.path (monkeypatch) and remove
this module from sys.modules afterwards; nothing installs it. Like the real one, importing it registers
`torch.neuron`. It checks every call and raises TypeError / ValueError on anything the documented API
would not accept, records calls, and does the work with plain TorchScript so outputs are real:

- trace(model, example_inputs, **kwargs), documented at
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/frameworks/torch/torch-neuron/api-compilation-python-api.html
  Keywords: the documented torch-neuron ones, plus anything torch.jit.trace accepts (forwarded).
  compiler_args: a list of strings that neuron-cc accepts (flags from the neuron-cc CLI reference,
  https://awsdocs-neuron.readthedocs-hosted.com/en/latest/compiler/neuron-cc/command-line-reference.html).
  Returns torch.jit.trace(model, example_inputs).
- experimental.neuron_cores_context(start_nc=-1, nc_count=-1), the core placement API. Its first use
  stands for the runtime initialising: it records NEURON_RT_VISIBLE_CORES then (read once per process),
  and later placements must fit in that range (start_nc is relative to it).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import types
from typing import List, Optional, Tuple

import torch

__version__ = "1.13.1.2.11.13.0"  # the last torch-neuron release (torch 1.13.1, Neuron SDK 2.x)

# Keywords torch_neuron.trace documents besides model and example_inputs (separate_weights: the
# troubleshooting guide's fix for models over 2 GB).
TRACE_KEYWORDS = frozenset(
    {
        "compiler_args",
        "compiler_timeout",
        "compiler_workdir",
        "subgraph_builder_function",
        "minimum_segment_size",
        "single_fusion_ratio_threshold",
        "fallback",
        "dynamic_batch_size",
        "optimizations",
        "separate_weights",
    }
)
# "All other keyword arguments will be forwarded directly to torch.jit.trace."
JIT_TRACE_KEYWORDS = frozenset(inspect.signature(torch.jit.trace).parameters) - {"func", "example_inputs"}
BOOL_KEYWORDS = ("fallback", "dynamic_batch_size", "separate_weights")

FAST_MATH_VALUES = frozenset(
    {
        "all",
        "none",
        "fast-relayout",
        "no-fast-relayout",
        "fp32-cast-all",
        "fp32-cast-all-fp16",
        "fp32-cast-matmult",
        "fp32-cast-matmult-bf16",
        "fp32-cast-matmult-fp16",
    }
)
FP32_CAST_VALUES = frozenset({"all", "matmult", "matmult-fp16", "matmult-bf16", "all-fp16"})
VERBOSE_VALUES = frozenset({"DEBUG", "INFO", "WARN", "ERROR"})
# neuron-cc compile flags that take no value.
SWITCH_FLAGS = frozenset({"--enable-saturate-infinity", "--enable-fast-loading-neuron-binaries", "--enable-fast-context-switch"})

trace_calls: List[dict] = []  # one entry per trace call: {"model", "example_inputs", "kwargs"}
placements: List[Tuple[int, int]] = []  # (start_nc, nc_count) of every neuron_cores_context
current_placement: Optional[Tuple[int, int]] = None  # inside a neuron_cores_context
runtime_visible_cores: Optional[str] = None  # NEURON_RT_VISIBLE_CORES when the "runtime" initialised ("" if unset)


def check_compiler_args(compiler_args) -> None:
    """Raise unless `compiler_args` is a list of strings neuron-cc's compile command accepts."""
    if not isinstance(compiler_args, list) or not all(isinstance(a, str) for a in compiler_args):
        raise TypeError(f"compiler_args must be a list of str, got {compiler_args!r}")
    i = 0
    while i < len(compiler_args):
        flag = compiler_args[i]
        values = []
        i += 1
        while i < len(compiler_args) and not compiler_args[i].startswith("--"):
            values.append(compiler_args[i])
            i += 1
        if flag in SWITCH_FLAGS:
            ok = not values
        elif flag == "--neuroncore-pipeline-cores":
            ok = len(values) == 1 and values[0].isdigit() and int(values[0]) >= 1
        elif flag == "--fast-math":
            ok = bool(values) and all(v in FAST_MATH_VALUES for v in values) and not {"all", "none"} <= set(values)
        elif flag == "--fp32-cast":
            ok = len(values) == 1 and values[0] in FP32_CAST_VALUES
        elif flag == "--verbose":
            ok = len(values) == 1 and values[0] in VERBOSE_VALUES
        else:
            raise ValueError(f"neuron-cc: unknown compiler argument {flag!r} in {compiler_args}")
        if not ok:
            raise ValueError(f"neuron-cc: invalid value(s) {values} for {flag} in {compiler_args}")


def trace(model, example_inputs, **kwargs):
    """torch_neuron.trace(model, example_inputs, **kwargs), checked; compiles with torch.jit.trace."""
    if not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)  # documented: a single tensor is wrapped in a tuple
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError(f"example_inputs must be a tuple of tensors (or one tensor), got {type(example_inputs).__name__}")
    unknown = sorted(set(kwargs) - TRACE_KEYWORDS - JIT_TRACE_KEYWORDS)
    if unknown:
        raise TypeError(f"torch_neuron.trace got unexpected keyword argument(s) {unknown}")
    if kwargs.get("compiler_args") is not None:
        check_compiler_args(kwargs["compiler_args"])
    for name in BOOL_KEYWORDS:
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise TypeError(f"{name} must be a bool, got {kwargs[name]!r}")
    if kwargs.get("compiler_workdir") is not None and not isinstance(kwargs["compiler_workdir"], (str, os.PathLike)):
        raise TypeError(f"compiler_workdir must be a str path, got {kwargs['compiler_workdir']!r}")
    timeout = kwargs.get("compiler_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise TypeError(f"compiler_timeout must be a positive int of seconds, got {timeout!r}")
    trace_calls.append({"model": model, "example_inputs": example_inputs, "kwargs": dict(kwargs)})
    jit_kwargs = {k: v for k, v in kwargs.items() if k in JIT_TRACE_KEYWORDS}
    return torch.jit.trace(model, example_inputs, **jit_kwargs)


def _neuron_cores_context(start_nc: int = -1, nc_count: int = -1):
    """torch_neuron.experimental.neuron_cores_context, checked (see the module docstring)."""
    global runtime_visible_cores
    for name, value in (("start_nc", start_nc), ("nc_count", nc_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError(f"{name} must be an int >= -1, got {value!r}")
    if nc_count == 0:
        raise ValueError("nc_count must be -1 or a positive number of NeuronCores, got 0")
    if runtime_visible_cores is None:
        runtime_visible_cores = os.environ.get("NEURON_RT_VISIBLE_CORES", "")
    if runtime_visible_cores:
        visible = _count_cores(runtime_visible_cores)
        end = max(start_nc, 0) + max(nc_count, 1)
        if end > visible:
            raise ValueError(
                f"neuron_cores_context(start_nc={start_nc}, nc_count={nc_count}) exceeds the {visible} NeuronCore(s) "
                f"visible to this process (NEURON_RT_VISIBLE_CORES={runtime_visible_cores}); start_nc is relative to them"
            )
    placements.append((start_nc, nc_count))
    return _placed(start_nc, nc_count)


def _count_cores(visible_cores: str) -> int:
    """How many cores NEURON_RT_VISIBLE_CORES names: "2" -> 1, "0-3" -> 4, "3,4,5" -> 3."""
    count = 0
    for part in visible_cores.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


@contextlib.contextmanager
def _placed(start_nc: int, nc_count: int):
    global current_placement
    current_placement = (start_nc, nc_count)
    try:
        yield
    finally:
        current_placement = None


experimental = types.ModuleType(__name__ + ".experimental", "Core placement API (stand-in).")
experimental.neuron_cores_context = _neuron_cores_context
sys.modules[experimental.__name__] = experimental

# `import torch_neuron` makes `torch.neuron` available, as the real package does.
torch.neuron = sys.modules[__name__]
sys.modules["torch.neuron"] = sys.modules[__name__]
