"""Admission at the door of a batch queue, shared by DynamicBatcher and BatchLane: a request whose
expected completion, the queue ahead priced at QUEUE_WAIT_FACTOR times its wait, misses its deadline is
DeadlineExceeded, a backlog past max_queue_wait_ms or max_queue_rows is Overloaded, before any work.
Expected times are the latency model's, scaled by the slowdown the batches really show (an EWMA). The
rules, with the reasons: docs/batching.md.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from neuronserve.config import BatchingConfig
from neuronserve.errors import DeadlineExceeded, InvalidInput, Overloaded

MIN_SLOWDOWN, MAX_SLOWDOWN = 0.1, 50.0  # bounds on one batch's observed / modelled time (a stall, a clock step)
SLOWDOWN_WEIGHT = 0.2  # EWMA weight of each batch's observed slowdown
# The deadline rule prices the queue ahead at this many times its modelled wait. The model prices the
# queue well; the waits it cannot see grow with it (the event loop's backlog before a request reaches
# admission and after its batch). Past capacity the queue settles at about half the deadline; a request
# that finds no queue is admitted if its own batch fits (docs/batching.md).
QUEUE_WAIT_FACTOR = 2.0


def checked_rows(rows, max_queue_rows: int, name: str) -> int:
    """A request's rows as an int >= 1 that can fit the queue; InvalidInput otherwise (retrying cannot help)."""
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
        raise InvalidInput(f"rows must be an integer >= 1, got {rows!r}")
    rows = int(rows)
    if rows > max_queue_rows:
        raise InvalidInput(
            f"{name}: a request of {rows} rows can never fit the queue (max_queue_rows={max_queue_rows}); split it"
        )
    return rows


class Admission:
    """One queue's admission rules and its latency model. estimate_latency_s(rows) -> seconds (cheap,
    never raises; None: no model, so only max_queue_rows refuses). Counts what it refuses."""

    def __init__(
        self,
        name: str,
        config: BatchingConfig,
        estimate_latency_s: Callable[[int], float] | None,
        max_batch_rows: int,
    ) -> None:
        self.name = name
        self.max_queue_rows = config.max_queue_rows
        self._max_wait_s = config.max_queue_wait_ms / 1e3
        self._estimate_s = estimate_latency_s
        self._max_rows = max_batch_rows
        self.slowdown = 1.0
        self.rejected_overload = self.rejected_deadline = 0

    def admit(
        self,
        rows: int,
        now: float,
        deadline_s: float | None,
        queued_rows: int,
        running_s: float,
        devices: int,
    ) -> None:
        """Refuse at once what cannot be served in time or would overflow the queue. `running_s`: the
        running batches' expected device seconds still to go, summed."""
        wait_s = self.backlog_s(queued_rows, running_s, devices)
        if deadline_s is not None:
            shortfall_s = self.shortfall_s(now + QUEUE_WAIT_FACTOR * wait_s, min(rows, self._max_rows), deadline_s)
            if shortfall_s > 0:
                self.rejected_deadline += 1
                raise self.deadline_error(rows, min(rows, self._max_rows), shortfall_s, wait_s)
        if wait_s > self._max_wait_s:
            self.rejected_overload += 1
            raise Overloaded(
                f"{self.name}: the queue ahead would take {wait_s * 1e3:.1f} ms to drain, above max_queue_wait_ms="
                f"{self._max_wait_s * 1e3:g}; retry later or on another replica"
            )
        if queued_rows + rows > self.max_queue_rows:
            self.rejected_overload += 1
            raise Overloaded(
                f"{self.name}: queue holds {queued_rows} rows; {rows} more would pass max_queue_rows={self.max_queue_rows}"
            )

    def backlog_s(self, queued_rows: int, running_s: float, devices: int) -> float:
        """Expected seconds until the running batches and the queued rows have run: the running batches'
        remaining device time, then the queue in full batches and the rest, over the devices."""
        if self._estimate_s is None:
            return 0.0
        full, rest = divmod(queued_rows, self._max_rows)
        queued_s = (full * self._estimate_s(self._max_rows) + (self._estimate_s(rest) if rest else 0.0)) * self.slowdown
        return (running_s + queued_s) / devices

    def expected_s(self, rows: int) -> float:
        """A batch of `rows`: its expected device seconds (the model, scaled by the observed slowdown)."""
        return self._estimate_s(rows) * self.slowdown if self._estimate_s is not None else 0.0

    def shortfall_s(self, now: float, batch_rows: int, deadline_s: float) -> float:
        """How far past `deadline_s` a batch of `batch_rows` started now would finish (> 0: too late)."""
        estimate_s = self._estimate_s(batch_rows) if self._estimate_s is not None else 0.0
        return now + estimate_s - deadline_s

    def observe(self, rows: int, elapsed_s: float) -> None:
        """Learn how much slower (or faster) than the latency model batches really run, from when their
        device was expected to start (host load, contention, a start-up timing on a noisy host)."""
        if self._estimate_s is None:
            return
        estimate_s = self._estimate_s(rows)
        if estimate_s > 0:
            ratio = min(max(elapsed_s / estimate_s, MIN_SLOWDOWN), MAX_SLOWDOWN)
            self.slowdown += SLOWDOWN_WEIGHT * (ratio - self.slowdown)

    def late(self, rows: int, batch_rows: int, now: float, deadline_s: float | None) -> DeadlineExceeded | None:
        """A queued request's error (counted) if a batch of `batch_rows` started now would miss its deadline."""
        if deadline_s is None:
            return None
        shortfall_s = self.shortfall_s(now, batch_rows, deadline_s)
        if shortfall_s <= 0:
            return None
        self.rejected_deadline += 1
        return self.deadline_error(rows, batch_rows, shortfall_s)

    def deadline_error(self, rows: int, batch_rows: int, shortfall_s: float, wait_s: float = 0.0) -> DeadlineExceeded:
        ahead = f" after {QUEUE_WAIT_FACTOR:g}x the {wait_s * 1e3:.1f} ms the queue ahead needs" if wait_s > 0 else ""
        return DeadlineExceeded(
            f"{self.name}: a request of {rows} rows cannot meet its deadline: a batch of {batch_rows} rows "
            f"started{ahead or ' now'} would finish {shortfall_s * 1e3:.3f} ms after it"
        )
