"""The tick's compiled host kernels (csrc/tick_kernels.c), with numpy arrays in and out.

A leaf of tick.py. The library is native.LIBRARY (ctypes releases the GIL for every call, so the tick's
threads run the kernels in parallel); without it `KERNELS` is None and tick.py runs its numpy path.
Contracts of the two calls: the C file.
"""

from __future__ import annotations

import ctypes

import numpy as np

from neuronserve.errors import ConfigError
from neuronserve.native import LIBRARY, VARIANT

# how the kernel combines c(u->v) and c(v->u): the C file's enum, in tick.MUTUALS' order (a test checks)
HOW = {"one_way": 0, "product": 1, "minimum": 2, "harmonic_mean": 3}
COLUMN_ALIGN = 32  # fill_probability's column side is padded to whole tiles of this many columns

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _pointer(array: np.ndarray) -> int:
    return array.ctypes.data


class TickKernels:
    """The loaded library's two kernels, with numpy arrays in and out."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fill = library.tick_fill_probability
        self._fill.argtypes = [_PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, ctypes.c_int, _I64, _I64, _I64, _PTR, _I64]  # fmt: skip
        self._fill.restype = None
        self._top_k = library.tick_top_k
        self._top_k.argtypes = [_PTR, _I64, _PTR, _I64, _I64, ctypes.c_int, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR]  # fmt: skip
        self._top_k.restype = ctypes.c_int
        self._isa = library.tick_isa
        self._isa.restype = ctypes.c_char_p
        self._use_isa = library.tick_use_isa
        self._use_isa.argtypes, self._use_isa.restype = [ctypes.c_char_p], ctypes.c_int

    @property
    def isa(self) -> str:
        """The variant in use: avx512, avx2 or generic (the first this CPU supports, unless use_isa chose)."""
        return self._isa().decode()

    def use_isa(self, name: str | None) -> bool:
        """Run the variant `name` from now on (for tests: every variant this CPU supports); None: the
        default. False when this CPU or build has no such variant."""
        return self._use_isa(None if name is None else name.encode()) == 0

    @staticmethod
    def transposed_columns(cols: np.ndarray) -> np.ndarray:
        """A column side [M, K, D] as fill_probability's right_t: [K, D, M'] float32, M' = M rounded up
        to COLUMN_ALIGN (zeros past M)."""
        m, k, d = cols.shape
        right_t = np.zeros((k, d, -(-m // COLUMN_ALIGN) * COLUMN_ALIGN), np.float32)
        for start in range(0, m, 64):  # in slabs of 64 columns: 4x faster than one strided copy
            stop = min(start + 64, m)
            right_t[:, :, start:stop] = cols[start:stop].transpose(1, 2, 0)
        return right_t

    def fill_probability(
        self,
        left: np.ndarray,
        right_t: np.ndarray,
        m: int,
        bias: np.ndarray,
        weights: np.ndarray,
        uniform: bool,
        start: int,
        stop: int,
        out: np.ndarray,
    ) -> np.ndarray:
        """out[i, :m] = sum_k w_k sigmoid(<left[k, start + i], right_t[k, :, j]> + bias[k]) for the rows
        start:stop of left [K, N, D] (C-contiguous float32); out: float32 [stop - start, >= m] whose rows
        are contiguous (any row stride)."""
        labels, n, dim = left.shape
        _check(left, right_t, bias, weights)
        if bias.shape != (labels,) or weights.shape != (labels,):
            raise ValueError(f"bias and weights must have one value per label ({labels})")
        if out.dtype != np.float32 or out.shape[0] != stop - start or out.shape[1] < m or out.strides[1] != 4:
            raise ValueError("out must be float32 [stop - start, >= m] with contiguous rows")
        if right_t.shape[:2] != (labels, dim) or right_t.shape[2] < m or right_t.shape[2] % COLUMN_ALIGN:
            raise ValueError("right_t must be [K, D, M'] with M' >= m a multiple of COLUMN_ALIGN")
        if not 0 <= start <= stop <= n:
            raise ValueError(f"rows {start}:{stop} outside the {n} rows")
        self._fill(
            _pointer(left), n, _pointer(right_t), right_t.shape[2], labels, dim, _pointer(bias), _pointer(weights),
            int(uniform), start, stop, m, _pointer(out), out.strides[0] // 4,
        )  # fmt: skip
        return out

    def top_k(
        self,
        forward: np.ndarray,
        k: int,
        how: str = "one_way",
        reverse: np.ndarray | None = None,
        reverse_column: int = 0,
        excluded_ptr: np.ndarray | None = None,
        excluded_cols: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row of forward [B, M] (float32, contiguous rows): the columns [B, k] (int64, -1 past the
        count), values [B, k] (float32, -inf past it) and counts [B] (int32) of its k best values,
        value descending, ties by the lower column. With `how` mutual the value of (i, v) is
        combine(forward[i, v], reverse[v, reverse_column + i]) (reverse: a pool's whole forward matrix).
        Excluded: row i's columns excluded_cols[excluded_ptr[i]:excluded_ptr[i + 1]]."""
        rows, m = forward.shape
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if rows == 0 or m == 0:  # nothing to choose from
            return np.full((rows, k), -1, np.int64), np.full((rows, k), -np.inf, np.float32), np.zeros(rows, np.int32)
        if forward.dtype != np.float32 or forward.strides[1] != 4:
            raise ValueError("forward must be float32 with contiguous rows")
        if how != "one_way":
            if reverse is None or reverse.dtype != np.float32 or not reverse.flags.c_contiguous:
                raise ValueError("a mutual top_k needs reverse: a C-contiguous float32 matrix")
            if reverse.shape[0] < m or reverse_column + rows > reverse.shape[1]:
                raise ValueError("reverse does not cover the block's rows and columns")
        if excluded_ptr is None:
            excluded_ptr, excluded_cols = np.zeros(rows + 1, np.int64), np.zeros(1, np.int64)
        excluded_ptr = np.ascontiguousarray(excluded_ptr, np.int64)
        excluded_cols = np.ascontiguousarray(excluded_cols, np.int64)
        bounds_ok = len(excluded_ptr) == rows + 1 and excluded_ptr[0] >= 0 and excluded_ptr[-1] <= len(excluded_cols)
        if not (
            bounds_ok and (np.diff(excluded_ptr) >= 0).all() and ((excluded_cols >= 0) & (excluded_cols < m)).all()
        ):
            raise ValueError("excluded_ptr must be rows + 1 ascending offsets into excluded_cols, columns of forward")
        cols = np.empty((rows, k), np.int64)
        values = np.empty((rows, k), np.float32)
        counts = np.empty(rows, np.int32)
        code = self._top_k(
            _pointer(forward), forward.strides[0] // 4, 0 if reverse is None else _pointer(reverse),
            0 if reverse is None else reverse.shape[1], reverse_column, HOW[how], rows, m,
            _pointer(excluded_ptr), _pointer(excluded_cols), k, _pointer(cols), _pointer(values), _pointer(counts),
        )  # fmt: skip
        if code != 0:
            raise MemoryError("tick_top_k could not allocate its scratch")
        return cols, values, counts


def _check(*arrays: np.ndarray) -> None:
    for array in arrays:
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError("the kernels take C-contiguous float32 arrays")


def _load() -> TickKernels | None:
    if LIBRARY is None:
        return None
    kernels = TickKernels(LIBRARY)
    if VARIANT is not None and not kernels.use_isa(VARIANT):
        raise ConfigError(
            f"NEURONSERVE_KERNELS={VARIANT}: this CPU or build has no such variant; use on, off, avx512, avx2 or generic"
        )
    return kernels


KERNELS = _load()
