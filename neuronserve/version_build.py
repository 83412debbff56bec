"""One served version built from an artifact: its ModelInfo and embedding cache, and for a repository's
later versions its backend, pipeline and runtime, verified and warm (model_control's Build).

A later version's stages load on the served version's core groups: the Neuron runtime holds both models
in a core's memory while the first still serves (docs/design.md, model lifecycle).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from neuronserve.config import Placement, ServerConfig
from neuronserve.errors import ArtifactError, ConfigError

# A version loading beside traffic sleeps this long after each stage's load and warm-up: torch.jit.load
# and the warm-up hold the GIL in stalls of a few ms each, and back to back they add up for the
# requests in flight (docs/lifecycle.md, five switches under load).
LOAD_PACE_S = 0.03


def new_cache(manifest, max_rows: int):
    """The embedding cache for `manifest`'s model (a pool's supervisor builds it before forking)."""
    from neuronserve.embeddings import EmbeddingCache

    cfg = manifest.model_config
    return EmbeddingCache(
        model_version=manifest.model_version,
        num_labels=cfg.num_labels,
        label_dim=cfg.label_dim,
        label_bias=manifest.label_bias,
        max_rows=max_rows,
    )


def model_info(manifest, config: ServerConfig, backend_name: str):
    """service.ModelInfo of an artifact (manifest) served with `config` on backend `backend_name`."""
    from neuronserve.memory_budget import ModelShape, message_bytes
    from neuronserve.service import ModelInfo, oip_version_of

    cfg = manifest.model_config
    return ModelInfo(
        name=manifest.model_name,
        version=manifest.model_version,
        user_features=cfg.user_features,
        peer_features=cfg.peer_features,
        num_labels=cfg.num_labels,
        label_dim=cfg.label_dim,
        label_names=tuple(manifest.label_names),
        max_peers=config.max_peers,
        max_tick_ids=config.max_tick_ids,
        max_tower_rows=config.batching.max_queue_rows,
        max_message_bytes=message_bytes(config, ModelShape.of(manifest)),
        platform=f"neuronserve_{backend_name}",
        oip_version=oip_version_of(manifest.model_version),
    )


def first_artifact(config: ServerConfig) -> tuple[Any, int | None]:
    """The artifact served first and its integer version: --artifact (no integer version: its content
    hash stands in), or the highest version the policy selects in --model-repository."""
    from neuronserve.repository import Repository, VersionPolicy

    if config.model_repository is None:
        return config.artifact, None
    repository = Repository(Path(config.model_repository))
    scan = repository.scan(repository.only_model(), VersionPolicy.parse(config.version_policy))
    if not scan.selected:
        raise ConfigError(
            f"model repository {config.model_repository}: the version policy {config.version_policy} "
            f"selects none of {list(scan.versions) or 'no versions'}"
        )
    return scan.path(scan.selected[-1]), scan.selected[-1]


def experiment_of(config: ServerConfig, clock):
    """--experiment's experiments.Experiment on `clock` (None without one). Its two versions must be in
    the repository and selected by the version policy: a ConfigError naming them otherwise (at start-up;
    a version unloaded later sends its arm's requests to the default version, versions.VersionTable)."""
    if config.experiment is None:
        return None
    from neuronserve.experiments import Experiment, load_design
    from neuronserve.repository import Repository, VersionPolicy

    design = load_design(config.experiment)
    repository = Repository(Path(str(config.model_repository)))
    scan = repository.scan(repository.only_model(), VersionPolicy.parse(config.version_policy))
    missing = [v for v in (design.control, design.candidate) if v not in scan.selected]
    if missing:
        raise ConfigError(
            f"experiment spec {config.experiment}: version {missing} is not served; the version policy "
            f"{config.version_policy} selects {list(scan.selected)} of {list(scan.versions)} in {config.model_repository} "
            "(serve both, e.g. --version-policy specific:CONTROL,CANDIDATE)"
        )
    return Experiment(design, clock)


def _schema(manifest) -> tuple:
    cfg = manifest.model_config
    return cfg.user_features, cfg.peer_features, cfg.num_labels, cfg.label_dim, tuple(manifest.label_names)


@dataclass(frozen=True)
class VersionBuilder:
    """model_control's Build on one server: the artifact at `path` verified (checksums, signature), its
    schema the served one's, every stage loaded and warmed up on the served cores (in a thread), its
    reference outputs checked on the backend, a Runtime started, a new empty cache (a pool's worker: the
    version's cache the workers share)."""

    config: ServerConfig
    served: Any  # artifact.Manifest of the version served first
    span: Any  # backends.CoreSpan: the cores this server holds
    placement: Placement
    metrics: Any  # metrics.Metrics
    abandon: threading.Event  # set when the server stops: a load in progress gives up
    current: Callable[[], Any] = lambda: None  # versions.ServedVersion serving now: its bucket plans are reused
    pool: Any = None  # pool_versions.WorkerVersions of a pool's worker: caches shared by the workers

    async def __call__(self, path, version: int):
        from neuronserve.artifact import load_manifest
        from neuronserve.backends import make_backend, resolve_backend
        from neuronserve.model_control import check_artifact_outputs
        from neuronserve.pipeline import Pipeline
        from neuronserve.runtime import Runtime
        from neuronserve.versions import ServedVersion

        config = self.config
        manifest = await asyncio.to_thread(load_manifest, path, True, config.trusted_key, True)
        if _schema(manifest) != _schema(self.served):
            raise ArtifactError(
                f"{path}: its inputs and outputs (F_u, F_p, K, D, labels) {_schema(manifest)} differ from the served "
                f"model's {_schema(self.served)}; versions of one model must share them (serve it as another model)"
            )
        backend = make_backend(
            resolve_backend(config.backend, manifest),
            manifest,
            dataclasses.replace(config.sim, num_cores=self.span.count),
            visible_cores=self.span,
            model_process=config.model_process,
            inline_below=config.inline_share(),
        )
        pipeline = Pipeline(backend, self.placement)
        try:
            pace = functools.partial(time.sleep, LOAD_PACE_S)
            await asyncio.to_thread(pipeline.start, self.abandon, self._plans_like(manifest, backend.name), pace)
            await check_artifact_outputs(pipeline, manifest)
            if self.pool is None:
                cache = new_cache(manifest, config.cache_max_rows)
            else:  # the version's cache every worker of the pool shares (pool_versions.py)
                cache = self.pool.cache_for(version, manifest)
            runtime = Runtime(pipeline, config.batching, self.metrics)
            runtime.start()
        except BaseException:
            await asyncio.to_thread(pipeline.close)
            backend.close()
            raise
        info = dataclasses.replace(model_info(manifest, config, backend.name), oip_version=str(version))
        return ServedVersion(version, info, runtime, cache, pipeline, backend, manifest)

    def _plans_like(self, manifest, backend: str) -> dict | None:
        """The serving version's bucket plans when the new one's graphs have the same shapes and backend
        (a retrained model): its costs hold, and timing every bucket again would take CPU, and the GIL,
        from the traffic being served while the version loads."""
        now = self.current()
        if now is None or now.pipeline is None or now.backend is None or now.backend.name != backend:
            return None
        same = now.manifest.model_config == manifest.model_config and now.manifest.target == manifest.target
        return now.pipeline.plans if same else None


def start_control(
    config: ServerConfig,
    manifest,
    versions,
    builder: VersionBuilder,
    on_change: Callable[[bool], Awaitable[None]] | None = None,
):
    """The repository's model_control.ModelControl over `versions`: --artifact is a one-version repository
    (its index answers; loads are refused); with --model-repository it polls (if asked) and loads the
    policy's other versions soon after. `on_change`: ModelControl's (the server's health follows loads)."""
    from neuronserve.model_control import ModelControl
    from neuronserve.repository import Repository, VersionPolicy

    policy = VersionPolicy.parse(config.version_policy)
    if config.model_repository is not None:
        repository = Repository(Path(config.model_repository))
        model = repository.only_model()
    else:
        repository = Repository.of_artifact(manifest.directory, manifest.model_name, manifest.model_version)
        model = manifest.model_name
    control = ModelControl(
        repository,
        model,
        policy,
        versions,
        builder,
        config.model_control,
        config.grace_period_s,
        builder.pool,
        on_change,
    )
    if config.model_repository is not None:
        control.start(config.repository_poll_s)
        if len(repository.scan(model, policy).selected) > 1:
            control.apply_soon()
    return control
