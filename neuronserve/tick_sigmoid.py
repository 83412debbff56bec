"""An in-place float32 sigmoid whose value depends on its input only, never on the element's position.

A leaf of tick.py (PROBABILITY's w_k * sigmoid(s_k) over whole blocks). torch's sigmoid runs about 2.4x
faster than numpy's `1 / (1 + exp(-s))` on this kind of CPU, but a torch elementwise loop computes the
last partial vector of each range it is given with a scalar routine that rounds differently, so equal
logits at two columns could get unequal probabilities and break the tick's tie rule. Here every call
covers a whole multiple of SIGMOID_ALIGN elements (two AVX-512 vectors, so any SIMD width up to it leaves
no tail) and, unless torch runs one thread, at most SIGMOID_CHUNK of them (below torch's parallel grain
size, 32,768: one range, never split between threads): torch's SIMD body computes every element. With one
thread the whole buffer is one range, so it is one call (20% faster than chunks of a [4, 209, 512] tile).
Same in torch 1.13 and 2.x.
"""

from __future__ import annotations

import numpy as np
import torch

SIGMOID_ALIGN = 32  # elements of a call: a multiple of this (2 x 16 float32 lanes)
SIGMOID_CHUNK = 32_736  # elements of a call: at most this (1,023 x 32, below torch's GRAIN_SIZE of 32,768)


def sigmoid_(buffer: np.ndarray) -> np.ndarray:
    """sigmoid(buffer) in place; buffer: C-contiguous float32 whose size is a multiple of SIGMOID_ALIGN."""
    if buffer.dtype != np.float32 or not buffer.flags.c_contiguous or buffer.size % SIGMOID_ALIGN:
        raise ValueError("sigmoid_ needs a C-contiguous float32 buffer of a multiple of 32 elements")
    flat = torch.from_numpy(buffer.reshape(-1))
    chunk = flat.numel() if torch.get_num_threads() == 1 else SIGMOID_CHUNK
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        torch.sigmoid(part, out=part)
    return buffer
