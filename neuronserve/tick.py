"""The matching tick: every person's top-k candidates over a whole pool (or users x peers), from the
cached tower outputs, without ever holding the [N, M, K] scores. The blocks run the compiled kernels
(tick_kernels: PROBABILITY's fill and every top-k) where they were built, else numpy and torch; LOGIT's
matmuls are numpy's either way. The service's ScoreTick gathers the vectors from the embedding cache and
runs `score_tick` in a worker thread.

Definitions (docs/tick.md states them with the algorithm and the block size):
  s_k(u->v) = <U[u, k], P[v, k]> + b_k             label k's logit of u towards v (w_k folded into U)
  c(u->v)   = sum_k w_k * sigmoid(s_k(u->v))       label_space PROBABILITY
            = sum_k w_k * s_k(u->v)                label_space LOGIT
  value(u, v) = c(u->v)                            ONE_WAY
              = c(u->v) * c(v->u)                  PRODUCT        (c >= 0 required)
              = min(c(u->v), c(v->u))              MINIMUM
              = 2 c(u->v) c(v->u) / (c(u->v) + c(v->u)), 0 when both are 0   HARMONIC_MEAN (c >= 0 required)
Per row, candidates sorted by value descending, ties by the lower peer id. Excluded pairs (self-pairs
when asked, blocked pairs) are never candidates.

Compute: blocked matmuls fused with the combination and a pruned top-k, on a thread pool; the
algorithm, the block sizes and the one-direction path for small mutual pools: docs/tick.md.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from neuronserve.errors import InvalidInput
from neuronserve.tick_device import DeviceDirection, TickDevice
from neuronserve.tick_kernels import KERNELS
from neuronserve.tick_pairs import exclusions as exclusions  # re-exported: tick.exclusions is the API
from neuronserve.tick_pairs import pool_order
from neuronserve.tick_threads import TickStopped as TickStopped  # re-exported: score_tick raises it
from neuronserve.tick_threads import default_threads as default_threads  # re-exported: the tick's API
from neuronserve.tick_threads import in_blocks
from neuronserve.tick_sigmoid import sigmoid_
from neuronserve.topk import padded_width, top_k

PROBABILITY, LOGIT = "probability", "logit"
LABEL_SPACES = (PROBABILITY, LOGIT)
ONE_WAY, PRODUCT, MINIMUM, HARMONIC_MEAN = "one_way", "product", "minimum", "harmonic_mean"
MUTUALS = (ONE_WAY, PRODUCT, MINIMUM, HARMONIC_MEAN)
PAD_ID = -1  # padding of a row with fewer than k candidates (its value: -inf); `counts` is authoritative
BLOCK_BYTES = 4 << 20  # one [B, M] float32 working matrix: about 4 MiB (see block_rows_for)
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 16, 1024
FILL_COLUMNS = 512  # PROBABILITY's column tile: the K logits of [B, 512] per batched matmul (docs/tick.md)
TILE_COLUMNS = 256  # a mutual pool's combination reads F's transposed side in tiles of this width
POOL_MATRIX_BYTES = 512 << 20  # a mutual pool's whole [N, N] float32 forward matrix, at most: N <= 11,585


@dataclass(frozen=True)
class TickSpec:
    k: int
    weights: np.ndarray  # float32 [K]
    label_space: str = PROBABILITY
    mutual: str = ONE_WAY
    include_label_scores: bool = False


@dataclass
class TickResult:
    ids: np.ndarray  # int64 [N, k]: peer ids, PAD_ID past counts[i]
    values: np.ndarray  # float32 [N, k]: value(u, v), -inf past counts[i]
    counts: np.ndarray  # int32 [N]: valid entries per row
    label_scores: np.ndarray | None = None  # float32 [N, k, K]: s_k(u->v), 0 past counts[i]
    reverse_label_scores: np.ndarray | None = None  # float32 [N, k, K]: s_k(v->u) (mutual only)


def make_spec(
    k: int,
    weights: Sequence[float],
    num_labels: int,
    candidates: int,
    *,
    label_space: str = PROBABILITY,
    mutual: str = ONE_WAY,
    include_label_scores: bool = False,
    candidates_what: str = "peers",
) -> TickSpec:
    """Validated TickSpec; `candidates`: the most a row can have (pool size - 1, or the peer count)."""
    if label_space not in LABEL_SPACES:
        raise InvalidInput(f"label_space must be one of {', '.join(LABEL_SPACES)}, got {label_space!r}")
    if mutual not in MUTUALS:
        raise InvalidInput(f"mutual must be one of {', '.join(MUTUALS)}, got {mutual!r}")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise InvalidInput(f"k must be >= 1 (candidates returned per person), got {k}")
    if candidates < 1:
        raise InvalidInput(f"no person has a candidate ({candidates_what} is {candidates}): send at least 2 people")
    if k > candidates:
        raise InvalidInput(
            f"k={k} is above the {candidates} candidates each person has ({candidates_what}); send k <= {candidates}"
        )
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        w = np.full(num_labels, 1.0 / num_labels)
    if w.size != num_labels:
        raise InvalidInput(
            f"weights has {w.size} values; send one per label ({num_labels}), or none for 1/{num_labels} each"
        )
    if not np.isfinite(w).all():
        bad = int(np.flatnonzero(~np.isfinite(w))[0])
        raise InvalidInput(f"weights[{bad}] is {w[bad]}: weights must be finite")
    if mutual in (PRODUCT, HARMONIC_MEAN) and (label_space != PROBABILITY or (w < 0).any()):
        raise InvalidInput(
            f"mutual {mutual.upper()} needs non-negative direction values: label_space PROBABILITY and "
            "every weight >= 0 (use MINIMUM for logits or negative weights)"
        )
    return TickSpec(int(k), w.astype(np.float32), label_space, mutual, bool(include_label_scores))


def block_rows_for(columns: int) -> int:
    """Rows per block: a [B, M] float32 matrix of about BLOCK_BYTES, B in [MIN_BLOCK_ROWS, MAX_BLOCK_ROWS]."""
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (4 * max(columns, 1))))


class HostDirection:
    """One direction's combined values c(row -> column) for blocks of rows: the row side's vectors and
    the column side's, pre-arranged for one matmul (LOGIT) or one batched matmul of the K labels in
    column tiles (PROBABILITY)."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, bias: np.ndarray, spec: TickSpec) -> None:
        # rows [N, K, D] (the row side's vectors of the labels' left factor), cols [M, K, D]
        n, k, d = rows.shape
        w = spec.weights.astype(np.float32)
        self.logit = spec.label_space == LOGIT
        if self.logit:  # c = [w_1 U_1 .. w_K U_K] . [P_1 .. P_K] + sum_k w_k b_k: one matmul, inner K*D
            self.rows = np.ascontiguousarray((rows * w[None, :, None]).reshape(n, k * d))
            self.cols = np.ascontiguousarray(cols.reshape(len(cols), k * d))
            self.const = np.float32(np.dot(w.astype(np.float64), bias.astype(np.float64)))
        elif KERNELS is not None:  # the compiled kernel: matmuls, sigmoids and the weighted sum in one pass
            self.row_vectors, self.col_vectors = rows, cols
            self.bias, self.weights_k = np.ascontiguousarray(bias, np.float32), np.ascontiguousarray(w)
            self.uniform = bool((w == w[0]).all())
            self._sides: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
            self._sides_lock = threading.Lock()
        else:  # per label [U_k, b_k] . [P_k, 1] = s_k, then sigmoid, times w_k, summed over k
            self.rows = np.empty((k, n, d + 1), np.float32)
            self.rows[:, :, :d] = rows.transpose(1, 0, 2)
            self.rows[:, :, d] = bias[:, None]
            self.cols = np.ones((k, len(cols), d + 1), np.float32)
            self.cols[:, :, :d] = cols.transpose(1, 0, 2)
            self.weights = w[:, None, None]
            self.uniform = bool((w == w[0]).all())  # the default 1/K: sum the probabilities, then one multiply

    def block(self, start: int, stop: int, out: np.ndarray, transposed: bool = False) -> np.ndarray:
        """c(row -> column) for rows start:stop into out [stop - start, M]; transposed: c(row -> column)
        for columns start:stop and every row, into out [stop - start, N]."""
        if not self.logit and KERNELS is not None:
            left, right_t = self._kernel_sides(transposed)
            m = len(self.row_vectors if transposed else self.col_vectors)
            return KERNELS.fill_probability(left, right_t, m, self.bias, self.weights_k, self.uniform, start, stop, out)
        left, right = (self.cols, self.rows) if transposed else (self.rows, self.cols)
        if self.logit:
            np.matmul(left[start:stop], right.T, out=out)
            out += self.const
            return out
        # the K labels' logits of a column tile in one padded scratch [K, B, W]: one batched matmul, then
        # torch's sigmoid on whole aligned chunks (tick_sigmoid: equal logits, equal probabilities)
        lhs, m = left[:, start:stop], right.shape[1]
        scratch = np.zeros((len(lhs), stop - start, min(FILL_COLUMNS, padded_width(m))), np.float32)
        for j in range(0, m, scratch.shape[2]):
            c = min(scratch.shape[2], m - j)
            np.matmul(lhs, right[:, j : j + c].transpose(0, 2, 1), out=scratch[:, :, :c])
            sigmoid_(scratch)
            if not self.uniform:
                scratch *= self.weights
            # ((p_1 + p_2) + p_3) + ...: the same order for every pair, summed in the scratch (a strided
            # tile of `out` costs 3x as much a pass); only the last pass writes `out`
            target, labels = out[:, j : j + c], scratch[:, :, :c]
            total = labels[0]
            for label in labels[1:]:
                total += label
            if self.uniform:
                np.multiply(total, self.weights[0], out=target)
            else:
                np.copyto(target, total)
        return out

    def _kernel_sides(self, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's left side [K, N, D] and transposed right side [K, D, M'] (a direction runs
        one way only, so each is arranged once, when first used)."""
        assert KERNELS is not None
        with self._sides_lock:
            if transposed not in self._sides:
                left, right = (
                    (self.col_vectors, self.row_vectors) if transposed else (self.row_vectors, self.col_vectors)
                )
                left_k = np.ascontiguousarray(left.transpose(1, 0, 2), np.float32)
                self._sides[transposed] = (left_k, KERNELS.transposed_columns(right))
            return self._sides[transposed]


def _mutual(forward: np.ndarray, reverse: np.ndarray, how: str) -> np.ndarray:
    """value from c(u->v) (forward) and c(v->u) (reverse), in forward's memory."""
    if how == PRODUCT:
        forward *= reverse
    elif how == MINIMUM:
        np.minimum(forward, reverse, out=forward)
    elif how == HARMONIC_MEAN:  # 2ab / (a + b); a, b >= 0, so a + b == 0 means a == b == 0: value 0
        total = forward + reverse
        forward *= reverse
        forward *= 2
        np.divide(forward, total, out=forward, where=total != 0)
    return forward


def _combine_transposed(matrix: np.ndarray, start: int, stop: int, how: str, out: np.ndarray) -> np.ndarray:
    """value(u, v) for the rows u in start:stop of a pool's forward matrix F (c(u->v) = F[u, v]) and
    every column v: combine(F[u, v], F[v, u]), read tile by tile so the transposed side stays in cache."""
    for j in range(0, matrix.shape[1], TILE_COLUMNS):
        stop_j = min(j + TILE_COLUMNS, matrix.shape[1])
        forward, reverse, target = matrix[start:stop, j:stop_j], matrix[j:stop_j, start:stop].T, out[:, j:stop_j]
        if how == PRODUCT:
            np.multiply(forward, reverse, out=target)
        elif how == MINIMUM:
            np.minimum(forward, reverse, out=target)
        else:  # HARMONIC_MEAN
            np.copyto(target, forward)
            _mutual(target, np.ascontiguousarray(reverse), how)
    return out


def score_tick(
    row_ids: np.ndarray,
    col_ids: np.ndarray,
    rows_user: np.ndarray,
    cols_peer: np.ndarray,
    bias: np.ndarray,
    spec: TickSpec,
    *,
    rows_peer: np.ndarray | None = None,
    cols_user: np.ndarray | None = None,
    excluded: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.int64)),
    block_rows: int | None = None,
    threads: int | None = None,
    pool: bool = False,
    device: TickDevice | None = None,
    matrix: np.ndarray | None = None,
    stop: threading.Event | None = None,
) -> TickResult:
    """Top-k per row. row_ids [N] distinct (any order: rows come back in it); col_ids [M] distinct and
    sorted ascending. rows_user [N, K, D] / cols_peer [M, K, D]: the user vectors of the rows and the
    peer vectors of the columns (c(u->v)); for a mutual spec also rows_peer [N, K, D] and cols_user
    [M, K, D] (c(v->u)). excluded: (row index, column index) pairs from `exclusions`, sorted by row.
    pool: the rows are the columns' people (row_ids the col_ids in any order, with the same vectors);
    a mutual pool whose [M, M] float32 matrix fits POOL_MATRIX_BYTES then computes c(u->v) once and
    reads c(v->u) from its transpose; matrix: flat float32 memory of at least M * M for it (any
    contents; ScoringGate keeps one between ticks), else allocated here. device: run the directions'
    blocks on it (tick_device), with its rows as the block and its executions as the threads; the host
    does the rest. stop: once set, no further block starts and TickStopped is raised (the caller has gone)."""
    n, m = len(row_ids), len(col_ids)
    if len(col_ids) > 1 and not (np.diff(col_ids) > 0).all():
        raise ValueError("col_ids must be distinct and sorted ascending")
    mutual = spec.mutual != ONE_WAY
    if mutual and (rows_peer is None or cols_user is None):
        raise ValueError("a mutual tick needs rows_peer and cols_user")
    whole = uses_pool_matrix(m, pool, mutual)  # one forward matrix for the whole pool
    pos = None
    if whole:  # work with the rows in column order (row a is column a); they go back to row_ids' order at the end
        pos, excluded = pool_order(row_ids, col_ids, excluded)
        rows_user, rows_peer = cols_user, cols_peer  # type: ignore[assignment]  # mutual: cols_user is set
    direction = HostDirection if device is None else functools.partial(DeviceDirection, device)
    blocks = _Blocks(
        col_ids,
        rows_user,
        cols_peer,
        rows_peer,
        cols_user,
        np.asarray(bias, np.float32),
        spec,
        excluded,
        _pool_matrix(matrix, m) if whole else None,
        direction,
    )
    block = block_rows or (device.rows if device else block_rows_for(m))
    host = threads or default_threads()
    feed = threads or (device.executions if device else host)  # the steps that run a direction's blocks
    steps = [(blocks.fill, feed), (blocks.run, host)] if whole else [(blocks.run, feed)]  # whole: F before any read
    for step, workers in steps:
        in_blocks(functools.partial(step, size=block), list(range(0, n, block)), workers, stop)
    if stop is not None and stop.is_set():
        raise TickStopped(f"the tick of {n} x {m} people was stopped: its caller has gone")
    return blocks.result(pos)


class _Blocks:
    """One tick's state and its two per-block steps: fill (a mutual pool's forward matrix F) and run
    (values, exclusions, top-k and label scores of a block of rows into the result arrays)."""

    def __init__(
        self,
        col_ids,
        rows_user,
        cols_peer,
        rows_peer,
        cols_user,
        bias,
        spec: TickSpec,
        excluded,
        matrix: np.ndarray | None,
        direction,
    ) -> None:
        n, m, k = len(rows_user), len(col_ids), spec.k
        self.col_ids, self.rows_user, self.cols_peer, self.rows_peer, self.cols_user = (
            col_ids,
            rows_user,
            cols_peer,
            rows_peer,
            cols_user,
        )
        self.bias, self.spec, self.m = bias, spec, m
        mutual = spec.mutual != ONE_WAY
        self.forward = direction(rows_user, cols_peer, bias, spec)
        # c(v->u) per row block: its "rows" are the columns' user vectors, its "cols" the rows' peer vectors
        self.reverse = direction(cols_user, rows_peer, bias, spec) if mutual and matrix is None else None
        self.matrix = matrix  # a mutual pool's c(u->v) for every pair, [M, M]; else None
        self.ex_rows, self.ex_cols = excluded
        per_row = np.bincount(self.ex_rows, minlength=n) if len(self.ex_rows) else np.zeros(n, np.int64)
        self.counts = np.minimum(m - per_row, k).astype(np.int32)
        self.ids = np.full((n, k), PAD_ID, np.int64)
        self.values = np.full((n, k), -np.inf, np.float32)
        shape = (n, k, rows_user.shape[1])
        self.labels = np.zeros(shape, np.float32) if spec.include_label_scores else None
        self.reverse_labels = np.zeros(shape, np.float32) if spec.include_label_scores and mutual else None

    def fill(self, start: int, size: int) -> None:
        assert self.matrix is not None
        stop = min(start + size, len(self.matrix))
        self.forward.block(start, stop, self.matrix[start:stop])

    def run(self, start: int, size: int) -> None:
        k = self.spec.k
        stop = min(start + size, len(self.ids))
        top, values = (self._top_compiled if KERNELS is not None else self._top_numpy)(start, stop)
        valid = np.arange(k)[None, :] < self.counts[start:stop, None]
        self.ids[start:stop] = np.where(valid, self.col_ids[top], PAD_ID)
        self.values[start:stop] = np.where(valid, values, -np.inf)
        if self.labels is not None:
            logits = pair_logits(self.rows_user[start:stop], self.cols_peer[top], self.bias)
            self.labels[start:stop] = np.where(valid[:, :, None], logits, 0)
        if self.reverse_labels is not None:
            logits = pair_logits(self.cols_user[top], self.rows_peer[start:stop], self.bias, swap=True)
            self.reverse_labels[start:stop] = np.where(valid[:, :, None], logits, 0)

    def _forward_values(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """value(u, v) of the rows start:stop into out [stop - start, M], from the directions' blocks."""
        self.forward.block(start, stop, out)
        if self.reverse is not None:
            back = np.empty_like(out)
            _reverse_block(self.reverse, start, stop, back)
            _mutual(out, back, self.spec.mutual)
        return out

    def _top_compiled(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) [B, k] of the rows start:stop by the compiled top-k; a mutual pool's
        kernel combines F's block with F's transposed columns itself."""
        assert KERNELS is not None
        ex_ptr = np.searchsorted(self.ex_rows, np.arange(start, stop + 1))
        ex_cols = self.ex_cols[ex_ptr[0] : ex_ptr[-1]]  # the block's own: checked once, not the whole list a block
        ex_ptr -= ex_ptr[0]
        if self.matrix is not None:
            forward, how, reverse = self.matrix[start:stop], self.spec.mutual, self.matrix
        else:
            forward, how, reverse = (
                self._forward_values(start, stop, np.empty((stop - start, self.m), np.float32)),
                ONE_WAY,
                None,
            )
        top, values, _ = KERNELS.top_k(forward, self.spec.k, how, reverse, start, ex_ptr, ex_cols)
        return top, values

    def _top_numpy(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, values) [B, k] of the rows start:stop by numpy and torch (topk.top_k)."""
        m = self.m
        padded = np.empty((stop - start, padded_width(m)), np.float32)
        padded[:, m:] = -np.inf
        out = padded[:, :m]
        if self.matrix is not None:  # c(v->u) = F[v, u]: the block's columns, transposed (combine is symmetric)
            _combine_transposed(self.matrix, start, stop, self.spec.mutual, out)
        else:
            self._forward_values(start, stop, out)
        lo, hi = np.searchsorted(self.ex_rows, start), np.searchsorted(self.ex_rows, stop)
        out[self.ex_rows[lo:hi] - start, self.ex_cols[lo:hi]] = -np.inf
        top = top_k(padded, self.spec.k, m)
        return top, np.take_along_axis(out, top, axis=1)

    def result(self, pos: np.ndarray | None) -> TickResult:
        """The result, rows back in the request's order (pos: a pool worked in column order)."""
        arrays = (self.ids, self.values, self.counts, self.labels, self.reverse_labels)
        if pos is None:
            return TickResult(*arrays)
        ids, values, counts, labels, reverse_labels = (None if a is None else a[pos] for a in arrays)
        return TickResult(ids, values, counts, labels, reverse_labels)  # type: ignore[arg-type]


def uses_pool_matrix(m: int, pool: bool, mutual: bool) -> bool:
    """A tick of m columns works through one [m, m] forward matrix: a mutual pool that fits POOL_MATRIX_BYTES."""
    return pool and mutual and 4 * m * m <= POOL_MATRIX_BYTES


def _pool_matrix(memory: np.ndarray | None, m: int) -> np.ndarray:
    """An [m, m] float32 matrix in `memory` (flat float32, at least m * m), or a new one."""
    if memory is None:
        return np.empty((m, m), np.float32)
    if memory.dtype != np.float32 or memory.ndim != 1 or memory.size < m * m or not memory.flags.c_contiguous:
        raise ValueError(f"matrix must be flat C-contiguous float32 memory of at least {m} x {m}")
    return memory[: m * m].reshape(m, m)


def _reverse_block(reverse: HostDirection | DeviceDirection, start: int, stop: int, out: np.ndarray) -> np.ndarray:
    """c(v->u) for the rows u in start:stop and every column v: [stop - start, M]. `reverse`'s rows are
    the columns' user vectors and its cols the rows' peer vectors, so this is its transposed block."""
    return reverse.block(start, stop, out, transposed=True)


def pair_logits(users: np.ndarray, peers: np.ndarray, bias: np.ndarray, swap: bool = False) -> np.ndarray:
    """s_k for row-aligned pairs: users [B, K, D] with peers [B, j, K, D] -> [B, j, K] (swap: users
    [B, j, K, D] with peers [B, K, D])."""
    if swap:
        return np.einsum("bjkd,bkd->bjk", users, peers) + bias
    return np.einsum("bkd,bjkd->bjk", users, peers) + bias
