"""The matching tick's direction on a device: the seam between tick.py and a backend's NeuronCores.

A TickDevice runs one direction's values at one fixed block, rows x columns (contract.TICK_BLOCK), as
one execution; DeviceDirection covers a tick's rows and columns with such blocks (zero padding at the
edges, sliced off) and is used by tick.score_tick in place of the host's matmuls. The device does the
matmuls, the sigmoid and the weighted sum over labels (one float per pair comes back, not K); the host
keeps the mutual combination, the exclusions and the top-k (docs/tick.md, "On NeuronCores").
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np


class TickDevice(Protocol):
    """rows x columns per execution; `executions`: how many may run at once (threads to feed it)."""

    rows: int
    columns: int
    executions: int

    def run(
        self, left: np.ndarray, right: np.ndarray, bias: np.ndarray, weights: np.ndarray, logit: bool
    ) -> np.ndarray:
        """values [rows, columns] float32 of left [rows, K, D] against right [columns, K, D]."""
        ...


class DeviceDirection:
    """tick.HostDirection's interface (`block`) on a TickDevice: c(row -> column) of rows_side [N, K, D]
    against cols_side [M, K, D], both padded once with zero vectors to whole blocks."""

    def __init__(self, device: TickDevice, rows: np.ndarray, cols: np.ndarray, bias: np.ndarray, spec) -> None:
        self.device = device
        self.rows, self.cols = _padded(rows, device.rows, device.columns), _padded(cols, device.rows, device.columns)
        self.n, self.m = len(rows), len(cols)
        self.bias = np.asarray(bias, np.float32)
        self.weights = np.asarray(spec.weights, np.float32)
        self.logit = spec.label_space == "logit"

    def block(self, start: int, stop: int, out: np.ndarray, transposed: bool = False) -> np.ndarray:
        """c(row -> column) for rows start:stop into out [stop - start, M]; transposed: for columns
        start:stop and every row, into out [stop - start, N]. stop - start <= device.rows."""
        left, right, width = (self.cols, self.rows, self.n) if transposed else (self.rows, self.cols, self.m)
        r, c = self.device.rows, self.device.columns
        if stop - start > r:
            raise ValueError(f"a device block holds at most {r} rows, got {stop - start}")
        lhs = left[start : start + r]
        for j in range(0, width, c):
            values = self.device.run(lhs, right[j : j + c], self.bias, self.weights, self.logit)
            out[:, j : min(j + c, width)] = values[: stop - start, : min(c, width - j)]
        return out


def _padded(vectors: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """vectors [N, K, D] followed by zero vectors up to a multiple of both block sides (a side's vectors
    serve as rows of one direction and as columns of the other)."""
    n, unit = len(vectors), math.lcm(rows, columns)
    out = np.zeros((max(1, -(-n // unit)) * unit,) + vectors.shape[1:], np.float32)
    out[:n] = vectors
    return out
