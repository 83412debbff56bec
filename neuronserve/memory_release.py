"""Freed memory given back to the system (glibc): fixed mmap / trim thresholds set at start-up, and a
trimmer that runs malloc_trim after a burst; and reading a process's memory from /proc. Why and what it
measured: docs/memory.md. Every glibc call is a no-op elsewhere (musl, macOS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import platform
from dataclasses import dataclass

MIB = 1 << 20
TRIM_INTERVAL_S = 1.0  # the trimmer's look at the process's private memory
TRIM_STEP_BYTES = 16 * MIB  # ... which it trims when this far above its baseline
MMAP_THRESHOLD_BYTES = 4 * MIB  # glibc: larger blocks are mapped alone (unmapped when freed), fixed
TRIM_THRESHOLD_BYTES = 4 * MIB  # glibc: a free arena top above this goes back at once (1 MiB: docs/memory.md)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
TRIM_BACKOFF_S = 8.0  # the longest interval, after trims that released nothing


@dataclass(frozen=True)
class ProcessMemory:
    """A process's memory from /proc/PID/status, in bytes: resident now, its peak (VmHWM, reset by writing 5
    to /proc/PID/clear_refs), and the resident shared memory (the embedding cache's mapping)."""

    rss: int
    peak: int
    shared: int

    @property
    def private(self) -> int:
        return self.rss - self.shared


def process_memory(pid: int | str = "self") -> ProcessMemory:
    """ProcessMemory of `pid` (Linux); elsewhere psutil's resident size (peak = rss, shared 0)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        import psutil

        rss = psutil.Process(None if pid == "self" else int(pid)).memory_info().rss
        return ProcessMemory(rss, rss, 0)

    def kib(name: str) -> int:
        return 1024 * int(fields.get(name, "0 kB").split()[0])

    return ProcessMemory(kib("VmRSS"), kib("VmHWM"), kib("RssShmem"))


def _glibc(name: str):
    """glibc's function `name`, or None elsewhere (musl, macOS: tune_malloc and the trimmer are no-ops)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _free_held():
    """A function giving the bytes glibc holds freed in its arenas (mallinfo2's fordblks, every arena),
    or None without it (glibc < 2.33, not glibc)."""
    mallinfo2 = _glibc("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.argtypes, mallinfo2.restype = [], _Mallinfo2
    return lambda: int(mallinfo2().fordblks)


def tune_malloc(environ) -> bool:
    """Fix glibc's mmap and trim thresholds (MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES) for this process
    and the workers it forks, unless the operator tuned malloc (GLIBC_TUNABLES, MALLOC_*_ environment).
    glibc raises both after a large block is freed (up to 32 and 64 MiB): freed replies and score
    matrices then stay in a thread's arena for good (docs/memory.md). True when set."""
    mallopt = _glibc("mallopt")
    if (
        mallopt is None
        or "malloc" in environ.get("GLIBC_TUNABLES", "")
        or any(k.startswith("MALLOC_") for k in environ)
    ):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


class MemoryTrimmer:
    """Gives memory freed after a burst back to the system: every TRIM_INTERVAL_S it reads how much freed
    memory glibc's arenas hold (mallinfo2) and, when that is TRIM_STEP_BYTES or more, runs glibc's
    malloc_trim(0) in a thread. Without mallinfo2: when private resident memory is TRIM_STEP_BYTES above
    the baseline measured at start() (backing off to TRIM_BACKOFF_S while trims release nothing). Why:
    glibc keeps freed memory in its arenas (docs/memory.md). A trim holds the arenas' locks (measured
    2-50 ms), so it runs only when there is a burst's worth to give back. A no-op without glibc."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self._free_held = _free_held()
        self._task: asyncio.Task | None = None
        self.baseline = 0
        self.trims = 0

    def start(self) -> None:
        self.baseline = process_memory().private
        if self._trim is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        interval = TRIM_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            if self._free_held is not None:
                if self._free_held() >= TRIM_STEP_BYTES:
                    await asyncio.to_thread(self._trim, 0)
                    self.trims += 1
                continue
            before = process_memory().private
            if before <= self.baseline + TRIM_STEP_BYTES:
                interval = TRIM_INTERVAL_S
                continue
            await asyncio.to_thread(self._trim, 0)
            self.trims += 1
            released = before - process_memory().private
            interval = TRIM_INTERVAL_S if released >= TRIM_STEP_BYTES else min(2 * interval, TRIM_BACKOFF_S)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
