"""The `serve` command: settings -> one serving process (`--workers 1`) or a supervised pool of them
(workers.py). Owns the process concerns: logging, the event loop, signals, the ready line, the exit code.

One process: SIGTERM/SIGINT drains (server.Server.stop) and exits 0: with --drain-delay-s, health goes
NOT_SERVING at once and requests are still served that long first (a second signal cuts the delay short);
a stop during the warm-up abandons it and never prints the ready line; the log's last line tallies the
requests answered, by status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable

from neuronserve.config import ServerConfig
from neuronserve.errors import ConfigError, Unavailable
from neuronserve.server import PoolMember, Server
from neuronserve.settings import ENV_PREFIX, add_arguments, resolve_config

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an artifact over gRPC (scorer API, Open Inference Protocol, health, reflection, metrics)",
        description="Serve a compiled two-tower artifact over gRPC. Settings: flags > --config FILE.json > "
        f"{ENV_PREFIX}* environment variables > defaults. Prints one 'neuronserve ready: ...' line when serving.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    """`serve`, plus the embedded default: with no artifact configured, compile the demo model for
    the CPU into the cache directory on first run (reused afterwards) and serve that."""
    config = resolve_config(args)
    if config.artifact is None and config.model_repository is None:
        from neuronserve.compile.demo import ensure_demo_artifact

        config = dataclasses.replace(config, artifact=str(ensure_demo_artifact(progress=True)))
    return run(config)


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 after a clean drain."""
    if config.artifact is None and config.model_repository is None:
        raise ConfigError(
            "no artifact configured: pass --artifact DIR (or NEURONSERVE_ARTIFACT, or 'artifact' in --config)"
        )
    from neuronserve.tls import load_tls

    tune_process(config)
    if load_tls(config) is not None:  # bad TLS files fail here, before a pool forks (each server reads them again)
        # grpc-core logs every failed TLS handshake (a plaintext or port-scan probe) at INFO: one line per
        # connection anyone can open. Its errors still show; GRPC_VERBOSITY set by the operator wins.
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    configure_logging()
    config = with_workers(config)
    if (config.workers or 1) > 1:
        from neuronserve.workers import supervise

        return supervise(config)
    config = with_one_cpu_batching(config, len(os.sched_getaffinity(0)))
    from neuronserve.sched_policy import use_policy
    from neuronserve.watchdog import LoopWatchdog

    use_policy(config.sched_policy)  # before any other thread starts: they inherit it
    watchdog = LoopWatchdog(config.worker_timeout_s)

    def ready(server: Server) -> None:
        _print_ready(server)
        watchdog.arm()
        _pin_loop(config, server)

    try:
        return run_loop(serve_process(config, on_ready=ready))
    finally:
        watchdog.stop()


def _pin_loop(config: ServerConfig, server: Server) -> None:
    """One process, serving: its event loop and gRPC's poller on one CPU when --loop-cpu says so."""
    from neuronserve.thread_placement import loop_cpu, pin, usable_cpus

    cpu = loop_cpu(config.loop_cpu, server.backend.name if server.backend else "", usable_cpus())
    if cpu is not None:
        pin(cpu)


def tune_process(config: ServerConfig) -> None:
    """The interpreter and allocator settings of a serving process, before any thread or fork (forked
    workers inherit them): glibc's malloc thresholds (docs/memory.md) and the GIL's switch interval."""
    from neuronserve.memory_release import tune_malloc

    tune_malloc(os.environ)
    sys.setswitchinterval(config.gil_switch_ms / 1e3)


def with_workers(config: ServerConfig) -> ServerConfig:
    """`config` with its worker count resolved: as set, 1 with a placement, else the backend's default."""
    if config.workers is not None:
        return config
    if config.placement or config.model_repository is not None:
        return dataclasses.replace(config, workers=1)
    from neuronserve.backends import core_span, default_workers

    backend = resolved_backend(config)
    cores = core_span(backend, config.cores).count
    return dataclasses.replace(config, workers=default_workers(backend, cores, len(os.sched_getaffinity(0))))


def resolved_backend(config: ServerConfig) -> str:
    """The backend `config`'s artifact is served with (`auto` resolved from its target)."""
    from neuronserve.artifact import load_manifest
    from neuronserve.backends import resolve_backend

    return resolve_backend(config.backend, load_manifest(config.artifact, False))


def with_one_cpu_batching(config: ServerConfig, usable_cpus: int) -> ServerConfig:
    """One process with one usable CPU batches as a pool's worker does (worker_plan.lane_batching): its
    graph can only take turns with the event loop on that CPU (docs/pipeline.md). Needs --artifact (or the
    demo) to resolve an `auto` backend; otherwise, and with more CPUs, `config` as it is."""
    if config.workers != 1 or usable_cpus != 1 or (config.backend == "auto" and config.artifact is None):
        return config
    from neuronserve.worker_plan import lane_batching

    backend = config.backend if config.artifact is None else resolved_backend(config)
    config = lane_batching(dataclasses.replace(config, backend=backend))
    if backend == "cpu":
        log.info(
            "one usable CPU: batches form in a lane when one is in flight (here --inline-below %g --max-in-flight-batches %s)",
            config.inline_below,
            config.batching.max_in_flight_batches,
        )
    return config


def configure_logging(prefix: str = "") -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        force=True,
    )
    quiet_replies_after_call_ended()


GRPC_AIO_LOGGER = "grpc._cython.cygrpc"


def quiet_replies_after_call_ended() -> None:
    """Install ReplyAfterCallEnded on grpc.aio's logger, once."""
    grpc_log = logging.getLogger(GRPC_AIO_LOGGER)
    if not any(isinstance(f, ReplyAfterCallEnded) for f in grpc_log.filters):
        grpc_log.addFilter(ReplyAfterCallEnded())


class ReplyAfterCallEnded(logging.Filter):
    """grpc.aio logs an ERROR with a traceback ("ExecuteBatchError raised in core by servicer method [M]")
    when a handler's reply cannot be sent because its call has already ended: the client cancelled or
    its deadline passed in the moment the handler finished. The client has its status and the server
    nothing to fix, so the record becomes one INFO line naming the method."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("ExecuteBatchError raised in core"):
            method = message[message.find("[") :]
            record.msg, record.args = (
                f"a reply was not sent: gRPC failed its send, as it does when the call has already ended (the client gone or its deadline past) {method}",
                (),
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def run_loop(main):
    """Run the coroutine `main` on a fresh event loop (uvloop when installed) and close it."""
    from neuronserve.thread_placement import released_executor

    loop = _new_event_loop()
    loop.set_default_executor(released_executor())  # its threads keep every CPU if the loop is pinned
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: serving on the default asyncio event loop (slower); pip install uvloop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _print_ready(server: Server) -> None:
    print(server.ready_line(), flush=True)


async def serve_process(
    config: ServerConfig, member: PoolMember | None = None, on_ready: Callable[[Server], None] = _print_ready
) -> int:
    """Start a Server, call `on_ready`, serve until SIGTERM/SIGINT, drain; 0 after a clean drain."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    server = Server(config, member)
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
    on_ready(server)
    await stopping.wait()
    stopping.clear()  # a second SIGTERM/SIGINT cuts the drain delay short
    if config.drain_delay_s > 0:
        log.info(
            "shutting down: health NOT_SERVING, serving for the drain delay (%.1f s), then draining accepted requests (grace period %.1f s)",
            config.drain_delay_s,
            config.grace_period_s,
        )
    else:
        log.info("shutting down: draining accepted requests (grace period %.1f s)", config.grace_period_s)
    await server.stop(drain_delay_s=config.drain_delay_s, cut_short=stopping)
    answered: dict[str, int] = server.metrics.outcomes() if server.metrics is not None else {}
    log.info(
        "stopped cleanly; requests answered: %s", " ".join(f"{k}={v}" for k, v in sorted(answered.items())) or "none"
    )
    return 0
