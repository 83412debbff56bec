"""The embedding cache: tower outputs per user / peer id, for the two-tower fast path, shared by forked workers.

UpsertEmbeddings stores tower outputs here; ScoreByIds and ScoreMatrix score from it with numpy only
(score_k = <u_k, p_k> + b_k, w_k folded into u_k; one BLAS matmul per label for a matrix).

Contract: one anonymous MAP_SHARED mapping, shared by every process forked after the constructor; an
upsert or clear_for in any process is seen by every reader once it returns; a read sees one committed
snapshot (never a torn row, a half upsert or a mix of versions; the label bias is the snapshot's version's)
without a lock; writers are serialised
across processes by a POSIX record lock the kernel drops when its holder dies; at most max_rows rows per
kind, least recently upserted evicted first. Hit / miss / eviction counters are this process's; rows
and bytes are shared. Design and the memory-ordering argument: docs/embeddings.md.
"""

from __future__ import annotations

import fcntl
import contextlib
import logging
import os
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from neuronserve.shared_table import (
    KINDS,
    COUNT,
    GENERATION,
    MAX_VERSION_BYTES,
    NEXT_SEQ,
    STATE,
    SharedTable,
    VERSION_BIT,
    VERSION_LEN,
    WRITER_PID,
)
from neuronserve.cache_ids import check_ids, check_kind, checked_lists, not_found, where
from neuronserve.cache_kernels import KERNEL as SCORE_IDS
from neuronserve.errors import ConfigError, InvalidInput, Unavailable

log = logging.getLogger(__name__)

_READ_TIMEOUT_S = 2.0  # a read that keeps seeing commits land under it for this long gives up

T = TypeVar("T")


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


_CACHES: weakref.WeakSet[EmbeddingCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_CACHES):
        cache._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class EmbeddingCache:
    """Bounded, version-tied cache of tower outputs in shared memory; readers lock-free, writers serialised
    across threads and processes."""

    def __init__(
        self, *, model_version: str, num_labels: int, label_dim: int, label_bias: Sequence[float], max_rows: int
    ) -> None:
        if num_labels < 1 or label_dim < 1:
            raise ConfigError(f"num_labels and label_dim must be >= 1, got {num_labels} and {label_dim}")
        if max_rows < 1:
            raise ConfigError(f"cache max_rows must be >= 1, got {max_rows}")
        self._k, self._d, self._max_rows = num_labels, label_dim, max_rows
        bias, version = self._checked_bias(label_bias), _encode_version(model_version)
        self._mem: SharedTable | None = SharedTable(num_labels, label_dim, max_rows)
        self._mem.versions[0, : len(version)] = np.frombuffer(version, np.uint8)
        self._mem.biases[0] = bias  # the bias travels with the version field (a pool's slot changes versions)
        self._mem.header[VERSION_LEN] = len(version)  # STATE 0: generation 0, buffers A, version field 0
        # The writers' lock between processes: a POSIX record lock on an unlinked temporary file whose
        # descriptor forked children inherit. Record locks belong to a process and die with it.
        fd, path = tempfile.mkstemp(prefix="neuronserve-cache-lock-")
        os.unlink(path)
        self._lock_fd = fd
        self._close_fd = weakref.finalize(self, os.close, fd)
        self._forked()
        _CACHES.add(self)

    def _forked(self) -> None:
        """Fresh per-process state: in the constructor and in a forked child (where a lock copied while
        another thread of the parent held it would stay held forever)."""
        self._write_lock = threading.Lock()  # the writing threads of this process
        self._count_lock = threading.Lock()  # hit / miss / eviction counters
        self._hits = self._misses = self._evictions = 0

    def __reduce__(self):
        raise TypeError(
            "an EmbeddingCache is shared with worker processes by fork only (its mapping is anonymous): "
            "construct it before forking, do not pickle it"
        )

    def close(self) -> None:
        """Release this process's mapping and lock file; other processes keep theirs. Idempotent; the
        cache answers Unavailable afterwards."""
        mem, self._mem = self._mem, None
        if mem is not None:
            mapping = mem.map
            mem.__dict__.clear()  # drop the numpy views, which pin the mapping
            with contextlib.suppress(
                BufferError
            ):  # a read in another thread still holds a view: unmapped when it lets go
                mapping.close()
        self._close_fd()

    def _shared(self) -> SharedTable:
        mem = self._mem
        if mem is None:
            raise Unavailable("the embedding cache is closed")
        return mem

    # -- writers -------------------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[tuple[SharedTable, int]]:
        """Hold the write lock (threads of this process, then processes); yields the mapping and STATE."""
        mem = self._shared()
        with self._write_lock:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
            try:
                dead = int(mem.header[WRITER_PID])
                if dead:
                    log.warning(
                        "embedding cache: writer pid %d died in the middle of an update; its partial "
                        "update was never published and is discarded",
                        dead,
                    )
                mem.header[WRITER_PID] = os.getpid()  # left behind only by a writer that died holding the lock
                try:
                    yield mem, int(mem.header[STATE])
                finally:
                    mem.header[WRITER_PID] = 0
            finally:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _commit(mem: SharedTable, state: int, flip: int) -> None:
        """Publish the prepared snapshot: one aligned 8-byte store (next generation, flipped buffers)."""
        mem.header[STATE] = ((state & ~(GENERATION - 1)) + GENERATION) | ((state ^ flip) & (GENERATION - 1))

    def _checked_bias(self, label_bias: Sequence[float]) -> np.ndarray:
        bias = np.asarray(label_bias, dtype=np.float32)
        if bias.shape != (self._k,):
            raise ConfigError(f"label_bias must hold num_labels={self._k} floats, got shape {bias.shape}")
        return bias

    def clear_for(self, model_version: str, label_bias: Sequence[float] | None = None) -> None:
        """Drop every row and take `model_version` with its `label_bias` (None: keep the current bias), in
        one commit (a new artifact was loaded, or a pool's cache slot passes to another version).
        Counters keep counting."""
        version = _encode_version(model_version)
        bias = None if label_bias is None else self._checked_bias(label_bias)
        with self._writing() as (mem, state):
            buf = int(not state & VERSION_BIT)  # the inactive version and bias fields
            mem.versions[buf, : len(version)] = np.frombuffer(version, np.uint8)
            mem.header[VERSION_LEN + buf] = len(version)
            mem.biases[buf] = mem.bias(state) if bias is None else bias
            for k in range(len(KINDS)):
                mem.header[COUNT + 2 * k + (1 - ((state >> k) & 1))] = 0  # empty inactive index buffers
            self._commit(mem, state, GENERATION - 1)  # flip every buffer and the version at once

    def check_upsert(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """`ids` as int64 if upsert() would take them: distinct, at most max_rows. The service calls it
        before the tower run, so a bad request costs no core time."""
        check_kind(kind)
        ids = check_ids(ids, "ids")
        if len(ids) > self._max_rows:
            raise InvalidInput(
                f"cannot upsert {len(ids)} {kind} ids: the cache holds at most max_rows={self._max_rows} per kind"
            )
        sorted_ids = np.sort(ids)
        dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        if len(dup):
            raise InvalidInput(f"ids must be distinct; {kind} id {int(dup[0])} appears more than once")
        return ids

    def _checked_rows(self, kind: str, ids, vectors, seqs):
        """(ids, vectors, seqs) as arrays of the right shapes and types, or InvalidInput naming the field."""
        ids = self.check_upsert(kind, ids)
        vectors = np.asarray(vectors)
        if vectors.shape != (len(ids), self._k, self._d) or vectors.dtype != np.float32:
            raise InvalidInput(
                f"vectors must be float32 [{len(ids)}, {self._k}, {self._d}] (one row per id), "
                f"got {vectors.dtype} {list(vectors.shape)}"
            )
        if seqs is not None:
            seqs = np.asarray(seqs, dtype=np.int64)
            if seqs.shape != ids.shape:
                raise InvalidInput(
                    f"seqs must hold one sequence number per id ({len(ids)}), got shape {list(seqs.shape)}"
                )
        return ids, vectors, seqs

    def upsert(
        self, kind: str, ids: np.ndarray, vectors: np.ndarray, model_version: str, seqs: np.ndarray | None = None
    ) -> int:
        """Store tower outputs for distinct `ids`; existing ids are overwritten. Returns the rows of `kind` now cached.

        `seqs` (the fleet's store, fleet.py): each row's sequence number in the shared store, kept as its
        upsert sequence. A row whose id is already cached with an equal or higher number is skipped (a
        replayed or older change), so applying changes twice or out of order leaves each id's newest row."""
        ids, vectors, seqs = self._checked_rows(kind, ids, vectors, seqs)
        k = KINDS.index(kind)
        with self._writing() as (mem, state):
            current = mem.version(state)
            if model_version != current:
                raise InvalidInput(
                    f"embeddings of model version {model_version!r} cannot mix with "
                    f"{current!r} (the cache's model version)"
                )
            old = mem.index(state, k)  # [(ids, slots, seqs), n] of the active buffer
            old_ids, old_seqs = old[0], old[2]
            if seqs is not None:  # skip rows not newer than the cached ones
                ids, vectors, seqs = _newer_only(old_ids, old_seqs, ids, vectors, seqs)
                if not len(ids):
                    return len(old_ids)
            m = len(ids)
            keep = np.ones(len(old_ids), bool)  # rows of the active index that stay
            if len(old_ids):
                pos = np.minimum(np.searchsorted(old_ids, ids), len(old_ids) - 1)
                keep[pos[old_ids[pos] == ids]] = False  # overwritten
            excess = int(np.count_nonzero(keep)) + m - self._max_rows
            if excess > 0:  # evict the `excess` least recently upserted survivors (sequences are distinct)
                kept_seqs = old_seqs[keep]
                keep &= old_seqs > np.partition(kept_seqs, excess - 1)[excess - 1]
            # Copy-on-write: the new vectors go to slots the active index does not reference (readers may
            # be reading those); the lowest free ones, so the touched part of the table stays compact.
            # At most n slots are referenced, so the first n + m hold at least m free ones.
            used = np.zeros(len(mem.vectors[k]), bool)
            used[old[1]] = True
            new_slots = np.flatnonzero(~used[: len(old_ids) + m])[:m]
            mem.vectors[k][new_slots] = vectors
            next_seq = int(mem.header[NEXT_SEQ])
            if seqs is None:
                seqs = next_seq + np.arange(m)  # a row's seq: its place in `ids`
            mem.header[NEXT_SEQ] = max(next_seq + m, int(seqs.max()) + 1)  # sequences stay distinct
            # The merged index goes to the inactive buffer: survivors (already sorted) + new rows.
            order = np.argsort(ids, kind="stable")
            new = np.stack([ids[order], new_slots[order], seqs[order]])
            survivors = [row[keep] for row in old]  # 1-D masks: numpy is much slower on axis 1 of a 2-D array
            rows = len(survivors[0]) + m
            at = np.searchsorted(survivors[0], new[0]) + np.arange(m)  # the new rows' places in the merge
            is_old = np.ones(rows, bool)
            is_old[at] = False
            buf = 1 - ((state >> k) & 1)
            out = mem.indexes[k][buf, :, :rows]
            for out_row, new_row, survivor_row in zip(out, new, survivors, strict=False):
                out_row[at] = new_row
                out_row[is_old] = survivor_row
            mem.header[COUNT + 2 * k + buf] = rows
            self._commit(mem, state, 1 << k)
        if excess > 0:
            with self._count_lock:
                self._evictions += excess
        return rows

    # -- readers -------------------------------------------------------------------------------------

    def _read(self, read: Callable[[SharedTable, int], T]) -> T:
        """read(mapping, STATE) on one committed snapshot: retried while a commit lands during it (a
        later writer may then be reusing that snapshot's memory). `read` must copy what it returns and
        must not raise on garbage: only a result read under an unchanged STATE is used."""
        mem = self._shared()
        deadline, attempt = 0.0, 0
        while True:
            state = int(mem.header[STATE])
            result = read(mem, state)
            if int(mem.header[STATE]) == state:
                return result
            attempt += 1
            now = time.monotonic()
            if attempt == 1:
                deadline = now + _READ_TIMEOUT_S
            elif now > deadline:
                raise Unavailable(
                    f"the embedding cache changed under every read for {_READ_TIMEOUT_S:g} s "
                    f"({attempt} attempts): writers are committing nonstop; try again"
                )
            time.sleep(0 if attempt < 10 else 0.0005)

    @staticmethod
    def _gather(mem: SharedTable, state: int, k: int, ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(copied vectors of `ids` or None if some are missing, found mask) in snapshot `state`."""
        index_ids, index_slots, _ = mem.index(state, k)
        if not len(index_ids):
            return None, np.zeros(len(ids), bool)
        pos, found = where(index_ids, ids)
        if not found.all():
            return None, found
        return mem.vectors[k].take(index_slots[pos], axis=0, mode="clip"), found

    @staticmethod
    def _present(mem: SharedTable, state: int, k: int, ids: np.ndarray) -> np.ndarray:
        index_ids = mem.index(state, k)[0]
        return where(index_ids, ids)[1] if len(index_ids) else np.zeros(len(ids), bool)

    def _count(self, field: str, kind: str, ids: np.ndarray, found: np.ndarray, hits: int | None = None) -> None:
        hits = int(np.count_nonzero(found)) if hits is None else hits
        with self._count_lock:
            self._hits += hits
            self._misses += len(ids) - hits
        if hits < len(ids):
            raise not_found(field, kind, ids, found)

    def _gather_pair(
        self, user_ids: np.ndarray, peer_ids: np.ndarray, fields: tuple[str, str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Users' and peers' vectors and the label bias from one snapshot; NotFound naming the users'
        field first (peers then uncounted), else the peers'."""
        (users, user_found), (peers, peer_found), bias = self._read(
            lambda mem, state: (
                self._gather(mem, state, 0, user_ids),
                self._gather(mem, state, 1, peer_ids),
                mem.bias(state).copy(),
            )
        )
        self._count(fields[0], "user", user_ids, user_found)
        self._count(fields[1], "peer", peer_ids, peer_found)
        assert users is not None and peers is not None
        return users, peers, bias

    def lookup(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Cached vectors float32 [N, K, D] for `ids` (in their order); unknown ids -> NotFound naming them."""
        check_kind(kind)
        field = f"{kind}_ids"
        ids, k = check_ids(ids, field), KINDS.index(kind)
        rows, found = self._read(lambda mem, state: self._gather(mem, state, k, ids))
        self._count(field, kind, ids, found)
        assert rows is not None
        return rows

    def lookup_many(self, requests: Sequence[tuple[str, np.ndarray, str]]) -> list[np.ndarray]:
        """Cached vectors float32 [N_i, K, D] of several (kind, ids, field) lists, all from one committed
        snapshot (ScoreTick reads a pool's user and peer vectors together); unknown ids -> NotFound
        naming the first list with some, and its field."""
        checked = checked_lists(requests)
        results = self._read(lambda mem, state: [self._gather(mem, state, k, ids) for k, ids in checked])
        for (kind, _, field), (_, ids), (_, found) in zip(requests, checked, results, strict=False):
            self._count(field, kind, ids, found)
        return [rows for rows, _ in results]  # type: ignore[misc]

    def require(self, requests: Sequence[tuple[str, np.ndarray, str]]) -> None:
        """NotFound naming the first (kind, ids, field) list with ids not cached now, as lookup_many, but
        nothing copied or counted: a call that reads the cache in parts (ScoreMatrixStream) checks all first."""
        checked = checked_lists(requests)
        found = self._read(lambda mem, state: [self._present(mem, state, k, ids) for k, ids in checked])
        for (kind, _, field), (_, ids), ok in zip(requests, checked, found, strict=True):
            if not ok.all():
                raise not_found(field, kind, ids, ok)

    @property
    def label_bias(self) -> np.ndarray:
        """b_k, float32 [K] (a copy) of the cache's current model version."""
        return self._read(lambda mem, state: mem.bias(state).copy())

    def score_by_ids(self, user_id: int, peer_ids: np.ndarray) -> np.ndarray:
        """Scores float32 [M, K] of one cached user against M cached peers: one batched dot product."""
        if isinstance(user_id, (bool, np.bool_)) or not isinstance(user_id, (int, np.integer)):
            raise InvalidInput(f"user_id must be an integer, got {user_id!r}")
        user_ids, peer_ids = check_ids(np.array([user_id]), "user_id"), check_ids(peer_ids, "peer_ids")
        if SCORE_IDS is not None:  # compiled: each peer found and scored where it lies, no [M, K, D] copy
            scores, hits, found = self._read(lambda mem, s: SCORE_IDS(mem, s, user_ids[0], peer_ids, mem.bias(s)))
            self._count("user_id", "user", user_ids, np.array([hits >= 0]))
            self._count("peer_ids", "peer", peer_ids, found, hits)
            return scores
        users, peers, bias = self._gather_pair(user_ids, peer_ids, ("user_id", "peer_ids"))
        # per label a BLAS matrix-vector product over the M peers ([K, M, D] x [K, D, 1]): half einsum's time
        scores = np.matmul(peers.transpose(1, 0, 2), users[0][:, :, None])[:, :, 0]
        return np.ascontiguousarray(scores.T) + bias

    def score_matrix(self, user_ids: np.ndarray, peer_ids: np.ndarray) -> np.ndarray:
        """Scores float32 [N, M, K] of N cached users x M cached peers: per label one matmul U_k @ P_k^T + b_k."""
        user_ids, peer_ids = check_ids(user_ids, "user_ids"), check_ids(peer_ids, "peer_ids")
        users, peers, bias = self._gather_pair(user_ids, peer_ids, ("user_ids", "peer_ids"))
        scores = np.matmul(
            np.ascontiguousarray(users.transpose(1, 0, 2)), np.ascontiguousarray(peers.transpose(1, 2, 0))
        )  # [K, N, M]
        scores += bias[:, None, None]
        return np.ascontiguousarray(scores.transpose(1, 2, 0))

    def rows(self, kind: str) -> int:
        check_kind(kind)
        k = KINDS.index(kind)
        return self._read(lambda mem, state: len(mem.index(state, k)[0]))

    def stats(self) -> CacheStats:
        """Rows and model version: the shared snapshot. bytes: the cached data, per row its vector, id and
        upsert sequence (not the 8-byte slot number, the second index buffer or unused slots). Hits,
        misses and evictions: this process's calls."""
        user_rows, peer_rows, version = self._read(
            lambda mem, state: (len(mem.index(state, 0)[0]), len(mem.index(state, 1)[0]), mem.version(state))
        )
        nbytes = (user_rows + peer_rows) * (self._k * self._d * 4 + 8 + 8)
        with self._count_lock:
            return CacheStats(
                user_rows, peer_rows, self._max_rows, nbytes, self._hits, self._misses, self._evictions, version
            )


def _newer_only(old_ids: np.ndarray, old_seqs: np.ndarray, ids: np.ndarray, vectors: np.ndarray, seqs: np.ndarray):
    """The rows of (ids, vectors, seqs) whose id is not cached (sorted `old_ids`) with an equal or higher seq."""
    if not len(old_ids):
        return ids, vectors, seqs
    pos = np.minimum(np.searchsorted(old_ids, ids), len(old_ids) - 1)
    newer = (old_ids[pos] != ids) | (old_seqs[pos] < seqs)
    return (ids, vectors, seqs) if newer.all() else (ids[newer], vectors[newer], seqs[newer])


def _encode_version(model_version: str) -> bytes:
    encoded = str(model_version).encode("utf-8")
    if len(encoded) > MAX_VERSION_BYTES:
        raise ConfigError(
            f"model version must be at most {MAX_VERSION_BYTES} bytes in UTF-8, got {len(encoded)}: {model_version[:40]!r}..."
        )
    return encoded
