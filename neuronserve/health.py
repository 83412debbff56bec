"""Health that follows the device: a small task on the server's event loop polls whether some core
group can still run every stage (Pipeline.healthy) and, when that changes, tells the server (which sets
the grpc.health.v1 statuses and ServingState.devices_ready, so ServerReady and ModelReady follow).

With every core group out of rotation (faulted, resetting) no call that needs a core can succeed: the
server then says NOT_SERVING, so a readiness probe or a load balancer takes the replica out of rotation,
and SERVING again once a core is back. The poll is a few flag reads under the backend's lock, so it
runs on the loop; a change shows within one `interval_s`.

A frozen event loop is not this task's business: it stops with the loop, and so does every answer.
Liveness is the health RPC with a timeout (a frozen loop answers nothing, the probe times out); a
pool's supervisor also kills a worker whose loop stops writing its heartbeat (workers.py).

The sleep is injectable, so tests run the watcher on a fake clock. HealthServicer: grpc_health's,
with List answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.1  # a core group going out of (or back into) rotation shows within this


class DeviceWatcher:
    """Polls `probe()` (True: the model can run) every `interval_s` and awaits `on_change(healthy)`
    on each change. Starts from `healthy=True` (the server opens once every stage is warm), so the
    first call is a loss of health. A probe that raises counts as unhealthy (logged once per streak)."""

    def __init__(
        self,
        probe: Callable[[], bool],
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval_s: float = POLL_INTERVAL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.healthy = True
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
        healthy = self._read()
        if healthy != self.healthy:
            self.healthy = healthy
            await self._on_change(healthy)

    def _read(self) -> bool:
        try:
            healthy = bool(self._probe())
        except Exception:
            if not self._probe_failed:
                log.exception("the device health probe failed: counted as unhealthy until it answers")
            self._probe_failed = True
            return False
        self._probe_failed = False
        return healthy

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
