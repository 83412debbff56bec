"""The fleet's warm start: how long a host takes to load N rows from the shared store into its cache.

Not part of `neuronserve bench` (which measures a running server from outside). It fills a store with
`--rows` peers (default 1,000,000) of K x D float32 tower outputs (default the demo model's: K=4, D=64,
1 KiB per row) through RedisStore.write in upserts of 1,000, then times what a replica does before it
says SERVING: Follower.warm_start into a fresh EmbeddingCache (max_rows = rows). Without `--store` it
starts its own redis-server (from PATH, data in a temp dir, no persistence) on a free loopback port and
stops it after. Run:

    python -m neuronserve.bench.fleet [--rows 1000000] [--labels 4] [--dim 64] [--store redis://HOST:PORT/DB] [--repeat 2]

Prints the fill time, then per repeat the load time, rows per second and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server); or pass --store URL")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    end = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.monotonic() > end:
                proc.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neuronserve.bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=4, help="K (default 4, the demo model)")
    parser.add_argument("--dim", type=int, default=64, help="D (default 64, the demo model)")
    parser.add_argument(
        "--store", default=None, help="redis:// URL of a store to use (its version key 'bench-fleet' is overwritten)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="warm starts to time (default 2)")
    args = parser.parse_args(argv)

    from neuronserve.embeddings import EmbeddingCache
    from neuronserve.fleet import Follower, StoreStatus
    from neuronserve.fleet_store import RedisStore

    with tempfile.TemporaryDirectory(prefix="neuronserve-bench-redis-") as directory:
        proc, url = (None, args.store) if args.store else _start_redis(directory)
        try:
            store = RedisStore(
                url, model_name="bench", model_version="bench-fleet", num_labels=args.labels, label_dim=args.dim
            )
            client = store._client()
            client.delete(
                store.changes_key, store.seq_key, store.meta_key, *store.row_keys["user"], *store.row_keys["peer"]
            )
            rng = np.random.default_rng(0)
            chunk = rng.standard_normal((1000, args.labels, args.dim)).astype(np.float32)
            started = time.perf_counter()
            for at in range(0, args.rows, 1000):
                ids = np.arange(at, min(at + 1000, args.rows))
                store.write("peer", ids, chunk[: len(ids)])
            fill_s = time.perf_counter() - started
            print(
                f"filled {args.rows:,} rows of K={args.labels} x D={args.dim} float32 ({args.labels * args.dim * 4} B) "
                f"in {fill_s:.1f} s ({args.rows / fill_s:,.0f} rows/s); redis used_memory {client.info('memory')['used_memory'] / 2**30:.2f} GiB",
                flush=True,
            )
            for repeat in range(args.repeat):
                cache = EmbeddingCache(
                    model_version="bench-fleet",
                    num_labels=args.labels,
                    label_dim=args.dim,
                    label_bias=[0.0] * args.labels,
                    max_rows=args.rows,
                )
                follower = Follower(store, cache, StoreStatus())
                started = time.perf_counter()
                assert follower.warm_start()
                load_s = time.perf_counter() - started
                assert cache.rows("peer") == args.rows, cache.rows("peer")
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                print(
                    f"warm start {repeat + 1}: {args.rows:,} rows in {load_s:.2f} s ({args.rows / load_s:,.0f} rows/s); "
                    f"peak RSS {peak:.2f} GiB",
                    flush=True,
                )
                cache.close()
            store.close()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
