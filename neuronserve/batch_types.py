"""The batcher's boundary types: what run_batch receives (Slice), the timer it is given (CallLater)
and what DynamicBatcher.stats() returns (BatcherStats)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of one request's payload, as handed to run_batch."""

    payload: Any
    start: int
    stop: int


RunBatch = Callable[[Sequence[Slice]], Awaitable[np.ndarray]]


class Cancellable(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]  # (delay_s, callback) -> a timer handle


@dataclass(frozen=True)
class BatcherStats:
    queued_rows: int
    queued_requests: int
    in_flight_batches: int
    batches: int  # cumulative: batches fired
    batch_rows: int  # cumulative: rows in them
    rejected_overload: int
    rejected_deadline: int
    cancelled: int
    failed: int  # requests failed by run_batch (or by close(drain=False))
    batched_requests: int  # cumulative: requests that reached a batch
    queue_s_total: float  # sum over those requests of (first batch start - arrival)
    slowdown: float  # observed device time of a batch / the latency model's (EWMA): scales expected times
