"""The shared embedding cache's memory: a server's total PSS with N workers against its PSS with 1.

Not part of `neuronserve bench` (which measures a running server's latency from outside); this one
starts the servers itself. For each worker count in `--workers` (default 1,2) it starts
`python -m neuronserve serve --artifact ART --backend cpu --port 0 --metrics-port off --workers N
--max-queue-rows 16384`, fills `--rows` (default 1,000,000) peers through UpsertEmbeddings in chunks
of 16,384 ids over 8 gRPC connections, upserts one user, then sends 200 ScoreByIds of 1,000 random
cached peers spread over the 8 connections (so every worker reads the table), and sums PSS and RSS
over the server's process tree (the supervisor and its workers). With the table held once, in
memory every worker maps, the PSS total grows by the second worker's runtime only, not by another
copy of the table; the RSS sum counts the shared table once per process. Prints one line per worker
count and its PSS ratio against the first, then SIGTERMs the server and checks it exits 0. Run:

    python -m neuronserve.bench.memory --artifact ART [--workers 1,2] [--rows 1000000] [--json FILE]

Exit status 0 when every server started, filled, answered and exited 0; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

CHUNK = 16_384  # ids per UpsertEmbeddings (= the server's --max-queue-rows here)
CHANNELS = 8  # separate gRPC connections, so the supervisor's SO_REUSEPORT spreads them over workers
READS = 200  # ScoreByIds after the fill
READ_PEERS = 1_000  # cached peers per ScoreByIds
DEFAULT_CACHE_MAX_ROWS = 1_000_000  # the server's --cache-max-rows default
READY_TIMEOUT_S = 300.0
EXIT_TIMEOUT_S = 60.0
MIB = 2**20


def progress(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def parse_workers(text: str) -> list[int]:
    """`--workers N[,N...]` -> the counts in order; a ValueError naming what is wrong."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--workers {text!r}: give worker counts separated by commas, e.g. 1,2") from None
    if min(counts) < 1:
        raise ValueError(f"--workers {text!r}: each worker count must be >= 1")
    return counts


class Server:
    """`with Server(argv) as server: server.port, server.pid`; `server.stop()` -> its exit status."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.port = 0
        self.pid = 0
        self._proc: subprocess.Popen = None  # type: ignore[assignment]  # set by start(), before any other call

    def __enter__(self) -> Server:
        # its stderr is ours (errors show); stdout is read for the ready line, then drained
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        self.pid = self._proc.pid
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert self._proc.stdout is not None  # stdout=PIPE
            for out in self._proc.stdout:
                lines.put(out)
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line.startswith("neuronserve ready:"):
                break
            if not line:
                self._kill()
                raise RuntimeError(f"the server did not become ready (exit {self._proc.poll()}): {' '.join(self.argv)}")
        grpc_address = next(field for field in line.split() if field.startswith("grpc="))
        self.port = int(grpc_address.rsplit(":", 1)[1])
        return self

    def tree(self):
        import psutil

        root = psutil.Process(self.pid)
        return [root] + root.children(recursive=True)

    def stop(self) -> int | None:
        """SIGTERM, wait; the exit status (None if it had to be killed)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._kill()
                return None
        return self._proc.returncode

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __exit__(self, *exc) -> None:
        self._kill()


def tensor(pb, array: np.ndarray):
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


@dataclass(frozen=True)
class ProcessMemory:
    """One process of the server's tree, after the reads."""

    pid: int
    pss_bytes: int
    rss_bytes: int
    uss_bytes: int


@dataclass(frozen=True)
class MemoryRun:
    """One server's run: its fill and its memory summed over its process tree (supervisor and workers)."""

    workers: int
    processes: int
    rows: int  # peers upserted
    cache_rows: int  # the most rows the server said its cache held
    fill_s: float
    pss_bytes: int
    rss_bytes: int
    uss_bytes: int
    per_process: tuple[ProcessMemory, ...]
    exit_code: int | None  # after SIGTERM; None if it had to be killed
    pss_ratio: float = 1.0  # pss_bytes against the first run's (set by main)

    def line(self, first_workers: int) -> str:
        """The run as main's one line of output."""
        return (
            f"workers={self.workers} processes={self.processes} rows={self.rows} cache_rows={self.cache_rows} fill_s={self.fill_s:.1f} "
            f"PSS_total_MiB={self.pss_bytes / MIB:.0f} RSS_sum_MiB={self.rss_bytes / MIB:.0f} USS_sum_MiB={self.uss_bytes / MIB:.0f} "
            f"PSS_ratio_vs_workers={first_workers}={self.pss_ratio:.2f}x exit={self.exit_code}"
        )


def server_argv(artifact: str, workers: int, rows: int) -> list[str]:
    """The `neuronserve serve` command line of one run: cpu backend, any port, no metrics, `workers` workers."""
    argv = [
        sys.executable,
        "-m",
        "neuronserve",
        "serve",
        "--artifact",
        artifact,
        "--backend",
        "cpu",
        "--port",
        "0",
        "--metrics-port",
        "off",
        "--workers",
        str(workers),
        "--max-queue-rows",
        str(CHUNK),
    ]
    if rows > DEFAULT_CACHE_MAX_ROWS:
        argv += ["--cache-max-rows", str(rows)]  # else the fill would evict its own rows
    return argv


def measure(artifact: str, workers: int, rows: int, seed: int = 0) -> MemoryRun:
    """One server with `workers` workers: fill, read, measure, stop."""
    import grpc

    from neuronserve.artifact import load_manifest
    from neuronserve.protos import scorer_pb2_grpc as pb_grpc

    cfg = load_manifest(artifact).model_config
    rng = np.random.default_rng(seed)
    with Server(server_argv(artifact, workers, rows)) as server:
        options = [
            ("grpc.max_send_message_length", 1 << 28),
            ("grpc.max_receive_message_length", 1 << 28),
            ("grpc.use_local_subchannel_pool", 1),
        ]  # one connection per channel, not one shared subchannel
        channels = [grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) for _ in range(CHANNELS)]
        try:
            stubs = [pb_grpc.ScorerStub(channel) for channel in channels]
            started = time.monotonic()
            cache_rows = _fill(stubs, cfg, workers, rows, rng)
            fill_s = time.monotonic() - started
            _read(stubs, rows, rng)
        finally:
            for channel in channels:
                channel.close()
        tree = server.tree()
        infos = [process.memory_full_info() for process in tree]
        per_process = tuple(ProcessMemory(p.pid, i.pss, i.rss, i.uss) for p, i in zip(tree, infos, strict=False))
        exit_code = server.stop()
    return MemoryRun(
        workers=workers,
        processes=len(tree),
        rows=rows,
        cache_rows=cache_rows,
        fill_s=round(fill_s, 2),
        pss_bytes=sum(p.pss_bytes for p in per_process),
        rss_bytes=sum(p.rss_bytes for p in per_process),
        uss_bytes=sum(p.uss_bytes for p in per_process),
        per_process=per_process,
        exit_code=exit_code,
    )


def _fill(stubs: list, cfg, workers: int, rows: int, rng: np.random.Generator) -> int:
    """Upsert `rows` peers in chunks over every connection, then user 1; the most cache rows the server reported."""
    from neuronserve.protos import scorer_pb2 as pb

    started = time.monotonic()
    cache_rows, next_report = 0, 0.1
    for i, start in enumerate(range(0, rows, CHUNK)):
        ids = np.arange(start, min(rows, start + CHUNK), dtype=np.int64)
        features = rng.standard_normal((len(ids), cfg.peer_features), dtype=np.float32)
        reply = stubs[i % CHANNELS].UpsertEmbeddings(
            pb.UpsertEmbeddingsRequest(kind=pb.PEER, ids=ids.tolist(), features=tensor(pb, features)),
            timeout=120,
        )
        cache_rows = max(cache_rows, reply.cache_rows)
        done = (start + len(ids)) / rows
        if done >= next_report or done == 1.0:
            progress(
                f"workers={workers}: {start + len(ids):,}/{rows:,} peers upserted ({done:.0%}), {time.monotonic() - started:.1f} s"
            )
            next_report = (int(done * 10) + 1) / 10
    user = rng.standard_normal((1, cfg.user_features), dtype=np.float32)
    stubs[0].UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=pb.USER, ids=[1], features=tensor(pb, user)), timeout=60)
    return cache_rows


def _read(stubs: list, rows: int, rng: np.random.Generator) -> None:
    """READS ScoreByIds of READ_PEERS random cached peers, on every connection: every worker touches the table."""
    from neuronserve.protos import scorer_pb2 as pb

    for r in range(READS):
        peer_ids = rng.integers(0, rows, READ_PEERS)
        reply = stubs[r % CHANNELS].ScoreByIds(pb.ScoreByIdsRequest(user_id=1, peer_ids=peer_ids.tolist()), timeout=30)
        if tuple(reply.scores.shape)[:1] != (READ_PEERS,):
            raise RuntimeError(
                f"ScoreByIds answered scores of shape {tuple(reply.scores.shape)} for {READ_PEERS} peers"
            )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neuronserve.bench.memory",
        description="A server's total PSS (supervisor + workers) holding --rows cached peers, per worker count, "
        "and its ratio against the first worker count.",
    )
    parser.add_argument("--artifact", required=True, help="compiled artifact directory (served with --backend cpu)")
    parser.add_argument(
        "--workers", default="1,2", metavar="N[,N...]", help="worker counts, one server each, in order (default 1,2)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="cached peers to upsert (default 1,000,000)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the runs as JSON here")
    args = parser.parse_args(argv)
    try:
        counts = parse_workers(args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rows < READ_PEERS:
        parser.error(f"--rows must be >= {READ_PEERS}")
    from neuronserve.artifact import load_manifest
    from neuronserve.errors import NeuronServeError

    try:
        load_manifest(args.artifact)  # a wrong --artifact fails now, not in a server
    except NeuronServeError as exc:
        parser.error(str(exc))
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            parser.error(f"--json {args.json}: directory {parent} does not exist or is not writable")

    runs: list[MemoryRun] = []
    ok = True
    for workers in counts:
        run = measure(args.artifact, workers, args.rows)
        run = replace(run, pss_ratio=run.pss_bytes / runs[0].pss_bytes if runs else 1.0)
        runs.append(run)
        ok = ok and run.exit_code == 0 and run.cache_rows >= min(args.rows, DEFAULT_CACHE_MAX_ROWS)
        print(run.line(counts[0]), flush=True)
    if args.json:
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
            "artifact": os.path.abspath(args.artifact),
            "rows": args.rows,
            "chunk": CHUNK,
            "channels": CHANNELS,
            "reads": {"requests": READS, "peers": READ_PEERS},
            "runs": [asdict(run) for run in runs],
        }
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
