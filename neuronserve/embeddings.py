"""The embedding cache: tower outputs per user / peer id, for the two-tower fast path.

Place on the request path: UpsertEmbeddings runs the towers on the cores and stores their outputs here;
ScoreByIds and ScoreMatrix then score from this cache with numpy only (no tower, no core):
score_k = <u_k, p_k> + b_k, with w_k already folded into u_k. ScoreMatrix is one float32 BLAS matmul per
label (U_k @ P_k^T) on the CPU: for cached vectors that beats a round trip through the `pair_scorer` graph,
which would need the [N*M, K, D] pair tensor materialised and padded to a bucket.

Storage per kind: a sorted int64 id array, a contiguous float32 [rows, K, D] matrix and an int64 upsert
sequence per row; lookups use np.searchsorted. All of it lives in one immutable snapshot (model version and
both kinds) that writers rebuild and swap in with one assignment, so readers never see a half update or
a mix of model versions while a background UpsertEmbeddings refreshes the cache.

Eviction rule: at most max_rows rows per kind; when an upsert would exceed that, the least recently
upserted ids of that kind are evicted first (lowest upsert sequence; within one upsert, earlier rows first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from neuronserve.errors import ConfigError, InvalidInput, NotFound

KINDS = ("user", "peer")
_MAX_NAMED_IDS = 10


@dataclass(frozen=True)
class CacheStats:
    user_rows: int
    peer_rows: int
    max_rows: int
    bytes: int
    hits: int
    misses: int
    evictions: int
    model_version: str


@dataclass(frozen=True)
class _Table:
    ids: np.ndarray  # int64 [rows], sorted ascending
    vectors: np.ndarray  # float32 [rows, K, D], row i belongs to ids[i]
    seq: np.ndarray  # int64 [rows], upsert sequence of each row


@dataclass(frozen=True)
class _Snapshot:
    model_version: str
    tables: Dict[str, _Table]


class EmbeddingCache:
    """Bounded, version-tied cache of tower outputs; readers lock-free, writers serialised by a lock."""

    def __init__(self, *, model_version: str, num_labels: int, label_dim: int, label_bias: Sequence[float], max_rows: int) -> None:
        if num_labels < 1 or label_dim < 1:
            raise ConfigError(f"num_labels and label_dim must be >= 1, got {num_labels} and {label_dim}")
        if max_rows < 1:
            raise ConfigError(f"cache max_rows must be >= 1, got {max_rows}")
        bias = np.asarray(label_bias, dtype=np.float32)
        if bias.shape != (num_labels,):
            raise ConfigError(f"label_bias must hold num_labels={num_labels} floats, got shape {bias.shape}")
        self._k, self._d, self._bias, self._max_rows = num_labels, label_dim, bias, max_rows
        self._write_lock = threading.Lock()  # upserts and clear_for
        self._count_lock = threading.Lock()  # hit / miss / eviction counters
        self._hits = self._misses = self._evictions = self._next_seq = 0
        self._state = self._empty(model_version)

    def _empty(self, model_version: str) -> _Snapshot:
        empty = _Table(np.empty(0, np.int64), np.empty((0, self._k, self._d), np.float32), np.empty(0, np.int64))
        return _Snapshot(model_version, {kind: empty for kind in KINDS})

    def clear_for(self, model_version: str) -> None:
        """Drop every row and take `model_version` (a new artifact was loaded). Counters keep counting."""
        with self._write_lock:
            self._state = self._empty(model_version)

    def check_upsert(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """`ids` as int64 if upsert() would take them: distinct, at most max_rows. The service calls it
        before the tower run, so a bad request costs no core time."""
        _check_kind(kind)
        ids = _check_ids(ids, "ids")
        if len(ids) > self._max_rows:
            raise InvalidInput(f"cannot upsert {len(ids)} {kind} ids: the cache holds at most max_rows={self._max_rows} per kind")
        sorted_ids = np.sort(ids)
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if len(dup):
            raise InvalidInput(f"ids must be distinct; {kind} id {int(dup[0])} appears more than once")
        return ids

    def upsert(self, kind: str, ids: np.ndarray, vectors: np.ndarray, model_version: str) -> int:
        """Store tower outputs for distinct `ids`; existing ids are overwritten. Returns the rows of `kind` now cached."""
        ids = self.check_upsert(kind, ids)
        vectors = np.asarray(vectors)
        if vectors.shape != (len(ids), self._k, self._d) or vectors.dtype != np.float32:
            raise InvalidInput(f"vectors must be float32 [{len(ids)}, {self._k}, {self._d}] (one row per id), "
                               f"got {vectors.dtype} {list(vectors.shape)}")
        with self._write_lock:
            state = self._state
            if model_version != state.model_version:
                raise InvalidInput(f"embeddings of model version {model_version!r} cannot mix with "
                                   f"{state.model_version!r} (the cache's model version)")
            old = state.tables[kind]
            survivors = np.flatnonzero(~np.isin(old.ids, ids, assume_unique=True))  # rows not overwritten
            excess = len(survivors) + len(ids) - self._max_rows
            if excess > 0:  # evict the least recently upserted survivors
                survivors = np.sort(survivors[np.argsort(old.seq[survivors], kind="stable")[excess:]])
            seq = np.arange(self._next_seq, self._next_seq + len(ids), dtype=np.int64)
            self._next_seq += len(ids)
            all_ids = np.concatenate([old.ids[survivors], ids])
            merge = np.argsort(all_ids, kind="stable")
            table = _Table(all_ids[merge],
                           np.ascontiguousarray(np.concatenate([old.vectors[survivors], vectors])[merge]),
                           np.concatenate([old.seq[survivors], seq])[merge])
            self._state = _Snapshot(state.model_version, {**state.tables, kind: table})
        if excess > 0:
            with self._count_lock:
                self._evictions += excess
        return len(table.ids)

    def lookup(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Cached vectors float32 [N, K, D] for `ids` (in their order); unknown ids -> NotFound naming them."""
        _check_kind(kind)
        return self._gather(self._state, kind, _check_ids(ids, f"{kind}_ids"))

    def _gather(self, state: _Snapshot, kind: str, ids: np.ndarray) -> np.ndarray:
        table = state.tables[kind]
        pos = np.minimum(np.searchsorted(table.ids, ids), max(len(table.ids) - 1, 0))
        found = table.ids[pos] == ids if len(table.ids) else np.zeros(len(ids), bool)
        hits = int(np.count_nonzero(found))
        with self._count_lock:
            self._hits += hits
            self._misses += len(ids) - hits
        if hits < len(ids):
            missing = np.unique(ids[~found])
            named = ", ".join(str(int(i)) for i in missing[:_MAX_NAMED_IDS]) + (", ..." if len(missing) > _MAX_NAMED_IDS else "")
            raise NotFound(f"unknown {kind} ids: {named} ({len(ids) - hits} of {len(ids)} not in the cache; "
                           f"UpsertEmbeddings them first)")
        return table.vectors[pos]

    def score_by_ids(self, user_id: int, peer_ids: np.ndarray) -> np.ndarray:
        """Scores float32 [M, K] of one cached user against M cached peers: one batched dot product."""
        if isinstance(user_id, (bool, np.bool_)) or not isinstance(user_id, (int, np.integer)):
            raise InvalidInput(f"user_id must be an integer, got {user_id!r}")
        state = self._state
        user = self._gather(state, "user", np.array([user_id], np.int64))[0]
        peers = self._gather(state, "peer", _check_ids(peer_ids, "peer_ids"))
        return np.einsum("kd,mkd->mk", user, peers) + self._bias

    def score_matrix(self, user_ids: np.ndarray, peer_ids: np.ndarray) -> np.ndarray:
        """Scores float32 [N, M, K] of N cached users x M cached peers: per label one matmul U_k @ P_k^T + b_k."""
        state = self._state
        users = self._gather(state, "user", _check_ids(user_ids, "user_ids")).transpose(1, 0, 2)  # [K, N, D]
        peers = self._gather(state, "peer", _check_ids(peer_ids, "peer_ids")).transpose(1, 2, 0)  # [K, D, M]
        scores = np.matmul(np.ascontiguousarray(users), np.ascontiguousarray(peers))  # [K, N, M]
        scores += self._bias[:, None, None]
        return np.ascontiguousarray(scores.transpose(1, 2, 0))

    def rows(self, kind: str) -> int:
        _check_kind(kind)
        return len(self._state.tables[kind].ids)

    def stats(self) -> CacheStats:
        state = self._state
        tables = state.tables
        nbytes = sum(t.ids.nbytes + t.vectors.nbytes + t.seq.nbytes for t in tables.values())
        with self._count_lock:
            return CacheStats(len(tables["user"].ids), len(tables["peer"].ids), self._max_rows, nbytes,
                              self._hits, self._misses, self._evictions, state.model_version)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _check_ids(ids: np.ndarray, field: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInput(f"{field} must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    if len(ids) == 0:
        raise InvalidInput(f"{field} must be non-empty")
    if ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:
        raise InvalidInput(f"{field} must fit in int64, got {int(ids.max())}")
    return ids.astype(np.int64, copy=False)
