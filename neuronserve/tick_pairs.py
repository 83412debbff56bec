"""A tick's excluded pairs, and a pool's rows put in column order. A leaf of tick.py (which re-exports
`exclusions`): index arithmetic on id arrays, no scores."""

from __future__ import annotations

import numpy as np


def exclusions(
    row_ids: np.ndarray,
    col_ids: np.ndarray,
    *,
    exclude_self: bool,
    blocked_rows: np.ndarray | None = None,
    blocked_cols: np.ndarray | None = None,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Excluded (row index, column index) pairs, distinct, sorted by row: self-pairs (a row's id among
    the columns) when exclude_self, and the blocked id pairs whose ids are both in the tick (both ways
    when symmetric). row_ids and col_ids are distinct ids; col_ids sorted ascending."""
    rows_found, cols_found = [], []

    def place(ids: np.ndarray, among: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Index of each id in `among` (sorted view: among[order]), -1 if absent."""
        if not len(among):
            return np.full(len(ids), -1)
        sorted_ids = among[order]
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(among) - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -1)

    row_order, col_order = np.argsort(row_ids, kind="stable"), np.arange(len(col_ids))
    if exclude_self:
        cols = place(row_ids, col_ids, col_order)
        hit = cols >= 0
        rows_found.append(np.flatnonzero(hit))
        cols_found.append(cols[hit])
    if blocked_rows is not None and len(blocked_rows):
        pairs = [(blocked_rows, blocked_cols)] + ([(blocked_cols, blocked_rows)] if symmetric else [])
        for a, b in pairs:
            r, c = (
                place(np.asarray(a, np.int64), row_ids, row_order),
                place(np.asarray(b, np.int64), col_ids, col_order),
            )
            hit = (r >= 0) & (c >= 0)
            rows_found.append(r[hit])
            cols_found.append(c[hit])
    if not rows_found:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    flat = np.unique(
        np.concatenate(rows_found).astype(np.int64) * len(col_ids) + np.concatenate(cols_found).astype(np.int64)
    )
    return flat // len(col_ids), flat % len(col_ids)


def pool_order(row_ids: np.ndarray, col_ids: np.ndarray, excluded: tuple[np.ndarray, np.ndarray]):
    """A pool worked with its rows in column order: (pos, the exclusions re-indexed and sorted by row),
    row i being column pos[i]."""
    n, m = len(row_ids), len(col_ids)
    pos = np.searchsorted(col_ids, row_ids)
    if n != m or not np.array_equal(col_ids[np.minimum(pos, max(m - 1, 0))], row_ids):
        raise ValueError("a pool's row_ids must be its col_ids (in any order)")
    ex_rows = pos[excluded[0]]
    by_row = np.argsort(ex_rows, kind="stable")
    return pos, (ex_rows[by_row], excluded[1][by_row])
