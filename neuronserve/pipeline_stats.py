"""The pipeline's counts as Pipeline.stats() returns them, per core group and per stage: what the
metrics read at scrape (metric_sources.pipeline_samples)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GroupStats:
    cores: str  # NEURON_RT_VISIBLE_CORES syntax
    stages: tuple[str, ...]
    executions: int
    inline_executions: int  # of them, run on the event loop (the cpu backend's launcher at low load)
    busy_s: float  # wall seconds spent in runner.run
    faults: int
    healthy: bool


@dataclass
class StageStats:
    """A stage's counts: the pipeline's running ones (loop thread only), and the copies stats() returns."""

    executions: int = 0
    rows: int = 0  # caller rows
    padded_rows: int = 0  # padding rows added to reach compiled buckets


@dataclass(frozen=True)
class PipelineStats:
    stages: dict[str, StageStats]
    groups: tuple[GroupStats, ...]

    @property
    def faults(self) -> int:
        return sum(g.faults for g in self.groups)
