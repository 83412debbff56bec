"""A pool worker's OIP ModelStatistics carried over its restart (`--workers N`).

Each worker place has a slot of shared memory, mapped by the supervisor before the first fork. The
worker writes its whole ModelStatisticsResponse there every PUBLISH_S (its own counts plus what it
carried); a worker that starts in the place (after a crash, a kill or a hang) reads the last one and
adds it to every answer, so the pool's counts never step down. Loss bound: what a dead worker counted
in its last PUBLISH_S. A slot is two buffers and a word naming the committed one: a worker killed in
the middle of a write leaves the previous snapshot whole.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
from collections.abc import Callable

from neuronserve.pool_stats import add_statistics
from neuronserve.protos import open_inference_pb2 as oip

PUBLISH_S = 0.5
SLOT_BYTES = 64 << 10  # per buffer: a ModelStatisticsResponse of a few models is ~1 KB
_HEADER = 3  # int64: the committed buffer (0 / 1), then each buffer's length


class StatisticsSlots:
    """One slot per worker place (see the module docstring)."""

    def __init__(self, workers: int) -> None:
        self._headers = multiprocessing.RawArray(ctypes.c_int64, workers * _HEADER)
        self._buffers = multiprocessing.RawArray(ctypes.c_char, workers * 2 * SLOT_BYTES)

    def write(self, place: int, data: bytes) -> None:
        """Commit `data` as `place`'s snapshot (too large: kept out; the previous one stands)."""
        if len(data) > SLOT_BYTES:
            return
        header = place * _HEADER
        spare = 1 - self._headers[header]
        start = (2 * place + spare) * SLOT_BYTES
        ctypes.memmove(ctypes.addressof(self._buffers) + start, data, len(data))
        self._headers[header + 1 + spare] = len(data)
        self._headers[header] = spare  # one aligned 8-byte store: the commit

    def read(self, place: int) -> bytes:
        header = place * _HEADER
        committed = self._headers[header]
        start = (2 * place + committed) * SLOT_BYTES
        return self._buffers.raw[start : start + self._headers[header + 1 + committed]]


class CarriedStatistics:
    """One worker's side: the predecessor's last snapshot (`carried`), and the publishing loop."""

    def __init__(self, slots: StatisticsSlots, place: int) -> None:
        self._slots, self._place = slots, place
        self.carried = oip.ModelStatisticsResponse.FromString(slots.read(place))
        self._publishing: asyncio.Task | None = None

    def add_to(self, reply: oip.ModelStatisticsResponse) -> None:
        """Add the carried counts of the models `reply` holds."""
        names = {m.name for m in reply.model_stats}
        add_statistics(
            reply, oip.ModelStatisticsResponse(model_stats=[m for m in self.carried.model_stats if m.name in names])
        )

    def start(self, snapshot: Callable[[], oip.ModelStatisticsResponse]) -> None:
        """On the serving loop: write `snapshot()` (this worker's counts, carried ones included) every
        PUBLISH_S until close()."""
        self._snapshot = snapshot

        async def publish() -> None:
            while True:
                self._write()
                await asyncio.sleep(PUBLISH_S)

        self._publishing = asyncio.ensure_future(publish())

    async def close(self) -> None:
        """Stop publishing, after writing the counts once more (a clean exit loses nothing)."""
        if self._publishing is not None:
            self._publishing.cancel()
            await asyncio.gather(self._publishing, return_exceptions=True)
            self._publishing = None
            self._write()

    def _write(self) -> None:
        self._slots.write(self._place, self._snapshot().SerializeToString())
