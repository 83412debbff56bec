"""The composition root of one serving process: artifact -> backend -> pipeline -> runtime (batchers)
-> embedding cache -> gRPC services (+ health, reflection) -> metrics. The only place objects are wired.

Contract: `start()` serves only once every stage is warm (health NOT_SERVING and inference UNAVAILABLE
before); `stop()` answers every accepted request within the grace period. The steps and the one
shutdown race are in docs/server.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from neuronserve.admin_auth import AdminGuard, load_token
from neuronserve.config import CoreGroup, Placement, ServerConfig
from neuronserve.errors import ConfigError, Unavailable
from neuronserve.contract import USER_TOWER
from neuronserve.model_control import ModelControl, control_samples
from neuronserve.version_build import VersionBuilder, first_artifact, model_info, new_cache, start_control

if TYPE_CHECKING:  # types only: grpc and the serving stack load in start(), not when the CLI imports this
    import grpc
    from neuronserve.artifact import Manifest
    from neuronserve.backends.base import Backend
    from neuronserve.embeddings import EmbeddingCache
    from neuronserve.fleet import FleetCache, Follower
    from neuronserve.health import ServerHealth
    from neuronserve.memory_release import MemoryTrimmer
    from neuronserve.metrics import Metrics
    from neuronserve.metrics_http import MetricsServer
    from neuronserve.pipeline import Pipeline
    from neuronserve.pool_carry import CarriedStatistics
    from neuronserve.pool_versions import WorkerVersions
    from neuronserve.runtime import Runtime
    from neuronserve.service import ServingState
    from neuronserve.versions import VersionTable

log = logging.getLogger(__name__)
T = TypeVar("T")

REPLY_WRITE_S = 1.0  # shutdown: time for gRPC to write answers already given, before it cancels what is left


@dataclass(frozen=True)
class PoolMember:
    """What makes a Server one worker of a pool (workers.py builds it in the worker, after the fork)."""

    index: int
    cache: (
        EmbeddingCache | FleetCache | None
    )  # the pool's cache, every worker shares (None: one per version, `versions`)
    peer_addresses: Callable[[], list[str]]  # the other live workers' local gRPC addresses (Unix sockets)
    local_address: str | None = None  # this worker's Unix socket, plaintext: the pool's own calls
    versions: WorkerVersions | None = None  # a pool serving a model repository: the caches per version
    statistics: CarriedStatistics | None = None  # OIP ModelStatistics carried over a restart in this place


def grpc_address(host: str, port: int) -> str:
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal in brackets


async def _close_pool_parts(servicers) -> None:
    """What a pool's worker holds for the pool: channels to its peers (statistics, repository loads) and
    the publishing of its statistics."""
    for servicer in servicers:
        for name in ("pool", "pool_loads", "carry"):
            part = getattr(servicer, name, None)
            if part is not None:
                await part.close()


def _started(value: T | None) -> T:
    """`value`, which start() set: for code that runs only on a started (or starting, past that step) server."""
    assert value is not None, "used before start() set it"
    return value


class Server:
    """One serving process's objects, started and stopped on the running event loop."""

    def __init__(self, config: ServerConfig, member: PoolMember | None = None, clock=time.time) -> None:
        self.clock = clock  # the --experiment's clock (experiments.py): tests inject a fake one
        if config.artifact is None and config.model_repository is None:
            raise ConfigError(
                "no artifact configured: pass --artifact DIR (or NEURONSERVE_ARTIFACT, or 'artifact' in --config)"
            )
        self.config = config
        self.member = member
        self.port: int | None = None
        self.private_port: int | None = None  # a pool member's own port
        self.metrics_port: int | None = None
        self.manifest: Manifest | None = None
        self.backend: Backend | None = None
        self.cores: int | None = None  # resolved at start: config.cores or the backend's default
        self._abandon = threading.Event()  # set by abandon_start(); read by the stage-loading thread
        self.pipeline: Pipeline | None = None
        self.runtime: Runtime | None = None
        self.cache: EmbeddingCache | FleetCache | None = None
        self.metrics: Metrics | None = None
        self.state: ServingState | None = None
        self._servicers: list = []
        self._grpc: grpc.aio.Server | None = None
        self._grpc_started = False  # _grpc.start() ran: stop() must stop it
        self._health: ServerHealth | None = None
        self._follower: Follower | None = None  # of a lone server with --embedding-store (a pool's: its supervisor's)
        self._metrics_server: MetricsServer | None = None
        self._trimmer: MemoryTrimmer | None = None  # from _open to stop: memory back after a burst
        self.versions: VersionTable | None = None  # the versions served (the first built here, others by model_control)
        self.control: ModelControl | None = None  # the repository's versions loaded and unloaded
        self._placement: Placement | None = None
        self._span: CoreGroup | None = None
        self._first_version: int | None = None  # a repository's integer version of the first artifact

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_period_s=0.0)
            raise

    async def _start(self) -> None:
        from neuronserve.artifact import load_manifest
        from neuronserve.backends import core_span, make_backend, resolve_backend
        from neuronserve.metric_sources import cache_samples
        from neuronserve.metrics import Metrics

        config = self.config
        # a bad token file fails before the warm-up
        self._admin = AdminGuard(load_token(config.admin_token_file)) if config.admin_token_file else None
        path, self._first_version = first_artifact(config)
        self.manifest = manifest = await asyncio.to_thread(
            load_manifest, path, True, config.trusted_key, True
        )  # keep_files: stages load from the checked bytes
        backend = resolve_backend(config.backend, manifest)
        span = core_span(backend, config.cores)
        self.cores, self._span = span.count, span
        sim = dataclasses.replace(config.sim, num_cores=span.count)
        self.backend = make_backend(
            backend, manifest, sim, span, model_process=config.model_process, inline_below=config.inline_share()
        )
        if config.placement:
            placement = Placement.parse(config.placement, span.count, first=span.first)
        else:
            placement = Placement.data_parallel(span.count, group_size=manifest.pipeline_cores, first=span.first)
        self._placement = placement
        self.metrics = Metrics(version=manifest.model_version, batch_buckets=self.buckets)
        if self.member is None:
            self.cache = new_cache(manifest, config.cache_max_rows)
        elif self.member.versions is not None:  # a repository's pool: the cache of the version served first
            self.cache = self.member.versions.cache_for(_started(self._first_version), manifest)
        else:
            self.cache = self.member.cache
        if self.member is None and config.embedding_store != "embedded":  # the fleet: writes go through the store
            from neuronserve.fleet import open_fleet

            self.cache, self._follower = open_fleet(config.embedding_store, manifest, self.cache)
        self.metrics.add_collector(lambda: cache_samples(_started(self.versions).current.cache.stats()))
        store_status = getattr(self.cache, "status", None)  # fleet.StoreStatus, shared by a pool's workers
        if store_status is not None:
            from neuronserve.fleet import store_samples

            self.metrics.add_collector(lambda: store_samples(store_status.state(), manifest.model_version))
        await self._build_services()
        # A lone server listens from before the warm-up (minutes on Inf1): a taken port fails now, and
        # meanwhile health says NOT_SERVING and the door answers every inference call UNAVAILABLE at once.
        # A pool member joins the shared port once warm (the supervisor checked the port is free).
        if self.member is None:
            await self._listen()
        await self._warm_up_and_load(backend, placement)
        if self.member is not None:
            await self._listen()
        await self._open()

    async def _build_services(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection, reflection_pb2

        from neuronserve.memory_budget import ModelShape, ScoringGate, scoring_bytes
        from neuronserve.health import HealthServicer, ServerHealth
        from neuronserve.protos import open_inference_pb2, scorer_pb2
        from neuronserve.oip_service import InferenceService
        from neuronserve.scorer_service import ScorerService
        from neuronserve.registration import add_service
        from neuronserve.service import ServingState
        from neuronserve.tls import connection_options
        from neuronserve.versions import ServedVersion, VersionTable
        from neuronserve.version_build import experiment_of

        config = self.config
        info = model_info(self.manifest, config, _started(self.backend).name)
        if self._first_version is not None:  # a repository's integer version
            info = dataclasses.replace(info, oip_version=str(self._first_version))
        self.state = ServingState(ScoringGate(scoring_bytes(config, ModelShape.of(self.manifest))))
        self.versions = VersionTable(
            ServedVersion(int(info.oip_version), info, None, self.cache, manifest=self.manifest),
            experiment_of(config, self.clock),
        )
        peers = self.member.peer_addresses if self.member is not None else None
        self._servicers = [
            ScorerService(info, None, self.cache, self.metrics, self.state, self.versions),
            InferenceService(
                info, None, self.cache, self.metrics, self.state, peer_addresses=peers, versions=self.versions
            ),
        ]
        if self.member is not None and self.member.statistics is not None:  # counts carried over restarts
            self._servicers[1].carry = self.member.statistics
            self.member.statistics.start(self._servicers[1].own_statistics)
        self._grpc = server = grpc.aio.server(
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_send_message_length", info.max_message_bytes),
                ("grpc.max_receive_message_length", info.max_message_bytes),
                # a lone server on a taken port fails instead of sharing it; pool members share the port
                ("grpc.so_reuseport", int(self.member is not None)),
                *connection_options(config),  # keepalive, --max-connection-age-s (tls.py)
            ],
        )
        scorer = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"]
        inference = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        add_service(server, self._servicers[0], scorer, scorer_pb2)
        add_service(server, self._servicers[1], inference, open_inference_pb2)
        health = health_pb2.DESCRIPTOR.services_by_name["Health"]
        servicer = HealthServicer()  # grpc_health's (set(), enter_graceful_shutdown()) with List ...
        add_service(server, servicer, health, health_pb2, self.metrics)  # ... behind the guard
        services = (scorer.full_name, inference.full_name, health.full_name)
        self._health = ServerHealth(servicer, self.state, services, inference.full_name)
        await self._health.set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.reflection:
            # reflection.enable_server_reflection, behind the guard: a malformed message is INVALID_ARGUMENT
            reflecting = reflection.aio.ReflectionServicer(services + (reflection.SERVICE_NAME,))
            described = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
            add_service(server, reflecting, described, reflection_pb2, self.metrics)

    async def _listen(self) -> None:
        """Bind gRPC (and /metrics) and start serving; the door stays closed until _open()."""
        from neuronserve.metrics_http import MetricsServer
        from neuronserve.tls import load_tls, server_credentials

        config, server = self.config, _started(self._grpc)
        address = grpc_address(config.host, config.port)
        tls = load_tls(config)  # None: plaintext; a bad file is a ConfigError naming its flag
        if tls is not None:
            credentials = server_credentials(tls)
            bind = lambda where: server.add_secure_port(where, credentials)  # noqa: E731
            log.info("gRPC over %s", tls.mode)
        else:
            bind = server.add_insecure_port
        try:
            self.port = bind(address)
            if self.member is not None:  # the private port is as secure as the shared one; the socket is local
                self.private_port = bind(grpc_address(config.host, 0))
                if self.member.local_address:
                    server.add_insecure_port(self.member.local_address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address} for gRPC ({exc}); choose another --port or --host") from None
        if not self.port:
            raise ConfigError(f"cannot listen on {address} for gRPC; choose another --port or --host")
        await server.start()
        self._grpc_started = True
        if config.metrics_port is not None:
            host, port = (config.host.strip("[]"), config.metrics_port) if self.member is None else ("127.0.0.1", 0)
            self._metrics_server = MetricsServer(self.metrics)
            try:
                self.metrics_port = await self._metrics_server.start(host, port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{port} for metrics ({exc.strerror}); choose another --metrics-port"
                ) from None

    async def _warm_up(self, backend: str, placement: Placement) -> None:
        from neuronserve.model_control import check_artifact_outputs
        from neuronserve.pipeline import Pipeline

        self.pipeline = Pipeline(_started(self.backend), placement)
        where = f"gRPC port {self.port} NOT_SERVING while" if self.member is None else "joining the port when warm,"
        log.info("%s loading and warming up every stage: backend %s, placement %s", where, backend, placement)
        await asyncio.to_thread(self.pipeline.start, self._abandon)
        await check_artifact_outputs(self.pipeline, _started(self.manifest))  # the graphs score as compiled

    async def _warm_up_and_load(self, backend: str, placement: Placement) -> None:
        """The warm-up and, with --embedding-store, the store's rows loaded into the cache, side by side:
        the server opens once both are done. Then the follower follows the store's changes."""
        if self._follower is None:
            return await self._warm_up(backend, placement)
        loading = asyncio.ensure_future(asyncio.to_thread(self._follower.warm_start, self._abandon))
        try:
            await self._warm_up(backend, placement)
            loaded = await loading
        except BaseException:
            self._follower.stop()  # the load gives up at its next batch or retry
            await asyncio.gather(loading, return_exceptions=True)
            raise
        if not loaded:
            raise Unavailable("start-up abandoned while loading the embedding store")
        self._follower.start()

    async def _open(self) -> None:
        from neuronserve.memory_budget import ModelShape, start_keeping
        from neuronserve.pool_versions import repository_slots
        from neuronserve.metric_sources import pipeline_samples, sim_samples
        from neuronserve.runtime import Runtime

        metrics, versions, backend = _started(self.metrics), _started(self.versions), _started(self.backend)
        self.runtime = Runtime(self.pipeline, self.config.batching, metrics)
        self.runtime.start()
        for model in self.runtime.batchers:  # the current version's batchers and pipeline
            metrics.add_batcher(model, lambda m=model: versions.current.runtime.batchers[m].stats())
        metrics.add_collector(lambda: pipeline_samples((versions.current.pipeline or _started(self.pipeline)).stats()))
        if hasattr(backend, "stats"):  # the sim's device clock
            metrics.add_collector(lambda: sim_samples(backend.stats()))
        first = versions.current
        first.runtime, first.pipeline, first.backend = self.runtime, self.pipeline, self.backend
        await self._start_control()
        gc.collect()
        gc.freeze()  # everything built so far lives as long as the server: keep it out of the collector's scans
        caches = repository_slots(self.config) if self.config.model_repository is not None else 1
        self._trimmer = start_keeping(self.config, ModelShape.of(self.manifest), caches)  # logs the memory budget
        _started(self.state).serving = True
        health = _started(self._health)
        await health.set_all()
        health.watch_devices(lambda: (versions.current.pipeline or _started(self.pipeline)).stages_down())
        store_status = getattr(self.cache, "status", None)
        if store_status is not None:  # health name neuronserve.EmbeddingStore: NOT_SERVING while the copy is stale
            from neuronserve.fleet import HEALTH_NAME

            await health.watch_store(HEALTH_NAME, lambda: store_status.state().up)

    async def _start_control(self) -> None:
        """The repository's control over the VersionTable (version_build.start_control)."""
        placement, metrics, versions = _started(self._placement), _started(self.metrics), _started(self.versions)
        pool = self.member.versions if self.member is not None else None
        builder = VersionBuilder(
            self.config, self.manifest, self._span, placement, metrics, self._abandon, lambda: versions.current, pool
        )
        on_change = _started(self._health).versions_changed  # health and ServerReady follow loads and unloads
        self.control = control = start_control(self.config, self.manifest, self.versions, builder, on_change)
        self._servicers[1].control = control
        if pool is not None and self.member is not None:  # a load through this worker reaches every worker
            from neuronserve.pool_loads import PoolLoads

            self._servicers[1].pool_loads = PoolLoads(self.member.peer_addresses)
        self._servicers[1].admin = self._admin
        metrics.add_collector(lambda: control_samples(control))

    @property
    def serving(self) -> bool:
        return self.state is not None and self.state.serving

    @property
    def buckets(self) -> tuple[int, ...]:
        return _started(self.manifest).stage(USER_TOWER).batch_sizes

    def ready_line(self) -> str:
        metrics = f"{self.config.host}:{self.metrics_port}" if self.metrics_port is not None else "-"
        manifest, backend = _started(self.manifest), _started(self.backend)
        return (
            f"neuronserve ready: grpc={self.config.host}:{self.port} metrics={metrics} backend={backend.name} "
            f"cores={self.cores} buckets={','.join(map(str, self.buckets))} "
            f"model={manifest.model_name} version={manifest.model_version} workers=1"
        )

    def abandon_start(self) -> None:
        """A stop request during start(): the stage loading gives up at its next stage, so start()
        raises (Unavailable) and cleans up instead of finishing the warm-up first."""
        self._abandon.set()

    async def stop(
        self, grace_period_s: float | None = None, drain_delay_s: float = 0.0, cut_short: asyncio.Event | None = None
    ) -> None:
        """Drain and stop within `grace_period_s` (default: the config's): health NOT_SERVING, new requests
        UNAVAILABLE, a version load abandoned (at its next stage; awaited), queued requests answered, gRPC
        stopped, pipeline closed. Safe on a half-started server. With `drain_delay_s` (SIGTERM with
        --drain-delay-s) a serving server keeps serving that long after health went NOT_SERVING, so load
        balancers and Kubernetes endpoints stop sending before the door closes; `cut_short` (set by a
        second signal) ends the delay early. The grace period follows it."""
        grace_s = self.config.grace_period_s if grace_period_s is None else grace_period_s
        self._abandon.set()  # read between stages by a version load's thread (VersionBuilder)
        await self._stop_serving(drain_delay_s, cut_short)
        end_s = asyncio.get_running_loop().time() + grace_s
        await self._drain(end_s)
        await self._release()

    async def _stop_serving(self, drain_delay_s: float, cut_short: asyncio.Event | None) -> None:
        """Health NOT_SERVING and ready false; with a drain delay, still serving that long."""
        if self._health is not None:
            await self._health.servicer.enter_graceful_shutdown()
        if self.state is not None:
            self.state.draining = True  # ServerReady/ModelReady false with health, while the door stays open
        if drain_delay_s > 0 and self.serving:
            log.info("health NOT_SERVING; still serving for the drain delay (%.1f s) before the drain", drain_delay_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for((cut_short or asyncio.Event()).wait(), drain_delay_s)
                log.info("drain delay cut short by a second signal")

    async def _drain(self, end_s: float) -> None:
        """The door closes; every accepted request is answered (until `end_s`, on the loop's clock); gRPC
        gets REPLY_WRITE_S to write the answers."""
        loop = asyncio.get_running_loop()
        if self.state is not None:
            self.state.serving = False
        if self.control is not None:
            await self.control.close()  # no more loads; the one in progress abandoned; retired versions drained
        others = [v for v in self.versions.all() if v.runtime is not self.runtime] if self.versions is not None else []
        for runtime in [self.runtime] + [v.runtime for v in others]:
            if runtime is not None:
                await runtime.close(timeout_s=end_s - loop.time())
        self.runtime = None
        if self.state is not None:  # the calls in handlers answered, gRPC's backlog at the closed door
            await self.state.answered(end_s)
        if self._grpc is not None and self._grpc_started:
            # Every accepted call has its answer now: give gRPC a moment to write them, then end what is
            # left, e.g. Health.Watch streams, which would otherwise hold the rest of the grace period.
            await self._grpc.stop(min(max(0.0, end_s - loop.time()), REPLY_WRITE_S))
            self._grpc = None

    async def _release(self) -> None:
        """Everything else the server holds, in dependency order."""
        await _close_pool_parts(self._servicers)
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None
        if self._health is not None:  # its watchers, before the pipeline they poll closes
            await self._health.stop_watching()
        if self._trimmer is not None:
            await self._trimmer.stop()
            self._trimmer = None
        if self._follower is not None:
            await asyncio.to_thread(self._follower.stop)
            self._follower = None
        others = (
            [v for v in self.versions.all() if v.pipeline is not self.pipeline] if self.versions is not None else []
        )
        for other in others:  # versions model_control loaded (the first one's objects close below)
            await other.close(0.0)
        if self.pipeline is not None:
            await asyncio.to_thread(self.pipeline.close)
            self.pipeline = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None
