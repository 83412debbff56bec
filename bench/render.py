"""The benchmark report rendered: the terminal table, the JSON file and the search plot.

The last step of `neuronserve bench`: it formats the typed report (document.BenchReport and the
records it holds) and writes its JSON form (BenchReport.to_dict()); it measures nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from neuronserve.bench.document import BenchReport
from neuronserve.bench.limits import Skipped
from neuronserve.bench.loadgen import LoadResult
from neuronserve.bench.report import SIM_DEVICE, Comparison, Measured
from neuronserve.bench.runs import ServerRuns
from neuronserve.bench.search import SearchStep


def _ms(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def run_lines(run: LoadResult, pairs_per_request: int) -> list[str]:
    """The table for one load run: errors by status, each with its latency (p50, p99, max; the rest is in the JSON)."""
    lat = run.latency_ms
    errors = ", ".join(f"{k} {v}" for k, v in run.errors.items()) or "none"
    if run.offered_rate_per_s:
        warmup = f"after {run.warmup_s:g} s of warm-up, excluded" if run.warmup_s else "no warm-up"
        offered = f"{run.offered_rate_per_s:.1f}/s: {run.sent} sends scheduled in the {run.duration_s:g} s measured window ({run.sent / run.duration_s:.1f}/s), {warmup}"
    else:
        offered = f"closed loop, {run.duration_s:g} s measured"
    lines = [
        f"  offered rate      {offered}",
        f"  achieved rate     {run.achieved_rate_per_s:.1f}/s  ({run.achieved_rate_per_s * pairs_per_request:,.0f} pairs/s)",
        f"  requests          sent {run.sent}  ok {run.ok}  errors: {errors}",
        "  latency ms        " + "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max")),
    ]
    for status, dist in run.error_latency_ms.items():
        lines.append(f"  error latency ms  {status}: p50 {_ms(dist.p50)}  p99 {_ms(dist.p99)}  max {_ms(dist.max)}")
    lines.append(
        f"  late sends        {run.late_sends} later than {run.late_threshold_ms:g} ms  (p99 {_ms(run.late_p99_ms)} ms, max {_ms(run.late_max_ms)} ms)"
    )
    return lines


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _measured_lines(measured: Measured, pairs_per_request: int) -> list[str]:
    """One run's result, server batches, CPU and memory."""
    lines = run_lines(measured.result, pairs_per_request)
    stats, cpu, memory = measured.batches, measured.cpu, measured.memory
    if stats:
        on_loop = "" if stats.on_loop is None else f", {100 * stats.on_loop:.0f}% on the event loop"
        lines.append(
            f"  server batches    {stats.executions:.0f} runs, {stats.avg_batch_rows:.1f} rows/run{on_loop}; per request: queue {_ms(stats.avg_queue_ms)} ms, compute {_ms(stats.avg_compute_ms)} ms"
        )
    if measured.device and measured.device.fraction is not None:
        device = measured.device
        lines.append(
            f"  device busy       {100 * device.fraction:.1f}% of {device.cores} simulated cores' time from the window's start to the last reply"
            f" ({device.device_s:.2f} device s in {device.wall_s:.2f} s; {SIM_DEVICE} from --metrics-url)"
        )
    if cpu:
        lines.append(
            f"  server CPU        {_ms(cpu.ms_per_request)} ms per request ({cpu.seconds:.2f} s for {cpu.requests} requests; {cpu.source})"
        )
    if memory:
        lines.append(
            f"  server RSS        {_mib(memory.before_bytes)} MiB at the window's start, {_mib(memory.after_bytes)} MiB after the last reply"
            f" ({(memory.after_bytes - memory.before_bytes) / 2**20:+.1f} MiB; {memory.source})"
        )
    if measured.steal_pct is not None:
        lines.append(
            f"  CPU steal         {measured.steal_pct:.1f}% of this machine's CPU time in the window (the hypervisor's)"
        )
    return lines


def sequence_lines(runs: Sequence[Measured]) -> list[str]:
    """One line per run of a --rate list, in order: the overload recipe at a glance."""
    lines = ["  run  offered/s  achieved/s    ok %   p50 ms   p99 ms  errors  error p99 ms  RSS MiB before -> after"]
    for i, run in enumerate(runs, 1):
        res, memory = run.result, run.memory
        lat = res.latency_ms
        error_p99 = max((d.p99 for d in res.error_latency_ms.values() if not math.isnan(d.p99)), default=None)
        rss = f"{_mib(memory.before_bytes)} -> {_mib(memory.after_bytes)}" if memory else "-"
        ok_pct = f"{100.0 * res.ok / res.sent:.1f}" if res.sent else "-"
        lines.append(
            f"  {i:>3}  {res.offered_rate_per_s:>9.1f}  {res.achieved_rate_per_s:>10.1f}  {ok_pct:>6}  {_ms(lat['p50']):>7}  {_ms(lat['p99']):>7}"
            f"  {res.failed:>6}  {_ms(error_p99):>12}  {rss}"
        )
    return lines


def _server_lines(server: ServerRuns, pairs_per_request: int) -> list[str]:
    """Search steps, result(s), server batches, CPU and memory of one server (the target, or the reference)."""
    lines = []
    search = server.search
    if search:
        lines.append(f"  search rule       {search.found.rule}")
        lines.append("  step  offered/s  achieved/s   p50 ms   p99 ms  p99.9 ms  errors  late  pass")
        for i, step in enumerate(search.found.steps, 1):
            res = step.result
            lat = res.latency_ms
            lines.append(
                f"  {i:>4}  {res.offered_rate_per_s:>9.1f}  {res.achieved_rate_per_s:>10.1f}  {_ms(lat['p50']):>7}  {_ms(lat['p99']):>7}  {_ms(lat['p99.9']):>8}"
                f"  {res.failed:>6}  {res.late_sends:>4}  {'yes' if step.passed else 'no'}"
            )
        best = search.best_rate_per_s
        lines.append(
            f"highest rate meeting P99 <= {search.latency_bound_ms:g} ms: {best:.1f} req/s"
            if best
            else f"no rate tried met P99 <= {search.latency_bound_ms:g} ms"
        )
    if server.runs:
        for i, run in enumerate(server.runs, 1):
            lines.append(
                f"run {i} of {len(server.runs)}: {run.result.offered_rate_per_s:.1f}/s"
                + (f", right after run {i - 1}" if i > 1 else "")
            )
            lines.extend(_measured_lines(run, pairs_per_request))
        lines.append(f"the {len(server.runs)} runs in order, each right after the one before")
        lines.extend(sequence_lines(server.runs))
    elif server.measured:
        lines.append("result" + (" (at the highest passing rate)" if search else ""))
        lines.extend(_measured_lines(server.measured, pairs_per_request))
    return lines


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def comparison_lines(cmp: Comparison) -> list[str]:
    """The ratios of neuronserve against the reference server."""
    rates = (
        f"{cmp.served_rate_per_s:.1f} vs {cmp.reference_served_rate_per_s:.1f} req/s"
        if cmp.served_rate_per_s and cmp.reference_served_rate_per_s
        else "no value on one side"
    )
    lines = [
        f"neuronserve / {cmp.reference} server",
        f"  served rate       {_times(cmp.served_ratio)}  ({rates}; {cmp.basis})",
    ]
    if cmp.p50_ratio is not None or cmp.p99_ratio is not None:
        lines.append(f"  latency           p50 {_times(cmp.p50_ratio)}  p99 {_times(cmp.p99_ratio)}")
    cpu_text = f"{_ms(cmp.cpu_ms_per_request)} vs {_ms(cmp.reference_cpu_ms_per_request)} ms"
    lines.append(
        f"  CPU per request   {_times(cmp.cpu_ratio)}  ({cpu_text}{'' if cmp.cpu_ms_per_request is not None else '; neuronserve CPU needs --metrics-url'})"
    )
    if cmp.note:
        lines.append(f"  note              {cmp.note}")
    return lines


def round_lines(rounds: Sequence[Comparison]) -> list[str]:
    """Each round's ratios, when there are several (the medians are printed above)."""
    if len(rounds) < 2:
        return []
    lines = ["  rounds            served   p50      p99      CPU per request (order: target first in odd rounds)"]
    for number, cmp in enumerate(rounds, 1):
        ratios = (cmp.served_ratio, cmp.p50_ratio, cmp.p99_ratio, cmp.cpu_ratio)
        lines.append(f"  {number:>5}             " + "  ".join(f"{_times(r):7s}" for r in ratios).rstrip())
    return lines


def table(report: BenchReport) -> str:
    """The report as the terminal table: the target's runs, the reference and the ratios if any, the limits."""
    wl, header = report.workload, report.header
    pairs = wl.pairs_per_request
    lines = [
        f"neuronserve bench: {wl.spec.name} against {header.target} ({pairs} pairs/request, {header.clients} client processes)"
    ]
    lines.extend(_server_lines(report.target, pairs))
    reference = report.reference
    if reference:
        lines.append(f"reference: {reference.server} server at {reference.target} ({reference.how})")
        lines.extend(_server_lines(reference.runs, pairs))
        lines.extend(comparison_lines(reference.comparison))
        lines.extend(round_lines(reference.rounds))
    served = "the highest achieved rate of the runs" if report.target.runs else "neuronserve's served rate"
    lines.append(f"limits (served = {served})")
    for limit, label in ((report.compute, "compute limit"), (report.transport, "transport limit")):
        if isinstance(limit, Skipped):
            lines.append(f"  {label:<17} skipped: {limit.reason}")
            continue
        frac = limit.served_fraction(report.served_rate_per_s)
        frac_text = f"; served = {frac:.0%} of it" if frac is not None else ""
        lines.append(
            f"  {label:<17} {limit.requests_per_s:.1f} req/s ({limit.pairs_per_s:,.0f} pairs/s; {limit.how}){frac_text}"
        )
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(_finite(report), handle, indent=2, allow_nan=False)
        handle.write("\n")


def _finite(value):
    """NaN (no sample) becomes null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def plot_search(steps: Sequence[SearchStep], bound_ms: float, path: str, title: str | None = None) -> None:
    """Latency percentiles against offered rate, one point per search step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(steps, key=lambda s: s.result.offered_rate_per_s)
    rates = [s.result.offered_rate_per_s for s in ordered]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        ax.plot(rates, [s.result.latency_ms[key] for s in ordered], marker="o", label=key)
    ax.axhline(bound_ms, color="red", linestyle="--", label=f"bound {bound_ms:g} ms")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
