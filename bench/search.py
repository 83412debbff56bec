"""The rate search: the highest offered rate whose P99 stays under a latency bound (MLPerf Server-like).

Drives the load generator (loadgen.run_load) step after step; outside the server's request path.
The rule, stated in every report (RULE):
- a step is one open-loop run at a fixed offered rate: warm-up, then a measured window;
- it passes when at most 1% of its measured requests failed or took longer than the bound, that is
  P99 over all requests, a failed request counting as slower than the bound, is <= the bound;
- the rate doubles from the start rate while steps pass (halves while the start rate fails), then
  bisects between the highest pass and the lowest fail until they are within `precision` of each
  other, the step limit is reached or the next step would overrun the time budget;
- the answer is the highest passing rate tried.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from neuronserve.bench.loadgen import LoadResult

RULE = (
    "pass = at most 1% of measured requests failed or exceeded the bound (P99, failures counted as over); "
    "rate x2 from the start while passing (/2 while the start fails), then bisect to {precision:.0%}; "
    "at most {max_steps} steps / {max_total_s:g} s"
)
MIN_RATE_PER_S = 1.0


@dataclass(frozen=True)
class SearchStep:
    rate_per_s: float
    result: LoadResult
    passed: bool


@dataclass(frozen=True)
class SearchResult:
    steps: tuple[SearchStep, ...]
    best: SearchStep | None  # the highest passing step; None when none passed
    rule: str


def step_passes(result: LoadResult, bound_ms: float) -> bool:
    total = result.ok + result.failed
    if total == 0:
        return False
    return result.failed + result.count_over_ms(bound_ms) <= 0.01 * total


def search_rate(
    run_step: Callable[[float], LoadResult],
    bound_ms: float,
    start_rate_per_s: float,
    step_s: float,
    max_steps: int = 12,
    max_total_s: float = 600.0,
    precision: float = 0.05,
    on_step: Callable[[SearchStep], None] | None = None,
) -> SearchResult:
    """`run_step(rate)` runs one step; `step_s` is its expected wall time (for the time budget)."""
    import time

    steps: list[SearchStep] = []
    started = time.monotonic()

    def budget_left() -> bool:
        return len(steps) < max_steps and time.monotonic() - started + step_s <= max_total_s

    def run(rate: float) -> bool:
        result = run_step(rate)
        step = SearchStep(rate, result, step_passes(result, bound_ms))
        steps.append(step)
        if on_step is not None:
            on_step(step)
        return step.passed

    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    rate = start_rate_per_s
    while budget_left() and hi is None:  # grow while passing
        if run(rate):
            lo, rate = rate, rate * 2.0
        else:
            hi = rate
    while budget_left() and lo is None and hi is not None and hi / 2.0 >= MIN_RATE_PER_S:  # the start failed: shrink
        rate = hi / 2.0
        if run(rate):
            lo = rate
        else:
            hi = rate
    while budget_left() and lo is not None and hi is not None and (hi - lo) > precision * hi:  # bisect
        mid = (lo + hi) / 2.0
        if run(mid):
            lo = mid
        else:
            hi = mid
    passing = [s for s in steps if s.passed]
    best = max(passing, key=lambda s: s.rate_per_s) if passing else None
    return SearchResult(
        tuple(steps), best, RULE.format(precision=precision, max_steps=max_steps, max_total_s=max_total_s)
    )
