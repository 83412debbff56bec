"""The matching tick end to end: ScoreTick from a Python client against the bare matmuls it contains.

Not part of `neuronserve bench` (an open-loop rate sweep): a tick is one large call, so this times calls.
It starts `neuronserve serve` on a free loopback port (or uses `--target`), upserts a pool's user and
peer features (random, seeded), then per repeat and in alternation: the bare matmuls in this process
(K BLAS calls `U_k @ P_k^T` of the pool's shapes, [N, D] x [D, N], numpy's BLAS with its default
threads), and one ScoreTick per combination (pool mode, top-k). It prints medians and each
combination's ratio to the bare matmuls of the same repeats, and the ratio of the largest pool's
default-combination time to the first pool's. Run:

    python -m neuronserve.bench.tick [--artifact DIR] [--pool 5000 --pool 10000] [--k 50] [--repeat 5]
        [--backend sim]

With `--backend sim` the tick's direction runs on the simulated NeuronCores (the host computes each block,
then the latency model's device time passes); it also prints the device time the latency model gives a
pool's one direction on the default 4 cores, the floor of a tick there.

The ratio is what issue 11 asks about; docs/tick.md has the results.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np

from neuronserve.backends.tick_runners import tick_latency_s
from neuronserve.bench.serve_process import start_serve
from neuronserve.config import SimConfig
from neuronserve.contract import TICK_BLOCK
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc

Req = pb.ScoreTickRequest
COMBINATIONS: tuple[tuple[str, int, int], ...] = (  # (name, label_space, mutual); the first is the default
    ("probability product", Req.PROBABILITY, Req.PRODUCT),
    ("probability one-way", Req.PROBABILITY, Req.ONE_WAY),
    ("probability minimum", Req.PROBABILITY, Req.MINIMUM),
    ("probability harmonic mean", Req.PROBABILITY, Req.HARMONIC_MEAN),
    ("logit one-way", Req.LOGIT, Req.ONE_WAY),
    ("logit minimum", Req.LOGIT, Req.MINIMUM),
)
UPSERT_ROWS = 1000


@dataclass(frozen=True)
class PoolResult:
    pool: int
    bare_ms: float  # median of the bare matmuls
    tick_ms: dict[str, float]  # median per combination

    def ratio(self, name: str) -> float:
        return self.tick_ms[name] / self.bare_ms


def _start_server(artifact: str | None, max_ids: int, backend: str) -> tuple[subprocess.Popen, str]:
    flags = ["--port", "0", "--metrics-port", "off", "--max-tick-ids", str(max_ids), "--backend", backend]
    return start_serve(flags + (["--artifact", artifact] if artifact else []))


def modelled_device_ms(pool: int, labels: int, dim: int, cores: int = SimConfig.num_cores) -> float:
    """The sim's device time of a pool's one direction: its blocks at tick_latency_s, spread over `cores`."""
    rows, columns = TICK_BLOCK
    blocks = math.ceil(pool / rows) * math.ceil(pool / columns)
    return 1e3 * blocks * tick_latency_s(labels, dim, rows, columns) / cores


def _num_labels(stub: pb_grpc.ScorerStub, pool_ids: np.ndarray) -> int:
    """K of the cached vectors, from a one-row tick's label scores."""
    reply = stub.ScoreTick(Req(pool_ids_packed=pool_ids[:2].astype("<i8").tobytes(), k=1, include_label_scores=True))
    return int(reply.label_scores.shape[-1])


def _upsert(stub: pb_grpc.ScorerStub, ids: np.ndarray, features: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for kind in (pb.USER, pb.PEER):
        for start in range(0, len(ids), UPSERT_ROWS):
            chunk = ids[start : start + UPSERT_ROWS]
            x = rng.standard_normal((len(chunk), features)).astype("<f4")
            stub.UpsertEmbeddings(
                pb.UpsertEmbeddingsRequest(
                    kind=kind, ids=chunk.tolist(), features=pb.Tensor(shape=list(x.shape), data=x.tobytes())
                )
            )


def _bare(users: list[np.ndarray], peers: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for u, p in zip(users, peers, strict=True):
        u @ p.T
    return time.perf_counter() - start


def measure_pool(
    stub: pb_grpc.ScorerStub,
    pool: int,
    k: int,
    repeat: int,
    features: int,
    dim: int,
    first_id: int,
    say,
    device_time: bool = False,
) -> PoolResult:
    ids = np.arange(first_id, first_id + pool, dtype=np.int64)
    _upsert(stub, ids, features, seed=pool)
    labels = _num_labels(stub, ids)
    rng = np.random.default_rng(0)
    users = [rng.standard_normal((pool, dim), dtype=np.float32) for _ in range(labels)]
    peers = [rng.standard_normal((pool, dim), dtype=np.float32) for _ in range(labels)]
    packed = ids.astype("<i8").tobytes()
    bare: list[float] = []
    ticks: dict[str, list[float]] = {name: [] for name, _, _ in COMBINATIONS}
    for round_ in range(repeat + 1):  # the first round warms up and is dropped
        bare.append(_bare(users, peers))
        # the order turns each round: the call right after the bare matmuls (400 MB of fresh outputs on
        # both CPUs) ran ~50 ms slower whichever combination it was, so no combination is always first
        turn = round_ % len(COMBINATIONS)
        for name, space, mutual in COMBINATIONS[turn:] + COMBINATIONS[:turn]:
            start = time.perf_counter()
            reply = stub.ScoreTick(Req(pool_ids_packed=packed, k=k, label_space=space, mutual=mutual), timeout=120)
            ticks[name].append(time.perf_counter() - start)
            if len(reply.ids) != pool * k * 8:
                raise SystemExit(f"ScoreTick {name}: {len(reply.ids)} bytes of ids for {pool} x {k}")
    result = PoolResult(
        pool, statistics.median(bare[1:]) * 1e3, {n: statistics.median(t[1:]) * 1e3 for n, t in ticks.items()}
    )
    say(f"pool {pool:,} (K={labels}, D={dim}, top-{k}): bare matmuls {result.bare_ms:.0f} ms")
    if device_time:
        say(
            f"  sim device time of one direction (latency model, 4 cores): {modelled_device_ms(pool, labels, dim):.0f} ms"
        )
    for name in ticks:
        say(f"  {name:26s} {result.tick_ms[name]:7.0f} ms  {result.ratio(name):5.2f}x bare")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronserve.bench.tick", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one on loopback)")
    parser.add_argument("--artifact", help="artifact of the server this starts (default: the demo model)")
    parser.add_argument(
        "--pool", type=int, action="append", help="pool size; repeat for several (default 5000 and 10000)"
    )
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--features", type=int, default=64, help="user and peer feature width of the model (demo: 64)")
    parser.add_argument("--label-dim", type=int, default=64, help="D of the model's label vectors (demo: 64)")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "sim"), help="of the server this starts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    pools = args.pool or [5000, 10000]
    proc, target = (None, args.target) if args.target else _start_server(args.artifact, max(pools), args.backend)
    results: list[PoolResult] = []
    try:
        with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
            stub = pb_grpc.ScorerStub(channel)
            first_id = 1
            for pool in pools:
                results.append(
                    measure_pool(
                        stub,
                        pool,
                        args.k,
                        args.repeat,
                        args.features,
                        args.label_dim,
                        first_id,
                        print,
                        device_time=args.backend == "sim",
                    )
                )
                first_id += pool
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    default = COMBINATIONS[0][0]
    if len(results) > 1:
        print(
            f"{default}: pool {results[-1].pool:,} takes {results[-1].tick_ms[default] / results[0].tick_ms[default]:.2f}x "
            f"pool {results[0].pool:,}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump([r.__dict__ | {"ratios": {n: r.ratio(n) for n in r.tick_ms}} for r in results], out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
