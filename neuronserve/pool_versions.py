"""The model versions of a pool (`--workers N` with `--model-repository`): one embedding cache per
version that every worker shares, and the versions an explicit load asked for last.

Role: the supervisor builds it before the first fork (the caches are anonymous shared mappings,
inherited by fork, like the one cache of a pool serving one artifact); each worker takes a version's
cache here when it loads the version and gives it back when the version is unloaded.

Contract:
- A fixed number of cache slots (`slots`: the most versions the start-up policy serves, plus one for
  a new version loading while the old one drains). `cache_for(worker, version, model_version,
  label_bias)` is the cache of integer `version`: the slot some worker already holds for it (so an
  upsert through any worker is seen by all), else a slot no worker holds, emptied for `model_version`
  and its `label_bias` in one commit (a slot's bias is that of the version it holds, not the start-up
  one's); ModelControlError when every slot is held. `release(worker, version)` gives it back;
  `forget(worker)` drops everything a (re)starting worker's predecessor held. Holds are kept per
  (worker, slot), so a slot is free exactly when no worker holds it, whatever version it was last
  tagged with.
- `wanted()`: the versions the last explicit RepositoryModelLoad / Unload left served (None: none
  yet), which a restarted worker serves instead of the start-up policy.
Claims are serialised across processes by a POSIX record lock, which the kernel drops with its holder.
"""

from __future__ import annotations

import ctypes
import fcntl
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from neuronserve.errors import ModelControlError

NOT_SET = -1  # _wanted[0] before any explicit load or unload


class PoolVersions:
    """Cache slots and the explicit version set of a pool (see the module docstring)."""

    def __init__(self, workers: int, slots: int, new_cache: Callable[[], Any]) -> None:
        if slots < 2:
            raise ValueError(f"a pool needs at least 2 cache slots, got {slots}")
        self.slots = slots
        self._caches = [new_cache() for _ in range(slots)]
        self._slot_version = multiprocessing.RawArray(ctypes.c_int64, slots)  # 0: never used
        self._held = multiprocessing.RawArray(ctypes.c_int64, workers * slots)  # [worker, slot]: version held, 0 none
        self._wanted = multiprocessing.RawArray(ctypes.c_int64, slots + 1)  # count (NOT_SET), then versions
        self._wanted[0] = NOT_SET
        fd, path = tempfile.mkstemp(prefix="neuronserve-pool-versions-")
        os.unlink(path)
        self._lock_fd = fd

    def cache_for(self, worker: int, version: int, model_version: str, label_bias: Sequence[float]):
        """The cache of `version` for `worker` (see the module docstring)."""
        with self._locked():
            held = self._held_slots()
            slot = next((s for s in held if self._slot_version[s] == version), None)
            if slot is None:
                free = [s for s in range(self.slots) if s not in held]
                if not free:
                    raise ModelControlError(
                        f"the pool keeps embedding caches for at most {self.slots} versions at once (held: "
                        f"{sorted(self._slot_version[s] for s in held)}); unload a version before loading "
                        f"version {version}"
                    )
                slot = min(free, key=lambda s: self._slot_version[s] != 0)  # a never-used slot first
                self._caches[slot].clear_for(model_version, label_bias)
                self._slot_version[slot] = version
            self._held[worker * self.slots + slot] = version
            return self._caches[slot]

    def release(self, worker: int, version: int) -> None:
        with self._locked():
            for i in range(worker * self.slots, (worker + 1) * self.slots):
                if self._held[i] == version:
                    self._held[i] = 0

    def forget(self, worker: int) -> None:
        """A worker starting in this place: what its predecessor held is free again."""
        with self._locked():
            for i in range(worker * self.slots, (worker + 1) * self.slots):
                self._held[i] = 0

    def set_wanted(self, versions: Sequence[int]) -> None:
        with self._locked():
            kept = sorted(versions)[-self.slots :]
            for i, version in enumerate(kept, start=1):
                self._wanted[i] = version
            self._wanted[0] = len(kept)

    def wanted(self) -> tuple[int, ...] | None:
        with self._locked():
            count = self._wanted[0]
            return None if count == NOT_SET else tuple(self._wanted[1 : 1 + count])

    def _held_slots(self) -> set[int]:
        """The slots some worker holds (each for the version it is tagged with)."""
        return {i % self.slots for i, version in enumerate(self._held) if version}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)


def repository_slots(config) -> int:
    """Cache slots for a pool serving config.model_repository with config.version_policy: the most
    versions the policy serves at once (`all`: the versions on disk at start-up), plus one for a version
    loading while another drains."""
    from pathlib import Path

    from neuronserve.repository import Repository, VersionPolicy

    policy = VersionPolicy.parse(config.version_policy)
    if policy.kind == "latest":
        served = policy.latest
    elif policy.kind == "specific":
        served = len(policy.versions)
    else:
        repository = Repository(Path(config.model_repository))
        served = len(repository.scan(repository.only_model(), policy).versions)
    return max(served, 1) + 1


class WorkerVersions:
    """One worker's view of PoolVersions: what its VersionBuilder and ModelControl call."""

    def __init__(self, pool: PoolVersions, worker: int) -> None:
        self.pool, self.worker = pool, worker

    def cache_for(self, version: int, manifest):
        return self.pool.cache_for(self.worker, version, manifest.model_version, manifest.label_bias)

    def released(self, version: int) -> None:
        self.pool.release(self.worker, version)

    def served(self, versions: Sequence[int]) -> None:
        """An explicit load or unload left these versions served (a restarted worker serves them too)."""
        self.pool.set_wanted(versions)
