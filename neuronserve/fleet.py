"""The fleet, host side: each host's embedding cache as a local copy of the shared store (fleet_store.py).

Role: with `--embedding-store redis://...` every replica scores from its own in-memory cache (the one its
worker processes share), so ScoreByIds, ScoreMatrix and ScoreTick never wait on the network, while
  - FleetCache.upsert writes through: the store first (UNAVAILABLE, nothing applied, when it cannot),
    then the local cache, then the caller is answered;
  - one Follower per host loads the version's rows before the host says SERVING (warm start), then
    applies the store's change stream to the local cache, from the last entry it applied; it reconnects
    with backoff after a failure, reloads the rows when it finds it has missed entries, and starts over
    from an empty copy when the store lost its data (its epoch changed);
  - StoreStatus, in memory shared with the worker processes, says whether the copy is current and since
    when it is not: metrics (store_samples) and the health name "neuronserve.EmbeddingStore".
Every row carries its store sequence number, and the cache keeps an id's highest (EmbeddingCache.upsert
`seqs`), so a replayed or late change never overwrites a newer row: the later upsert wins everywhere.
Design and measurements: docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass
from typing import TypeVar
from collections.abc import Callable, Iterator

import numpy as np

from neuronserve.errors import InvalidInput, StoreUnavailable
from neuronserve.fleet_store import KINDS, Change, RedisStore, RowBatch

log = logging.getLogger(__name__)
T = TypeVar("T")

HEALTH_NAME = "neuronserve.EmbeddingStore"  # grpc.health.v1 name: SERVING while the local copy follows the store
BLOCK_S = 0.5  # the follower's blocking stream read: also how often it re-confirms contact when idle
BACKOFF_S = (0.05, 2.0)  # reconnect backoff: first, doubling up to this
SCAN_COUNT = 2000  # HSCAN COUNT per bucket per round trip of a (re)load
PROGRESS_S = 2.0  # a (re)load logs its progress this often


@dataclass(frozen=True)
class StoreState:
    """The follower's status, as read by any process of the host (metrics, health)."""

    up: bool  # the follower reached the store on its last attempt: the copy follows it
    loading: bool  # a warm start or reload is in progress
    stale_s: float  # 0 while up; else seconds since the copy was last known current
    last_contact: float  # unix time of the last successful read of the store (0: never)
    rows_loaded: int  # rows applied by the current or last (re)load
    load_s: float  # duration of the last completed (re)load (so far, while loading)
    changes_applied: int  # stream entries applied since start
    reloads: int  # reloads after a missed entry or a reset store (the warm start not counted)


_UP, _LOADING, _LAST_CONTACT, _ROWS_LOADED, _LOAD_START, _LOAD_S, _CHANGES, _RELOADS = range(8)


class StoreStatus:
    """StoreState in a small shared array made before the pool forks: the follower (one thread per host)
    writes it, every worker process reads it. Fields are single doubles; a reader may see one update
    half applied across fields, never a torn field. `clock`: unix time, injectable."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._values = multiprocessing.RawArray(ctypes.c_double, 8)
        self._clock = clock

    def __reduce__(self):
        raise TypeError("a StoreStatus is shared with worker processes by fork only")

    def state(self) -> StoreState:
        v = list(self._values)
        now = self._clock()
        up = bool(v[_UP])
        loading = bool(v[_LOADING])
        stale = 0.0 if up and not loading else (now - v[_LAST_CONTACT] if v[_LAST_CONTACT] else 0.0)
        load_s = now - v[_LOAD_START] if loading else v[_LOAD_S]
        return StoreState(
            up,
            loading,
            max(stale, 0.0),
            v[_LAST_CONTACT],
            int(v[_ROWS_LOADED]),
            load_s,
            int(v[_CHANGES]),
            int(v[_RELOADS]),
        )

    def contact(self) -> bool:
        """The store answered: up, and current as of now. True if it was down before."""
        was_down = not self._values[_UP]
        self._values[_LAST_CONTACT] = self._clock()
        self._values[_UP] = 1.0
        return was_down

    def lost(self) -> bool:
        """The store did not answer. True if it was up before."""
        was_up = bool(self._values[_UP])
        self._values[_UP] = 0.0
        return was_up

    def loading(self, rows: int, reload: bool = False) -> None:
        if not self._values[_LOADING]:
            self._values[_LOAD_START] = self._clock()
            self._values[_RELOADS] += reload
        self._values[_LOADING] = 1.0
        self._values[_ROWS_LOADED] = rows

    def loaded(self, rows: int) -> None:
        self._values[_ROWS_LOADED] = rows
        self._values[_LOAD_S] = self._clock() - self._values[_LOAD_START]
        self._values[_LOADING] = 0.0

    def applied(self, changes: int) -> None:
        self._values[_CHANGES] += changes


class FleetCache:
    """The host's EmbeddingCache with upserts written through the shared store. Reads are the cache's own
    bound methods (no indirection on the fast path). Made before the pool forks, like the cache."""

    def __init__(self, cache, store: RedisStore, status: StoreStatus) -> None:
        self.cache, self.store, self.status = cache, store, status
        self.model_version = store.model_version
        self.check_upsert = cache.check_upsert
        self.lookup = cache.lookup
        self.lookup_many = cache.lookup_many
        self.score_by_ids = cache.score_by_ids
        self.score_matrix = cache.score_matrix
        self.rows = cache.rows
        self.stats = cache.stats
        self.close = cache.close

    def __reduce__(self):
        raise TypeError("a FleetCache is shared with worker processes by fork only")

    @property
    def label_bias(self) -> np.ndarray:
        return self.cache.label_bias

    def upsert(self, kind: str, ids: np.ndarray, vectors: np.ndarray, model_version: str) -> int:
        """Write the rows to the store (StoreUnavailable if it cannot take them: nothing is applied), then
        to the local cache with their store sequence numbers; the rows of `kind` now cached."""
        ids = self.cache.check_upsert(kind, ids)
        if model_version != self.model_version:
            raise InvalidInput(
                f"embeddings of model version {model_version!r} cannot go to the store of {self.model_version!r}"
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        seqs = self.store.write(kind, ids, vectors)
        return self.cache.upsert(kind, ids, vectors, model_version, seqs=seqs)


class Follower:
    """Keeps one host's cache a copy of one model version's rows in the store. `warm_start()` loads them
    (blocking; retried with backoff while the store is unreachable); `start()` then follows the change
    stream in a daemon thread until `stop()`; `warm_start_and_follow` does both from an event loop, until
    an asyncio event. Sleeping is `stop_event.wait`; `clock` (monotonic) times the backoff and progress
    lines, StoreStatus has its own (unix) clock."""

    def __init__(
        self,
        store: RedisStore,
        cache,
        status: StoreStatus,
        *,
        block_s: float = BLOCK_S,
        backoff_s: tuple[float, float] = BACKOFF_S,
        scan_count: int = SCAN_COUNT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.cache, self.status = store, cache, status
        self.version = store.model_version
        self.block_s, self.backoff_s, self.scan_count = block_s, backoff_s, scan_count
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_id = b"0-0"
        self._next_seq = 1
        self._epoch: bytes | None = None
        self._max_rows = cache.stats().max_rows

    # -- lifecycle -----------------------------------------------------------------------------------

    def warm_start(self, abandon: threading.Event | None = None) -> bool:
        """Load the version's rows into the cache; retried with backoff while the store is unavailable.
        False if `abandon` (or stop()) ended it first."""
        backoff, attempt = self.backoff_s[0], 0
        while not self._stopping(abandon):
            try:
                self._load(reload=False, abandon=abandon)
                return not self._stopping(abandon)
            except StoreUnavailable as exc:
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "%s; warm start attempt %d failed, retrying in %.2f s (not serving until loaded)",
                        exc,
                        attempt,
                        backoff,
                    )
                self.status.lost()
                self._wait(backoff, abandon)
                backoff = min(backoff * 2, self.backoff_s[1])
        return False

    async def warm_start_and_follow(self, stopping: asyncio.Event) -> bool:
        """warm_start() in a thread, abandoned when `stopping` is set first (it gives up at its next batch
        or retry), then start(). False, not following, when `stopping` was set first."""
        abandon = threading.Event()
        loading = asyncio.ensure_future(asyncio.to_thread(self.warm_start, abandon))
        stop_requested = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({loading, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        stop_requested.cancel()
        if stopping.is_set():
            abandon.set()
        if not await loading or stopping.is_set():
            return False
        self.start()
        return True

    def start(self) -> None:
        """Follow the change stream from where the warm start left off, in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="neuronserve-store-follower", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop following (within about block_s); the cache keeps what it has."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _stopping(self, abandon: threading.Event | None) -> bool:
        return self._stop.is_set() or (abandon is not None and abandon.is_set())

    def _wait(self, seconds: float, abandon: threading.Event | None) -> None:
        end = self._clock() + seconds
        while not self._stopping(abandon) and self._clock() < end:
            self._stop.wait(min(0.05, max(end - self._clock(), 0.0)))

    # -- loading -------------------------------------------------------------------------------------

    def _load(self, reload: bool, abandon: threading.Event | None = None, reset: bool = False) -> None:
        """Every row of the version into the cache, then follow from the stream position read before the
        scan (so a write during the scan is applied from the stream if the scan missed it). A store that
        was reset (`reset`, or its epoch changed since we last read it) first empties the local copy."""
        position = self.store.position()
        self.status.contact()
        if reset or (reload and self._epoch is not None and position.epoch != self._epoch):
            log.error(
                "embedding store %s was reset (its data is gone: epoch %s -> %s): dropping the local copy and "
                "loading what the store has now; run the store with persistence (AOF) to avoid this",
                self.store.where,
                self._epoch,
                position.epoch,
            )
            self.cache.clear_for(self.version)
        self._epoch = position.epoch
        what = "reloading" if reload else "warm start: loading"
        log.info("embedding store %s: %s model version %s's rows", self.store.where, what, self.version)
        rows, counts = 0, {kind: 0 for kind in KINDS}
        self.status.loading(0, reload)
        started = last_line = self._clock()
        try:
            for kind in KINDS:
                for batch in _prefetched(self.store.scan(kind, self.scan_count)):
                    if self._stopping(abandon):
                        return
                    self._apply(batch)
                    rows += len(batch.ids)
                    counts[kind] += len(batch.ids)
                    self.status.loading(rows)
                    if self._clock() - last_line >= PROGRESS_S:
                        last_line = self._clock()
                        log.info(
                            "embedding store: loaded %d rows (user %d, peer %d) in %.1f s",
                            rows,
                            counts["user"],
                            counts["peer"],
                            last_line - started,
                        )
            self._last_id, self._next_seq = position.stream_id, position.next_seq
        finally:
            self.status.loaded(rows)
        self.status.contact()
        log.info(
            "embedding store: loaded %d rows (user %d, peer %d) in %.2f s; following its changes from %s",
            rows,
            counts["user"],
            counts["peer"],
            self._clock() - started,
            position.stream_id.decode(),
        )

    def _apply(self, batch: RowBatch) -> None:
        """Rows into the cache with their sequence numbers (older than the cached row: skipped)."""
        for at in range(0, len(batch.ids), self._max_rows):
            part = slice(at, at + self._max_rows)
            try:
                self.cache.upsert(batch.kind, batch.ids[part], batch.vectors[part], self.version, seqs=batch.seqs[part])
            except InvalidInput as exc:  # e.g. duplicate ids in one batch: another writer's layout
                log.error("embedding store: %d %s rows not applied: %s", len(batch.ids[part]), batch.kind, exc)

    # -- following -----------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.backoff_s[0]
        check_epoch = False  # after a failure: was the store reset while we could not see it?
        while not self._stop.is_set():
            try:
                if (
                    check_epoch or self._epoch is None
                ):  # after a failure, or not yet known (nothing written at the load)
                    position = self.store.position()
                    if self._epoch is not None and position.epoch != self._epoch:
                        self._load(reload=True)
                    self._epoch, check_epoch = position.epoch, False
                changes = self.store.changes(self._last_id, self.block_s)
                if self.status.contact():
                    log.warning(
                        "embedding store %s is back: following its changes again from %s",
                        self.store.where,
                        self._last_id.decode(),
                    )
                backoff = self.backoff_s[0]
                self._follow(changes)
            except StoreUnavailable as exc:
                if self.status.lost():
                    log.error(
                        "%s: scoring goes on from the local copy, stale from now; upserts fail until it is back", exc
                    )
                check_epoch = True
                self._wait(backoff, None)
                backoff = min(backoff * 2, self.backoff_s[1])
            except Exception:  # noqa: BLE001 - the follower must outlive a bug in one change
                log.exception("embedding store follower: unexpected error; retrying")
                self._wait(backoff, None)
                backoff = min(backoff * 2, self.backoff_s[1])

    def _follow(self, changes: list[Change]) -> None:
        """Apply changes in stream order; a missing sequence number means entries were trimmed before we
        read them (reload the rows), a number going back means the store was reset (start over)."""
        applied = 0
        for change in changes:
            if change.base != self._next_seq:
                self.status.applied(applied)
                if change.base > self._next_seq:
                    log.warning(
                        "embedding store: changes %d..%d were trimmed from the stream before this host read them: reloading the rows",
                        self._next_seq,
                        change.base - 1,
                    )
                self._load(reload=True, reset=change.base < self._next_seq)  # going back: a reset store
                return
            self._apply(change.rows)
            self._last_id, self._next_seq = change.stream_id, change.base + len(change.rows.ids)
            applied += 1
        self.status.applied(applied)


def _prefetched(batches: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`batches`, produced by a thread up to `depth` ahead: a load reads the next batch from the store
    (the socket wait releases the GIL, Redis works meanwhile) while the cache takes this one. An error
    of the producer is raised here; a consumer that stops early lets the producer finish its batch."""
    slots: queue.Queue[tuple[str, object]] = queue.Queue(depth)
    done = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not done.is_set():
                    try:
                        slots.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if done.is_set():
                    return
            slots.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            slots.put(("error", exc))

    producer = threading.Thread(target=produce, name="neuronserve-store-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            what, item = slots.get()
            if what == "end":
                return
            if what == "error":
                raise item  # type: ignore[misc]
            yield item  # type: ignore[misc]
    finally:
        done.set()


def store_samples(state: StoreState, version: str) -> list:
    """metrics.Sample lines of a StoreState (the collector hook, as cache_samples)."""
    from neuronserve.metric_families import Sample

    labels = (("version", version),)
    return [
        Sample("neuronserve_embedding_store_up", labels, 1.0 if state.up else 0.0),
        Sample("neuronserve_embedding_store_stale_seconds", labels, state.stale_s),
        Sample("neuronserve_embedding_store_last_contact_timestamp_seconds", labels, state.last_contact),
        Sample("neuronserve_embedding_store_loading", labels, 1.0 if state.loading else 0.0),
        Sample("neuronserve_embedding_store_rows_loaded", labels, state.rows_loaded),
        Sample("neuronserve_embedding_store_load_seconds", labels, state.load_s),
        Sample("neuronserve_embedding_store_changes_applied_total", labels, state.changes_applied),
        Sample("neuronserve_embedding_store_reloads_total", labels, state.reloads),
    ]


def open_fleet(url: str, manifest, cache) -> tuple[FleetCache, Follower]:
    """The write-through cache and the host's follower for `manifest`'s model on the store at `url`
    (nothing connects yet). Build before a pool forks; the follower runs in one process per host."""
    cfg = manifest.model_config
    store = RedisStore(
        url,
        model_name=manifest.model_name,
        model_version=manifest.model_version,
        num_labels=cfg.num_labels,
        label_dim=cfg.label_dim,
    )
    status = StoreStatus()
    return FleetCache(cache, store, status), Follower(store, cache, status)
