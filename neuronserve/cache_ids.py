"""Ids against the embedding cache's sorted index: checked id lists, their positions (one binary search
over ascending keys), and the NotFound that names the missing ones. The cache's lookups use them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neuronserve.errors import InvalidInput, NotFound
from neuronserve.shared_table import KINDS

MAX_NAMED_IDS = 10  # a NotFound names at most this many ids
SORTED_SEARCH_MIN_IDS = 128  # below this a plain searchsorted is as fast or faster (measured: 64 and 256 ids)


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def checked_lists(requests: Sequence[tuple[str, np.ndarray, str]]) -> list[tuple[int, np.ndarray]]:
    """(kind's table index, checked ids) of each (kind, ids, field) list."""
    checked = []
    for kind, ids, field in requests:
        check_kind(kind)
        checked.append((KINDS.index(kind), check_ids(ids, field)))
    return checked


def where(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each id's position in non-empty `sorted_ids`, clipped; whether it is there)."""
    pos = np.minimum(positions(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


def not_found(field: str, kind: str, ids: np.ndarray, found: np.ndarray) -> NotFound:
    """NotFound naming the request's `field`, the first missing ids of `kind` and how many of `ids` are missing."""
    missing = np.unique(ids[~found])
    named = ", ".join(str(int(i)) for i in missing[:MAX_NAMED_IDS]) + (", ..." if len(missing) > MAX_NAMED_IDS else "")
    return NotFound(
        f"{field}: unknown {kind} ids: {named} ({np.count_nonzero(~found)} of {len(ids)} not in the cache; "
        "UpsertEmbeddings them first)"
    )


def positions(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """np.searchsorted(sorted_ids, ids), searching in ascending order: numpy's binary search starts from
    the previous key's place when keys ascend, and its branches become predictable (1,000 random ids in
    5,000 cached: 72 us against 97; in 1M: 168 against 270, the argsort included; docs/embeddings.md)."""
    if len(ids) < SORTED_SEARCH_MIN_IDS:
        return np.searchsorted(sorted_ids, ids)
    order = np.argsort(ids)
    positions = np.empty(len(ids), dtype=np.intp)
    positions[order] = np.searchsorted(sorted_ids, ids[order])
    return positions


def check_ids(ids: np.ndarray, field: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInput(f"{field} must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    if len(ids) == 0:
        raise InvalidInput(f"{field} must be non-empty")
    if ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:
        raise InvalidInput(f"{field} must fit in int64, got {int(ids.max())}")
    return ids.astype(np.int64, copy=False)
