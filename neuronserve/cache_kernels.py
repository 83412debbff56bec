"""ScoreByIds' compiled kernel (csrc/cache_kernels.c): find each id in the cache's snapshot and score it
where its vectors lie, with no [M, K, D] copy. A leaf of embeddings.py; `KERNEL` is None where the
library was not built (or NEURONSERVE_KERNELS is off), and the cache then runs its numpy path."""

from __future__ import annotations

import ctypes

import numpy as np

from neuronserve.native import LIBRARY
from neuronserve.shared_table import SharedTable

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class ScoreIdsKernel:
    """cache_score_ids with a snapshot of the shared table and numpy arrays in and out."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._call = library.cache_score_ids
        self._call.argtypes = [_PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR]  # fmt: skip
        self._call.restype = _I64

    def __call__(
        self, mem: SharedTable, state: int, user_id: int | np.integer, peer_ids: np.ndarray, bias: np.ndarray
    ) -> tuple[np.ndarray, int, np.ndarray]:
        """(scores float32 [M, K], peers found or -1 when the user is not, found bool [M]) of one user
        against `peer_ids` (int64) in snapshot `state`; bias float32 [K]. Garbage, never a
        fault, when a commit tears the snapshot (the caller's read retries)."""
        user_ids, user_slots, user_rows = mem.index_addresses(state, 0)
        peer_ids_at, peer_slots, peer_rows = mem.index_addresses(state, 1)
        user_table, peer_table = mem.vector_addresses
        (user_table_rows, labels, dim), peer_table_rows = mem.vectors[0].shape, len(mem.vectors[1])
        peer_ids, m = np.ascontiguousarray(peer_ids, np.int64), len(peer_ids)
        scores = np.empty((m, labels), np.float32)
        found = np.empty(m, np.bool_)
        hits = self._call(
            user_ids, user_slots, user_rows, user_table, user_table_rows, int(user_id),
            peer_ids_at, peer_slots, peer_rows, peer_table, peer_table_rows,
            labels, dim, bias.ctypes.data, peer_ids.ctypes.data, m, scores.ctypes.data, found.ctypes.data,
        )  # fmt: skip
        return scores, hits, found


KERNEL = None if LIBRARY is None or not hasattr(LIBRARY, "cache_score_ids") else ScoreIdsKernel(LIBRARY)
