"""The cpu backend's fused graph in a process of its own, fed through shared memory from the event loop.

Why (docs/benchmarks.md, "the GIL convoy"): one call of the TorchScript graph gives up and retakes the
GIL about five times, and each retake waits a switch interval (5 ms) whenever the serving loop's thread
is busy in Python, so under load an execution on an executor thread took several times the graph's own
time. Here no thread of the serving process waits for the model: the loop copies a batch's padded
inputs into one of `slots` regions of a shared memory file, sends a small `Job` over a socket, and a
reader callback on the loop (`loop.add_reader`) resolves the batch's future when `Done` comes back.
The child (`python -m neuronserve.model_process`) holds its own interpreter and GIL: it loads the graph
from the verified bytes the parent sends, warms up every compiled (B, U) pair, then runs jobs in
order. As Triton's Python backend stub does, with its shared-memory message queue.

A slot is busy from `submit` until the child's reply: a caller that goes away never frees it early, so
the child never writes into a slot a new job is using. The child exiting fails the jobs in flight
(CoreFault) and `alive` goes False (the runner reports its group unhealthy: health NOT_SERVING) until a
new child is warm; restarts back off (1, 2, 4 ... 30 s) while children keep dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from collections.abc import Sequence

import numpy as np

from neuronserve.errors import CoreFault
from neuronserve.thread_placement import release_thread

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # the child's import of torch, graph load and warm-up
STOP_TIMEOUT_S = 5.0
MAX_RESTART_DELAY_S = 30.0


@dataclass(frozen=True)
class Region:
    """An array in the shared file: `shape` of `dtype` at byte `offset`."""

    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Chunk:
    """One execution: the padded (user, peer, index) inputs and where its first `rows` outputs go."""

    inputs: tuple[Region, Region, Region]
    out: Region  # [rows, K] float32


@dataclass(frozen=True)
class Setup:
    """Parent -> child, once: the graph files' bytes, the (B, U) pair -> file map, the feature widths."""

    files: dict[str, bytes]
    pairs: dict[tuple[int, int], str]
    user_features: int
    peer_features: int
    labels: int  # K: the graph's output is [B, K]


@dataclass(frozen=True)
class Job:
    slot: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Done:
    slot: int
    busy_s: float


@dataclass(frozen=True)
class Failed:
    slot: int
    error: str


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Stop:
    pass


class ModelProcess:
    """The parent's side: start() (blocking: spawn, send Setup, wait for Ready), submit() on the loop,
    close(). `slot_bytes` bounds one job's inputs and outputs; `fits` says whether a job does."""

    def __init__(self, setup: Setup, slots: int, slot_bytes: int, name: str = "model") -> None:
        self.slots, self.slot_bytes, self.name = slots, slot_bytes, name
        self._setup = setup
        self._free: list[int] = list(range(slots))
        self._pending: dict[int, tuple[asyncio.Future, tuple[Chunk, ...]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._map: mmap.mmap | None = None
        self._closing = False
        self._restarts = 0
        self.alive = False

    def start(self) -> None:
        """Spawn the child, send the graph, wait until it is warm (blocking)."""
        self._free, self._pending = list(range(self.slots)), {}
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        size = self.slots * self.slot_bytes
        with tempfile.NamedTemporaryFile(prefix=f"neuronserve-{self.name}-", dir=directory, delete=False) as file:
            file.truncate(size)
            path = file.name
        ours, theirs = socket.socketpair()
        try:
            with open(path, "r+b") as file:
                self._map = mmap.mmap(file.fileno(), size)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "neuronserve.model_process", str(theirs.fileno()), path, str(size)],
                pass_fds=(theirs.fileno(),),
            )
            theirs.close()
            self._conn = Connection(ours.detach())
            self._conn.send(self._setup)
            if not self._conn.poll(READY_TIMEOUT_S):
                raise CoreFault(f"the {self.name} process did not get ready within {READY_TIMEOUT_S:g} s")
            reply = self._conn.recv()
            if not isinstance(reply, Ready):
                raise CoreFault(f"the {self.name} process failed to start: {getattr(reply, 'error', reply)}")
        except BaseException:
            self.close()
            raise
        finally:
            os.unlink(path)  # both sides have it mapped; nothing is left behind in /dev/shm
        self.alive = True

    def fits(self, chunks: Sequence[tuple[Sequence[np.ndarray], int]]) -> bool:
        """Whether submit(chunks) fits one slot."""
        labels = self._setup.labels
        return (
            sum(sum(_aligned(a.nbytes) for a in arrays) + _aligned(4 * rows * labels) for arrays, rows in chunks)
            <= self.slot_bytes
        )

    def submit(self, chunks: Sequence[tuple[Sequence[np.ndarray], int]]) -> asyncio.Future:
        """On the loop: run chunks of (padded [user, peer, index], rows) in the child -> a future of
        (scores [sum rows, K] float32, busy seconds). The caller keeps at most `slots` jobs in flight."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        conn = self._conn
        if not self.alive or conn is None:
            future.set_exception(CoreFault(f"the {self.name} process is not running"))
            return future
        if self._loop is None:
            self._loop = loop
            loop.add_reader(conn.fileno(), self._on_readable)
        slot = self._free.pop()
        base, layout = slot * self.slot_bytes, []
        for arrays, rows in chunks:
            regions = []
            for array in arrays:
                region = Region(base, tuple(array.shape), array.dtype.str)
                self._view(region)[...] = array
                regions.append(region)
                base += _aligned(region.nbytes)
            out = Region(base, (rows, self._setup.labels), "<f4")
            base += _aligned(out.nbytes)
            user, peer, index = regions
            layout.append(Chunk((user, peer, index), out))
        job = Job(slot, tuple(layout))
        self._pending[slot] = (future, job.chunks)
        conn.send(job)
        return future

    def _view(self, region: Region) -> np.ndarray:
        return np.ndarray(region.shape, np.dtype(region.dtype), buffer=self._map, offset=region.offset)

    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._settle(conn.recv())
        except (EOFError, OSError):
            self._lost()

    def _settle(self, reply) -> None:
        future, chunks = self._pending.pop(reply.slot)
        if isinstance(reply, Done):
            outs = [self._view(chunk.out) for chunk in chunks]
            result = (np.concatenate(outs) if len(outs) > 1 else outs[0].copy(), reply.busy_s)
            del outs
        self._free.append(reply.slot)
        if future.done():
            return
        if isinstance(reply, Done):
            future.set_result(result)
        else:
            future.set_exception(RuntimeError(f"the {self.name} process: {reply.error}"))

    def _lost(self) -> None:
        """The child exited: fail what it held, stop reading, start a new one in the background."""
        self.alive = False
        code = self._proc.poll() if self._proc is not None else None
        if self._loop is not None and self._conn is not None:
            self._loop.remove_reader(self._conn.fileno())
        self._loop = None  # the next submit registers the new child's socket
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(CoreFault(f"the {self.name} process exited (code {code}) while running a batch"))
        self._pending.clear()
        if not self._closing:
            delay_s = min(MAX_RESTART_DELAY_S, 2.0**self._restarts)
            log.error("the %s process exited (code %s): starting a new one in %.0f s", self.name, code, delay_s)
            self._restarts += 1
            threading.Thread(target=self._restart, args=(delay_s,), name=f"{self.name}-restart", daemon=True).start()

    def _restart(self, delay_s: float) -> None:
        release_thread()  # started by the loop: the new child must not inherit a pinned loop's one CPU
        time.sleep(delay_s)  # backoff: a child that dies at once is not respawned in a tight loop
        if self._closing:
            return
        self._release()
        try:
            self.start()
            log.info("the %s process is back", self.name)
        except Exception:  # noqa: BLE001 -- logged; the group stays out of rotation
            log.exception("the %s process could not be restarted", self.name)

    def close(self) -> None:
        """Stop the child (after the job it is running), release the mapping. Idempotent."""
        self._closing = True
        self.alive = False
        self._release()

    def _release(self) -> None:
        if self._conn is not None:
            if self._loop is not None and not self._loop.is_closed():
                _on_loop(self._loop, self._loop.remove_reader, self._conn.fileno())
            with contextlib.suppress(OSError):  # the child is gone already
                self._conn.send(Stop())
        if self._proc is not None:
            try:
                self._proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still exported; the mapping goes with the process
                self._map.close()
            self._map = None


def _on_loop(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """callback(*args) on `loop`'s thread: now if this is it, else handed over and waited for (1 s at
    most: a loop that no longer turns has nothing left to read for us)."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback(*args)
        return
    done = threading.Event()

    def run() -> None:
        try:
            callback(*args)
        finally:
            done.set()

    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # closed meanwhile
        return
    done.wait(1.0)


def _aligned(nbytes: int) -> int:
    """Region sizes rounded up to 64 bytes: every region starts aligned for any dtype (and a cache line)."""
    return -(-nbytes // 64) * 64


# ---- the child ---------------------------------------------------------------------------------


def _child(fd: int, path: str, size: int) -> int:
    import torch

    torch.set_num_threads(1)
    conn = Connection(fd)
    with open(path, "r+b") as file:
        shared = mmap.mmap(file.fileno(), size)

    def view(region: Region) -> np.ndarray:
        return np.ndarray(region.shape, np.dtype(region.dtype), buffer=shared, offset=region.offset)

    try:
        setup = conn.recv()
        files = {
            name: torch.jit.load(io.BytesIO(data), map_location="cpu").eval() for name, data in setup.files.items()
        }
        graphs = {pair: files[name] for pair, name in setup.pairs.items()}
        with torch.inference_mode():
            for (batch, users), graph in graphs.items():
                graph(
                    torch.zeros(users, setup.user_features),
                    torch.zeros(batch, setup.peer_features),
                    torch.zeros(batch, dtype=torch.int64),
                )
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which refuses to start
        conn.send(Failed(-1, f"{type(exc).__name__}: {exc}"))
        return 1
    conn.send(Ready())
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return 0
        if isinstance(message, Stop):
            return 0
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for chunk in message.chunks:
                    user, peer, index = (torch.from_numpy(view(region)) for region in chunk.inputs)
                    out = graphs[(peer.shape[0], user.shape[0])](user, peer, index)
                    view(chunk.out)[...] = out[: chunk.out.shape[0]].numpy()
        except Exception as exc:  # noqa: BLE001 -- the batch fails, the process goes on
            conn.send(Failed(message.slot, f"{type(exc).__name__}: {exc}"))
            continue
        conn.send(Done(message.slot, time.perf_counter() - start))


if __name__ == "__main__":
    # through the package module, so the messages pickle as neuronserve.model_process.*, not __main__.*
    from neuronserve.model_process import _child as child

    sys.exit(child(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
