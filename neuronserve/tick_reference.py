"""The matching tick's plain definition, for tests and the benchmark: the whole [N, M, K] logits in
float64, combined, and a full sort per row (tick.py's docstring states the definitions)."""

from __future__ import annotations

import numpy as np

from neuronserve.tick import LOGIT, MINIMUM, ONE_WAY, PAD_ID, PRODUCT, TickResult, TickSpec


def reference_tick(
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
) -> TickResult:
    """The plain definition, for tests: the whole [N, M, K] logits in float64, combined, a full sort per
    row (value descending, then peer id ascending). col_ids need not be sorted here."""
    n, m = len(row_ids), len(col_ids)
    w, b = spec.weights.astype(np.float64), np.asarray(bias, np.float64)

    def combined(u: np.ndarray, p: np.ndarray) -> np.ndarray:
        logits = np.einsum("nkd,mkd->nmk", u.astype(np.float64), p.astype(np.float64)) + b
        return (logits if spec.label_space == LOGIT else 1.0 / (1.0 + np.exp(-logits))) @ w

    value = combined(rows_user, cols_peer)
    if spec.mutual != ONE_WAY:
        assert cols_user is not None and rows_peer is not None, "a mutual tick needs rows_peer and cols_user"
        back = combined(cols_user, rows_peer).T  # c(v->u) at [u, v]
        if spec.mutual == PRODUCT:
            value = value * back
        elif spec.mutual == MINIMUM:
            value = np.minimum(value, back)
        else:
            total = value + back
            value = np.where(total == 0, 0.0, 2 * value * back / np.where(total == 0, 1.0, total))
    allowed = np.ones((n, m), bool)
    allowed[excluded[0], excluded[1]] = False
    k = spec.k
    ids = np.full((n, k), PAD_ID, np.int64)
    values = np.full((n, k), -np.inf, np.float32)
    counts = np.zeros(n, np.int32)
    labels = np.zeros((n, k, rows_user.shape[1]), np.float32) if spec.include_label_scores else None
    reverse_labels = np.zeros_like(labels) if labels is not None and spec.mutual != ONE_WAY else None
    for i in range(n):
        cols = np.flatnonzero(allowed[i])
        cols = cols[np.lexsort((col_ids[cols], -value[i, cols]))][:k]
        counts[i] = len(cols)
        ids[i, : len(cols)] = col_ids[cols]
        values[i, : len(cols)] = value[i, cols]
        if labels is not None:
            labels[i, : len(cols)] = (
                np.einsum("kd,jkd->jk", rows_user[i].astype(np.float64), cols_peer[cols].astype(np.float64)) + b
            )
            if reverse_labels is not None:
                assert cols_user is not None and rows_peer is not None
                reverse_labels[i, : len(cols)] = (
                    np.einsum("jkd,kd->jk", cols_user[cols].astype(np.float64), rows_peer[i].astype(np.float64)) + b
                )
    return TickResult(ids, values, counts, labels, reverse_labels)
