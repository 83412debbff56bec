"""The per-row top-k of a block of combined values, pruned to the chunks of columns that can hold it.

A leaf of tick.py. Sorted by value descending, ties by the lower column; -inf marks columns that are
never candidates (padding, exclusions). The pruning argument: docs/tick.md.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK_COLUMNS = 32  # the pruned top-k's chunk width (see top_k)


def padded_width(m: int) -> int:
    """Columns of a block's working matrix: m rounded up to whole CHUNK_COLUMNS chunks (see top_k)."""
    return -(-m // CHUNK_COLUMNS) * CHUNK_COLUMNS


def top_k(padded: np.ndarray, k: int, m: int) -> np.ndarray:
    """Columns [B, k] of each row's k largest values among the first m columns of padded [B, M'] (M' =
    padded_width(m); the columns past m hold -inf), sorted by value descending, ties by lower column.

    Pruned: t, the k-th largest of the rows' CHUNK_COLUMNS-wide chunk maxima, is at most the row's k-th
    value (k chunks hold a value >= t each), so the values >= t hold the top k and every tie with the
    k-th; only they are sorted (t = -inf when exclusions leave fewer than k: the whole row)."""
    b = padded.shape[0]
    chunks = padded.shape[1] // CHUNK_COLUMNS
    if chunks < 2 * k:  # too few chunks for the pruning to pay
        return select(padded[:, :m], np.broadcast_to(np.arange(m), (b, m)), k)
    maxima = torch.from_numpy(padded.reshape(b, chunks, CHUNK_COLUMNS)).amax(dim=2).numpy()  # vectorised
    bound = np.partition(maxima, chunks - k, axis=1)[:, chunks - k]
    values = padded[:, :m]
    rows, cols = np.divmod(np.flatnonzero(values >= bound[:, None]), m)  # by row, then column
    return first_k(values[rows, cols], rows, cols, b, k)


def first_k(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, b: int, k: int) -> np.ndarray:
    """Columns [b, k]: per row the k first of the candidates (values at rows, cols; sorted by row, then
    column; at least k per row) by value descending, ties by lower column."""
    bits = (values + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0 (equal, one key)
    descending = 0x7FFFFFFF - (bits ^ ((bits >> 31) & 0x7FFFFFFF))  # float order, reversed, in [0, 2**32)
    order = np.argsort((rows.astype(np.int64) << 32) | descending, kind="stable")  # stable: ties keep column order
    starts = np.searchsorted(rows, np.arange(b))
    return cols[order][starts[:, None] + np.arange(k)]


def select(values: np.ndarray, columns: np.ndarray, k: int) -> np.ndarray:
    """Of candidates values [B, c] at columns [B, c] (distinct per row, any order): the columns of each
    row's k largest values, sorted by value descending, ties by lower column."""
    b, c = values.shape
    part = np.argpartition(values, c - k, axis=1)[:, c - k :] if k < c else np.broadcast_to(np.arange(c), (b, c)).copy()
    threshold = np.take_along_axis(values, part, axis=1).min(axis=1)
    # argpartition picks arbitrarily among values equal to the threshold: where more candidates than chosen
    # reach it, take those above it and then the lowest columns equal to it
    for row in np.flatnonzero(np.count_nonzero(values >= threshold[:, None], axis=1) > k):
        above = np.flatnonzero(values[row] > threshold[row])
        equal = np.flatnonzero(values[row] == threshold[row])
        equal = equal[np.argsort(columns[row, equal], kind="stable")][: k - len(above)]
        part[row] = np.concatenate([above, equal])
    chosen, chosen_columns = np.take_along_axis(values, part, axis=1), np.take_along_axis(columns, part, axis=1)
    order = np.lexsort((chosen_columns, -chosen), axis=1)
    return np.take_along_axis(chosen_columns, order, axis=1)
