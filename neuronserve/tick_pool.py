"""A mutual pool's tick in PROBABILITY with non-negative weights, pruned by a bound (docs/tick.md).

A leaf of tick.py. Tiles (I, J) and (J, I) are computed together (both directions' logits of a pair of
blocks), so value(u, v) is formed in cache and serves row u and row v. Exact probabilities (four sigmoids
a direction) are computed only for pairs whose upper bound reaches a row threshold; every other pair costs
its matmuls and a few elementwise operations. The argument, why it never changes a result:

  sigmoid(x) <= 1/2 + x/4 + max(0, -x)^3 / 48 for every real x, so with w_k >= 0 and m = min_k s_k,
  c = sum_k w_k sigmoid(s_k) <= beta = W/2 + sum_k w_k s_k / 4 + W max(0, -m)^3 / 48 (W = sum_k w_k),
  and every mutual combination is non-decreasing in each direction: value(u, v) <= combine(beta, beta').
  T_u is any number: the candidates of row u are all its valid pairs whose exact value is >= T_u (a pair
  whose bound, with a float margin, is below min(T_u, T_v) cannot be one). When a row has at least k
  candidates (or all its valid pairs), its top k and every tie with the k-th are among them; otherwise
  the row is recomputed exactly (the fallback). T_u: the j-th largest exact value of row u over a probe
  of columns (all computed exactly), j chosen so that T_u is below the row's k-th value almost always.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from neuronserve.tick_sigmoid import SIGMOID_ALIGN, sigmoid_
from neuronserve.topk import padded_width, top_k

PAIR_TILE = 256  # rows and columns of a pair tile (I, J): both directions' K logits, 2 x K x 256 x 256
PROBE_COLUMNS = 512  # the probe: this many columns (at least) computed exactly for the thresholds
MARGIN = 1.0 - 2.0**-11  # thresholds lowered by this factor: the bound's and the values' float rounding
ROW_BITS, COL_BITS = 10, 21  # a candidate's sort key: local row, value (descending), column


class PoolTick:
    """value(u, v) for every pair of a pool (rows are the columns, in column order) and its top k."""

    def __init__(self, users, peers, bias, weights, mutual: str, k: int, excluded, combine) -> None:
        n, labels, d = users.shape
        self.n, self.k, self.mutual, self.combine = n, k, mutual, combine
        quarter = np.float32(0.25)  # s / 4 exactly (a power of two): the bound's linear term for free
        self.left = np.empty((labels, n, d + 1), np.float32)  # [U_k / 4 | b_k / 4]: s_k(row -> col) / 4
        self.left[:, :, :d] = users.transpose(1, 0, 2) * quarter
        self.left[:, :, d] = (bias * quarter)[:, None]
        self.right = np.ones((labels, n, d + 1), np.float32)  # [P_k | 1]
        self.right[:, :, :d] = peers.transpose(1, 0, 2)
        self.w = np.asarray(weights, np.float32)
        self.total = float(np.sum(self.w, dtype=np.float64))
        self.uniform = bool((self.w == self.w[0]).all())
        self.cube = np.float32(-4.0 / 3.0 * self.total)  # (s/4 = q) max(0, -s)^3 / 48 = -(4/3) min(q, 0)^3
        self.half = np.float32(self.total / 2)
        self.ex_rows, self.ex_cols = excluded
        self.ex_keys = np.sort(self.ex_rows.astype(np.int64) * n + self.ex_cols)
        self.valid = n - np.bincount(self.ex_rows, minlength=n)
        self.probe = min(n, -(-PROBE_COLUMNS // PAIR_TILE) * PAIR_TILE)
        lam = k * self.probe / max(n - 1, 1)  # the probe's expected members of a row's top k
        self.j = math.ceil(lam + 2 * math.sqrt(lam) + 1)
        self.fallbacks = 0

    # ---- exact values -------------------------------------------------------------------------------

    def exact(self, logits: np.ndarray) -> np.ndarray:
        """c from the quarter logits [K, ...]: in place; logits C-contiguous, its size a multiple of
        SIGMOID_ALIGN or its base (`logits` from `self.logits`) such a buffer."""
        logits *= np.float32(4)
        whole = logits if logits.size % SIGMOID_ALIGN == 0 else logits.base
        assert whole is not None
        sigmoid_(whole)
        if not self.uniform:
            logits *= self.w.reshape((-1,) + (1,) * (logits.ndim - 1))
        out = logits[0] + logits[1] if len(logits) > 1 else logits[0].copy()
        for label in logits[2:]:
            out += label
        if self.uniform:
            out *= self.w[0]
        return out

    def logits(self, rows: slice | np.ndarray, cols: slice | np.ndarray, reverse: bool) -> np.ndarray:
        """Quarter logits [K, r, c] of row -> col (reverse: col -> row, laid out [row, col]), in a buffer
        whose size is a multiple of SIGMOID_ALIGN."""
        a, b = (self.right, self.left) if reverse else (self.left, self.right)
        lhs, rhs = a[:, rows], b[:, cols]
        shape = (lhs.shape[0], lhs.shape[1], rhs.shape[1])
        size = shape[0] * shape[1] * shape[2]
        flat = np.empty(-(-size // SIGMOID_ALIGN) * SIGMOID_ALIGN, np.float32)
        flat[size:] = 0  # the alignment tail: read by the sigmoid, never used
        out = flat[:size].reshape(shape)
        np.matmul(lhs, rhs.transpose(0, 2, 1), out=out)
        return out

    def dense(self, rows, cols) -> np.ndarray:
        """Exact value [r, c] of rows x cols."""
        forward = self.exact(self.logits(rows, cols, False))
        return self.combine(forward, self.exact(self.logits(rows, cols, True)))

    def gathered(self, logits: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Exact c at flat positions `index` of logits [K, r, c]."""
        size = -(-len(index) // SIGMOID_ALIGN) * SIGMOID_ALIGN
        picked = np.zeros((len(logits), size), np.float32)
        np.take(logits.reshape(len(logits), -1), index, axis=1, out=picked[:, : len(index)])
        return self.exact(picked)[: len(index)]

    # ---- bound --------------------------------------------------------------------------------------

    def bound(self, q: np.ndarray) -> np.ndarray:
        """beta from the quarter logits q [K, r, c]: W/2 + sum_k w_k q_k - (4/3) W min(min_k q_k, 0)^3."""
        if self.uniform:
            lin = q[0] + q[1] if len(q) > 1 else q[0].copy()
            for label in q[2:]:
                lin += label
            lin *= self.w[0]
        else:
            lin = np.tensordot(self.w, q, axes=1)
        low = np.minimum(q[0], np.float32(0))
        for label in q[1:]:
            np.minimum(low, label, out=low)
        cube = low * low
        cube *= low
        cube *= self.cube
        lin += cube
        lin += self.half
        return lin

    # ---- the phases ---------------------------------------------------------------------------------

    def probe_rows(self, start: int, stop: int, out: np.ndarray) -> None:
        """Phase 1: exact values of rows start:stop against the probe's columns, into out [N, probe]."""
        out[start:stop] = self.dense(slice(start, stop), slice(0, self.probe))

    def thresholds(self, probe_values: np.ndarray) -> np.ndarray:
        """T per row: the j-th largest exact probe value over valid pairs (-inf when there are fewer)."""
        if self.j > self.probe:
            return np.full(self.n, -np.inf, np.float32)
        part = np.partition(probe_values, self.probe - self.j, axis=1)[:, self.probe - self.j]
        return part.astype(np.float32)

    def pair_tile(self, tile: tuple[int, int, int, int], lowered: np.ndarray):
        """Phase 2 on tile (I, J) = rows i0:i1, columns j0:j1 (I before J, both past the probe):
        candidates (rows, cols, values) of rows in I and of rows in J."""
        i0, i1, j0, j1 = tile
        forward, reverse = (
            self.logits(slice(i0, i1), slice(j0, j1), False),
            self.logits(slice(i0, i1), slice(j0, j1), True),
        )
        bound = self.combine(self.bound(forward), self.bound(reverse))
        threshold = np.minimum.outer(lowered[i0:i1], lowered[j0:j1])
        index = np.flatnonzero(bound >= threshold)
        value = self.combine(self.gathered(forward, index), self.gathered(reverse, index))
        width = j1 - j0
        u, v = index // width + i0, index % width + j0
        found = [self._kept(u, v, value)]
        if i0 != j0:  # the transposed side: row v, column u
            found.append(self._kept(v, u, value))
        return found

    def _kept(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray):
        keep = values >= self.threshold[rows]
        rows, cols, values = rows[keep], cols[keep], values[keep]
        lo, hi = (
            np.searchsorted(self.ex_keys, [rows.min() * self.n, (rows.max() + 1) * self.n]) if len(rows) else (0, 0)
        )
        if hi > lo:  # exclusions among these rows (the tile's rows are a range)
            near = self.ex_keys[lo:hi]
            keys = rows.astype(np.int64) * self.n + cols
            at = np.minimum(np.searchsorted(near, keys), len(near) - 1)
            allowed = near[at] != keys
            rows, cols, values = rows[allowed], cols[allowed], values[allowed]
        return rows, cols, values

    def block_top(self, start: int, stop: int, probe_values: np.ndarray, found: list) -> tuple[np.ndarray, np.ndarray]:
        """Phase 3 for rows start:stop past the probe: (columns [B, k], values [B, k]) from the probe's
        candidates and the pair tiles' (`found`: (rows, cols, values) of these rows); rows with too few
        candidates are recomputed exactly."""
        k, b = self.k, stop - start
        probe = probe_values[start:stop]
        pr, pc = np.nonzero((probe >= self.threshold[start:stop, None]) & (probe > -np.inf))
        rows = np.concatenate([pr + start] + [f[0] for f in found]) - start
        cols = np.concatenate([pc] + [f[1] for f in found])
        values = np.concatenate([probe[pr, pc]] + [f[2] for f in found])
        counts = np.bincount(rows, minlength=b)
        need = np.minimum(self.valid[start:stop], k)
        top, top_values = np.zeros((b, k), np.int64), np.full((b, k), -np.inf, np.float32)
        if len(rows):
            bits = (values + np.float32(0)).view(np.int32).astype(np.int64)  # -0.0 and 0.0: one key
            descending = 0x7FFFFFFF - (bits ^ ((bits >> 31) & 0x7FFFFFFF))  # float order, reversed
            order = np.argsort((rows.astype(np.int64) << (32 + COL_BITS)) | (descending << COL_BITS) | cols)
            at = (np.cumsum(counts) - counts)[:, None] + np.arange(k)
            ok = np.arange(k)[None, :] < np.minimum(counts, k)[:, None]
            picked = order[np.where(ok, at, 0)]
            top, top_values = np.where(ok, cols[picked], 0), np.where(ok, values[picked], np.float32(-np.inf))
        short = np.flatnonzero(counts < need)
        if len(short):  # the fallback: these rows exactly, every column
            self.fallbacks += len(short)
            top[short], top_values[short] = self.exact_rows(short + start)
        return top, top_values

    def exact_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(columns [r, k], values [r, k]) of rows `rows`, every column computed exactly."""
        n, k = self.n, self.k
        padded = np.full((len(rows), padded_width(n)), -np.inf, np.float32)
        padded[:, :n] = self.dense(rows, slice(0, n))
        lo, hi = np.searchsorted(self.ex_rows, rows), np.searchsorted(self.ex_rows, rows, side="right")
        for i, (a, z) in enumerate(zip(lo, hi, strict=True)):
            padded[i, self.ex_cols[a:z]] = -np.inf
        top = top_k(padded, k, n)
        return top, np.take_along_axis(padded, top, axis=1)

    def run(self, threads: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns [N, k], values [N, k]) of every row (column order), value descending, ties by lower
        column; past a row's valid candidates: column 0 and -inf."""
        n, p, tile = self.n, self.probe, PAIR_TILE
        probe_values = np.empty((n, p), np.float32)
        top, values = np.zeros((n, self.k), np.int64), np.full((n, self.k), -np.inf, np.float32)
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads, thread_name_prefix="tick") as ex:
            list(ex.map(lambda s: self.probe_rows(s, min(s + tile, n), probe_values), range(0, n, tile)))
            for s, (t, v) in zip(
                range(0, p, tile), ex.map(lambda s: self._probe_top(s, probe_values), range(0, p, tile)), strict=True
            ):
                top[s : s + len(t)], values[s : s + len(t)] = t, v  # before the exclusions below: rows of the probe
            hit = self.ex_cols < p
            probe_values[self.ex_rows[hit], self.ex_cols[hit]] = -np.inf
            self.threshold = self.thresholds(probe_values)
            lowered = np.where(self.threshold > 0, self.threshold * np.float32(MARGIN), self.threshold)
            starts = list(range(p, n, tile))
            tiles = [(a, min(a + tile, n), c, min(c + tile, n)) for i, a in enumerate(starts) for c in starts[i:]]
            found: dict[int, list] = {a: [] for a in starts}
            for pieces in ex.map(lambda t: self.pair_tile(t, lowered), tiles):
                for piece in pieces:
                    if len(piece[0]):
                        found[starts[0] + (int(piece[0][0]) - starts[0]) // tile * tile].append(piece)
            for s, (t, v) in zip(
                starts,
                ex.map(lambda s: self.block_top(s, min(s + tile, n), probe_values, found[s]), starts),
                strict=True,
            ):
                top[s : s + len(t)], values[s : s + len(t)] = t, v
        return top, values

    def _probe_top(self, start: int, probe_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows start:start+tile of the probe: their whole rows are exact (value(u, v) = value(v, u))."""
        stop = min(start + PAIR_TILE, self.probe)
        padded = np.full((stop - start, padded_width(self.n)), -np.inf, np.float32)
        padded[:, : self.n] = probe_values[:, start:stop].T
        lo, hi = np.searchsorted(self.ex_rows, [start, stop])
        padded[self.ex_rows[lo:hi] - start, self.ex_cols[lo:hi]] = -np.inf
        top = top_k(padded, self.k, self.n)
        return top, np.take_along_axis(padded, top, axis=1)
