"""The memory budget of one serving process: the settings' bound on its peak RSS, the limits derived from
them (the default maximum message size, the scoring calls' byte budget), the gate that holds the heavy
calls to that budget, and the trimmer that gives freed memory back to the system after a burst.

A leaf module (config and errors only; tick is read lazily for its block rule; freed memory goes back to
the system by memory_release.py). Contract:
peak RSS <= memory_budget(...).total_bytes whatever the clients send, because every term is enforced:
gRPC refuses calls above max_concurrent_rpcs and messages above max_message_bytes (RESOURCE_EXHAUSTED,
before the body is read), and ScoreMatrix, ScoreMatrixStream and ScoreTick reserve their estimated
working bytes in a ScoringGate first (RESOURCE_EXHAUSTED at once when it is spent). The formula, each
term's derivation and the measurements: docs/memory.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from neuronserve.config import MAX_GRPC_MESSAGE_BYTES
from neuronserve.errors import ConfigError, InvalidInput, Overloaded
from neuronserve.memory_release import MIB, MemoryTrimmer

if TYPE_CHECKING:
    import numpy as np

    from neuronserve.tick_device import TickDevice

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BLOCKED_PAIRS = 1 << 20  # ScoreTick: blocked pairs per request
ID_BYTES = 8  # an id on the wire, packed (little-endian int64); repeated int64 takes 1-10 bytes
MESSAGE_HEADROOM = 1.25  # the derived max_message_bytes: the largest legitimate request x this, in whole MiB
MESSAGE_COPIES = 3  # a message in flight: gRPC's buffer, Python's bytes, protobuf's copy (measured: 3.1)
MATRIX_COPIES = 3  # ScoreMatrix's [N, M, K] scores: the matmul's and its transpose, then the bytes and the proto's copy
SLACK_BYTES = 64 * MIB  # batches, call objects, metrics, allocator rounding (measured: docs/memory.md)


@dataclass(frozen=True)
class ModelShape:
    """The model's widths the memory depends on (from the artifact's model config)."""

    user_features: int
    peer_features: int
    num_labels: int
    label_dim: int

    @classmethod
    def of(cls, manifest) -> ModelShape:
        cfg = manifest.model_config
        return cls(cfg.user_features, cfg.peer_features, cfg.num_labels, cfg.label_dim)

    def vectors(self, rows: int) -> int:
        """Bytes of `rows` cached vectors, float32 [rows, K, D]."""
        return 4 * rows * self.num_labels * self.label_dim


@dataclass(frozen=True)
class MemoryBudget:
    """A bound on the process's peak RSS and its terms, in bytes (docs/memory.md derives each)."""

    baseline_bytes: int  # the process after the warm-up: interpreter, libraries, model, gRPC
    cache_bytes: int  # every embedding cache's mapping, all slots written
    calls_bytes: int  # max_concurrent_rpcs x calls' message copies and tower outputs
    scoring_bytes: int  # the heavy calls' working memory, at once (max_scoring_bytes)
    slack_bytes: int = SLACK_BYTES

    @property
    def total_bytes(self) -> int:
        return self.baseline_bytes + self.cache_bytes + self.calls_bytes + self.scoring_bytes + self.slack_bytes

    def describe(self) -> str:
        parts = ("baseline", "cache", "calls", "scoring", "slack")
        terms = " + ".join(f"{name} {getattr(self, name + '_bytes') / MIB:.0f}" for name in parts)
        largest = max(parts, key=lambda name: getattr(self, name + "_bytes"))
        advice = {
            "calls": "lower --max-concurrent-rpcs or --max-message-bytes to lower it",
            "cache": "lower --cache-max-rows to lower it",
            "scoring": "lower --max-scoring-bytes to lower it",
        }.get(largest, "")
        tail = f"; {largest} is the largest term: {advice}" if advice else ""
        return f"peak RSS <= {self.total_bytes / MIB:.0f} MiB = {terms} (MiB; docs/memory.md){tail}"


def largest_request_bytes(shape: ModelShape, max_peers: int, max_tower_rows: int, max_tick_ids: int) -> int:
    """The largest legitimate request message of any RPC, ids packed: Score / OIP twotower (one user, max_peers
    peers), UpsertEmbeddings / an OIP tower (max_tower_rows rows and ids), ScoreMatrix (max_peers ids
    each side), ScoreTick (users and peers of max_tick_ids each, MAX_BLOCKED_PAIRS blocked pairs)."""
    widest = max(shape.user_features, shape.peer_features)
    return max(
        4 * (shape.user_features + max_peers * shape.peer_features),
        max_tower_rows * (4 * widest + ID_BYTES),
        2 * max_peers * ID_BYTES,
        (2 * max_tick_ids + 2 * MAX_BLOCKED_PAIRS) * ID_BYTES,
    )


def message_bytes(config, shape: ModelShape) -> int:
    """max_message_bytes as set, else the largest legitimate request x MESSAGE_HEADROOM in whole MiB, at most
    gRPC's limit; ConfigError naming the limits when that request itself is above it."""
    if config.max_message_bytes is not None:
        return int(config.max_message_bytes)
    largest = largest_request_bytes(shape, config.max_peers, config.batching.max_queue_rows, config.max_tick_ids)
    if largest > MAX_GRPC_MESSAGE_BYTES:
        raise ConfigError(
            f"--max-peers {config.max_peers}, --max-queue-rows {config.batching.max_queue_rows} and --max-tick-ids "
            f"{config.max_tick_ids} allow requests of {largest} bytes for this model, above gRPC's message limit of "
            f"{MAX_GRPC_MESSAGE_BYTES}; lower the largest of them"
        )
    return min(math.ceil(largest * MESSAGE_HEADROOM / MIB) * MIB, MAX_GRPC_MESSAGE_BYTES)


def matrix_working_bytes(shape: ModelShape, users: int, peers: int) -> int:
    """ScoreMatrix of users x peers: the gathered vectors (and their transposes) and the scores' copies."""
    return 2 * shape.vectors(users + peers) + MATRIX_COPIES * 4 * users * peers * shape.num_labels


def stream_working_bytes(shape: ModelShape, block_users: int, peers: int) -> int:
    """ScoreMatrixStream: one block at a time (ScoreMatrix's working memory of one block of user rows)."""
    return matrix_working_bytes(shape, block_users, peers)


def tick_working_bytes(
    shape: ModelShape,
    rows: int,
    cols: int,
    k: int,
    *,
    mutual: bool,
    pool: bool,
    labels: bool,
    blocked: int,
    device: TickDevice | None = None,
) -> int:
    """ScoreTick of `rows` x `cols` people (a pool: rows == cols), top `k`, `blocked` blocked pairs. Held
    throughout: the gathered vectors, the directions' arrangements, a mutual pool's whole matrix, the
    exclusion list and the result arrays; plus the largest of three phases that follow one another: finding
    the exclusions, the row blocks in flight (one per tick thread), the reply's bytes and proto copy.
    On a `device`, its block rows and executions set the blocks in flight, and each direction's vectors
    are padded to whole blocks. tests/test_memory_budget.py checks it against tracemalloc's peak."""
    from neuronserve import tick

    big_k, dim, sides = shape.num_labels, shape.label_dim, 2 if mutual else 1
    pairs = blocked * (2 if pool else 1) + (rows if pool else 0)  # exclusion candidates (both ways, self-pairs)
    result = rows * k * (ID_BYTES + 4 + (4 * big_k * sides if labels else 0))
    whole = pool and mutual and 4 * cols * cols <= tick.POOL_MATRIX_BYTES  # one [M, M] matrix; top-k on host threads
    held = (
        2 * sides * shape.vectors(rows + cols)  # gathered (and a pool's reordered copies)
        + sides * 4 * big_k * (dim + 1) * (rows + cols)  # each direction's arrangement for the matmuls
        + (4 * cols * cols if whole else 0)
        + 4 * ID_BYTES * pairs
        + result
    )
    block = device.rows if device else tick.block_rows_for(cols)
    matrices = 2 if device else 4  # a block's [B, M] working matrices (on a device: no host fill scratch)
    per_block = 4 * matrices * block * (cols + 64) + 24 * block * min(32 * k, cols + 64)  # and the top-k
    if labels:
        per_block += sides * 4 * block * k * big_k * dim  # the winners' gathered vectors
    feed = device.executions if device and not whole else tick.default_threads()
    threads = min(feed, max(1, -(-rows // block)))
    if device:  # the padded copies of each side (tick_device._padded), and one block's result per thread
        held += sides * shape.vectors(rows + cols + 2 * math.lcm(device.rows, device.columns))
        r, c = device.rows, device.columns  # an execution's result, and the sim's host arrangement and scratch
        per_block += 4 * r * c + 4 * big_k * ((dim + 1) * (r + c) + r * tick.FILL_COLUMNS)
    return held + max(16 * ID_BYTES * pairs, threads * per_block, 2 * result)


def tick_reply_k(shape: ModelShape, people: int, max_message: int, candidates: int) -> int:
    """The largest k a reply of `people` rows fits in max_message with label scores both ways."""
    per_pair = 12 + 8 * shape.num_labels
    return max(1, min(candidates, (max_message - 4096) // max(1, people * per_pair)))


def largest_tick_bytes(shape: ModelShape, max_tick_ids: int, max_message: int) -> int:
    """The working memory of the largest legitimate ScoreTick: mutual, label scores, every blocked pair,
    k as large as the reply allows; the larger of a pool at max_tick_ids, a pool at the largest size
    whose whole matrix is used, and users x peers of max_tick_ids each."""
    from neuronserve import tick

    whole = min(max_tick_ids, math.isqrt(tick.POOL_MATRIX_BYTES // 4))
    cases = [(n, True) for n in {whole, max_tick_ids} if n >= 2] + [(max_tick_ids, False)]
    return max(
        tick_working_bytes(
            shape,
            n,
            n,
            tick_reply_k(shape, n, max_message, n - 1 if pool else n),
            mutual=True,
            pool=pool,
            labels=True,
            blocked=MAX_BLOCKED_PAIRS,
        )
        for n, pool in cases
    )


def scoring_bytes(config, shape: ModelShape) -> int:
    """max_scoring_bytes as set, else the larger of the largest legitimate ScoreMatrix (its reply as large
    as max_message_bytes allows) and the largest legitimate ScoreTick: each can always run alone."""
    if config.max_scoring_bytes is not None:
        return int(config.max_scoring_bytes)
    max_message = message_bytes(config, shape)
    matrix = 2 * shape.vectors(2 * config.max_peers) + MATRIX_COPIES * max_message  # its reply fits one message
    return max(matrix, largest_tick_bytes(shape, config.max_tick_ids, max_message))


def call_bytes(config, shape: ModelShape) -> int:
    """One call in flight, at most: its request and its reply, MESSAGE_COPIES each, and the tower outputs
    of an upsert of max_queue_rows rows (as the batcher returns them, and concatenated)."""
    return 2 * MESSAGE_COPIES * message_bytes(config, shape) + 2 * shape.vectors(config.batching.max_queue_rows)


def memory_budget(config, shape: ModelShape, baseline_bytes: int, versions: int = 1) -> MemoryBudget:
    """The budget of a process serving `config` (a config.ServerConfig) for a model of `shape`, whose RSS
    after the warm-up, less its shared memory, is `baseline_bytes`; `versions` served (a cache each)."""
    from neuronserve.shared_table import table_bytes

    return MemoryBudget(
        baseline_bytes=baseline_bytes,
        cache_bytes=versions * table_bytes(shape.num_labels, shape.label_dim, config.cache_max_rows),
        calls_bytes=config.max_concurrent_rpcs * call_bytes(config, shape),
        scoring_bytes=scoring_bytes(config, shape),
    )


class ScoringGate:
    """The byte budget of ScoreMatrix, ScoreMatrixStream and ScoreTick together: a call reserves its
    estimated working bytes before it allocates and releases them when it ends. Never waits: a call
    larger than the whole budget is InvalidInput (it can never run here), one that does not fit beside
    the calls in progress is Overloaded (RESOURCE_EXHAUSTED: retry later or elsewhere). Used on the
    event loop only (the handlers reserve before they hand work to a thread), so it needs no lock.

    It also keeps a mutual pool tick's [N, N] matrix for the next tick (a fresh one cost the kernel's
    page clearing and a cold read, 10-15 ms a 5,000 pool: docs/tick.md): one at a time, its bytes
    reserved while kept, so the bound holds; dropped when a call needs the room. The handler never
    keeps a matrix whose call was cancelled (its thread may still write it)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity  # None: unbounded (a service built without a server, in tests)
        self.reserved = 0
        self._kept: np.ndarray | None = None

    @contextlib.contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[Reservation]:
        """Hold `nbytes` for the block; work it starts with Reservation.run keeps them held until its thread
        ends, even when the call is cancelled first."""
        capacity = self.capacity
        if capacity is not None:
            if nbytes > capacity:
                raise InvalidInput(
                    f"{what} needs about {nbytes / MIB:.1f} MiB of working memory, above the server's "
                    f"max_scoring_bytes of {capacity / MIB:.1f} MiB; send fewer ids or a smaller k"
                )
            if self.reserved + nbytes > capacity:
                self._drop()  # a kept matrix gives way to any call
            if self.reserved + nbytes > capacity:
                raise Overloaded(
                    f"{what} needs about {nbytes / MIB:.1f} MiB of working memory; {self.reserved / MIB:.1f} "
                    f"of the server's max_scoring_bytes of {capacity / MIB:.1f} MiB are held by calls in "
                    "progress; retry shortly or on another replica"
                )
            self.reserved += nbytes
        reservation = Reservation(self, nbytes if capacity is not None else 0)
        try:
            yield reservation
        finally:
            reservation.close()

    def take(self, nbytes: int) -> np.ndarray | None:
        """The kept matrix (flat float32) if it holds at least nbytes, else None. Its bytes leave the
        reservation: the caller's own reservation counts them."""
        kept = self._kept
        if kept is None or kept.nbytes < nbytes:
            return None
        self._drop()
        return kept

    def keep(self, matrix: np.ndarray) -> None:
        """Keep `matrix` for the next take, its bytes reserved, unless a larger one is kept or they do not
        fit beside the calls in progress."""
        if self._kept is not None and self._kept.nbytes >= matrix.nbytes:
            return
        self._drop()
        if self.capacity is not None:
            if self.reserved + matrix.nbytes > self.capacity:
                return
            self.reserved += matrix.nbytes
        self._kept = matrix

    @property
    def kept_bytes(self) -> int:
        return 0 if self._kept is None else self._kept.nbytes

    def _drop(self) -> None:
        if self._kept is not None and self.capacity is not None:
            self.reserved -= self._kept.nbytes
        self._kept = None


class Reservation:
    """A ScoringGate reservation's bytes, released when its call has ended and no thread it started still
    runs: a call cancelled (the client gone, the deadline past) while its worker thread computes leaves the
    bytes held until that thread stops, so the gate's bound holds. Loop-only, as the gate."""

    def __init__(self, gate: ScoringGate, nbytes: int) -> None:
        self._gate, self._nbytes = gate, nbytes
        self._threads = 0
        self._open = True

    async def run(self, work: Callable[[threading.Event], T]) -> T:
        """work(stop) in the loop's default executor. If the caller is cancelled, `stop` is set (work that
        checks it may end early) and CancelledError raised at once; the bytes stay held until work returns."""
        stop = threading.Event()
        thread = asyncio.get_running_loop().run_in_executor(None, work, stop)
        self._threads += 1
        thread.add_done_callback(self._thread_done)
        try:
            return await asyncio.shield(thread)
        except asyncio.CancelledError:
            stop.set()
            raise

    def close(self) -> None:
        self._open = False
        self._release()

    def _thread_done(self, thread: asyncio.Future) -> None:
        if not thread.cancelled():
            thread.exception()  # retrieved: a cancelled call's (its shield no longer looks), or asyncio logs it
        self._threads -= 1
        self._release()

    def _release(self) -> None:
        if not self._open and not self._threads and self._nbytes:
            self._gate.reserved -= self._nbytes
            self._nbytes = 0


def start_keeping(config, shape: ModelShape, versions: int = 1) -> MemoryTrimmer:
    """At the end of the start-up, on the serving loop: log the budget (baseline measured now) and start
    the trimmer. The caller stops it (MemoryTrimmer.stop) when the server stops."""
    trimmer = MemoryTrimmer()
    trimmer.start()
    budget = memory_budget(config, shape, trimmer.baseline, versions)
    how = "as set" if config.max_message_bytes is not None else "derived from the model and the limits"
    log.info("memory budget: %s; max_message_bytes %d (%s)", budget.describe(), message_bytes(config, shape), how)
    return trimmer
