"""The limits reported beside a benchmark result: the model alone, and gRPC alone, on this machine.

Outside the server's request path; run by `neuronserve bench` after the load, on the same machine.
- compute limit: the artifact's stages run in-process, flat out, for a few seconds (one thread and
  one torch thread per core). This is the one part of bench that imports the runtime
  (neuronserve.backends, hence torch): the server is measured as a black box, its model is not.
  `score`/`oip` run the whole model at the largest compiled bucket B: the fused `twotower` graph
  when the artifact has it (one call per batch, as the server runs it data parallel; B peer rows
  against ceil(B / M) users, rounded up to a compiled user batch), else user tower, peer tower and
  pair scorer; the report line says which. `score-ids`/`matrix` run what the server does for
  cached embeddings, the per-label dot product of tower outputs (numpy), at the workload's shape.
- transport limit: a no-op gRPC server (echo.py, a subprocess) answering the same request bytes
  with a reply of the real reply's size, driven closed-loop flat out by the same load generator.
Served throughput is reported as a fraction of each.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from neuronserve.bench.loadgen import LoadSpec, run_load
from neuronserve.bench.workloads import Workload
from neuronserve.errors import Unavailable
from neuronserve.contract import FUSED_STAGE, PAIR_SCORER, PEER_TOWER, USER_TOWER


@dataclass(frozen=True)
class Skipped:
    """A limit not measured, and why."""

    reason: str

    def to_dict(self, served_rate_per_s: float | None = None) -> dict:
        return {"skipped": self.reason}


@dataclass(frozen=True)
class Limit:
    requests_per_s: float
    pairs_per_s: float
    how: str

    def served_fraction(self, served_rate_per_s: float | None) -> float | None:
        return served_rate_per_s / self.requests_per_s if served_rate_per_s and self.requests_per_s else None

    def to_dict(self, served_rate_per_s: float | None) -> dict:
        fraction = self.served_fraction(served_rate_per_s)
        return {
            "requests_per_s": round(self.requests_per_s, 2),
            "pairs_per_s": round(self.pairs_per_s, 1),
            "how": self.how,
            "served_fraction": None if fraction is None else round(fraction, 4),
        }


def compute_limit(
    artifact_dir: str, workload: Workload, seconds: float = 3.0, backend: str = "cpu", threads: int = 0
) -> Limit:
    import torch

    from neuronserve.artifact import load_manifest
    from neuronserve.contract import STAGES
    from neuronserve.backends import default_cores, make_backend
    from neuronserve.config import CoreGroup

    torch.set_num_threads(1)
    manifest = load_manifest(artifact_dir)
    cfg = manifest.model_config
    m = workload.spec.peers
    if workload.spec.name in ("score", "oip"):
        engine = make_backend(backend, manifest)
        threads = threads or default_cores(engine.name)  # the server's default cores for that backend, a thread each
        if manifest.has_fused_stage:
            steps, how = _fused_steps([engine.load(FUSED_STAGE, CoreGroup(i)) for i in range(threads)], m)
        else:
            steps, how = _stage_steps(
                [{s: engine.load(s, CoreGroup(i)) for s in STAGES} for i in range(threads)], m, cfg
            )
        how = f"{backend} backend in-process, {threads} thread(s), {how}"
    else:
        n = workload.spec.users if workload.spec.name == "matrix" else 1
        threads = threads or default_cores("cpu")  # host CPUs: this path never touches the cores
        k, d = cfg.num_labels, cfg.label_dim
        rng = np.random.default_rng(0)
        bias = np.asarray(manifest.label_bias, np.float32)

        def make_step(_):
            users = rng.standard_normal((n, k, d), dtype=np.float32)
            peers = rng.standard_normal((m, k, d), dtype=np.float32)

            def step() -> int:
                np.einsum("nkd,mkd->nmk", users, peers, optimize=True) + bias
                return n * m

            return step

        steps = [make_step(i) for i in range(threads)]
        how = f"numpy dot product of cached tower outputs in-process, {threads} thread(s), {n}x{m} pairs"
    for step in steps:
        step()  # warm up
    pairs = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < deadline:
            pairs[i] += steps[i]()

    start = time.monotonic()
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    pairs_per_s = sum(pairs) / (time.monotonic() - start)
    return Limit(pairs_per_s / workload.pairs_per_request, pairs_per_s, how)


def _fused_steps(runners, peers_per_request: int) -> tuple[list[Callable[[], int]], str]:
    """One fused call per step at the largest bucket B: B peer rows, peer row i meeting user i // M, the
    users rounded up to a compiled user batch U (the server pads its user rows the same way)."""
    rows = max(runners[0].batch_sizes)
    compiled = runners[0].user_batch_sizes(rows)
    needed = -(-rows // peers_per_request)
    users = next((u for u in compiled if u >= needed), compiled[-1])
    index = np.minimum(np.arange(rows) // peers_per_request, users - 1).astype(np.int64)

    def make_step(runner) -> Callable[[], int]:
        user, peers, _ = runner.zero_inputs(rows, users)

        def step() -> int:
            runner.run([user, peers, index])
            return rows

        return step

    return [
        make_step(r) for r in runners
    ], f"fused {FUSED_STAGE} graph at batch {rows} ({users} user row{'s' if users > 1 else ''})"


def _stage_steps(stages, peers_per_request: int, cfg) -> tuple[list[Callable[[], int]], str]:
    """User tower, peer tower and pair scorer per step (an artifact without the fused graph), at the largest bucket."""
    rows = max(stages[0][PEER_TOWER].batch_sizes)  # the largest batch the server can form
    user_buckets = stages[0][USER_TOWER].batch_sizes
    user_rows = min(
        [b for b in user_buckets if b >= -(-rows // peers_per_request)] or [max(user_buckets)]
    )  # one user per request in the batch

    def make_step(runners) -> Callable[[], int]:
        user = np.zeros((user_rows, cfg.user_features), np.float32)
        peers = np.zeros((rows, cfg.peer_features), np.float32)

        def step() -> int:
            u = runners[USER_TOWER].run([user])
            p = runners[PEER_TOWER].run([peers])
            u_rows = np.ascontiguousarray(np.repeat(u[:1], rows, axis=0))  # each peer row meets its user
            runners[PAIR_SCORER].run([u_rows, p])
            return rows

        return step

    return [
        make_step(r) for r in stages
    ], f"three stages (user tower + peer tower + pair scorer; no fused graph in the artifact) at batch {rows}"


def transport_limit(
    workload: Workload, seconds: float = 3.0, clients: int = 2, channels: int = 2, concurrency: int = 32
) -> Limit:
    echo = subprocess.Popen(
        [sys.executable, "-m", "neuronserve.bench.echo", "--port", "0", "--reply-bytes", str(workload.response_bytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert echo.stdout is not None  # stdout=PIPE
        line = echo.stdout.readline()
        if "port=" not in line:
            raise Unavailable(
                f"transport limit: the echo server did not start (said {line.strip()!r}, exit {echo.poll()})"
            )
        spec = LoadSpec(
            target=f"127.0.0.1:{int(line.split('port=')[1])}",
            method=workload.method,
            payloads=workload.payloads,
            duration_s=seconds,
            warmup_s=1.0,
            concurrency=concurrency,
            clients=clients,
            channels=channels,
        )
        result = run_load(spec)
    finally:
        echo.terminate()
        echo.wait(timeout=10)
    how = f"no-op gRPC echo subprocess, same request bytes, {workload.response_bytes} B replies, closed loop {clients}x{concurrency} in flight"
    return Limit(result.achieved_rate_per_s, result.achieved_rate_per_s * workload.pairs_per_request, how)
