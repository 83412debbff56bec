"""Where the event loop and gRPC's poller thread run (`--loop-cpu`, docs/workers.md).

grpc.aio hands every completion to the event loop through a poller thread: it waits in gRPC's completion
queue without the GIL and wakes the loop through a socket, several times a call. On two CPUs each of those
wake-ups crosses CPUs (an inter-processor interrupt: a VM exit on a guest). With the two on one CPU the
poller blocks and the loop runs in its place (measured: docs/benchmarks.md, seventeenth session).

A thread starts on the CPUs of the thread that starts it. So once the loop is pinned, every thread it
starts would share its one CPU. Each thread the server starts while serving calls `release_thread` first,
which puts it back on the process's CPUs. These are the executor threads, torch's inter-op threads, the
lane's thread, and a model process's restart thread (a child process inherits its CPUs too).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

MODES = ("auto", "off")
PINNED_BACKENDS = ("cpu",)  # auto's backends: measured on cpu only (sim and neuron not yet)
POLLER_SUFFIX = "(_poll_wrapper)"  # threading's default name for grpc.aio's poller thread (Python >= 3.10)

_process_cpus: set[int] | None = None  # the CPUs before `pin`, for release_thread; None: nothing is pinned


def loop_cpu(mode: str, backend: str, usable_cpus: set[int]) -> int | None:
    """The CPU `mode` puts the loop and the poller on: with 'auto', the highest usable CPU when there are
    two or more and the backend is one of PINNED_BACKENDS (CPU 0 takes most of a host's interrupts);
    otherwise None (nothing pinned)."""
    if mode != "auto" or backend not in PINNED_BACKENDS or len(usable_cpus) < 2:
        return None
    return max(usable_cpus)


def grpc_poller() -> threading.Thread | None:
    """grpc.aio's poller thread, once a grpc.aio server or channel has started it; None under another engine."""
    return next((t for t in threading.enumerate() if t.name.endswith(POLLER_SUFFIX)), None)


def pin(cpu: int) -> None:
    """On the event loop's thread: pin it and gRPC's poller to `cpu`, and log their thread ids; nothing
    changes when there is no poller thread (a warning)."""
    global _process_cpus
    poller = grpc_poller()
    if poller is None or poller.native_id is None:
        log.warning("--loop-cpu: gRPC has no poller thread here; the event loop stays unpinned")
        return
    _process_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(poller.native_id, {cpu})
    os.sched_setaffinity(0, {cpu})
    loop = threading.get_native_id()
    log.info("the event loop (thread %d) and gRPC's poller (thread %d) on CPU %d", loop, poller.native_id, cpu)


def usable_cpus() -> set[int]:
    """The CPUs this process may use, whichever thread asks: those it had before `pin` narrowed the loop's
    thread (and the threads it starts, until they release) to one."""
    return set(_process_cpus) if _process_cpus is not None else os.sched_getaffinity(0)


def release_thread() -> None:
    """Put the calling thread back on the process's CPUs, if `pin` ran. Call it first in each thread
    the server starts while serving."""
    if _process_cpus is not None:
        os.sched_setaffinity(0, _process_cpus)


def released_executor(workers: int | None = None, name: str = "") -> ThreadPoolExecutor:
    """A ThreadPoolExecutor whose threads run on the process's CPUs, even when a pinned loop starts them."""
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=release_thread)
