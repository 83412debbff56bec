"""The compiled kernels' shared library, loaded once with ctypes (None where it was not built).

setup.py builds csrc/*.c as the optional extension `neuronserve._kernels`: no Python API,
so one build serves numpy 1.x and 2.x, and ctypes releases the GIL for every call. Without a C compiler
at install time the install still succeeds and LIBRARY is None: its caller (tick_kernels.py) then runs
the numpy path, with the same results to float32 rounding.
NEURONSERVE_KERNELS=off turns the library off (for comparisons and tests).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

EXTENSION = "neuronserve._kernels"


def load() -> ctypes.CDLL | None:
    """The library, or None when it was not built or NEURONSERVE_KERNELS is off."""
    if os.environ.get("NEURONSERVE_KERNELS", "on").lower() in ("off", "0", "false", "no"):
        return None
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)


LIBRARY = load()
