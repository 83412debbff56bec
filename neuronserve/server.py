"""The composition root of `neuronserve serve`: settings -> artifact -> backend -> pipeline -> batchers
-> embedding cache -> gRPC services (+ health, reflection) -> metrics. The only place objects are wired.

Start-up: load and verify the artifact; build the backend and the placement; start gRPC (health
NOT_SERVING, the door closed: inference calls UNAVAILABLE at once) and /metrics, so a taken port fails
before the warm-up; load and warm up every stage at every bucket (in a thread; a SIGTERM meanwhile
abandons it at the next stage, and nothing is served); build the Runtime (one DynamicBatcher for Score,
one per tower for UpsertEmbeddings and the OIP tower models) and attach it to the services;
gc.freeze(); the door opens, health SERVING; then the ready line. Shutdown (SIGTERM/SIGINT, Server.stop):
health NOT_SERVING, the door closes (new requests UNAVAILABLE), the batchers drain and the calls in the
service finish (every accepted request is answered, within the grace period), gRPC gets REPLY_WRITE_S
to write the answers and ends what is left (e.g. Health.Watch streams), the pipeline closes, and the
log's last line tallies the requests the service answered, by status. (A call that reaches gRPC's transport in the instant its shutdown begins never
reaches the service: grpc.aio cancels calls it has not yet picked up, and that client sees CANCELLED.
Clients that heed NOT_SERVING, or a load balancer that does, are gone by then.) Settings: flags > --config FILE.json > NEURONSERVE_*
environment variables > the dataclass defaults (config.ServerConfig).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from neuronserve.config import BatchingConfig, Placement, ServerConfig, SimConfig, read_json_object
from neuronserve.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)

ENV_PREFIX = "NEURONSERVE_"
OTHER_ENV = ("CONFIG", "CACHE_DIR", "VENV")  # NEURONSERVE_* variables that are not settings
REPLY_WRITE_S = 1.0  # shutdown: time for gRPC to write answers already given, before it cancels what is left
_DISABLED = ("", "none", "off", "-", "disabled")


# ---- settings: flags > config file > environment > defaults ------------------------------------


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in _DISABLED):
            return None
        return parse(value)

    return parse_optional


@dataclass(frozen=True)
class _Setting:
    """One setting: config-file key `key`, flag --key-with-dashes, environment NEURONSERVE_KEY. It sets
    SimConfig.<key without sim_> for sim_* keys, BatchingConfig.<key> for its fields, else ServerConfig.<key>."""

    key: str
    parse: Callable[[Any], Any]
    metavar: str
    help: str

    @property
    def section(self) -> str:
        if self.key.startswith("sim_"):
            return "sim"
        return "batching" if self.key in BatchingConfig.__dataclass_fields__ else "server"

    @property
    def field(self) -> str:
        return self.key[len("sim_") :] if self.section == "sim" else self.key

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


SETTINGS: Tuple[_Setting, ...] = (
    _Setting("artifact", _optional(_text), "DIR", "compiled artifact directory (default: the demo model, compiled for the CPU on first run)"),
    _Setting("backend", _text, "NAME", "auto | cpu | sim | neuron (auto: neuron when torch-neuron and a NeuronCore are here and the artifact was compiled for neuron, else cpu)"),
    _Setting("cores", _integer, "N", "NeuronCores to use (neuron: the NEURON_RT_VISIBLE_CORES range when set, else 4, one Inferentia chip; sim: cores simulated, default 4; cpu: executor threads, default one per usable CPU less one for the event loop)"),
    _Setting("placement", _text, "SPEC", "stage placement, e.g. user_tower=0,peer_tower=1-2,pair_scorer=3 (default: data parallel)"),
    _Setting("host", _text, "HOST", "address to listen on"),
    _Setting("port", _integer, "PORT", "gRPC port, 0 = any free port"),
    _Setting("metrics_port", _optional(_integer), "PORT", "Prometheus /metrics port, 0 = any, 'off' = none"),
    _Setting("max_peers", _integer, "M", "most peers (and users) per scoring request"),
    _Setting("max_message_bytes", _integer, "BYTES", "gRPC max send/receive message size (1024 to 2**31 - 1)"),
    _Setting("grace_period_s", _number, "S", "shutdown: seconds to answer accepted requests"),
    _Setting("cache_max_rows", _integer, "ROWS", "embedding cache bound per kind"),
    _Setting("max_queue_delay_ms", _number, "MS", "batching delay bound from the oldest queued request"),
    _Setting("max_queue_rows", _integer, "ROWS", "queue bound in rows (memory); past it RESOURCE_EXHAUSTED at once"),
    _Setting("max_queue_wait_ms", _number, "MS", "queue bound in time: a request whose queue ahead needs longer to drain is RESOURCE_EXHAUSTED at once"),
    _Setting("max_batch_rows", _optional(_integer), "ROWS", "rows per batch (default: the largest compiled bucket)"),
    _Setting("max_in_flight_batches", _optional(_integer), "N", "batches in flight per batcher (default: the pipeline's executor slots)"),
    _Setting("sim_latency_scale", _number, "X", "sim backend: multiply the device latency model (0 = as fast as the CPU)"),
    _Setting("sim_core_timeout_s", _number, "S", "sim backend: an execution past this is a hung core"),
    _Setting("sim_reset_s", _number, "S", "sim backend: a faulted core is back in rotation after this"),
)
_SECTIONS = {"server": ServerConfig, "batching": BatchingConfig, "sim": SimConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag (raw strings: resolve_config parses them and names the flag on error)."""
    parser.add_argument(
        "--config", metavar="FILE.json", default=None, help=f"JSON object of settings (keys: the flag names with _); env {ENV_PREFIX}CONFIG"
    )
    for setting in SETTINGS:
        default = getattr(_SECTIONS[setting.section](), setting.field)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(setting.flag, dest=setting.key, metavar=setting.metavar, help=f"{setting.help}{shown}; env {setting.env}")


def resolve_config(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """ServerConfig from flags > --config file > NEURONSERVE_* environment > defaults. A bad value is a
    ConfigError naming where it came from (the flag, the file and key, or the variable)."""
    environ = os.environ if environ is None else environ
    values: Dict[str, Tuple[Any, str]] = {}  # key -> (raw value, source)
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.key] = (environ[setting.env], f"environment variable {setting.env}")
    known = {s.env for s in SETTINGS} | {ENV_PREFIX + name for name in OTHER_ENV}
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        log.warning("ignoring environment variable %s: not a neuronserve setting (a typo?)", name)
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, value in _read_config_file(config_path).items():
            values[key] = (value, f"config file {config_path}, key {key!r}")
    for setting in SETTINGS:
        value = getattr(args, setting.key, None)
        if value is not None:
            values[setting.key] = (value, setting.flag)
    sections: Dict[str, Dict[str, Any]] = {name: {} for name in _SECTIONS}
    for setting in SETTINGS:
        if setting.key not in values:
            continue
        raw, source = values[setting.key]
        try:
            parsed = setting.parse(raw)
            _SECTIONS[setting.section](**{setting.field: parsed})  # the dataclass's own checks, for this value alone
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
        sections[setting.section][setting.field] = parsed
    server = sections["server"]
    return ServerConfig(**server, batching=BatchingConfig(**sections["batching"]), sim=SimConfig(**sections["sim"]))


def _read_config_file(path: str) -> Dict[str, Any]:
    data = read_json_object(path, f"config file {path}")
    known = {s.key for s in SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    return data


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an artifact over gRPC (scorer API, Open Inference Protocol, health, reflection, metrics)",
        description="Serve a compiled two-tower artifact over gRPC. Settings: flags > --config FILE.json > "
        f"{ENV_PREFIX}* environment variables > defaults. Prints one 'neuronserve ready: ...' line when serving.",
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: run(resolve_config(args)))


# ---- the runtime: batchers in front of the pipeline --------------------------------------------


class Runtime:
    """service.Runtime over a pipeline: one DynamicBatcher for Score (a request of M peers is M rows)
    and one per tower (UpsertEmbeddings and the OIP tower models). `pipeline` needs score_requests, run_stage,
    max_batch_rows, concurrency, devices, estimate_latency_s and plan_cost_s (pipeline.Pipeline has them)."""

    def __init__(self, pipeline, batching: BatchingConfig, metrics) -> None:
        from neuronserve.batcher import DynamicBatcher
        from neuronserve.service import TOWERS, TWOTOWER

        self.pipeline = pipeline
        self.metrics = metrics
        common = dict(
            max_batch_rows=pipeline.max_batch_rows, config=batching, max_in_flight=pipeline.concurrency, devices=pipeline.devices
        )
        self._scores = DynamicBatcher(self._run_score, estimate_latency_s=pipeline.estimate_latency_s, name=TWOTOWER, **common)
        self.batchers = {TWOTOWER: self._scores}  # keyed by model name, which is also each batcher's name
        for tower in TOWERS:
            self.batchers[tower] = DynamicBatcher(
                functools.partial(self._run_tower, tower),
                estimate_latency_s=functools.partial(pipeline.plan_cost_s, tower),
                name=tower,
                **common,
            )

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def score(self, user_features: np.ndarray, peer_features: np.ndarray, deadline_s: Optional[float]) -> np.ndarray:
        return await self._scores.submit((user_features, peer_features), peer_features.shape[0], deadline_s=deadline_s)

    async def embed(self, tower: str, features: np.ndarray, deadline_s: Optional[float]) -> np.ndarray:
        return await self.batchers[tower].submit(features, features.shape[0], deadline_s=deadline_s)

    async def _run_score(self, slices) -> np.ndarray:
        """One batch of Score requests: each request's user row and its peer rows; the pipeline
        assembles the batch on its executor thread, so the event loop only hands over the lists."""
        peers = [s.payload[1][s.start : s.stop] for s in slices]
        batch = await self.pipeline.score_requests([s.payload[0] for s in slices], peers)
        self.metrics.execution(
            self._scores.name,
            rows=batch.scores.shape[0],
            requests=len(slices),
            compute_s=batch.compute_s,
            input_s=batch.input_s,
            output_s=batch.output_s,
        )
        return batch.scores

    async def _run_tower(self, tower: str, slices) -> np.ndarray:
        features = _concat([s.payload[s.start : s.stop] for s in slices])
        start = time.perf_counter()
        out = await self.pipeline.run_stage(tower, [features])
        self.metrics.execution(tower, rows=features.shape[0], requests=len(slices), compute_s=time.perf_counter() - start)
        return out

    async def close(self, timeout_s: float) -> None:
        """Drain every batcher (each accepted request answered); past `timeout_s`, fail what is still
        queued with UNAVAILABLE rather than wait longer."""
        draining = [asyncio.ensure_future(b.close(drain=True)) for b in self.batchers.values()]
        _, pending = await asyncio.wait(draining, timeout=max(0.0, timeout_s))
        if pending:
            if any(s.queued_requests or s.in_flight_batches for s in (b.stats() for b in self.batchers.values())):
                log.warning("grace period over with requests still queued: failing them with UNAVAILABLE")
            pending |= {asyncio.ensure_future(b.close(drain=False)) for b in self.batchers.values()}
            await asyncio.wait(pending, timeout=1.0)


def model_info(manifest, config: ServerConfig, backend_name: str):
    """service.ModelInfo of an artifact (manifest) served with `config` on backend `backend_name`."""
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
        max_tower_rows=config.batching.max_queue_rows,
        max_message_bytes=config.max_message_bytes,
        platform=f"neuronserve_{backend_name}",
        oip_version=oip_version_of(manifest.model_version),
    )


def _concat(parts: List[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---- the server ---------------------------------------------------------------------------------


class Server:
    """One serving process's objects, started and stopped on the running event loop."""

    def __init__(self, config: ServerConfig) -> None:
        if config.artifact is None:
            raise ConfigError("no artifact configured: pass --artifact DIR (or NEURONSERVE_ARTIFACT, or 'artifact' in --config)")
        self.config = config
        self.port: Optional[int] = None
        self.metrics_port: Optional[int] = None
        self.manifest = None
        self.backend = None
        self.cores: Optional[int] = None  # resolved at start: config.cores or the backend's default
        self._abandon = threading.Event()  # set by abandon_start(); read by the stage-loading thread
        self.pipeline = None
        self.runtime: Optional[Runtime] = None
        self.cache = None
        self.metrics = None
        self.state = None
        self._grpc = None
        self._health = None
        self._metrics_server = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_period_s=0.0)
            raise

    async def _start(self) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from neuronserve.artifact import load_manifest
        from neuronserve.backends import core_span, make_backend, resolve_backend
        from neuronserve.embeddings import EmbeddingCache
        from neuronserve.metrics import Metrics, MetricsServer, cache_samples, pipeline_samples, sim_samples
        from neuronserve.pipeline import Pipeline
        from neuronserve.protos import open_inference_pb2, scorer_pb2
        from neuronserve.service import InferenceService, ScorerService, ServingState, add_service

        config = self.config
        self.manifest = manifest = await asyncio.to_thread(load_manifest, config.artifact, True)
        backend = resolve_backend(config.backend, manifest)
        span = core_span(backend, config.cores)
        self.cores = span.count
        self.backend = make_backend(backend, manifest, dataclasses.replace(config.sim, num_cores=span.count), visible_cores=span)
        if config.placement:
            placement = Placement.parse(config.placement, span.count, first=span.first)
        else:
            placement = Placement.data_parallel(span.count, group_size=manifest.pipeline_cores, first=span.first)
        version = manifest.model_version
        self.metrics = Metrics(version=version, batch_buckets=self.buckets)
        cfg = manifest.model_config
        self.cache = EmbeddingCache(
            model_version=version,
            num_labels=cfg.num_labels,
            label_dim=cfg.label_dim,
            label_bias=manifest.label_bias,
            max_rows=config.cache_max_rows,
        )
        self.metrics.add_collector(lambda: cache_samples(self.cache.stats()))

        # gRPC and /metrics serve from before the warm-up (minutes on Inf1): a taken port fails now, not
        # after it, and meanwhile health says NOT_SERVING and the door (ServingState) answers every
        # inference call UNAVAILABLE at once, so clients and probes get a fast answer, not a hang.
        info = model_info(manifest, config, self.backend.name)
        self.state = ServingState()
        servicers = [cls(info, None, self.cache, self.metrics, self.state) for cls in (ScorerService, InferenceService)]
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
            ]
        )
        self._grpc = server
        scorer = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"]
        inference = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        add_service(server, servicers[0], scorer, scorer_pb2)
        add_service(server, servicers[1], inference, open_inference_pb2)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (scorer.full_name, inference.full_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        for name in ("",) + services:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(services + (reflection.SERVICE_NAME,), server)
        host = config.host.strip("[]")
        address = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"  # an IPv6 literal in brackets
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address} for gRPC ({exc}); choose another --port or --host") from None
        if not self.port:
            raise ConfigError(f"cannot listen on {address} for gRPC; choose another --port or --host")
        await server.start()
        if config.metrics_port is not None:
            self._metrics_server = MetricsServer(self.metrics)
            try:
                self.metrics_port = await self._metrics_server.start(host, config.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{config.metrics_port} for metrics ({exc.strerror}); choose another --metrics-port"
                ) from None

        self.pipeline = Pipeline(self.backend, placement)
        log.info("gRPC port %d NOT_SERVING while loading and warming up every stage at every bucket: backend %s, placement %s", self.port, backend, placement)
        await asyncio.to_thread(self.pipeline.start, self._abandon)  # load + warm up every stage at every bucket

        self.runtime = Runtime(self.pipeline, config.batching, self.metrics)
        self.runtime.start()
        for model, batcher in self.runtime.batchers.items():
            self.metrics.add_batcher(model, batcher.stats)
        self.metrics.add_collector(lambda: pipeline_samples(self.pipeline.stats()))
        if hasattr(self.backend, "stats"):  # the sim's device clock
            self.metrics.add_collector(lambda: sim_samples(self.backend.stats()))
        for servicer in servicers:
            servicer.runtime = self.runtime
        gc.collect()
        gc.freeze()  # everything built so far lives as long as the server: keep it out of the collector's scans
        self.state.serving = True
        for name in ("",) + services:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def buckets(self) -> Tuple[int, ...]:
        return self.manifest.stage("user_tower").batch_sizes

    def ready_line(self) -> str:
        metrics = f"{self.config.host}:{self.metrics_port}" if self.metrics_port is not None else "-"
        return (
            f"neuronserve ready: grpc={self.config.host}:{self.port} metrics={metrics} backend={self.backend.name} "
            f"cores={self.cores} buckets={','.join(map(str, self.buckets))} "
            f"model={self.manifest.model_name} version={self.manifest.model_version}"
        )

    def abandon_start(self) -> None:
        """A stop request during start(): the stage loading gives up at its next stage, so start()
        raises (Unavailable) and cleans up instead of finishing the warm-up first."""
        self._abandon.set()

    async def stop(self, grace_period_s: Optional[float] = None) -> None:
        """Drain and stop within `grace_period_s` (default: the config's): health NOT_SERVING, new requests
        UNAVAILABLE, queued requests answered, gRPC stopped, pipeline closed. Safe on a half-started server."""
        grace_s = self.config.grace_period_s if grace_period_s is None else grace_period_s
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        if self.state is not None:
            self.state.serving = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.runtime is not None:
            await self.runtime.close(timeout_s=end - loop.time())
            self.runtime = None
        while self.state is not None and self.state.in_flight and loop.time() < end:
            await asyncio.sleep(0.01)  # calls outside the batchers (ScoreByIds, ScoreMatrix) finishing
        if self._grpc is not None:
            # Every accepted call has its answer now: give gRPC a moment to write them, then end what is
            # left, e.g. Health.Watch streams, which would otherwise hold the rest of the grace period.
            await self._grpc.stop(min(max(0.0, end - loop.time()), REPLY_WRITE_S))
            self._grpc = None
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None
        if self.pipeline is not None:
            await asyncio.to_thread(self.pipeline.close)
            self.pipeline = None
        if self.backend is not None:
            self.backend.close()
            self.backend = None


# ---- the process --------------------------------------------------------------------------------


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: serving on the default asyncio event loop (slower); pip install uvloop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _serve(config: ServerConfig) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = Server(config)
    starting = asyncio.ensure_future(server.start())
    stop_requested = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({starting, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # SIGTERM during warm-up (minutes on Inf1): stop now, never print ready
            log.info("stop requested during start-up: abandoning it")
            server.abandon_start()
            try:
                await starting  # raises once the loading thread notices; start() has cleaned up by then
            except Unavailable:
                return 0
            await server.stop()  # it finished in the meantime
            return 0
        starting.result()  # a start-up error propagates
    finally:
        if not stop_requested.done():
            stop_requested.cancel()
    print(server.ready_line(), flush=True)
    await stopping.wait()
    log.info("shutting down: draining accepted requests (grace period %.1f s)", config.grace_period_s)
    await server.stop()
    answered = server.metrics.outcomes() if server.metrics is not None else {}
    log.info("stopped cleanly; requests answered: %s", " ".join(f"{k}={v}" for k, v in sorted(answered.items())) or "none")
    return 0


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 after a clean drain."""
    if config.artifact is None:
        raise ConfigError("no artifact configured: pass --artifact DIR (or NEURONSERVE_ARTIFACT, or 'artifact' in --config)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(config))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
