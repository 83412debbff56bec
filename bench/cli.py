"""`neuronserve bench`: measure a running server from outside, over gRPC only.

The command that wires the benchmark: workloads.py builds the requests, loadgen.py sends them
open-loop, search.py picks the rates, limits.py measures the model and gRPC alone, plain.py is the
reference server of `--reference plain` (measured the same way, right after the target), report.py
compares, prints and writes the results. Imports nothing heavy until the command runs.

    neuronserve bench --target 127.0.0.1:8001 --workload score --rate 500 --duration-s 20
    neuronserve bench --target 127.0.0.1:8001 --rate 750,1800,4500,750 --duration-s 20 --timeout-ms 100 \
        --metrics-url http://127.0.0.1:8002/metrics       # half capacity, 1.2x, 3x, half again
    neuronserve bench --target 127.0.0.1:8001 --search --latency-bound-ms 100 --artifact ART \\
        --metrics-url http://127.0.0.1:8002/metrics --json out.json --plot out.png
    neuronserve bench --target 127.0.0.1:8001 --rate 800 --artifact ART --reference plain \\
        --metrics-url http://127.0.0.1:8002/metrics
"""

from __future__ import annotations

import argparse
import os
import sys

BENCH_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="open-loop gRPC benchmark of a running server (fixed rate, or a search for the highest rate under a P99 bound)",
        description="Open-loop load (latency from the scheduled send time), HdrHistogram percentiles, server batch statistics, compute and transport limits.",
    )
    p.add_argument("--target", required=True, help="HOST:PORT of the gRPC server")
    p.add_argument("--workload", default="score", choices=("score", "score-ids", "matrix", "oip"))
    p.add_argument(
        "--peers",
        type=int,
        default=None,
        help="M peers per request (default: 128 for score/oip, 1000 for score-ids/matrix)",
    )
    p.add_argument("--users", type=int, default=16, help="N users per matrix request (default 16)")
    p.add_argument("--model", default="twotower", help="the OIP model name (metadata and the oip workload)")
    mode = p.add_argument_group("mode")
    mode.add_argument(
        "--rate",
        default=None,
        metavar="R[,R...]",
        help="fixed offered rate, requests/s; several (e.g. 1800,4500,750: overload, then half capacity) run in that order "
        "against the same server, each right after the one before, each reported on its own",
    )
    mode.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per run (default 10)")
    mode.add_argument(
        "--warmup-s",
        type=float,
        default=2.0,
        help="seconds of load before the measured window, excluded (default 2; with several --rate values, before the first only)",
    )
    mode.add_argument("--arrival", default="poisson", choices=("poisson", "constant"))
    mode.add_argument(
        "--search", action="store_true", help="find the highest rate whose P99 stays under --latency-bound-ms"
    )
    mode.add_argument("--latency-bound-ms", type=float, default=100.0)
    mode.add_argument("--search-start-rate", type=float, default=100.0)
    mode.add_argument("--search-max-steps", type=int, default=12)
    mode.add_argument("--search-max-s", type=float, default=600.0, help="time budget of the whole search")
    mode.add_argument(
        "--search-precision",
        type=float,
        default=0.05,
        help="stop bisecting when pass and fail rates are this close (fraction)",
    )
    client = p.add_argument_group("client")
    client.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    client.add_argument("--channels", type=int, default=2, help="gRPC connections per client process (default 2)")
    client.add_argument("--timeout-ms", type=float, default=1000.0, help="per-request deadline (default 1000)")
    client.add_argument(
        "--late-ms", type=float, default=2.0, help="a send this much behind schedule counts as late (default 2)"
    )
    client.add_argument("--seed", type=int, default=0)
    limits = p.add_argument_group("limits and output")
    limits.add_argument(
        "--metrics-url", default=None, help="the server's Prometheus endpoint, e.g. http://127.0.0.1:8002/metrics"
    )
    limits.add_argument(
        "--artifact", default=None, help="artifact directory for the compute limit (skipped without it)"
    )
    limits.add_argument("--compute-backend", default="cpu", help="backend for the compute limit (default cpu)")
    limits.add_argument("--limit-s", type=float, default=3.0, help="seconds for each limit measurement (default 3)")
    limits.add_argument("--no-limits", action="store_true", help="skip the compute and transport limits")
    limits.add_argument(
        "--reference",
        default=None,
        choices=("plain",),
        help="also start a plain server on --artifact (the model once per request on its event loop, no batching), run the same "
        "measurement against it and report the target's result as a ratio of it (score and oip workloads)",
    )
    limits.add_argument("--json", default=None, help="write the report as JSON here")
    limits.add_argument(
        "--plot", default=None, help="write a PNG of latency percentiles against offered rate here (search)"
    )
    limits.add_argument("--quiet", action="store_true", help="no progress display on stderr")
    p.set_defaults(func=run)
    return p


def parse_rates(text: str | None) -> tuple[float, ...]:
    """`--rate R[,R...]` -> the rates in order (empty for None); a ConfigError naming what is wrong."""
    from neuronserve.errors import ConfigError

    if text is None:
        return ()
    try:
        rates = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"--rate {text!r}: give requests/s, or several separated by commas, e.g. 1800,4500,750"
        ) from None
    if not all(0 < rate < float("inf") for rate in rates):
        raise ConfigError(f"--rate must be > 0 (each of a list), got {text}")
    return rates


def check_outputs(args: argparse.Namespace, rates: tuple[float, ...] = ()) -> None:
    """What would otherwise fail only after the whole run (and lose it): checked before any load."""
    from urllib.parse import urlsplit

    from neuronserve.errors import ConfigError

    if args.metrics_url:
        try:
            url = urlsplit(args.metrics_url)
            _ = url.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise ConfigError(
                f"--metrics-url {args.metrics_url!r} is not a URL ({exc}); e.g. http://127.0.0.1:8002/metrics"
            ) from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(
                f"--metrics-url {args.metrics_url!r} is not an http URL; e.g. http://127.0.0.1:8002/metrics"
            )
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            raise ConfigError(f"{flag} {path}: directory {parent} does not exist or is not writable")
    if not args.no_limits and args.limit_s <= 0:
        raise ConfigError(f"--limit-s must be > 0, got {args.limit_s} (or pass --no-limits)")
    if args.reference:
        if not args.artifact:
            raise ConfigError("--reference plain needs --artifact (the plain server serves that artifact)")
        if args.workload not in ("score", "oip"):
            raise ConfigError(f"--reference plain serves the score and oip workloads, not {args.workload}")
        if len(rates) > 1:
            raise ConfigError("--reference plain compares one run: give one --rate (or --search), not a list")
    if args.artifact and (args.reference or not args.no_limits):
        from neuronserve.artifact import load_manifest

        manifest = load_manifest(args.artifact, verify=True)  # a wrong --artifact is an error now, not after the load
        if args.reference and manifest.target != "cpu":
            raise ConfigError(
                f"--reference plain runs --target cpu artifacts; {args.artifact} is a {manifest.target} artifact"
            )


def run(args: argparse.Namespace) -> int:
    import platform
    import time

    from neuronserve.bench import limits, report
    from neuronserve.bench.loadgen import LoadSpec, run_load, stderr_progress
    from neuronserve.bench.search import search_rate
    from neuronserve.bench.workloads import DEFAULT_PEERS, WorkloadSpec, prepare_workload
    from neuronserve.errors import ConfigError

    if args.search == (args.rate is not None):
        raise ConfigError(
            "give either --rate R[,R...] (fixed-rate runs) or --search (find the highest rate under --latency-bound-ms)"
        )
    rates = parse_rates(args.rate)
    check_outputs(args, rates)
    progress = None if args.quiet else stderr_progress
    peers = args.peers or DEFAULT_PEERS[args.workload]
    workload_spec = WorkloadSpec(name=args.workload, peers=peers, users=args.users, model=args.model, seed=args.seed)
    workload = prepare_workload(args.target, workload_spec)

    def measured_run(
        target: str, rate: float, metrics_url: str | None, pid: int | None, say, warmup_s: float
    ) -> report.Measured:
        """One open-loop run; server batches, CPU and memory read at the window's start and after the last reply."""
        spec = LoadSpec(
            target=target,
            method=workload.method,
            payloads=workload.payloads,
            duration_s=args.duration_s,
            warmup_s=warmup_s,
            rate_per_s=rate,
            arrival=args.arrival,
            clients=args.clients,
            channels=args.channels,
            timeout_ms=args.timeout_ms,
            late_ms=args.late_ms,
            seed=args.seed,
        )
        before: dict[str, float] = {}
        pid_start = []  # (cpu seconds, rss bytes) at the window's start

        def snapshot() -> None:
            if metrics_url:
                before.update(report.scrape_metrics(metrics_url))
            if pid:
                pid_start.append((report.process_cpu_seconds(pid), report.process_rss_bytes(pid)))

        if say:
            say(f"offered rate {rate:.1f}/s: {warmup_s:g} s warm-up + {args.duration_s:g} s measured")
        result = run_load(spec, progress=say, on_window_start=snapshot)
        stats = cpu = memory = None
        if metrics_url:
            after = report.scrape_metrics(metrics_url)
            stats, cpu, memory = (
                report.batch_stats(before, after),
                report.metrics_cpu(before, after, result.sent),
                report.metrics_memory(before, after),
            )
        if pid:
            cpu_s, rss = pid_start[0]
            cpu = report.ServerCpu(report.process_cpu_seconds(pid) - cpu_s, result.sent, f"psutil, pid {pid}")
            memory = report.ServerMemory(rss, report.process_rss_bytes(pid), f"psutil, pid {pid}")
        return report.Measured(result, stats, cpu, memory)

    def measure(
        target: str, metrics_url: str | None, pid: int | None, say
    ) -> tuple[dict, report.Measured | None, bool]:
        """The fixed-rate run(s) or the search against one server: its report section, the run to compare
        (for a --rate list, the one with the highest achieved rate: what the limits are set against),
        and whether a search passed every step (never found the bound)."""
        section: dict = {}
        never_failed = False
        if args.search:
            by_rate: dict[float, report.Measured] = {}

            def step(rate: float):
                by_rate[rate] = measured_run(target, rate, metrics_url, pid, say, args.warmup_s)
                return by_rate[rate].result

            def on_step(s) -> None:
                if say:
                    lat = s.result.latency_ms
                    say(
                        f"step {s.rate_per_s:.1f}/s: p99 {lat['p99']:.1f} ms, errors {s.result.failed}, late {s.result.late_sends} -> {'pass' if s.passed else 'fail'}"
                    )

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
            section["search"] = {
                "latency_bound_ms": args.latency_bound_ms,
                "rule": found.rule,
                "best_rate_per_s": best.rate_per_s if best else None,
                "steps": [dict(s.result.to_dict(), passed=s.passed) for s in found.steps],
            }
            measured = by_rate[best.rate_per_s] if best else None
            never_failed = all(s.passed for s in found.steps)
        elif len(rates) > 1:  # in order, back to back: only the first has a warm-up
            runs = [
                measured_run(target, rate, metrics_url, pid, say, args.warmup_s if i == 0 else 0.0)
                for i, rate in enumerate(rates)
            ]
            section["runs"] = [m.section(workload.pairs_per_request) for m in runs]
            return section, max(runs, key=lambda m: m.result.achieved_rate_per_s), False
        else:
            measured = measured_run(target, rates[0], metrics_url, pid, say, args.warmup_s)
        if measured:
            section.update(measured.section(workload.pairs_per_request))
        else:
            section.update(result=None, server_batches=None, server_cpu=None, server_memory=None)
        return section, measured, never_failed

    out = {
        "date": time.strftime(BENCH_DATE_FORMAT),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "target": args.target,
        "clients": args.clients,
        "channels_per_client": args.channels,
        "timeout_ms": args.timeout_ms,
        "arrival": args.arrival,
        "workload": workload.describe(),
        "mode": "search" if args.search else "fixed-rate" if len(rates) == 1 else "rate-sequence",
    }
    section, measured, never_failed = measure(args.target, args.metrics_url, None, progress)
    out.update(section)
    if args.reference:
        from neuronserve.bench.plain import HOW, PlainServer

        if progress:
            progress(f"reference: starting the {args.reference} server on {args.artifact}")
        say = (lambda line: progress(f"[{args.reference}] {line}")) if progress else None
        with PlainServer(args.artifact, args.model) as plain:
            if prepare_workload(plain.target, workload_spec).payloads != workload.payloads:
                raise ConfigError(
                    f"--reference: the model of --artifact {args.artifact} has other feature sizes than the target's; give the target's artifact"
                )
            ref_section, ref_measured, ref_never_failed = measure(plain.target, None, plain.pid, say)
        out["reference"] = {
            "server": args.reference,
            "target": plain.target,
            "pid": plain.pid,
            "how": HOW,
            **ref_section,
        }
        unbounded = [name for name, flag in (("neuronserve", never_failed), (args.reference, ref_never_failed)) if flag]
        comparison = report.compare(
            args.reference, measured, ref_measured, args.latency_bound_ms if args.search else None, unbounded
        )
        out["versus_reference"] = comparison.to_dict()
    served = measured.result.achieved_rate_per_s if measured else None
    out["limits"] = {}
    if args.no_limits:
        out["limits"] = {"compute": {"skipped": "--no-limits"}, "transport": {"skipped": "--no-limits"}}
    else:
        if progress:
            progress("measuring the compute limit and the transport limit")
        if args.artifact:
            out["limits"]["compute"] = limits.compute_limit(
                args.artifact, workload, seconds=args.limit_s, backend=args.compute_backend
            ).to_dict(served)
        else:
            out["limits"]["compute"] = {"skipped": "no --artifact given"}
        out["limits"]["transport"] = limits.transport_limit(
            workload, seconds=args.limit_s, clients=args.clients, channels=args.channels
        ).to_dict(served)
    print(report.table(out), flush=True)
    if args.json:
        report.write_json(out, args.json)
    if args.plot:
        if args.search:
            report.plot_search(
                out["search"]["steps"], args.latency_bound_ms, args.plot, title=f"{args.workload} against {args.target}"
            )
        else:
            print(
                "neuronserve bench: --plot needs --search (a plot of one rate says nothing); no plot written",
                file=sys.stderr,
            )
    return 0
