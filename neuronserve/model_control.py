"""Model control: load, switch and unload versions from the model repository while serving.

Role: the lifecycle of versions over the VersionTable (versions.py) and the Repository
(repository.py); Triton's repository extension (RepositoryIndex, RepositoryModelLoad,
RepositoryModelUnload) is answered from here (`index`, `load`, `unload`, for oip_service.py), and
with --model-control poll the repository is rescanned every poll interval.

Contract of a load: the versions the policy selects that are not served yet are each built by the
injected `build(path, version)` (the server's: verify checksums and signature via load_manifest,
check the schema against the served one, load and warm up every stage in a thread, run the artifact's
reference inputs on the backend and compare with its reference outputs, a new empty embedding cache),
then all are installed in one event-loop step (`current` becomes the highest version served) and the
versions the policy no longer selects are drained and closed in the background. Any failure leaves
what was served serving: the RPC answers the error's status (an ArtifactError names the file), the
log says why, and neuronserve_model_loads_total{outcome="failed"} counts it. Loads and unloads are
serialised by one lock. A load the server's stop abandons (the build's abandon event: it gives up at its
next stage) is no failure: logged at INFO, not counted, its caller answered UNAVAILABLE; `close()`
waits for it, and refuses every load after. After every load or unload `on_change(loaded)` tells the
server whether any version is served (its readiness follows).

Embedding cache per version: a new, empty cache; the client re-upserts (UpsertEmbeddings naming the
version). While two versions are loaded the cache memory is twice one version's (rows x K x D x 4
bytes per kind and version, x2 for the double buffer), plus a second copy of the stages on the cores.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

from neuronserve.errors import ArtifactError, InvalidInput, LoadAbandoned, ModelControlError, NeuronServeError, NotFound
from neuronserve.repository import Repository, VersionPolicy, parse_version
from neuronserve.versions import ServedVersion, VersionTable
from neuronserve.contract import PEER_TOWER, USER_TOWER

log = logging.getLogger(__name__)

NONE, EXPLICIT, POLL = "none", "explicit", "poll"
MODES = (NONE, EXPLICIT, POLL)
READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"

Build = Callable[[Path, int], Awaitable[ServedVersion]]
OnChange = Callable[[bool], Awaitable[None]]  # after a load or unload: whether any version is served


class PoolHooks(Protocol):
    """A pool worker's shared version state (pool_versions.WorkerVersions)."""

    def served(self, versions: Sequence[int]) -> None: ...  # an explicit load or unload left these served

    def released(self, version: int) -> None: ...  # this worker closed the version: its cache slot may go


@dataclass(frozen=True)
class VersionStatus:
    """One row of the repository index."""

    model: str
    version: int
    state: str  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""


@dataclass(frozen=True)
class LoadCounts:
    """Load outcomes since start, for the metrics."""

    loaded: int = 0
    failed: int = 0
    unloaded: int = 0


class ModelControl:
    """Loads and unloads the versions of the repository's one model into `table` (see the module docstring)."""

    def __init__(
        self,
        repository: Repository,
        model: str,
        policy: VersionPolicy,
        table: VersionTable,
        build: Build,
        mode: str = NONE,
        drain_timeout_s: float = 10.0,
        pool: PoolHooks | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        if mode not in MODES:
            raise InvalidInput(f"model control must be one of {', '.join(MODES)}, got {mode!r}")
        self.repository, self.model, self.policy, self.table = repository, model, policy, table
        self.mode, self._build, self.drain_timeout_s = mode, build, drain_timeout_s
        self._pool, self._on_change = pool, on_change
        self._lock = asyncio.Lock()
        self._closed = False  # close() began: no more loads
        self._status: dict[int, VersionStatus] = {}  # versions not READY: loading, failed, unloading
        self._refused: dict[int, tuple[int, ...] | None] = {}  # refused versions: their manifest.json's _stamp then
        self._retiring: set = set()  # drain-and-close tasks
        self.counts = LoadCounts()
        self._poller: asyncio.Task | None = None

    # ---- Triton's repository extension -----------------------------------------------------

    def index(self, ready_only: bool = False) -> list[VersionStatus]:
        """Every version on disk, and every one served or failed, with its state (Triton's index)."""
        rows: dict[int, VersionStatus] = {}
        try:
            for entry in self.repository.scan(self.model, self.policy).available:
                rows[entry.version] = VersionStatus(self.model, entry.version, UNAVAILABLE, "unloaded")
        except NeuronServeError as exc:
            log.warning("repository index: %s", exc)
        rows.update(self._status)
        for served in self.table.all():
            rows[served.version] = VersionStatus(self.model, served.version, READY)
        listed = [rows[v] for v in sorted(rows)]
        return [r for r in listed if r.state == READY] if ready_only else listed

    async def load(self, model: str, config: str | None = None) -> tuple[int, ...]:
        """RepositoryModelLoad: serve the versions the policy selects (Triton's model config JSON in
        `config` may carry a `version_policy`, which then stays in force). Returns the versions served."""
        self._check_explicit("load")
        self._check_model(model)
        policy = self.policy
        if config:
            try:
                data = json.loads(config)
            except ValueError as exc:
                raise InvalidInput(f"load config is not JSON ({exc})") from None
            if not isinstance(data, dict):
                raise InvalidInput("load config must be a JSON object (Triton's model configuration)")
            if "version_policy" in data:
                policy = VersionPolicy.from_triton(data["version_policy"])
        served = await self._apply_locked(policy)
        self.policy = policy
        if self._pool is not None:
            self._pool.served(served)
        return served

    async def unload(self, model: str, version: str = "") -> tuple[int, ...]:
        """RepositoryModelUnload: stop serving the model (every version: inference answers UNAVAILABLE
        until a load), or only `version` (a parameter beyond Triton's: switch back by unloading the
        newer one). Drains and closes in the background. Returns the versions still served."""
        self._check_explicit("unload")
        self._check_model(model)
        async with self._lock:
            if version:
                number = parse_version(version)
                if number is None or self.table.get(number) is None:
                    raise NotFound(
                        f"version {version[:64]!r} of model {self.model} is not loaded; loaded: {list(self.table.versions)}"
                    )
                self._retire(self.table.remove(number))
                left = self.table.versions
            else:
                for served in self.table.unload_all():
                    self._retire(served)
                left = ()
            await self._changed()
        if self._pool is not None:
            self._pool.served(left)
        return left

    # ---- poll ----------------------------------------------------------------------------------

    def start(self, interval_s: float) -> None:
        """--model-control poll: rescan every `interval_s` and apply the policy (failures are logged)."""
        if self.mode == POLL and self._poller is None:
            self._poller = asyncio.ensure_future(self._poll(interval_s))

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._apply_locked(self.policy, retry_refused=False)
            except LoadAbandoned:
                return  # the server is stopping
            except NeuronServeError as exc:
                log.warning("repository poll: %s", exc)
            except Exception:  # noqa: BLE001 - the poll must outlive a bug in one pass
                log.exception("repository poll failed")

    def apply_soon(self) -> None:
        """Apply the policy in the background (start-up: the policy's versions below the first one)."""

        async def apply() -> None:
            try:
                await self._apply_locked(self.policy)
            except LoadAbandoned:
                pass  # the server is stopping
            except NeuronServeError as exc:
                log.warning("loading the version policy's versions: %s", exc)

        task = asyncio.ensure_future(apply())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        """Refuse further loads, wait for the load in progress (the server's stop set the build's abandon
        event, so it gives up at its next stage, its thread done), stop polling, wait for the drains."""
        self._closed = True
        async with self._lock:  # no load runs while this holds it: cancelling the poller cancels no build
            if self._poller is not None:
                self._poller.cancel()
                await asyncio.gather(self._poller, return_exceptions=True)
                self._poller = None
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # ---- the work --------------------------------------------------------------------------

    async def _apply_locked(self, policy: VersionPolicy, retry_refused: bool = True) -> tuple[int, ...]:
        """_apply under the lock, then on_change; LoadAbandoned once close() began."""
        async with self._lock:
            if self._closed:
                raise LoadAbandoned("the server is shutting down: it loads no more versions; load on a serving replica")
            served = await self._apply(policy, retry_refused)
            await self._changed()
        return served

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change(self.table.loaded)

    async def _apply(self, policy: VersionPolicy, retry_refused: bool = True) -> tuple[int, ...]:
        """Load what `policy` selects and is not served, retire what it no longer selects. Without
        `retry_refused` (the poll) a version refused before is skipped until its manifest.json changes."""
        scan = self.repository.scan(self.model, policy)
        if not scan.selected:
            wanted = list(policy.versions) if policy.kind == "specific" else "any"
            raise NotFound(
                f"model {self.model}: the version policy {policy} selects none of the versions in the repository {list(scan.versions) or 'none'} (asked {wanted})"
            )
        missing = [v for v in (policy.versions if policy.kind == "specific" else ()) if v not in scan.versions]
        if missing:
            raise NotFound(
                f"model {self.model} has no version {missing} in the repository; it has {list(scan.versions)}"
            )
        new = self._to_load(scan, retry_refused)
        built: list[ServedVersion] = []
        try:
            for version in new:
                built.append(await self._load_one(scan.path(version), version))
        except BaseException:
            for served in built:  # the load is all or nothing: what was served keeps serving
                self._retire(served)
            raise
        for served in built:  # one event-loop step: no request sees half a switch
            replaced = self.table.install(served)
            if replaced is not None:
                self._retire(replaced)
        for served in self.table.all():
            if served.version not in scan.selected and len(self.table.versions) > 1:
                self._retire(self.table.remove(served.version))
        return self.table.versions

    def _to_load(self, scan, retry_refused: bool) -> list[int]:
        """The selected versions not served (without `retry_refused`: nor refused with the same manifest)."""
        new = [v for v in scan.selected if self.table.get(v) is None]
        if retry_refused:
            return new
        return [v for v in new if v not in self._refused or self._refused[v] != _stamp(scan.path(v))]

    async def _load_one(self, path: Path, version: int) -> ServedVersion:
        self._status[version] = VersionStatus(self.model, version, LOADING)
        start = time.monotonic()
        log.info("loading model %s version %d from %s", self.model, version, path)
        try:
            served = await self._build(path, version)
        except LoadAbandoned:
            self._status[version] = VersionStatus(self.model, version, UNAVAILABLE, "load abandoned: shutting down")
            log.info("load of model %s version %d abandoned: the server is shutting down", self.model, version)
            raise LoadAbandoned(
                f"the server is shutting down: the load of model {self.model} version {version} was abandoned; load it on a serving replica"
            ) from None
        except NeuronServeError as exc:
            self._status[version] = VersionStatus(self.model, version, UNAVAILABLE, str(exc))
            self._refused[version] = _stamp(path)
            self.counts = LoadCounts(self.counts.loaded, self.counts.failed + 1, self.counts.unloaded)
            log.error(
                "load of model %s version %d refused (the poll retries it once its manifest.json changes); still serving %s: %s",
                self.model,
                version,
                list(self.table.versions),
                exc,
            )
            raise
        except BaseException as exc:
            self._status[version] = VersionStatus(
                self.model, version, UNAVAILABLE, f"load failed: {type(exc).__name__}"
            )
            self.counts = LoadCounts(self.counts.loaded, self.counts.failed + 1, self.counts.unloaded)
            log.exception(
                "load of model %s version %d failed; still serving %s", self.model, version, list(self.table.versions)
            )
            raise
        self._status.pop(version, None)
        self._refused.pop(version, None)
        self.counts = LoadCounts(self.counts.loaded + 1, self.counts.failed, self.counts.unloaded)
        log.info(
            "model %s version %d (artifact %s) loaded and warm in %.1f s",
            self.model,
            version,
            served.info.version,
            time.monotonic() - start,
        )
        return served

    def _retire(self, served: ServedVersion) -> None:
        """Drain and close `served` (no longer in the table) in the background."""
        self._status[served.version] = VersionStatus(self.model, served.version, UNLOADING)

        async def retire() -> None:
            try:
                await served.close(self.drain_timeout_s)
            finally:
                if self._status.get(served.version, VersionStatus(self.model, 0, "")).state == UNLOADING:
                    del self._status[served.version]
                self.counts = LoadCounts(self.counts.loaded, self.counts.failed, self.counts.unloaded + 1)
                if self._pool is not None and self.table.get(served.version) is None:
                    self._pool.released(served.version)
                log.info("model %s version %d drained and unloaded", self.model, served.version)

        task = asyncio.ensure_future(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _check_explicit(self, what: str) -> None:
        if self.mode != EXPLICIT:
            raise ModelControlError(
                f"explicit model {what} is not allowed with --model-control {self.mode}; start the server with --model-control explicit"
            )

    def _check_model(self, model: str) -> None:
        if model != self.model:
            raise NotFound(f"unknown model {model[:64]!r}; the repository's model is {self.model}")


async def check_artifact_outputs(pipeline, manifest) -> None:
    """check_reference with the artifact's own reference file (read when the manifest was verified): at
    start-up and for every version loaded, the graphs must score as compiled."""
    with np.load(io.BytesIO(manifest.file_bytes(manifest.reference_file))) as data:
        await check_reference(pipeline, manifest, {k: data[k] for k in data.files})


async def check_reference(pipeline, manifest, reference: dict[str, np.ndarray]) -> None:
    """The artifact's reference inputs run on the loaded pipeline (both towers and the score path)
    must give its reference outputs within a tolerance; an ArtifactError naming the file otherwise.
    `reference`: the arrays of the verified reference file."""
    tolerance = max(10 * manifest.parity_tolerance, 1e-4)
    where = manifest.path(manifest.reference_file)
    checks = [
        (
            USER_TOWER,
            await pipeline.run_stage(USER_TOWER, [reference["user_features"]]),
            reference["user_embeddings"],
        ),
        (
            PEER_TOWER,
            await pipeline.run_stage(PEER_TOWER, [reference["peer_features"]]),
            reference["peer_embeddings"],
        ),
    ]
    users = [row[None] for row in reference["user_features"]]
    peers = [row[None] for row in reference["peer_features"]]
    # the fused graph run here, in a thread: through the pipeline it would start torch's inter-op thread,
    # which a pool worker or a one-CPU lane never starts
    batch = await asyncio.to_thread(pipeline.score_here, users, peers)
    if batch is None:  # stages on their own groups: no launcher there
        batch = await pipeline.score_requests(users, peers)
    checks.append(("scores", batch.scores, reference["scores"]))
    for name, got, want in checks:
        error = float(np.max(np.abs(np.asarray(got, np.float64) - want))) if got.shape == want.shape else float("inf")
        if not error <= tolerance:
            raise ArtifactError(
                f"{where}: the backend's {name} differ from the reference outputs by {error:.2e} (tolerance {tolerance:.0e}); the artifact does not score as compiled"
            )


def control_samples(control: ModelControl) -> list:
    """The metrics of model control (metrics.FAMILIES): loads by outcome, and the versions served."""
    from neuronserve.metric_families import Sample

    counts = control.counts
    samples = [
        Sample("neuronserve_model_loads_total", (("outcome", outcome),), value)
        for outcome, value in (("loaded", counts.loaded), ("failed", counts.failed), ("unloaded", counts.unloaded))
    ]
    current = control.table.current
    samples += [
        Sample(
            "neuronserve_model_version_served", (("version", str(s.version)), ("current", str(s is current).lower())), 1
        )
        for s in control.table.all()
    ]
    return samples


def _stamp(version_dir: Path) -> tuple[int, ...] | None:
    """What changes when a version directory's artifact is replaced: its manifest.json's inode, size and
    modification time (None: no manifest)."""
    try:
        info = (version_dir / "manifest.json").stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
