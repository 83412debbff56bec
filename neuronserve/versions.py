"""The versions being served: which objects answer a request naming version V, or naming none.

Role: a ServedVersion holds one loaded version's objects (its ModelInfo, Runtime, embedding cache,
pipeline, backend); the VersionTable maps versions to them, knows `current` (what a request naming no
version gets: the highest loaded version, as Triton serves), and changes on the event loop only, so a
change is atomic for every request. Listeners (the servicers) keep `current` in a plain attribute: the
request path reads one attribute, a dict lookup when a request names its version.

Draining without a per-request counter: a request resolves its version and hands its work to that
version's batcher in one event-loop step (no await between), so once the table no longer lists a
version, every call that will use its runtime is already queued there; Runtime.close(drain) answers
them all, then the pipeline and backend close. Calls on the cache alone (ScoreByIds, ScoreMatrix,
ScoreTick) keep the cache object they resolved alive until they finish; nothing closes a cache.

Routing (`route`), the one place a request gets its version and arm: a version the request names
(arm "explicit"), else the experiment's assignment (experiments.py: A/B by the request's user id,
switch-back by time; arm "control" or "candidate") when the assigned version is served, else
`current` (arm "default"). The route is also left in the ROUTED context variable of the request's
task, where metrics.Metrics.request reads it for the version and arm labels.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from neuronserve.errors import NotFound, Unavailable
from neuronserve.experiments import DEFAULT, EXPLICIT, Experiment

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedVersion:
    """One version's serving objects. `runtime` is attached once the version is warm (the server serves
    with the door closed during the first warm-up). `version` is the repository's integer version;
    `info.version` the artifact's (its content hash unless compile named one)."""

    version: int
    info: Any  # service.ModelInfo
    runtime: Any  # service.Runtime (runtime.Runtime), None until warm
    cache: Any  # embeddings.EmbeddingCache: one per version, never shared between versions
    pipeline: Any = None
    backend: Any = None
    manifest: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        """The strings a request may name this version by: the integer and the artifact's version."""
        return (str(self.version), self.info.version)

    async def close(self, timeout_s: float) -> None:
        """Drain the batchers (every queued request answered within `timeout_s`), then close the
        pipeline and backend, off the event loop."""
        if self.runtime is not None:
            await self.runtime.close(timeout_s=timeout_s)
        if self.pipeline is not None:
            await asyncio.to_thread(self.pipeline.close)
        if self.backend is not None:
            self.backend.close()


Listener = Callable[["ServedVersion"], None]


@dataclass(frozen=True)
class Route:
    """The version that serves a request and the arm that chose it (experiments.ARMS); `burn_in`: a
    switch-back request in the burn-in after a switch (served by its arm, flagged so analysis drops it)."""

    served: ServedVersion
    arm: str
    burn_in: bool = False

    @property
    def version(self) -> int:
        return self.served.version


# The route of the request being answered in this task (set by VersionTable.route; metrics read it).
ROUTED: ContextVar[Route | None] = ContextVar("neuronserve_route", default=None)


class VersionTable:
    """version -> ServedVersion, with `current` the highest; mutated on the event loop only."""

    def __init__(self, first: ServedVersion, experiment: Experiment | None = None) -> None:
        self._by_version: dict[int, ServedVersion] = {}
        self._by_name: dict[str, ServedVersion] = {}
        self._listeners: list[Listener] = []
        self.current = first
        self.experiment = experiment  # --experiment: between two versions of this table
        self._unserved_logged: tuple[int, ...] = ()  # assigned versions not served, last logged
        self._add(first)

    def route(self, name: str, user_id: int | None = None, *, experiment: bool = True) -> Route:
        """The version and arm serving a request naming version `name` ("" = none), for user `user_id`
        (None: no single user); `experiment=False` skips the experiment (upserts go where they name).
        Resolves and records in one step, no await (see the module docstring on draining)."""
        if name:
            route = Route(self.resolve(name), EXPLICIT)
        else:
            assigned = self._assigned(user_id) if experiment and self.experiment is not None else None
            route = assigned or Route(self.current, DEFAULT)
        ROUTED.set(route)
        return route

    def _assigned(self, user_id: int | None) -> Route | None:
        """The experiment's route, or None when it does not apply or its version is not served (logged
        once per load: the experiment resumes by itself when the version is loaded again)."""
        assert self.experiment is not None
        assignment = self.experiment.route(user_id)
        if assignment is None:
            return None
        served = self._by_version.get(assignment.version)
        if served is None:
            if assignment.version not in self._unserved_logged:
                self._unserved_logged = self._unserved_logged + (assignment.version,)
                log.warning(
                    "experiment: the %s version %d is not served (served: %s); its requests get version %d, arm default",
                    assignment.arm,
                    assignment.version,
                    ", ".join(map(str, self.versions)) or "none",
                    self.current.version,
                )
            return None
        return Route(served, assignment.arm, assignment.burn_in)

    def listen(self, listener: Listener) -> None:
        """`listener(current)` now and after every change of `current` (same event-loop step)."""
        self._listeners.append(listener)
        listener(self.current)

    def resolve(self, name: str) -> ServedVersion:
        """The version a request names ("" = current); NotFound naming what is served."""
        if not name:
            return self.current
        served = self._by_name.get(name)
        if served is None:
            raise NotFound(
                f"version {name[:64]!r} is not served; served versions: {', '.join(map(str, self.versions))} (or send none for {self.current.version})"
            )
        return served

    def serves(self, name: str) -> bool:
        """Whether a request naming `name` (integer or artifact version) is answered."""
        return name in self._by_name

    def get(self, version: int) -> ServedVersion | None:
        return self._by_version.get(version)

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self._by_version))

    def all(self) -> tuple[ServedVersion, ...]:
        return tuple(self._by_version[v] for v in self.versions)

    def install(self, served: ServedVersion) -> ServedVersion | None:
        """Serve `served` (warm, runtime attached); `current` becomes the highest version. Returns the
        ServedVersion it replaces at the same number (the caller drains and closes it), else None."""
        replaced = self._by_version.get(served.version)
        if replaced is not None:
            self._drop(replaced)
        self._add(served)
        self._set_current()
        return replaced

    def remove(self, version: int) -> ServedVersion:
        """Stop serving `version` (the caller drains and closes what is returned). The last version
        cannot be removed: the server would have nothing to answer with (unload the model instead)."""
        served = self._by_version.get(version)
        if served is None:
            raise NotFound(f"version {version} is not loaded; loaded: {', '.join(map(str, self.versions))}")
        if len(self._by_version) == 1:
            from neuronserve.errors import InvalidInput

            raise InvalidInput(f"version {version} is the only version served; load another before unloading it")
        self._drop(served)
        self._set_current()
        return served

    @property
    def loaded(self) -> bool:
        """False after unload_all, until a version is installed again."""
        return bool(self._by_version)

    def unload_all(self) -> tuple[ServedVersion, ...]:
        """Serve nothing: `current` becomes a stand-in whose runtime and cache answer UNAVAILABLE
        (metrics still read the last version's counters). Returns the versions removed (the caller
        drains and closes them)."""
        removed = self.all()
        last = self.current
        self._by_version, self._by_name = {}, {}
        self.current = ServedVersion(last.version, last.info, _Unloaded(last.runtime), _UnloadedCache(last.cache))
        log.info("model unloaded: inference answers UNAVAILABLE until a load")
        for listener in self._listeners:
            listener(self.current)
        return removed

    def _add(self, served: ServedVersion) -> None:
        self._unserved_logged = ()  # a version loaded: log again what is still missing
        self._by_version[served.version] = served
        names = dict(self._by_name)
        for name in served.names:
            names.setdefault(name, served)  # an artifact version equal to another's integer never shadows it
        names[str(served.version)] = served
        self._by_name = names

    def _drop(self, served: ServedVersion) -> None:
        del self._by_version[served.version]
        self._by_name = {k: v for k, v in self._by_name.items() if v is not served}

    def _set_current(self) -> None:
        current = self._by_version[max(self._by_version)]
        if current is not self.current:
            log.info("now serving version %d (artifact %s) by default", current.version, current.info.version)
            self.current = current
        for listener in self._listeners:
            listener(current)


_UNLOADED = "the model is unloaded (RepositoryModelUnload); load it again with RepositoryModelLoad"


class _Unloaded:
    """The runtime of an unloaded model: every call UNAVAILABLE; the last batchers kept for the metrics."""

    def __init__(self, runtime) -> None:
        self.batchers = getattr(runtime, "batchers", {})

    async def score(self, *args, **kwargs):
        raise Unavailable(_UNLOADED)

    async def embed(self, *args, **kwargs):
        raise Unavailable(_UNLOADED)

    async def close(self, timeout_s: float) -> None:
        return None


class _UnloadedCache:
    """The cache of an unloaded model: every read or write UNAVAILABLE; stats() the last cache's."""

    def __init__(self, cache) -> None:
        self._last = cache

    def stats(self):
        return self._last.stats()

    def __getattr__(self, name: str):
        raise Unavailable(_UNLOADED)
