"""`neuronserve bench`: measure a running server from outside, over gRPC only.

The command that wires the benchmark: workloads.py builds the requests, runs.py measures one
server (loadgen.py sends the load open-loop, search.py picks the rates), limits.py measures the
model and gRPC alone, reference.py starts the reference server of `--reference plain|probe` (plain.py,
probe.py; measured the same way, right after the target), report.py computes the server figures and the comparison, render.py
prints and writes the report. Imports nothing heavy until the command runs.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuronserve.bench.document import BenchReport, Header, Reference
    from neuronserve.bench.limits import Limit, Skipped
    from neuronserve.bench.report import Comparison
    from neuronserve.bench.runs import Endpoint, Runner, ServerRuns
    from neuronserve.bench.workloads import Workload, WorkloadSpec

BENCH_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


def register(subparsers) -> argparse.ArgumentParser:
    """The `bench` subcommand and its flags; it runs `run`."""
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
    p.add_argument(
        "--cached-peers",
        type=int,
        default=5000,
        help="peers bench upserts before score-ids/matrix, the requests' ids drawn from them (default 5000; "
        "1,000,000 takes about a minute of upserts)",
    )
    p.add_argument("--model", default="twotower", help="the OIP model name (metadata and the oip workload)")
    _add_mode_args(p.add_argument_group("mode"))
    _add_client_args(p.add_argument_group("client"))
    _add_output_args(p.add_argument_group("limits and output"))
    p.set_defaults(func=run)
    return p


def _add_mode_args(mode) -> None:
    """--rate or --search, and how long each run lasts."""
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


def _add_client_args(client) -> None:
    """The load generator's processes, connections, deadline and seed."""
    client.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    client.add_argument("--channels", type=int, default=2, help="gRPC connections per client process (default 2)")
    client.add_argument("--timeout-ms", type=float, default=1000.0, help="per-request deadline (default 1000)")
    client.add_argument(
        "--late-ms", type=float, default=2.0, help="a send this much behind schedule counts as late (default 2)"
    )
    client.add_argument("--seed", type=int, default=0)


def _add_output_args(limits) -> None:
    """The server's metrics, the limits, the reference server and the output files."""
    from neuronserve.bench.reference import KINDS

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
        choices=tuple(KINDS),
        help="also start a reference server on --artifact, run the same measurement against it and report the target's "
        "result as a ratio of it: 'plain', the model once per request on its event loop, no batching (score and oip "
        "workloads); 'probe', issue 9's probe, a work-conserving batcher on one worker thread (oip)",
    )
    limits.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --reference: measure the target and the reference this many times, the order alternating "
        "(target first in odd rounds), and report the median of each ratio over the rounds beside every "
        "round's (default 1; these machines drift between runs, so a single pair of runs is noisy)",
    )
    limits.add_argument("--json", default=None, help="write the report as JSON here")
    limits.add_argument(
        "--plot", default=None, help="write a PNG of latency percentiles against offered rate here (search)"
    )
    limits.add_argument("--quiet", action="store_true", help="no progress display on stderr")


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


def _check_writable(flag: str, path: str) -> None:
    """ConfigError unless `path` can be opened for writing (a directory, a missing or read-only parent,
    /proc: all refused): tried by opening it to append, a file it creates removed again."""
    from neuronserve.errors import ConfigError

    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there: {exc.strerror}") from None
    if not existed:
        os.remove(path)


def check_outputs(args: argparse.Namespace, rates: tuple[float, ...] = ()) -> None:
    """What would otherwise fail only after the whole run (and lose it): checked before any load."""
    from neuronserve.errors import ConfigError

    if args.metrics_url:
        _check_metrics_url(args.metrics_url)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            _check_writable(flag, path)
    if not args.no_limits and args.limit_s <= 0:
        raise ConfigError(f"--limit-s must be > 0, got {args.limit_s} (or pass --no-limits)")
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and not args.reference:
        raise ConfigError("--rounds compares the target with a reference: give --reference plain (or probe) too")
    if args.reference:
        _check_reference(args, rates)
    if args.artifact and (args.reference or not args.no_limits):
        from neuronserve.artifact import load_manifest

        manifest = load_manifest(args.artifact, verify=True)  # a wrong --artifact is an error now, not after the load
        if args.reference and manifest.target != "cpu":
            raise ConfigError(
                f"--reference {args.reference} runs --target cpu artifacts; {args.artifact} is a {manifest.target} artifact"
            )


def _check_metrics_url(text: str) -> None:
    """A ConfigError unless --metrics-url is an http(s) URL with a host."""
    from urllib.parse import urlsplit

    from neuronserve.errors import ConfigError

    try:
        url = urlsplit(text)
        _ = url.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"--metrics-url {text!r} is not a URL ({exc}); e.g. http://127.0.0.1:8002/metrics") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"--metrics-url {text!r} is not an http URL; e.g. http://127.0.0.1:8002/metrics")


def _check_reference(args: argparse.Namespace, rates: tuple[float, ...]) -> None:
    """A ConfigError unless --reference has what it needs: --artifact, a workload it serves, one run."""
    from neuronserve.bench.reference import KINDS
    from neuronserve.errors import ConfigError

    name, workloads = args.reference, KINDS[args.reference].workloads
    if not args.artifact:
        raise ConfigError(f"--reference {name} needs --artifact (the {name} server serves that artifact)")
    if args.workload not in workloads:
        raise ConfigError(f"--reference {name} answers --workload {' or '.join(workloads)}, not {args.workload}")
    if len(rates) > 1:
        raise ConfigError(f"--reference {name} compares one run: give one --rate (or --search), not a list")


def run(args: argparse.Namespace) -> int:
    """The command: check the flags, measure the target (and the reference), then the limits; print and write."""
    from neuronserve.bench import render
    from neuronserve.bench.document import BenchReport
    from neuronserve.bench.loadgen import stderr_progress
    from neuronserve.bench.runs import Endpoint, Runner
    from neuronserve.bench.workloads import DEFAULT_PEERS, WorkloadSpec, prepare_workload

    rates = _check_args(args)
    progress = None if args.quiet else stderr_progress
    peers = args.peers or DEFAULT_PEERS[args.workload]
    workload_spec = WorkloadSpec(
        name=args.workload,
        peers=peers,
        users=args.users,
        pool_peers=args.cached_peers,
        model=args.model,
        seed=args.seed,
    )
    workload = prepare_workload(args.target, workload_spec)
    runner = Runner(args, rates, workload)
    header = _header(args, rates)
    endpoint = Endpoint(args.target, args.metrics_url, None, progress)
    target = runner.measure(endpoint)
    reference = _reference(args, runner, workload_spec, endpoint, target, progress) if args.reference else None
    compute, transport = _limits(args, workload, progress)
    report = BenchReport(header, workload, target, reference, compute, transport)
    print(render.table(report), flush=True)
    _write_files(args, report)
    return 0


def _check_args(args: argparse.Namespace) -> tuple[float, ...]:
    """The --rate list, after every check that can fail before any load (a ConfigError)."""
    from neuronserve.errors import ConfigError

    if args.search == (args.rate is not None):
        raise ConfigError(
            "give either --rate R[,R...] (fixed-rate runs) or --search (find the highest rate under --latency-bound-ms)"
        )
    _check_numbers(args)
    rates = parse_rates(args.rate)
    check_outputs(args, rates)
    return rates


_POSITIVE = (  # (flag, attribute): must be > 0
    ("--duration-s", "duration_s"),
    ("--latency-bound-ms", "latency_bound_ms"),
    ("--timeout-ms", "timeout_ms"),
    ("--search-start-rate", "search_start_rate"),
    ("--users", "users"),
    ("--cached-peers", "cached_peers"),
    ("--clients", "clients"),
    ("--channels", "channels"),
)


def _check_numbers(args: argparse.Namespace) -> None:
    """A ConfigError for a count or duration that cannot run, or a --target that is not HOST:PORT."""
    from neuronserve.errors import ConfigError

    for flag, key in _POSITIVE:
        if not getattr(args, key) > 0:
            raise ConfigError(f"{flag} must be > 0, got {getattr(args, key)}")
    if args.peers is not None and args.peers < 1:
        raise ConfigError(f"--peers must be >= 1, got {args.peers}")
    if not args.warmup_s >= 0:
        raise ConfigError(f"--warmup-s must be >= 0, got {args.warmup_s}")
    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--target {args.target!r} is not HOST:PORT, e.g. 127.0.0.1:8001")


def _header(args: argparse.Namespace, rates: tuple[float, ...]) -> Header:
    """When, on what machine, against what, with which client settings."""
    import platform
    import time

    from neuronserve.bench.document import Header, Machine

    return Header(
        date=time.strftime(BENCH_DATE_FORMAT),
        machine=Machine(os.cpu_count(), platform.processor() or platform.machine(), platform.python_version()),
        target=args.target,
        clients=args.clients,
        channels_per_client=args.channels,
        timeout_ms=args.timeout_ms,
        arrival=args.arrival,
        mode="search" if args.search else "fixed-rate" if len(rates) == 1 else "rate-sequence",
    )


def _reference(
    args: argparse.Namespace,
    runner: Runner,
    workload_spec: WorkloadSpec,
    endpoint: Endpoint,
    target: ServerRuns,
    progress,
) -> Reference:
    """Start the reference server on --artifact, measure it the same way (round 1: after the target's run),
    then --rounds - 1 more pairs of runs, the order alternating; compare each round, and report the
    medians when there are several."""
    from neuronserve.bench import report
    from neuronserve.bench.document import Reference
    from neuronserve.bench.reference import KINDS, ReferenceServer
    from neuronserve.bench.runs import Endpoint
    from neuronserve.bench.workloads import prepare_workload
    from neuronserve.errors import ConfigError

    if progress:
        progress(f"reference: starting the {args.reference} server on {args.artifact}")
    say = (lambda line: progress(f"[{args.reference}] {line}")) if progress else None
    with ReferenceServer(args.reference, args.artifact, args.model) as server:
        if prepare_workload(server.target, workload_spec).payloads != runner.workload.payloads:
            raise ConfigError(
                f"--reference: the model of --artifact {args.artifact} has other feature sizes than the target's; give the target's artifact"
            )
        reference = Endpoint(server.target, None, server.pid, say)
        ref = runner.measure(reference)
        rounds = [_compare(args, target, ref)]
        for number in range(2, args.rounds + 1):
            if progress:
                progress(f"round {number} of {args.rounds}: {'the target' if number % 2 else 'the reference'} first")
            if number % 2:
                ours, theirs = runner.measure(endpoint), runner.measure(reference)
            else:
                theirs, ours = runner.measure(reference), runner.measure(endpoint)
            rounds.append(_compare(args, ours, theirs))
    comparison = rounds[0] if len(rounds) == 1 else report.median_comparison(rounds)
    return Reference(
        args.reference, server.target, server.pid, KINDS[args.reference].how, ref, comparison, tuple(rounds)
    )


def _compare(args: argparse.Namespace, target: ServerRuns, ref: ServerRuns) -> Comparison:
    """One round: the target's measured run against the reference's."""
    from neuronserve.bench import report

    unbounded = [
        name for name, flag in (("neuronserve", target.never_failed), (args.reference, ref.never_failed)) if flag
    ]
    return report.compare(
        args.reference, target.measured, ref.measured, args.latency_bound_ms if args.search else None, unbounded
    )


def _limits(args: argparse.Namespace, workload: Workload, progress) -> tuple[Limit | Skipped, Limit | Skipped]:
    """The compute limit (with --artifact) and the transport limit, or why skipped."""
    from neuronserve.bench import limits

    if args.no_limits:
        return limits.Skipped("--no-limits"), limits.Skipped("--no-limits")
    if progress:
        progress("measuring the compute limit and the transport limit")
    compute: Limit | Skipped = limits.Skipped("no --artifact given")
    if args.artifact:
        compute = limits.compute_limit(args.artifact, workload, seconds=args.limit_s, backend=args.compute_backend)
    transport = limits.transport_limit(workload, seconds=args.limit_s, clients=args.clients, channels=args.channels)
    return compute, transport


def _write_files(args: argparse.Namespace, report: BenchReport) -> None:
    """--json and --plot (a plot only of a search)."""
    from neuronserve.bench import render

    if args.json:
        render.write_json(report.to_dict(), args.json)
    if not args.plot:
        return
    if report.target.search:
        render.plot_search(
            report.target.search.found.steps,
            args.latency_bound_ms,
            args.plot,
            title=f"{args.workload} against {args.target}",
        )
    else:
        print(
            "neuronserve bench: --plot needs --search (a plot of one rate says nothing); no plot written",
            file=sys.stderr,
        )
