"""OIP ModelStatistics summed over a pool's workers (Triton's statistics extension for `--workers N`).

The worker that receives a ModelStatistics call adds the other live workers' counters to its own: it asks
each on its Unix socket (PoolShared.local_address) with the header SCOPE_HEADER=worker (answered from that
worker's counters alone) and sums: counts and durations add, last_inference is the latest. A worker that does not answer within
PEER_TIMEOUT_S (dying, being replaced) is left out of that answer, and the log says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc

log = logging.getLogger(__name__)

SCOPE_HEADER = "neuronserve-statistics-scope"
WORKER_SCOPE = (SCOPE_HEADER, "worker")
PEER_TIMEOUT_S = 1.0
_DURATIONS = [f.name for f in oip.InferStatistics.DESCRIPTOR.fields]


def worker_scope(context) -> bool:
    """True when the caller asked for this worker's counters only (the pool's own fan-out)."""
    return any(key == SCOPE_HEADER and value == "worker" for key, value in (context.invocation_metadata() or ()))


def add_statistics(total: oip.ModelStatisticsResponse, other: oip.ModelStatisticsResponse) -> None:
    """Add `other`'s counters into `total`, model by model (matched by name)."""
    by_name: dict[str, oip.ModelStatistics] = {m.name: m for m in total.model_stats}
    for model in other.model_stats:
        mine = by_name.get(model.name)
        if mine is None:
            total.model_stats.add().CopyFrom(model)
            continue
        mine.last_inference = max(mine.last_inference, model.last_inference)
        mine.inference_count += model.inference_count
        mine.execution_count += model.execution_count
        for name in _DURATIONS:
            ours, theirs = getattr(mine.inference_stats, name), getattr(model.inference_stats, name)
            ours.count += theirs.count
            ours.ns += theirs.ns


class PoolStatistics:
    """The other workers' ModelStatistics, over one channel per peer address (kept while it is listed)."""

    def __init__(self, peer_addresses: Callable[[], list[str]]) -> None:
        self._peer_addresses = peer_addresses
        self._stubs: dict[str, oip_grpc.GRPCInferenceServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def add_peers(self, reply: oip.ModelStatisticsResponse, request: oip.ModelStatisticsRequest) -> None:
        addresses = self._peer_addresses()
        for gone in set(self._channels) - set(addresses):
            await self._channels.pop(gone).close()
            del self._stubs[gone]
        answers = await asyncio.gather(*(self._ask(address, request) for address in addresses))
        for answer in answers:
            if answer is not None:
                add_statistics(reply, answer)

    async def _ask(self, address: str, request: oip.ModelStatisticsRequest) -> oip.ModelStatisticsResponse | None:
        stub = self._stubs.get(address)
        if stub is None:
            self._channels[address] = channel = grpc.aio.insecure_channel(address)
            stub = self._stubs[address] = oip_grpc.GRPCInferenceServiceStub(channel)
        try:
            return await stub.ModelStatistics(request, metadata=(WORKER_SCOPE,), timeout=PEER_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "ModelStatistics: worker at %s did not answer (%s); its counters are left out", address, exc.code().name
            )
            return None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
