"""The compiled kernels' shared library, loaded once with ctypes (None where it was not built).

setup.py builds csrc/*.c as the optional extension `neuronserve._kernels`: no Python API,
so one build serves numpy 1.x and 2.x, and ctypes releases the GIL for every call. Without a C compiler
at install time the install still succeeds and LIBRARY is None: its callers (tick_kernels.py,
cache_kernels.py) then run their numpy paths, with the same results to float32 rounding.
NEURONSERVE_KERNELS: `on` (the default), `off` (the library unused, for comparisons and tests), or
an instruction set's variant to use instead of the best this CPU runs (avx512, avx2, generic: to
measure what a smaller CPU would get; tick_kernels.py applies it).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

EXTENSION = "neuronserve._kernels"
SETTING = os.environ.get("NEURONSERVE_KERNELS", "on").lower()
OFF = SETTING in ("off", "0", "false", "no")
VARIANT = None if OFF or SETTING in ("on", "1", "true", "yes") else SETTING  # an instruction set's name


def load() -> ctypes.CDLL | None:
    """The library, or None when it was not built or NEURONSERVE_KERNELS is off."""
    if OFF:
        return None
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)


LIBRARY = load()
