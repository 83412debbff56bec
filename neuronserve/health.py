"""Health that follows the device: a small task on the server's event loop polls which stages no core
group can run now (Pipeline.stages_down) and, when that changes, tells the server (which sets the
grpc.health.v1 statuses and ServingState.stages_down, so ServerReady and ModelReady follow).

With every core group of a stage out of rotation (faulted, resetting) no call that needs that stage
can succeed: the services and models that need it then say NOT_SERVING / not ready, so a readiness
probe or a load balancer takes the replica out of rotation, and SERVING again once a core is back. The poll is a few flag reads under the backend's lock, so it
runs on the loop; a change shows within one `interval_s`.

A frozen event loop is not this task's business: it stops with the loop, and so does every answer.
Liveness is the health RPC with a timeout (a frozen loop answers nothing, the probe times out); a
single process's watchdog thread (watchdog.py) and a pool's supervisor (workers.py) act sooner.

The sleep is injectable, so tests run the watcher on a fake clock. HealthServicer: grpc_health's,
with List answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from grpc_health.v1 import health, health_pb2

from neuronserve.contract import MODEL_STAGES, TWOTOWER

if TYPE_CHECKING:
    from neuronserve.service import ServingState

log = logging.getLogger(__name__)

T = TypeVar("T")
ALL_STAGES = MODEL_STAGES[TWOTOWER]
POLL_INTERVAL_S = 0.1  # a core group going out of (or back into) rotation shows within this


class DeviceWatcher(Generic[T]):
    """Polls `probe()` every `interval_s` and awaits `on_change(value)` on each change of its value
    (the server's: the stages no core group can run). Starts from `initial` (what the server opened
    with), so the first call is a change from it. A probe that raises reads as `failed` (logged once
    per streak)."""

    def __init__(
        self,
        probe: Callable[[], T],
        on_change: Callable[[T], Awaitable[None]],
        *,
        initial: T,
        failed: T,
        interval_s: float = POLL_INTERVAL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.value = initial
        self._failed = failed
        self._probe = probe
        self._on_change = on_change
        self._interval_s = interval_s
        self._sleep = sleep
        self._task: asyncio.Task | None = None
        self._probe_failed = False

    def start(self) -> None:
        """Start polling on the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="neuronserve-device-watcher")

    async def stop(self) -> None:
        """Stop polling; no on_change call runs after this returns."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def poll(self) -> None:
        """One poll: read the probe, tell on a change."""
        value = self._read()
        if value != self.value:
            self.value = value
            await self._on_change(value)

    def _read(self) -> T:
        try:
            value = self._probe()
        except Exception:
            if not self._probe_failed:
                log.exception("the device health probe failed: counted as unhealthy until it answers")
            self._probe_failed = True
            return self._failed
        self._probe_failed = False
        return value

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failing on_change must not end the watching
                log.exception("updating health after a device health change failed")
            await self._sleep(self._interval_s)


class HealthServicer(health.aio.HealthServicer):
    """grpc_health's servicer (Check, Watch, set, enter_graceful_shutdown) plus List, which its aio
    version leaves unimplemented (a traceback per call): every service's status, as Check gives it."""

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        statuses = dict(getattr(self, "_server_status", {}))
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in statuses.items()}
        )


class ServerHealth:
    """One server's grpc.health.v1 statuses and the watchers that keep them current.

    While the door is open (ServingState.serving): the Health service SERVING (liveness); the OIP
    service while some model is ready (a version loaded, its stages all with a healthy core group,
    contract.MODEL_STAGES); the overall "" and the Scorer while the server is ready (a version loaded,
    every stage with one); `store_name` while the embedding store's local copy follows it. Statuses
    change with the devices (watch_devices) and with model control's loads and unloads (versions_changed).
    """

    def __init__(self, servicer: HealthServicer, state: ServingState, services: tuple[str, ...], oip: str) -> None:
        self.servicer, self._state, self._oip = servicer, state, oip
        self._names = ("",) + services
        self._devices: DeviceWatcher[frozenset[str]] | None = None
        self._store: DeviceWatcher[bool] | None = None

    async def set_all(self, status: int | None = None) -> None:
        """Every name to `status`; by default to what the server is now."""
        answer, state = health_pb2.HealthCheckResponse, self._state
        oip_up = any(state.model_ready(model) for model in MODEL_STAGES)
        for name in self._names:
            if status is None:
                up = state.serving if name == health.SERVICE_NAME else oip_up if name == self._oip else state.ready
                status_now = answer.SERVING if up else answer.NOT_SERVING
                await self.servicer.set(name, status_now)
            else:
                await self.servicer.set(name, status)

    def watch_devices(self, stages_down: Callable[[], frozenset[str]]) -> None:
        """Poll `stages_down()` (Pipeline.stages_down of the current version); statuses follow it."""
        self._devices = DeviceWatcher(stages_down, self._devices_changed, initial=frozenset(), failed=ALL_STAGES)
        self._devices.start()

    async def watch_store(self, store_name: str, up: Callable[[], bool]) -> None:
        """`store_name` SERVING while `up()` (the embedding store's local copy follows the store)."""

        async def changed(now_up: bool) -> None:
            answer = health_pb2.HealthCheckResponse
            await self.servicer.set(store_name, answer.SERVING if now_up else answer.NOT_SERVING)

        initial = up()
        self._store = DeviceWatcher(up, changed, initial=initial, failed=False)
        await changed(initial)
        self._store.start()

    async def stop_watching(self) -> None:
        for watcher in (self._devices, self._store):
            if watcher is not None:
                await watcher.stop()
        self._devices = self._store = None

    async def versions_changed(self, loaded: bool) -> None:
        """Model control loaded or unloaded versions (its on_change): `loaded`, whether any version is
        served, goes to ServingState.loaded; on a change the statuses follow, as after a device change."""
        if loaded == self._state.loaded:
            return
        self._state.loaded = loaded
        if loaded:
            log.info("a model version is loaded again: health SERVING, ServerReady true")
        else:
            log.info(
                "no model version loaded: health NOT_SERVING, ServerReady false until a load (liveness stays SERVING)"
            )
        await self.set_all()

    async def _devices_changed(self, down: frozenset[str]) -> None:
        self._state.stages_down = down
        if down:
            log.warning(
                "no core group can run %s (all out of rotation after faults): the services and models that need it are NOT_SERVING / not ready until a core is back",
                ", ".join(sorted(down)),
            )
        else:
            log.info("a core group can run every stage again: health SERVING, ModelReady true")
        await self.set_all()
