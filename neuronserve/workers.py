"""`serve --workers N`: the supervisor of N worker processes that serve one port.

The supervisor never creates a gRPC object or loads a model: it plans each worker's share of the cores
(and, with --cpu-affinity split, of the host CPUs), reserves the port, builds the shared embedding cache,
then forks the workers. Each worker is a whole server.Server (its own event loop, GIL, batchers and core
range: NEURON_RT_VISIBLE_CORES set before its runtime starts) that joins the port with SO_REUSEPORT once
warm, so the kernel spreads connections over the warm workers. The supervisor then
- prints the ready line once every worker is ready, and serves the pool's /metrics (pool_metrics.py);
- restarts a worker that exits (backoff per RestartPolicy; past its crash-loop limit the server stops
  and exits 1) and a ready one whose heartbeat (written by its event loop) is older than
  --worker-timeout-s (SIGKILL, then restart);
- on SIGTERM/SIGINT forwards SIGTERM (each worker drains: every accepted request answered) and exits 0
  when every worker exited 0; a second signal is forwarded too (it cuts the workers' drain delay short).
With --embedding-store the supervisor loads the store's rows before the first fork (its /metrics up, its
signal handlers in place: a SIGTERM/SIGINT then abandons the load, exit 0, no worker started).
Messages from worker to supervisor are typed records over a pipe; heartbeats and the workers' private
ports live in shared arrays. docs/workers.md has the rules and the measurements behind them.
"""

from __future__ import annotations

import contextlib
import asyncio
import ctypes
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING

from neuronserve.config import VISIBLE_CORES_ENV, ServerConfig
from neuronserve.connection_balance import RoundRobin, load_balance, reserve_port
from neuronserve.errors import ConfigError, NeuronServeError
from neuronserve.pool_carry import CarriedStatistics, StatisticsSlots
from neuronserve.pool_dirs import new_socket_dir
from neuronserve.pool_versions import PoolVersions, WorkerVersions, repository_slots
from neuronserve.sched_policy import use_policy
from neuronserve.worker_plan import WorkerPlan, member_config, plan_workers
from neuronserve.contract import USER_TOWER

if TYPE_CHECKING:
    from neuronserve.fleet import Follower

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5  # a worker's event loop writes its heartbeat this often
POLL_S = 0.1  # the supervisor checks its workers this often
STOP_MARGIN_S = 5.0  # past the drain delay and the grace period, a worker still running is killed


# ---- messages and state shared with the workers -------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    index: int
    pid: int
    private_port: int
    metrics_port: int | None


@dataclass(frozen=True)
class WorkerFailed:
    """The worker could not start for a reason a restart will not fix (a ConfigError, a bad artifact)."""

    index: int
    message: str


class PoolShared:
    """What the supervisor and every worker share, built before the first fork: the embedding cache,
    each worker's last heartbeat (time.monotonic(), system-wide) and private gRPC port (0: not serving),
    and a private directory (0700) of one Unix socket per worker for the pool's own calls (the statistics
    fan-out): plaintext there whatever the TCP ports use, since only this user can reach it."""

    def __init__(
        self, workers: int, cache, host: str, versions: PoolVersions | None = None, balance: RoundRobin | None = None
    ) -> None:
        self.cache = cache  # None when serving a model repository: `versions` holds a cache per version
        self.versions = versions
        self.statistics = StatisticsSlots(workers)  # each place's OIP statistics, carried over restarts
        self.host = host
        self.balance = balance  # the port's connection dealer, each worker attaches it (None: the kernel's hash)
        self.heartbeats = multiprocessing.RawArray(ctypes.c_double, workers)
        self.ports = multiprocessing.RawArray(ctypes.c_int, workers)
        self.socket_dir = new_socket_dir()  # mode 0700; stale ones of killed pools removed first

    def local_address(self, index: int) -> str:
        return f"unix:{self.socket_dir}/worker-{index}.sock"

    def peer_addresses(self, index: int) -> list[str]:
        """The other serving workers' Unix sockets."""
        return [self.local_address(i) for i, port in enumerate(self.ports) if i != index and port]


# ---- the worker process ----------------------------------------------------------------------------


def _worker_main(config: ServerConfig, plan: WorkerPlan, shared: PoolShared, conn) -> None:
    """The forked worker: its cores and CPUs, then a Server as a pool member until SIGTERM. Never returns."""
    code = 1
    try:
        _die_with_parent()
        asyncio.events._set_running_loop(None)  # forked from the supervisor's running loop (Python < 3.12 keeps it)
        from neuronserve.serve import configure_logging, run_loop, serve_process
        from neuronserve.server import PoolMember

        configure_logging(prefix=f"worker{plan.index} ")
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C reaches the supervisor, which sends SIGTERM
        if plan.cpus:
            os.sched_setaffinity(0, plan.cpus)
        use_policy(config.sched_policy)  # before any other thread starts: they inherit it
        if config.backend == "neuron":
            os.environ[VISIBLE_CORES_ENV] = plan.cores.visible_cores()  # before the Neuron runtime starts
        versions = None
        if shared.versions is not None:
            shared.versions.forget(plan.index)  # what this place's previous worker held
            versions = WorkerVersions(shared.versions, plan.index)
            config = dataclasses.replace(config, version_policy=_policy_now(config, shared.versions))
        member = PoolMember(
            plan.index,
            shared.cache,
            lambda: shared.peer_addresses(plan.index),
            shared.local_address(plan.index),
            versions,
            CarriedStatistics(shared.statistics, plan.index),
        )
        worker_config = member_config(config, plan)

        def ready(server) -> None:
            if shared.balance is not None and not shared.balance.attach(server.port):
                log.warning("no socket on port %d to deal connections from", server.port)
            conn.send(WorkerReady(plan.index, os.getpid(), server.private_port, server.metrics_port))

        async def serve() -> int:
            beat = asyncio.ensure_future(_heartbeat(shared.heartbeats, plan.index))
            try:
                return await serve_process(worker_config, member, on_ready=ready)
            finally:
                beat.cancel()

        code = run_loop(serve())
    except NeuronServeError as exc:
        conn.send(WorkerFailed(plan.index, str(exc)))
        code = 2
    except BaseException:  # noqa: BLE001 - logged; the supervisor restarts the worker
        logging.getLogger(__name__).exception("worker %d failed", plan.index)
    finally:
        logging.shutdown()
        os._exit(code)  # a forked child: no atexit handlers or finalizers of the supervisor's objects


def _policy_now(config: ServerConfig, versions: PoolVersions) -> str:
    """The version policy a (re)starting worker serves: the versions an explicit load or unload left
    served on the pool, else the configured policy."""
    wanted = versions.wanted()
    return f"specific:{','.join(map(str, wanted))}" if wanted else config.version_policy


async def _heartbeat(heartbeats, index: int) -> None:
    while True:
        heartbeats[index] = time.monotonic()
        await asyncio.sleep(HEARTBEAT_S)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies (even by SIGKILL), so no worker outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- restart rules --------------------------------------------------------------------------------


class RestartPolicy:
    """When to restart a worker that exited: after a backoff doubling from `first_delay_s` to
    `max_delay_s` per worker (reset once it is ready again); never when the pool has seen more than
    `max_restarts` exits within `window_s` (a crash loop: the server stops and exits 1)."""

    def __init__(
        self,
        max_restarts: int = 5,
        window_s: float = 60.0,
        first_delay_s: float = 0.5,
        max_delay_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_restarts, self.window_s = max_restarts, window_s
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self._clock = clock
        self._exits: list[float] = []
        self._delay_s: dict[int, float] = {}

    def on_exit(self, index: int) -> float | None:
        """Seconds to wait before restarting worker `index`, or None: give up, the pool is crash-looping."""
        now = self._clock()
        self._exits = [t for t in self._exits if now - t < self.window_s] + [now]
        if len(self._exits) > self.max_restarts:
            return None
        delay = self._delay_s.get(index, self.first_delay_s)
        self._delay_s[index] = min(delay * 2, self.max_delay_s)
        return delay

    def on_ready(self, index: int) -> None:
        self._delay_s.pop(index, None)


# ---- the supervisor ----------------------------------------------------------------------------------


@dataclass
class _Worker:
    plan: WorkerPlan
    process: multiprocessing.process.BaseProcess | None = None
    conn: multiprocessing.connection.Connection | None = None  # the supervisor's end of the worker's pipe
    ready: WorkerReady | None = None
    restart_at: float | None = None  # monotonic time of the next start; None: running or stopped
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        config: ServerConfig,
        plans: list[WorkerPlan],
        shared: PoolShared,
        ready_line: Callable[[int | None], str],
        follower: Follower | None = None,
    ) -> None:
        self.config = config
        self.shared = shared
        self.follower = follower  # the host's embedding-store follower (--embedding-store), not started yet
        self.workers = [_Worker(plan) for plan in plans]
        self.policy = RestartPolicy()
        self._ready_line = ready_line
        self._context = multiprocessing.get_context("fork")
        self._stopping = asyncio.Event()
        self._failure: str | None = None  # why the pool gave up
        self.metrics_port: int | None = None

    async def run(self) -> int:
        from neuronserve.metrics_http import MetricsServer
        from neuronserve.pool_metrics import PoolMetrics

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        metrics_server = None
        if self.config.metrics_port is not None:
            metrics_server = MetricsServer(PoolMetrics(self))
            host = self.config.host.strip("[]")
            try:
                self.metrics_port = await metrics_server.start(host, self.config.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{self.config.metrics_port} for metrics ({exc.strerror}); choose another --metrics-port"
                ) from None
        announced = False
        try:
            if self.follower is not None and not await self.follower.warm_start_and_follow(self._stopping):
                log.info("stop requested during start-up: abandoning the embedding store's warm start")
                return 0
            for worker in self.workers:
                self._start(worker)
            while not self._stopping.is_set() and self._failure is None:
                self._check(time.monotonic())
                if not announced and all(w.ready for w in self.workers):
                    print(self._ready_line(self.metrics_port), flush=True)
                    announced = True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), POLL_S)
            code = await self._stop_all()
        finally:
            if metrics_server is not None:
                await metrics_server.close()
        if self._failure is not None:
            log.error("stopping the server: %s", self._failure)
            return 1
        log.info("stopped cleanly: every worker drained")
        return code

    def _start(self, worker: _Worker) -> None:
        receive, send = self._context.Pipe(duplex=False)
        self.shared.heartbeats[worker.plan.index] = time.monotonic()
        process = self._context.Process(
            target=_worker_main,
            args=(self.config, worker.plan, self.shared, send),
            name=f"neuronserve-worker{worker.plan.index}",
        )
        process.start()
        send.close()
        worker.process, worker.conn, worker.ready, worker.restart_at = process, receive, None, None
        log.info(
            "worker %d started: pid %d, cores %s%s",
            worker.plan.index,
            process.pid,
            worker.plan.cores,
            f", cpus {list(worker.plan.cpus)}" if worker.plan.cpus else "",
        )

    def _check(self, now: float) -> None:
        """One pass: messages, exits, hangs, due restarts."""
        for worker in self.workers:
            index = worker.plan.index
            if worker.process is None:
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restarts += 1
                    self._start(worker)
                continue
            self._read_messages(worker)
            silent_s = now - self.shared.heartbeats[index]
            hung = worker.ready is not None and silent_s > self.config.worker_timeout_s
            if worker.process.exitcode is None and hung:  # a starting worker's loop may block on imports for seconds
                log.error(
                    "worker %d (pid %d) has not ticked for %.1f s: killing it", index, worker.process.pid, silent_s
                )
                worker.process.kill()
                worker.process.join(5.0)
            if worker.process.exitcode is not None:
                self._exited(worker, now)

    def _read_messages(self, worker: _Worker) -> None:
        assert worker.conn is not None  # only started workers are read: set with the process in _start
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if isinstance(message, WorkerReady):
                    worker.ready = message
                    self.shared.ports[message.index] = message.private_port
                    self.policy.on_ready(message.index)
                    log.info(
                        "worker %d ready: pid %d, private port %d", message.index, message.pid, message.private_port
                    )
                elif isinstance(message, WorkerFailed):
                    self._failure = f"worker {message.index} cannot start: {message.message}"
        except (EOFError, OSError):
            pass  # the worker is gone; its exit code tells the rest

    def _exited(self, worker: _Worker, now: float) -> None:
        index = worker.plan.index
        self.shared.ports[index] = 0
        assert worker.process is not None and worker.conn is not None  # _check's started worker
        code = worker.process.exitcode
        self._read_messages(worker)  # what it said before it went, e.g. WorkerFailed
        worker.conn.close()
        worker.process, worker.ready = None, None
        if self._failure is not None:
            return
        delay = self.policy.on_exit(index)
        if delay is None:
            self._failure = f"workers keep dying ({self.policy.max_restarts} restarts within {self.policy.window_s:.0f} s; worker {index} exited with {code})"
            return
        log.error("worker %d exited with %s: restarting it in %.1f s", index, code, delay)
        worker.restart_at = now + delay

    async def _stop_all(self) -> int:
        """SIGTERM every live worker (each drains), wait for them; 0 when every one exited 0. A signal
        meanwhile is passed on (a worker's second SIGTERM cuts its drain delay short)."""
        self._stopping.clear()
        live = [(w, w.process) for w in self.workers if w.process is not None]
        log.info(
            "shutting down: draining %d workers (drain delay %.1f s, grace period %.1f s)",
            len(live),
            self.config.drain_delay_s,
            self.config.grace_period_s,
        )
        for _, process in live:
            process.terminate()
        end = time.monotonic() + self.config.drain_delay_s + self.config.grace_period_s + STOP_MARGIN_S
        while any(p.exitcode is None for _, p in live) and time.monotonic() < end:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), POLL_S)
            if self._stopping.is_set():
                self._stopping.clear()
                draining = [p for _, p in live if p.exitcode is None]
                log.info("a signal during the drain: passing it on to the %d workers still draining", len(draining))
                for process in draining:
                    process.terminate()
        code = 0
        for worker, process in live:
            if process.exitcode is None:
                log.error("worker %d did not stop within the grace period: killing it", worker.plan.index)
                process.kill()
                process.join(5.0)
            if process.exitcode != 0:
                code = 1
            self.shared.ports[worker.plan.index] = 0
        return code


def supervise(config: ServerConfig) -> int:
    """Run `config.workers` workers until SIGTERM/SIGINT; the exit code of the pool."""
    from neuronserve.artifact import load_manifest
    from neuronserve.backends import resolve_backend
    from neuronserve.serve import run_loop
    from neuronserve.version_build import first_artifact, new_cache

    path, _ = first_artifact(config)
    manifest = load_manifest(path, True, config.trusted_key)  # refused here, before any worker forks
    backend = resolve_backend(config.backend, manifest)
    plans = plan_workers(config, backend, manifest.pipeline_cores, tuple(sorted(os.sched_getaffinity(0))))
    reservation, port = reserve_port(config.host, config.port)
    config = dataclasses.replace(config, port=port, backend=backend)
    cache, follower, versions = None, None, None
    if config.model_repository is None:
        cache = new_cache(manifest, config.cache_max_rows)
    else:  # a cache per version, shared by the workers (pool_versions.py)
        versions = PoolVersions(
            len(plans), repository_slots(config), lambda: new_cache(manifest, config.cache_max_rows)
        )
    if config.embedding_store != "embedded":
        # The host's one store follower runs here (it needs the cache, not a model), loaded before any
        # worker forks: every worker opens with the store's rows, and writes through it (fleet.py).
        from neuronserve.fleet import open_fleet

        cache, follower = open_fleet(config.embedding_store, manifest, cache)  # loaded by Supervisor.run
    balance = load_balance(config.connection_balance, len(plans))
    shared = PoolShared(len(plans), cache, config.host, versions, balance)  # a worker per plan: config.workers
    buckets = ",".join(map(str, manifest.stage(USER_TOWER).batch_sizes))

    def ready_line(metrics_port: int | None) -> str:
        metrics = f"{config.host}:{metrics_port}" if metrics_port is not None else "-"
        return (
            f"neuronserve ready: grpc={config.host}:{port} metrics={metrics} backend={backend} "
            f"cores={sum(p.cores.count for p in plans)} buckets={buckets} "
            f"model={manifest.model_name} version={manifest.model_version} workers={config.workers}"
        )

    try:
        return run_loop(Supervisor(config, plans, shared, ready_line, follower).run())
    finally:
        reservation.close()
        shutil.rmtree(shared.socket_dir, ignore_errors=True)
        if follower is not None:
            follower.stop()
