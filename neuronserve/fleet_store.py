"""The fleet's shared embedding store: the Redis layout and protocol (`serve --embedding-store redis://...`).

Role: the source of truth for tower outputs that every replica writes to and reads from. This module
only speaks Redis: it encodes rows, writes an upsert atomically, scans a model version's rows and reads
its change stream. Keeping each host's in-memory copy current is fleet.py's job.

Layout, per model (name and version), every key under one Redis Cluster hash tag {name@version}:
  neuronserve:{name@version}:rows:<kind>:<b>  hash, b = id mod BUCKETS: field = id (8-byte little-endian
                                              int64), value = seq (8-byte LE int64) + the tower output
                                              (K*D little-endian float32)
  neuronserve:{name@version}:changes          stream, one entry per upsert: kind, base (the seq of its
                                              first row; row i has base + i), ids, vectors (binary as above)
  neuronserve:{name@version}:seq              the version's sequence counter (INCRBY, one number per row)
  neuronserve:{name@version}:meta             hash: epoch, a random token set by the first write, so a
                                              store that lost its data is told apart from one that did not

Contract. `write` is one Lua script: it takes n sequence numbers, overwrites the n rows (so each id's row
is always its latest write: scripts run one at a time, in sequence order) and appends the change to the
stream, all or nothing. Sequence numbers of a version are contiguous over the stream, so a reader that
sees an entry whose base is not the next number it expects has missed entries (trimmed) or is reading a
store that was reset. Every Redis failure that means "the store cannot take or give data now" is a
StoreUnavailable naming the store (without its password); clients are made per process (fork-safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np

from neuronserve.errors import ConfigError, StoreUnavailable

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # --embedding-store default: the in-process cache only, no shared store
KINDS = ("user", "peer")  # as embeddings.KINDS
BUCKETS = 16  # hashes per kind: no single huge key, and a warm load pipelines one HSCAN per bucket
STREAM_MAX_ENTRIES = 1000  # changes kept (XADD MAXLEN ~): a host further behind reloads the rows instead
TIMEOUT_S = 2.0  # socket connect / read timeout, unless the URL sets socket_timeout / socket_connect_timeout
# Errors Redis answers when it is up but cannot serve data now: the same as unreachable, for a caller.
_UNAVAILABLE_REPLIES = (
    "LOADING",
    "READONLY",
    "OOM",
    "MISCONF",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "BUSY",
    "NOREPLICAS",
)

# KEYS: changes, seq, meta, then the BUCKETS row hashes of the kind. ARGV: kind, n, ids, vectors, bytes per
# vector, stream max entries, epoch token (used if the store has none yet), bucket of each row (n bytes).
_WRITE_LUA = """
local n = tonumber(ARGV[2])
local ids, vecs, rb, buckets = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[8]
local base = redis.call('INCRBY', KEYS[2], n) - n + 1
redis.call('HSETNX', KEYS[3], 'epoch', ARGV[7])
local per = {}
for i = 0, n - 1 do
  local key = 4 + string.byte(buckets, i + 1)
  local t = per[key]
  if t == nil then t = {}; per[key] = t end
  t[#t + 1] = string.sub(ids, 8 * i + 1, 8 * i + 8)
  t[#t + 1] = struct.pack('<i8', base + i) .. string.sub(vecs, rb * i + 1, rb * (i + 1))
  if #t >= 1000 then redis.call('HSET', KEYS[key], unpack(t)); per[key] = {} end
end
for key, t in pairs(per) do
  if #t > 0 then redis.call('HSET', KEYS[key], unpack(t)) end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'kind', ARGV[1], 'base', base, 'ids', ids, 'vectors', vecs)
return base
"""


def parse_store_url(value: str) -> str:
    """`embedded` or a redis:// (rediss://, unix://) URL, checked: the --embedding-store setting."""
    text = str(value).strip()
    if text.lower() == EMBEDDED:
        return EMBEDDED
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"expected 'embedded' or a redis://HOST:PORT/DB URL, got {value!r}")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"the store URL {value!r} names no host; e.g. redis://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 - raises on a bad port
        db = parts.path.strip("/")
        if parts.scheme != "unix" and db and int(db) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"the store URL {value!r} has a bad port or database number; e.g. redis://127.0.0.1:6379/0"
        ) from None
    return text


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class RowBatch:
    """Rows of one kind: ids int64 [n], their store sequence numbers int64 [n], vectors float32 [n, K, D]."""

    kind: str
    ids: np.ndarray
    seqs: np.ndarray
    vectors: np.ndarray


@dataclass(frozen=True)
class Change:
    """One stream entry (one upsert): its stream id and rows (seqs = base + 0..n-1)."""

    stream_id: bytes
    base: int
    rows: RowBatch


@dataclass(frozen=True)
class Position:
    """Where the store is, read atomically: the last stream entry's id (b"0-0": none), the sequence
    number the next write will start at, and the store's epoch (None: nothing written yet)."""

    stream_id: bytes
    next_seq: int
    epoch: bytes | None


_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_STORES):
        store._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class RedisStore:
    """One model version's rows in Redis. Thread-safe; a forked child makes its own connections."""

    def __init__(
        self,
        url: str,
        *,
        model_name: str,
        model_version: str,
        num_labels: int,
        label_dim: int,
        stream_max_entries: int = STREAM_MAX_ENTRIES,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        try:
            import redis  # noqa: F401 - only with --embedding-store redis://
        except ImportError:
            raise ConfigError(
                "--embedding-store redis://... needs the redis client: pip install redis (or neuronserve[fleet])"
            ) from None
        self.url, self.where = url, redact(url)
        self.model_version = model_version
        self.shape = (num_labels, label_dim)
        self.row_bytes = num_labels * label_dim * 4
        self.stream_max_entries = stream_max_entries
        self.timeout_s = timeout_s
        prefix = f"neuronserve:{{{model_name}@{model_version}}}"
        self.changes_key, self.seq_key, self.meta_key = f"{prefix}:changes", f"{prefix}:seq", f"{prefix}:meta"
        self.row_keys = {kind: [f"{prefix}:rows:{kind}:{b}" for b in range(BUCKETS)] for kind in KINDS}
        self._row_dtype = np.dtype([("seq", "<i8"), ("vector", "<f4", self.shape)])
        self._forked()
        _STORES.add(self)

    def _forked(self) -> None:
        """Fresh per-process state: in the constructor and in a forked child (a pool's worker forks from
        the supervisor while its follower thread may hold the lock; the parent's sockets are not ours)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._clients: dict = {}
        self._script: Any = None

    # -- connections ---------------------------------------------------------------------------------

    def _client(self, role: str = "commands"):
        """This process's client for `role` ("commands", or "follow" for the blocking stream reads)."""
        with self._lock:
            client = self._clients.get(role)
            if client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                # One immediate retry (a pooled connection broken by a Redis restart), never a backoff
                # loop: a caller gets StoreUnavailable at once and the follower does its own backoff.
                client = redis.Redis.from_url(
                    self.url,
                    socket_timeout=self.timeout_s,
                    socket_connect_timeout=self.timeout_s,
                    retry=Retry(NoBackoff(), 1),
                    decode_responses=False,
                )
                client.set_response_callback(
                    "HSCAN", lambda reply, **_: reply
                )  # [cursor, [field, value, ...]]: no dict per batch
                self._clients[role] = client
                if role == "commands":
                    self._script = client.register_script(_WRITE_LUA)
            return client

    def _unavailable(self, exc: Exception, doing: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"the embedding store {self.where} is unavailable ({type(exc).__name__}: {exc}) while {doing}"
        )

    def _call(self, doing: str, fn, *args, **kwargs):
        """fn(*args) with Redis's "cannot serve now" failures as StoreUnavailable."""
        import redis

        try:
            return fn(*args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise self._unavailable(exc, doing) from None
        except redis.exceptions.ResponseError as exc:
            if str(exc).split(" ", 1)[0].upper() in _UNAVAILABLE_REPLIES:
                raise self._unavailable(exc, doing) from None
            raise

    def ping(self) -> None:
        self._call("checking it", lambda: self._client().ping())

    def close(self) -> None:
        """Close this process's connections (the store can be used again: they reopen)."""
        with self._lock:
            clients, self._clients = self._clients, {}
        for client in clients.values():
            with contextlib.suppress(Exception):  # closing a broken connection
                client.close()

    # -- writes --------------------------------------------------------------------------------------

    def write(self, kind: str, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Store rows for distinct `ids` (float32 vectors [n, K, D]) and append the change, atomically.
        Returns their sequence numbers int64 [n] (the later write of an id has the higher number)."""
        ids = np.ascontiguousarray(ids, dtype="<i8")
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        n = len(ids)
        if vectors.shape != (n,) + self.shape:
            raise ValueError(f"vectors must be [{n}, {self.shape[0]}, {self.shape[1]}], got {list(vectors.shape)}")
        buckets = np.mod(ids, BUCKETS).astype(np.uint8)
        client = self._client()
        keys = [self.changes_key, self.seq_key, self.meta_key] + self.row_keys[kind]
        args = [
            kind,
            n,
            ids.tobytes(),
            vectors.tobytes(),
            self.row_bytes,
            self.stream_max_entries,
            secrets.token_hex(8),
            buckets.tobytes(),
        ]
        base = int(self._call(f"writing {n} {kind} rows", self._script, keys=keys, args=args, client=client))
        return base + np.arange(n, dtype=np.int64)

    # -- reads ---------------------------------------------------------------------------------------

    def position(self) -> Position:
        """The stream's last entry, the next sequence number and the epoch, in one MULTI/EXEC."""

        def read():
            pipe = self._client().pipeline(transaction=True)
            pipe.xrevrange(self.changes_key, count=1)
            pipe.get(self.seq_key)
            pipe.hget(self.meta_key, "epoch")
            return pipe.execute()

        entries, seq, epoch = self._call("reading its position", read)
        return Position(entries[0][0] if entries else b"0-0", int(seq or 0) + 1, epoch)

    def scan(self, kind: str, count: int = 2000) -> Iterator[RowBatch]:
        """Every row of `kind`, in batches: one pipelined round trip HSCANs every bucket still open
        (about `count` rows each). A row written during the scan may or may not be in it; an id may come
        twice (in different batches, with its sequence number, so applying both is harmless)."""
        cursors = {b: 0 for b in range(BUCKETS)}
        keys = self.row_keys[kind]
        while cursors:
            open_buckets = list(cursors)

            def read(open_buckets=open_buckets):
                pipe = self._client().pipeline(transaction=False)
                for b in open_buckets:
                    pipe.hscan(keys[b], cursors[b], count=count)
                return pipe.execute()

            fields: list[bytes] = []
            values: list[bytes] = []
            for b, (cursor, data) in zip(open_buckets, self._call(f"scanning its {kind} rows", read), strict=True):
                if int(cursor) == 0:
                    del cursors[b]
                else:
                    cursors[b] = int(cursor)
                fields += data[0::2]
                values += data[1::2]
            if fields:
                yield self._rows(kind, fields, values)

    def _rows(self, kind: str, fields: list[bytes], values: list[bytes]) -> RowBatch:
        """Decode hash fields and values; a malformed one (another writer's layout) is skipped, logged."""
        raw_ids, raw_rows = b"".join(fields), b"".join(values)
        if len(raw_ids) != 8 * len(fields) or len(raw_rows) != self._row_dtype.itemsize * len(values):
            good = [
                i
                for i, (f, v) in enumerate(zip(fields, values, strict=True))
                if len(f) == 8 and len(v) == self._row_dtype.itemsize
            ]
            log.warning(
                "embedding store: skipped %d malformed %s rows (expected 8-byte ids and %d-byte rows)",
                len(fields) - len(good),
                kind,
                self._row_dtype.itemsize,
            )
            raw_ids = b"".join(fields[i] for i in good)
            raw_rows = b"".join(values[i] for i in good)
        rows = np.frombuffer(raw_rows, self._row_dtype)
        return RowBatch(
            kind,
            np.frombuffer(raw_ids, "<i8").astype(np.int64),
            rows["seq"].astype(np.int64),
            rows["vector"].astype(np.float32),
        )

    def changes(self, after: bytes, block_s: float, count: int = 64) -> list[Change]:
        """Stream entries after the id `after`, waiting up to `block_s` for the first (the "follow"
        connection's blocking read). Malformed entries are skipped, logged."""
        reply = self._call(
            "reading its changes",
            lambda: self._client("follow").xread(
                {self.changes_key: after}, count=count, block=max(1, int(block_s * 1000))
            ),
        )
        if not reply:
            return []
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        out: list[Change] = []
        for stream_id, fields in entries:
            try:
                out.append(self._change(stream_id, fields))
            except (KeyError, ValueError) as exc:
                log.warning("embedding store: skipped malformed change %s (%s)", stream_id, exc)
        return out

    def _change(self, stream_id: bytes, fields: dict) -> Change:
        kind = fields[b"kind"].decode()
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}")
        ids = np.frombuffer(fields[b"ids"], "<i8").astype(np.int64)
        vectors = np.frombuffer(fields[b"vectors"], "<f4").astype(np.float32)
        if len(fields[b"ids"]) % 8 or vectors.size != len(ids) * self.shape[0] * self.shape[1]:
            raise ValueError(f"{len(ids)} ids and {vectors.size} floats for K={self.shape[0]}, D={self.shape[1]}")
        base = int(fields[b"base"])
        return Change(
            stream_id,
            base,
            RowBatch(kind, ids, base + np.arange(len(ids), dtype=np.int64), vectors.reshape((len(ids),) + self.shape)),
        )

    def row_counts(self) -> tuple[int, int]:
        """(user rows, peer rows) in the store (HLEN over the buckets)."""

        def read():
            pipe = self._client().pipeline(transaction=False)
            for kind in KINDS:
                for key in self.row_keys[kind]:
                    pipe.hlen(key)
            return pipe.execute()

        lengths = self._call("counting its rows", read)
        return int(sum(lengths[:BUCKETS])), int(sum(lengths[BUCKETS:]))
