"""`neuronserve bench`: measure a running server from outside, over gRPC only.

The command that wires the benchmark: workloads.py builds the requests, loadgen.py sends them
open-loop, search.py picks the rates, limits.py measures the model and gRPC alone, report.py
prints and writes the results. Imports nothing heavy until the command runs.

    neuronserve bench --target 127.0.0.1:8001 --workload score --rate 500 --duration-s 20
    neuronserve bench --target 127.0.0.1:8001 --search --latency-bound-ms 100 --artifact ART \\
        --metrics-url http://127.0.0.1:8002/metrics --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

BENCH_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="open-loop gRPC benchmark of a running server (fixed rate, or a search for the highest rate under a P99 bound)",
        description="Open-loop load (latency from the scheduled send time), HdrHistogram percentiles, server batch statistics, compute and transport limits.",
    )
    p.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--workload", default="score", choices=("score", "score-ids", "matrix", "oip"))
    p.add_argument("--peers", type=int, default=None, help="M peers per request (default: 128 for score/oip, 1000 for score-ids/matrix)")
    p.add_argument("--users", type=int, default=16, help="N users per matrix request (default 16)")
    p.add_argument("--model", default="twotower", help="the OIP model name (metadata and the oip workload)")
    mode = p.add_argument_group("mode")
    mode.add_argument("--rate", type=float, default=None, help="fixed offered rate, requests/s")
    mode.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per run (default 10)")
    mode.add_argument("--warmup-s", type=float, default=2.0, help="seconds of load before each measured window, excluded (default 2)")
    mode.add_argument("--arrival", default="poisson", choices=("poisson", "constant"))
    mode.add_argument("--search", action="store_true", help="find the highest rate whose P99 stays under --latency-bound-ms")
    mode.add_argument("--latency-bound-ms", type=float, default=100.0)
    mode.add_argument("--search-start-rate", type=float, default=100.0)
    mode.add_argument("--search-max-steps", type=int, default=12)
    mode.add_argument("--search-max-s", type=float, default=600.0, help="time budget of the whole search")
    mode.add_argument("--search-precision", type=float, default=0.05, help="stop bisecting when pass and fail rates are this close (fraction)")
    client = p.add_argument_group("client")
    client.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    client.add_argument("--channels", type=int, default=2, help="gRPC connections per client process (default 2)")
    client.add_argument("--timeout-ms", type=float, default=1000.0, help="per-request deadline (default 1000)")
    client.add_argument("--late-ms", type=float, default=2.0, help="a send this much behind schedule counts as late (default 2)")
    client.add_argument("--seed", type=int, default=0)
    limits = p.add_argument_group("limits and output")
    limits.add_argument("--metrics-url", default=None, help="the server's Prometheus endpoint, e.g. http://127.0.0.1:8002/metrics")
    limits.add_argument("--artifact", default=None, help="artifact directory for the compute limit (skipped without it)")
    limits.add_argument("--compute-backend", default="cpu", help="backend for the compute limit (default cpu)")
    limits.add_argument("--limit-s", type=float, default=3.0, help="seconds for each limit measurement (default 3)")
    limits.add_argument("--no-limits", action="store_true", help="skip the compute and transport limits")
    limits.add_argument("--json", default=None, help="write the report as JSON here")
    limits.add_argument("--plot", default=None, help="write a PNG of latency percentiles against offered rate here (search)")
    limits.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=run)
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """What would otherwise fail only after the whole run (and lose it): checked before any load."""
    from urllib.parse import urlsplit

    from neuronserve.errors import ConfigError

    if args.metrics_url:
        try:
            url = urlsplit(args.metrics_url)
            url.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise ConfigError(f"--metrics-url {args.metrics_url!r} is not a URL ({exc}); e.g. http://127.0.0.1:8002/metrics") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"--metrics-url {args.metrics_url!r} is not an http URL; e.g. http://127.0.0.1:8002/metrics")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            raise ConfigError(f"{flag} {path}: directory {parent} does not exist or is not writable")
    if not args.no_limits:
        if args.limit_s <= 0:
            raise ConfigError(f"--limit-s must be > 0, got {args.limit_s} (or pass --no-limits)")
        if args.artifact:
            from neuronserve.artifact import load_manifest

            load_manifest(args.artifact, verify=True)  # a wrong --artifact is an error now, not after the load


def run(args: argparse.Namespace) -> int:
    import platform
    import time

    from neuronserve.bench import limits, report
    from neuronserve.bench.loadgen import LoadResult, LoadSpec, run_load, stderr_progress
    from neuronserve.bench.search import search_rate
    from neuronserve.bench.workloads import DEFAULT_PEERS, WorkloadSpec, prepare_workload
    from neuronserve.errors import ConfigError

    if args.search == (args.rate is not None):
        raise ConfigError("give either --rate R (a fixed-rate run) or --search (find the highest rate under --latency-bound-ms)")
    if args.rate is not None and args.rate <= 0:
        raise ConfigError(f"--rate must be > 0, got {args.rate}")
    check_outputs(args)
    progress = None if args.quiet else stderr_progress
    peers = args.peers or DEFAULT_PEERS[args.workload]
    workload = prepare_workload(args.target, WorkloadSpec(name=args.workload, peers=peers, users=args.users, model=args.model, seed=args.seed))

    def measured_run(rate: float) -> Tuple[LoadResult, Optional[report.BatchStats]]:
        spec = LoadSpec(
            target=args.target,
            method=workload.method,
            payloads=workload.payloads,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            rate_per_s=rate,
            arrival=args.arrival,
            clients=args.clients,
            channels=args.channels,
            timeout_ms=args.timeout_ms,
            late_ms=args.late_ms,
            seed=args.seed,
        )
        before = {}
        snapshot = (lambda: before.update(report.scrape_metrics(args.metrics_url))) if args.metrics_url else None
        if progress:
            progress(f"offered rate {rate:.1f}/s: {args.warmup_s:g} s warm-up + {args.duration_s:g} s measured")
        result = run_load(spec, progress=progress, on_window_start=snapshot)
        stats = report.batch_stats(before, report.scrape_metrics(args.metrics_url)) if args.metrics_url else None
        return result, stats

    out = {
        "date": time.strftime(BENCH_DATE_FORMAT),
        "machine": {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "target": args.target,
        "clients": args.clients,
        "channels_per_client": args.channels,
        "timeout_ms": args.timeout_ms,
        "arrival": args.arrival,
        "workload": workload.describe(),
    }
    if args.search:
        stats_by_rate = {}

        def step(rate: float) -> LoadResult:
            result, stats = measured_run(rate)
            stats_by_rate[rate] = stats
            return result

        def on_step(s) -> None:
            if progress:
                lat = s.result.latency_ms
                progress(f"step {s.rate_per_s:.1f}/s: p99 {lat['p99']:.1f} ms, errors {s.result.failed}, late {s.result.late_sends} -> {'pass' if s.passed else 'fail'}")

        found = search_rate(
            step,
            bound_ms=args.latency_bound_ms,
            start_rate_per_s=args.search_start_rate,
            step_s=args.warmup_s + args.duration_s + 3.0,
            max_steps=args.search_max_steps,
            max_total_s=args.search_max_s,
            precision=args.search_precision,
            on_step=on_step,
        )
        best = found.best
        out["search"] = {
            "latency_bound_ms": args.latency_bound_ms,
            "rule": found.rule,
            "best_rate_per_s": best.rate_per_s if best else None,
            "steps": [dict(s.result.to_dict(), passed=s.passed) for s in found.steps],
        }
        result = best.result if best else None
        stats = stats_by_rate.get(best.rate_per_s) if best else None
    else:
        result, stats = measured_run(args.rate)
    out["mode"] = "search" if args.search else "fixed-rate"
    out["result"] = result.to_dict() if result else None
    if result:
        out["result"]["pairs_per_s"] = round(result.achieved_rate_per_s * workload.pairs_per_request, 1)
    out["server_batches"] = stats.to_dict() if stats else None
    served = result.achieved_rate_per_s if result else None
    out["limits"] = {}
    if args.no_limits:
        out["limits"] = {"compute": {"skipped": "--no-limits"}, "transport": {"skipped": "--no-limits"}}
    else:
        if progress:
            progress("measuring the compute limit and the transport limit")
        if args.artifact:
            out["limits"]["compute"] = limits.compute_limit(args.artifact, workload, seconds=args.limit_s, backend=args.compute_backend).to_dict(served)
        else:
            out["limits"]["compute"] = {"skipped": "no --artifact given"}
        out["limits"]["transport"] = limits.transport_limit(workload, seconds=args.limit_s, clients=args.clients, channels=args.channels).to_dict(served)
    print(report.table(out), flush=True)
    if args.json:
        report.write_json(out, args.json)
    if args.plot:
        if args.search:
            report.plot_search(out["search"]["steps"], args.latency_bound_ms, args.plot, title=f"{args.workload} against {args.target}")
        else:
            print("neuronserve bench: --plot needs --search (a plot of one rate says nothing); no plot written", file=sys.stderr)
    return 0
