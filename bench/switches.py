"""Version switches under open-loop load: every reply's version, failures and latency around each switch.

Not part of `neuronserve bench` (a rate sweep against a running server): this one builds a model
repository from two artifacts of one model (A as version 1), starts `neuronserve serve
--model-repository DIR --model-control explicit` on a free loopback port, and sends Score requests
(1 user x `--peers` peers, seeded) at `--rate` per second, Poisson arrivals, from an asyncio client on
`--channels` connections, for the whole run. The first `--warmup-s` of load (a freshly started server
and client settle: P99 2-5x the rest here) are left out of every latency figure. After `--steady-s`
more of steady load it switches `--switches` times: version n+1 (B, A, B, ... alternately) is copied
into the repository and RepositoryModelLoad makes it current while the load goes on (the old version
drains), then `--gap-s` more of load. It prints the failures by status; P50/P99 of the steady window
against the windows around the switches; the whole run's P99 against the P99 outside the switch
windows (steady state over the same span, so the host's drift over the run cancels), and their ratio
`p99_over_steady` (issue 15 asks <= 1.5); and the number
of times the version changes in send order (exactly one per switch when every request sent after a
switch gets the new version and none before it does). Run:

    python -m neuronserve.bench.switches --artifact A --artifact-b B [--rate 500] [--switches 5]

docs/lifecycle.md has the results. Exit status 0 when no request failed and the versions changed
exactly once per switch, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from neuronserve.artifact import load_manifest
from neuronserve.bench.report import cpu_ticks, steal_pct
from neuronserve.bench.serve_process import start_serve
from neuronserve.protos import open_inference_pb2 as oip
from neuronserve.protos import open_inference_pb2_grpc as oip_grpc
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc

TIMEOUT_S = 1.0  # each Score's deadline: a switch must not stall a request for longer


@dataclass(frozen=True)
class Reply:
    sent_s: float  # since the load started
    latency_ms: float
    status: str  # "OK" or the gRPC status name
    version: int  # the integer version that served it (0 when it failed)


@dataclass(frozen=True)
class Switch:
    version: int
    started_s: float  # since the load started: RepositoryModelLoad sent
    done_s: float  # its reply


@dataclass(frozen=True)
class Summary:
    requests: int
    failures: dict[str, int]
    steady_p50_ms: float
    steady_p99_ms: float
    switching_p50_ms: float
    switching_p99_ms: float
    loading_p99_ms: float  # sent while a version loaded and warmed up
    after_p99_ms: float  # sent in the second after the switch (the old version draining, the new one's first batches)
    all_p99_ms: float  # the whole run
    outside_p99_ms: float  # steady state over the same span: sent outside every switch's load and the second after
    version_changes: int
    switches: int
    load_s: list[float]  # each RepositoryModelLoad's duration

    @property
    def ok(self) -> bool:
        return not self.failures and self.version_changes == self.switches

    @property
    def p99_over_steady(self) -> float:
        """The whole run's P99 over steady state's (the P99 outside the switch windows, same span)."""
        return round(self.all_p99_ms / self.outside_p99_ms, 2) if self.outside_p99_ms else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="neuronserve-switches-") as tmp:
        manifest = load_manifest(args.artifact)
        model_dir = Path(tmp) / manifest.model_name
        shutil.copytree(args.artifact, model_dir / "1")
        proc, address = _start_server(Path(tmp))
        cpu_before = cpu_ticks()
        try:
            replies, switches = asyncio.run(_run(args, address, model_dir, manifest))
        finally:
            proc.terminate()
            proc.wait(30)
    summary = _summarise(replies, switches, args.warmup_s)
    # the hypervisor's share of this VM's CPU time during the run: a tail spike may be the host's, not ours
    steal = steal_pct(cpu_before, cpu_ticks())
    report = {**asdict(summary), "p99_over_steady": summary.p99_over_steady, "ok": summary.ok, "cpu_steal_pct": steal}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "args": vars(args)}, indent=2))
    return 0 if summary.ok else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m neuronserve.bench.switches", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="version A (served first, as version 1)")
    p.add_argument("--artifact-b", required=True, help="version B: the same model's schema, other weights")
    p.add_argument("--rate", type=float, default=500.0, help="Score requests per second (default 500)")
    p.add_argument("--peers", type=int, default=128)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--switches", type=int, default=5)
    p.add_argument(
        "--warmup-s", type=float, default=5.0, help="first load, left out of the latency figures (default 5)"
    )
    p.add_argument(
        "--steady-s", type=float, default=8.0, help="load after the warm-up, before the first switch (default 8)"
    )
    p.add_argument("--gap-s", type=float, default=4.0, help="load after each switch (default 4)")
    p.add_argument("--json", help="write the summary here too")
    return p


def _start_server(repository: Path) -> tuple[subprocess.Popen, str]:
    flags = ["--model-repository", str(repository), "--model-control", "explicit", "--backend", "cpu"]
    return start_serve(flags + ["--port", "0", "--metrics-port", "off"])


async def _run(args, address: str, model_dir: Path, manifest) -> tuple[list[Reply], list[Switch]]:
    cfg = manifest.model_config
    rng = np.random.default_rng(0)
    user = rng.standard_normal((1, cfg.user_features), dtype=np.float32)
    peers = rng.standard_normal((args.peers, cfg.peer_features), dtype=np.float32)
    request = pb.ScoreRequest(user_features=_tensor(user), peer_features=_tensor(peers))
    channels = [grpc.aio.insecure_channel(address) for _ in range(args.channels)]
    stubs = [pb_grpc.ScorerStub(c) for c in channels]
    replies: list[Reply] = []
    stop = asyncio.Event()
    start = time.perf_counter()
    load = asyncio.ensure_future(_load(stubs, request, args.rate, start, replies, stop))
    switches: list[Switch] = []
    try:
        await asyncio.sleep(args.warmup_s + args.steady_s)
        repository = oip_grpc.GRPCInferenceServiceStub(channels[0])
        for n in range(2, args.switches + 2):
            source = args.artifact_b if n % 2 == 0 else args.artifact
            await asyncio.to_thread(shutil.copytree, source, model_dir / str(n))
            began = time.perf_counter() - start
            await repository.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=manifest.model_name))
            switches.append(Switch(n, began, time.perf_counter() - start))
            print(f"switch to version {n}: load took {switches[-1].done_s - began:.2f} s", file=sys.stderr)
            await asyncio.sleep(args.gap_s)
    finally:
        stop.set()
        await load
        for channel in channels:
            await channel.close()
    return replies, switches


async def _load(stubs, request, rate: float, start: float, replies: list[Reply], stop: asyncio.Event) -> None:
    """Poisson arrivals at `rate` until `stop`; every reply recorded, the calls in flight awaited."""
    rng = np.random.default_rng(1)
    pending: set[asyncio.Task] = set()
    next_s, i = 0.0, 0
    while not stop.is_set():
        delay = next_s - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(_one(stubs[i % len(stubs)], request, start, replies))
        pending.add(task)
        task.add_done_callback(pending.discard)
        next_s += rng.exponential(1.0 / rate)
        i += 1
    await asyncio.gather(*pending)


async def _one(stub, request, start: float, replies: list[Reply]) -> None:
    sent = time.perf_counter()
    try:
        reply = await stub.Score(request, timeout=TIMEOUT_S)
        status, version = "OK", int(reply.version)
    except grpc.aio.AioRpcError as exc:
        status, version = exc.code().name, 0
    replies.append(Reply(sent - start, (time.perf_counter() - sent) * 1e3, status, version))


def _summarise(replies: list[Reply], switches: list[Switch], warmup_s: float = 0.0) -> Summary:
    """Failures and version changes over the whole run; latencies of the requests sent after `warmup_s`."""
    failures: dict[str, int] = {}
    for r in replies:
        if r.status != "OK":
            failures[r.status] = failures.get(r.status, 0) + 1
    ok = sorted((r for r in replies if r.status == "OK"), key=lambda r: r.sent_s)
    measured = [r for r in ok if r.sent_s >= warmup_s]
    first = switches[0].started_s if switches else float("inf")
    near = [(s.started_s, s.done_s + 1.0) for s in switches]  # the load, and a second of draining after
    steady = [r.latency_ms for r in measured if r.sent_s < first]
    switching = [r.latency_ms for r in measured if any(a <= r.sent_s <= b for a, b in near)]
    outside = [r.latency_ms for r in measured if not any(a <= r.sent_s <= b for a, b in near)]
    loading = [r.latency_ms for r in measured if any(s.started_s <= r.sent_s <= s.done_s for s in switches)]
    after = [r.latency_ms for r in measured if any(s.done_s < r.sent_s <= s.done_s + 1.0 for s in switches)]
    versions = [r.version for r in ok]
    changes = sum(1 for a, b in zip(versions, versions[1:], strict=False) if a != b)
    return Summary(
        requests=len(replies),
        failures=failures,
        steady_p50_ms=_percentile(steady, 50),
        steady_p99_ms=_percentile(steady, 99),
        switching_p50_ms=_percentile(switching, 50),
        switching_p99_ms=_percentile(switching, 99),
        loading_p99_ms=_percentile(loading, 99),
        after_p99_ms=_percentile(after, 99),
        all_p99_ms=_percentile([r.latency_ms for r in measured], 99),
        outside_p99_ms=_percentile(outside, 99),
        version_changes=changes,
        switches=len(switches),
        load_s=[round(s.done_s - s.started_s, 3) for s in switches],
    )


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(data=array.astype("<f4").tobytes(), shape=list(array.shape))


if __name__ == "__main__":
    sys.exit(main())
