"""How a batch of rows is cut into executions at the compiled buckets: the cheapest cover.

A leaf of the pipeline: given each bucket's measured device time, the chunks covering r rows at least
total time, for every r up to a limit, computed once at start-up (a table lookup per batch after).
"""

from __future__ import annotations

import numpy as np

from neuronserve.backends.base import FusedRunner, Runner, StageRunner
from neuronserve.execution import timed_run


def plan_table(buckets: tuple[int, ...], cost_s: dict[int, float], limit: int) -> list[tuple[int, ...]]:
    """table[r] = the chunks (bucket sizes) covering r rows at least total device time, for r <= limit.

    Dynamic programming over the bucket costs: best(r) = min over buckets b of cost(b) + best(r - b),
    with best(r <= 0) = 0, i.e. the last chunk is padded up. Ties go to fewer chunks, then fewer rows.
    """
    best: list[tuple[float, int, int]] = [(0.0, 0, 0)] * (limit + 1)
    table: list[tuple[int, ...]] = [()] * (limit + 1)
    for rows in range(1, limit + 1):
        options = []
        for b in buckets:
            cost, chunks, total = best[max(rows - b, 0)]
            options.append(((cost + cost_s[b], chunks + 1, total + b), b))
        key, b = min(options)
        best[rows] = key
        table[rows] = (b,) + table[max(rows - b, 0)]
    return table


class BucketPlan:
    """One stage's plan: its compiled buckets and their device seconds -> the chunks for any row count.

    any_rows: the stage's graph runs any row count as it is (a host graph, Runner.any_rows), so chunks
    are exact, never padded: as few as the widest efficient bucket allows (exact_rows_cap), of near-equal
    rows. Costs (the batcher's estimates) stay those of the padded plan, an upper bound."""

    def __init__(self, buckets: tuple[int, ...], cost_s: dict[int, float], any_rows: bool = False) -> None:
        self.buckets = tuple(sorted(buckets))
        self.cost_s = cost_s
        self.any_rows = any_rows
        self._table = plan_table(self.buckets, cost_s, 2 * self.buckets[-1])
        self.exact_cap = exact_rows_cap(self.buckets, cost_s)  # any_rows: the most rows of one execution

    def plan(self, rows: int) -> tuple[int, ...]:
        """Buckets for `rows`: full largest buckets while more than two of them remain, then the cheapest
        cover of the rest (plan_table): pad up when one bigger bucket costs less device time than
        splitting, split when it does not (e.g. 513 rows -> 512 + 1, not 1024)."""
        largest = self.buckets[-1]
        full = max(0, rows - largest) // largest
        return (largest,) * full + self._table[rows - full * largest]

    def chunks(self, rows: int) -> tuple[tuple[int, int], ...]:
        """(rows, bucket) of every execution covering `rows` rows, in order (any_rows: bucket == rows)."""
        if self.any_rows:
            count = -(-rows // self.exact_cap)
            return tuple((size, size) for size in (rows // count + (i < rows % count) for i in range(count)))
        chunks, start = [], 0
        for bucket in self.plan(rows):
            chunks.append((min(bucket, rows - start), bucket))
            start += bucket
        return tuple(chunks)

    def total_cost_s(self, rows: int) -> float:
        return sum(self.cost_s[b] for b in self.plan(rows))


def exact_rows_cap(buckets: tuple[int, ...], cost_s: dict[int, float], slack: float = 1.1) -> int:
    """The most rows an unpadded execution takes: the largest bucket whose measured seconds per row are
    within `slack` of the best bucket's (fewer executions cost less host time; a too-wide one spills
    the caches, e.g. the demo model at 1,024 rows costs 1.3x per row what it does at 512)."""
    best = min(cost_s[b] / b for b in buckets)
    return max(b for b in buckets if cost_s[b] / b <= slack * best)


def bucket_cost_s(runner: Runner, batch_size: int) -> float:
    """Device seconds of one execution at `batch_size`: the backend's model (sim), else the best of 3
    timed runs (a noisy host only adds time). The fused stage is costed with its fewest user rows."""
    if isinstance(runner, FusedRunner):
        users = runner.user_batch_sizes(batch_size)[0]
        modelled = runner.latency_s(batch_size, users)
        inputs = list(runner.zero_inputs(batch_size, users))
    else:
        assert isinstance(runner, StageRunner)
        modelled = runner.latency_s(batch_size)
        inputs = [np.zeros((batch_size,) + shape, dtype=np.float32) for shape in runner.input_shapes()]
    if modelled is not None:
        return modelled
    return min(timed_run(runner, inputs)[1] for _ in range(3))


def measured_plan(runner: Runner, known: BucketPlan | None = None) -> BucketPlan:
    """`runner`'s plan: `known` (measured on graphs of the same shapes) when it has the same buckets,
    else every bucket costed (timed on a host: CPU beside served traffic, which a version load avoids)."""
    if known is not None and known.buckets == tuple(sorted(runner.batch_sizes)) and known.any_rows == runner.any_rows:
        return known
    return BucketPlan(runner.batch_sizes, {b: bucket_cost_s(runner, b) for b in runner.batch_sizes}, runner.any_rows)
