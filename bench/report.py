"""The benchmark's report: server metrics deltas, the terminal table, JSON and the search plot.

The last step of `neuronserve bench`, outside the server's request path. The server's batch
statistics come from its Prometheus endpoint (Triton's metric names, `nv_inference_*`), read
before and after the measured window; only their difference is reported. Everything else comes
from the load generator's results (loadgen.LoadResult) and the limits (limits.py).
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Optional

from neuronserve.errors import Unavailable

TRITON_PREFIX = "nv_"


def scrape_metrics(url: str, timeout_s: float = 5.0) -> Dict[str, float]:
    """Every `nv_*` sample of a Prometheus text page, summed over its label sets (histogram buckets skipped)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError, InvalidURL: a malformed URL
        raise Unavailable(f"--metrics-url {url}: cannot read metrics ({type(exc).__name__}: {exc})") from None
    totals: Dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(TRITON_PREFIX):
            continue
        name, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        fields = rest[rest.rindex("}") + 1 :].split() if "{" in line else rest.split()
        if name.endswith("_bucket"):
            continue
        try:
            value = float(fields[0])  # a trailing timestamp, if any, is ignored
        except (IndexError, ValueError):
            continue
        totals[name] = totals.get(name, 0.0) + value
    return totals


@dataclass(frozen=True)
class BatchStats:
    """What the server did during the measured window (deltas of its counters)."""

    requests: float  # nv_inference_request_success
    executions: float  # nv_inference_exec_count: batches run
    inferences: float  # nv_inference_count: rows run, summed over batches
    avg_batch_rows: float
    avg_queue_ms: float  # per successful request
    avg_compute_ms: float  # per successful request
    counters: Dict[str, float]  # every nv_* delta, as read

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "counters"} | {"counters": self.counters}


def batch_stats(before: Dict[str, float], after: Dict[str, float]) -> BatchStats:
    delta = {name: after[name] - before.get(name, 0.0) for name in sorted(after)}
    requests = delta.get("nv_inference_request_success", 0.0)
    executions = delta.get("nv_inference_exec_count", 0.0)
    inferences = delta.get("nv_inference_count", 0.0)
    return BatchStats(
        requests=requests,
        executions=executions,
        inferences=inferences,
        avg_batch_rows=inferences / executions if executions else math.nan,
        avg_queue_ms=delta.get("nv_inference_queue_duration_us", 0.0) / requests / 1000.0 if requests else math.nan,
        avg_compute_ms=delta.get("nv_inference_compute_infer_duration_us", 0.0) / requests / 1000.0 if requests else math.nan,
        counters=delta,
    )


def _ms(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def run_lines(run: dict, pairs_per_request: int) -> List[str]:
    """The table for one load run (a dict from LoadResult.to_dict)."""
    lat = run["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in run["errors"].items()) or "none"
    if run["offered_rate_per_s"]:
        offered = f"{run['offered_rate_per_s']:.1f}/s: {run['sent']} sends scheduled in the {run['duration_s']:g} s measured window ({run['sent'] / run['duration_s']:.1f}/s), warm-up excluded"
    else:
        offered = f"closed loop, {run['duration_s']:g} s measured"
    return [
        f"  offered rate      {offered}",
        f"  achieved rate     {run['achieved_rate_per_s']:.1f}/s  ({run['achieved_rate_per_s'] * pairs_per_request:,.0f} pairs/s)",
        f"  requests          sent {run['sent']}  ok {run['ok']}  errors: {errors}",
        "  latency ms        " + "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max")),
        f"  late sends        {run['late_sends']} later than {run['late_threshold_ms']:g} ms  (p99 {_ms(run['late_p99_ms'])} ms, max {_ms(run['late_max_ms'])} ms)",
    ]


def table(report: dict) -> str:
    wl = report["workload"]
    lines = [f"neuronserve bench: {wl['workload']} against {report['target']} ({wl['pairs_per_request']} pairs/request, {report['clients']} client processes)"]
    if report.get("search"):
        search = report["search"]
        lines.append(f"  search rule       {search['rule']}")
        lines.append("  step  offered/s  achieved/s   p50 ms   p99 ms  p99.9 ms  errors  late  pass")
        for i, step in enumerate(search["steps"], 1):
            lat = step["latency_ms"]
            lines.append(
                f"  {i:>4}  {step['offered_rate_per_s']:>9.1f}  {step['achieved_rate_per_s']:>10.1f}  {_ms(lat['p50']):>7}  {_ms(lat['p99']):>7}  {_ms(lat['p99.9']):>8}"
                f"  {sum(step['errors'].values()):>6}  {step['late_sends']:>4}  {'yes' if step['passed'] else 'no'}"
            )
        best = search["best_rate_per_s"]
        lines.append(
            f"highest rate meeting P99 <= {search['latency_bound_ms']:g} ms: {best:.1f} req/s" if best else f"no rate tried met P99 <= {search['latency_bound_ms']:g} ms"
        )
    if report.get("result"):
        lines.append("result" + (" (at the highest passing rate)" if report.get("search") else ""))
        lines.extend(run_lines(report["result"], wl["pairs_per_request"]))
    stats = report.get("server_batches")
    if stats:
        lines.append(
            f"  server batches    {stats['executions']:.0f} runs, {stats['avg_batch_rows']:.1f} rows/run; per request: queue {_ms(stats['avg_queue_ms'])} ms, compute {_ms(stats['avg_compute_ms'])} ms"
        )
    limits = report.get("limits", {})
    for key, label in (("compute", "compute limit"), ("transport", "transport limit")):
        limit = limits.get(key)
        if not limit:
            continue
        if limit.get("skipped"):
            lines.append(f"  {label:<17} skipped: {limit['skipped']}")
            continue
        frac = limit.get("served_fraction")
        frac_text = f"; served = {frac:.0%} of it" if frac is not None else ""
        lines.append(f"  {label:<17} {limit['requests_per_s']:.1f} req/s ({limit['pairs_per_s']:,.0f} pairs/s; {limit['how']}){frac_text}")
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


def plot_search(steps: List[dict], bound_ms: float, path: str, title: Optional[str] = None) -> None:
    """Latency percentiles against offered rate, one point per search step (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(steps, key=lambda s: s["offered_rate_per_s"])
    rates = [s["offered_rate_per_s"] for s in ordered]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("p50", "p90", "p99", "p99.9", "max"):
        ax.plot(rates, [s["latency_ms"][key] for s in ordered], marker="o", label=key)
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
