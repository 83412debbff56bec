"""RepositoryModelLoad and RepositoryModelUnload through one worker of a pool, applied on every worker.

The worker a client calls applies the call itself (model_control.py), then sends it to each other live
worker on its private Unix socket with the header pool_stats.SCOPE_HEADER=worker (that worker applies it
alone) and the caller's authorization metadata, and answers once every one has. A worker that refuses
fails the call with a message naming it; the others keep what they loaded, so the pool can serve mixed
versions until the next load succeeds (the error says so). Embedding caches are per version and shared
by the workers (pool_versions.py), so a version loaded on every worker scores the same rows everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from neuronserve.admin_auth import METADATA_KEY
from neuronserve.errors import ModelControlError
from neuronserve.pool_stats import WORKER_SCOPE
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc


class PoolLoads:
    """Forwards the repository's load and unload calls to the other workers (see the module docstring)."""

    def __init__(self, peer_addresses: Callable[[], list[str]]) -> None:
        self._peer_addresses = peer_addresses
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def forward(self, method: str, request, context) -> None:
        """Send `request` as `method` (RepositoryModelLoad or RepositoryModelUnload) to every other live
        worker; ModelControlError naming each that refused or did not answer within the caller's time."""
        metadata = [WORKER_SCOPE] + [
            (key, value) for key, value in (context.invocation_metadata() or ()) if key == METADATA_KEY
        ]
        addresses = self._peer_addresses()
        for gone in set(self._channels) - set(addresses):
            await self._channels.pop(gone).close()
        timeout_s = context.time_remaining()
        results = await asyncio.gather(
            *(self._call(address, method, request, metadata, timeout_s) for address in addresses)
        )
        refused = [f"worker at {address}: {error}" for address, error in zip(addresses, results, strict=True) if error]
        if refused:
            raise ModelControlError(
                f"{method} applied on this worker but not on {len(refused)} of its {len(addresses)} peers, which "
                f"serve what they served before until a load succeeds: {'; '.join(refused)}"
            )

    async def _call(self, address: str, method: str, request, metadata, timeout_s: float | None) -> str:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        try:
            await getattr(oip_grpc.GRPCInferenceServiceStub(channel), method)(
                request, metadata=metadata, timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} {exc.details()}"
        return ""

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
