"""The measured runs of `neuronserve bench` against one server: one rate, a list of rates, or a search.

Each run is one open-loop load (loadgen.run_load) with the server's batch counters, CPU and memory
read at the measured window's start and after the last reply (report.Measured). Runner.measure
does what the flags ask of one server (the target, or the plain reference) and returns its report
section with the run the comparison and the limits are set against (a ServerRuns).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from neuronserve.bench import report
from neuronserve.bench.loadgen import LoadResult, LoadSpec, Progress, run_load
from neuronserve.bench.search import SearchResult, SearchStep, search_rate
from neuronserve.bench.workloads import Workload


@dataclass(frozen=True)
class Endpoint:
    """A server to measure: its gRPC target, where its CPU and memory are read, where progress goes."""

    target: str  # host:port
    metrics_url: str | None = None  # its Prometheus endpoint
    pid: int | None = None  # a local process, read with psutil
    say: Progress | None = None


@dataclass(frozen=True)
class Search:
    """A rate search's outcome, as reported: its bound and the steps it ran."""

    latency_bound_ms: float
    found: SearchResult

    @property
    def best_rate_per_s(self) -> float | None:
        return self.found.best.rate_per_s if self.found.best else None

    def to_dict(self) -> dict:
        return {
            "latency_bound_ms": self.latency_bound_ms,
            "rule": self.found.rule,
            "best_rate_per_s": self.best_rate_per_s,
            "steps": [dict(s.result.to_dict(), passed=s.passed) for s in self.found.steps],
        }


@dataclass(frozen=True)
class ServerRuns:
    """What measuring one server gave.

    `measured` is the run to compare: the fixed-rate run, the highest passing step of a search
    (None if none passed), or for a --rate list the run with the highest achieved rate (what the
    limits are set against). `never_failed`: a search passed every step (it never found the bound).
    """

    measured: report.Measured | None
    never_failed: bool = False
    runs: tuple[report.Measured, ...] = ()  # a --rate list, in order
    search: Search | None = None

    def to_dict(self, pairs_per_request: int) -> dict:
        """Its part of the JSON report: search, runs, or result, server_batches, server_cpu, server_memory."""
        out: dict = {}
        if self.search:
            out["search"] = self.search.to_dict()
        if self.runs:
            out["runs"] = [m.section(pairs_per_request) for m in self.runs]
        elif self.measured:
            out.update(self.measured.section(pairs_per_request))
        elif self.search:
            out.update(result=None, server_batches=None, server_cpu=None, server_memory=None)
        return out


class Runner:
    """The runs the bench flags (`args`) ask for, with `workload`'s requests at `rates` or by a search."""

    def __init__(self, args: argparse.Namespace, rates: tuple[float, ...], workload: Workload) -> None:
        self.args, self.rates, self.workload = args, rates, workload

    def measure(self, server: Endpoint) -> ServerRuns:
        """The fixed-rate run(s) or the search against one server."""
        if self.args.search:
            return self._search(server)
        if len(self.rates) > 1:
            return self._sequence(server)
        return ServerRuns(self.run_at(server, self.rates[0], self.args.warmup_s))

    def run_at(self, server: Endpoint, rate: float, warmup_s: float) -> report.Measured:
        """One open-loop run at `rate`; the server's batches, CPU and memory over its measured window."""
        args = self.args
        spec = LoadSpec(
            target=server.target,
            method=self.workload.method,
            payloads=self.workload.payloads,
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
        probe = _ServerProbe(server)
        if server.say:
            server.say(f"offered rate {rate:.1f}/s: {warmup_s:g} s warm-up + {args.duration_s:g} s measured")
        result = run_load(spec, progress=server.say, on_window_start=probe.start)
        return probe.finish(result)

    def _sequence(self, server: Endpoint) -> ServerRuns:
        """The --rate list in order, back to back: only the first has a warm-up."""
        runs = [self.run_at(server, rate, self.args.warmup_s if i == 0 else 0.0) for i, rate in enumerate(self.rates)]
        return ServerRuns(max(runs, key=lambda m: m.result.achieved_rate_per_s), runs=tuple(runs))

    def _search(self, server: Endpoint) -> ServerRuns:
        """The highest rate whose P99 stays under --latency-bound-ms (search.py), each step one run."""
        args = self.args
        by_rate: dict[float, report.Measured] = {}

        def step(rate: float) -> LoadResult:
            by_rate[rate] = self.run_at(server, rate, args.warmup_s)
            return by_rate[rate].result

        found = search_rate(
            step,
            bound_ms=args.latency_bound_ms,
            start_rate_per_s=args.search_start_rate,
            step_s=args.warmup_s + args.duration_s + 3.0,
            max_steps=args.search_max_steps,
            max_total_s=args.search_max_s,
            precision=args.search_precision,
            on_step=(lambda s: _say_step(server.say, s)) if server.say else None,
        )
        measured = by_rate[found.best.rate_per_s] if found.best else None
        search = Search(args.latency_bound_ms, found)
        return ServerRuns(measured, all(s.passed for s in found.steps), search=search)


def _say_step(say: Progress, s: SearchStep) -> None:
    lat = s.result.latency_ms
    say(
        f"step {s.rate_per_s:.1f}/s: p99 {lat['p99']:.1f} ms, errors {s.result.failed}, late {s.result.late_sends} -> {'pass' if s.passed else 'fail'}"
    )


class _ServerProbe:
    """One run's server side: `start()` at the measured window's start, `finish(result)` after the last reply."""

    def __init__(self, server: Endpoint, clock: Callable[[], float] = time.monotonic) -> None:
        self.server = server
        self.clock = clock
        self.start_s = 0.0  # clock() at the start
        self.before: dict[str, float] = {}  # the metrics page at the start
        self.cpu_start_s = 0.0  # the process's, at the start (with a pid)
        self.rss_start = 0.0
        self.ticks: list[int] = []  # the machine's CPU counters at the start

    def start(self) -> None:
        self.start_s = self.clock()
        self.ticks = report.cpu_ticks()
        if self.server.metrics_url:
            self.before.update(report.scrape_metrics(self.server.metrics_url))
        if self.server.pid:
            self.cpu_start_s = report.process_cpu_seconds(self.server.pid)
            self.rss_start = report.process_rss_bytes(self.server.pid)

    def finish(self, result: LoadResult) -> report.Measured:
        """The run with the server's batches, CPU and memory (psutil's, with a pid, over the metrics')."""
        stats = cpu = memory = device = None
        url, pid = self.server.metrics_url, self.server.pid
        if url:
            after = report.scrape_metrics(url)
            stats = report.batch_stats(self.before, after)
            cpu = report.metrics_cpu(self.before, after, result.sent)
            memory = report.metrics_memory(self.before, after)
            device = report.metrics_device_busy(self.before, after, self.clock() - self.start_s)
        if pid:
            source = f"psutil, pid {pid}"
            cpu = report.ServerCpu(report.process_cpu_seconds(pid) - self.cpu_start_s, result.sent, source)
            memory = report.ServerMemory(self.rss_start, report.process_rss_bytes(pid), source)
        steal = report.steal_pct(self.ticks, report.cpu_ticks())
        return report.Measured(result, stats, cpu, memory, steal, device)
