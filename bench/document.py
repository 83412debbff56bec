"""The bench report as one typed record: what cli.py assembles, render.py prints, and its JSON form.

Every part is a record of the module that measured it (runs.ServerRuns, report.Comparison,
limits.Limit / Skipped, workloads.Workload); `to_dict()` is the `--json` document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from neuronserve.bench.limits import Limit, Skipped
from neuronserve.bench.report import Comparison
from neuronserve.bench.runs import ServerRuns
from neuronserve.bench.workloads import Workload


@dataclass(frozen=True)
class Machine:
    nproc: int | None
    cpu: str
    python: str


@dataclass(frozen=True)
class Header:
    """When, on what machine, against what, with which client settings."""

    date: str
    machine: Machine
    target: str
    clients: int
    channels_per_client: int
    timeout_ms: float
    arrival: str
    mode: str  # search, fixed-rate or rate-sequence


@dataclass(frozen=True)
class Reference:
    """The reference server (`--reference plain|probe`), measured the same way, and neuronserve against it."""

    server: str
    target: str
    pid: int
    how: str
    runs: ServerRuns  # the first round's
    comparison: Comparison  # the only round's, or the medians of several (report.median_comparison)
    rounds: tuple[Comparison, ...] = ()  # every round's, in order (--rounds)


@dataclass(frozen=True)
class BenchReport:
    header: Header
    workload: Workload
    target: ServerRuns
    reference: Reference | None
    compute: Limit | Skipped
    transport: Limit | Skipped

    @property
    def served_rate_per_s(self) -> float | None:
        """What the limits are set against: the compared run's achieved rate."""
        measured = self.target.measured
        return measured.result.achieved_rate_per_s if measured else None

    def to_dict(self) -> dict:
        pairs = self.workload.pairs_per_request
        out = {**asdict(self.header), "workload": self.workload.describe(), **self.target.to_dict(pairs)}
        ref = self.reference
        if ref is not None:
            out["reference"] = {
                "server": ref.server,
                "target": ref.target,
                "pid": ref.pid,
                "how": ref.how,
                **ref.runs.to_dict(pairs),
            }
            out["versus_reference"] = ref.comparison.to_dict()
            if len(ref.rounds) > 1:
                out["versus_reference_rounds"] = [c.to_dict() for c in ref.rounds]
        served = self.served_rate_per_s
        out["limits"] = {"compute": self.compute.to_dict(served), "transport": self.transport.to_dict(served)}
        return out
