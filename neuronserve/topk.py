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

    Pruned: only the CHUNK_COLUMNS-wide chunks holding the k largest chunk maxima are searched. Their
    smallest maximum t is a lower bound of the row's k-th value, and every value above t lies in them; a
    row whose k-th value found equals t (ties at the bound, -inf among them) is searched whole."""
    b = padded.shape[0]
    chunks = padded.shape[1] // CHUNK_COLUMNS
    if chunks < 2 * k:  # too few chunks for the pruning to pay
        return select(padded[:, :m], np.broadcast_to(np.arange(m), (b, m)), k)
    by_chunk = padded.reshape(b, chunks, CHUNK_COLUMNS)
    maxima = torch.from_numpy(by_chunk).amax(dim=2).numpy()  # torch's reduction is vectorised (numpy's is not)
    best = np.argpartition(maxima, chunks - k, axis=1)[:, chunks - k :]
    bound = np.take_along_axis(maxima, best, axis=1).min(axis=1)
    candidates = by_chunk[np.arange(b)[:, None], best].reshape(b, k * CHUNK_COLUMNS)  # whole chunks: [B, k, C]
    columns = (best[:, :, None] * CHUNK_COLUMNS + np.arange(CHUNK_COLUMNS)).reshape(b, k * CHUNK_COLUMNS)
    top = select(candidates, columns, k)
    for row in np.flatnonzero(padded[np.arange(b), top[:, -1]] <= bound):  # ties at the bound: the whole row
        top[row] = select(padded[row : row + 1, :m], np.arange(m)[None, :], k)[0]
    return top


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
