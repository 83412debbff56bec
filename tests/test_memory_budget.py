"""The memory budget (issue 12, item 1; docs/memory.md): a real `neuronserve serve` on 127.0.0.1 in a
subprocess, whose peak RSS (VmHWM, reset through /proc/PID/clear_refs) stays within the budget computed
from the same settings by memory_budget.memory_budget through 32 concurrent 63 MiB bodies, 16 concurrent
largest ScoreMatrix calls and a burst of upserts into a full cache, and whose RSS is back within 1.2x of
its baseline afterwards. Also: the working-memory estimates against tracemalloc's peak, the gate, and the
derived maximum message size."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import grpc
import numpy as np
import pytest

from neuronserve import tick
from neuronserve.config import MAX_GRPC_MESSAGE_BYTES, ServerConfig
from neuronserve.embeddings import EmbeddingCache
from neuronserve.errors import ConfigError, InvalidInput, Overloaded
from neuronserve.memory_release import process_memory
from neuronserve.memory_budget import (
    MIB,
    ModelShape,
    ScoringGate,
    largest_request_bytes,
    matrix_working_bytes,
    memory_budget,
    message_bytes,
    tick_working_bytes,
)
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.scorer_service import ScorerService
from neuronserve.service import finite_output, tensor_proto
from neuronserve.settings import add_arguments, resolve_config

pytestmark = pytest.mark.timeout(120)

SMALL = ModelShape(user_features=16, peer_features=16, num_labels=3, label_dim=16)  # conftest.SMALL_CONFIG
CACHE_ROWS = 2000
BODY_BYTES = 63 * MIB


# ---- the estimates, the gate, the derived message size -------------------------------------------


@pytest.fixture(scope="module")
def cache():
    cache = EmbeddingCache(model_version="v", num_labels=3, label_dim=16, label_bias=[0.1, 0.0, -0.1], max_rows=2048)
    rng = np.random.default_rng(0)
    for kind in ("user", "peer"):
        cache.upsert(kind, np.arange(2048), rng.standard_normal((2048, 3, 16)).astype(np.float32), "v")
    yield cache
    cache.close()


def traced_peak(work) -> int:
    """tracemalloc's peak (numpy's buffers and Python's bytes) of work(), above what was traced before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "rows, cols, k, mutual, pool, labels, blocked",
    [
        (1024, 1024, 597, True, True, True, 1 << 18),  # a mutual pool (its whole matrix), label scores, blocked pairs
        (2048, 2048, 50, True, False, True, 0),  # users x peers, mutual: both directions per block
        (1000, 2048, 5, False, False, False, 0),
        (2048, 2048, 1500, False, True, False, 0),  # a large k: the result dominates
    ],
)
@pytest.mark.parametrize("on", ["host", "sim"])
def test_the_tick_estimate_covers_its_measured_peak(cache, rows, cols, k, mutual, pool, labels, blocked, on, small_artifact):
    from neuronserve.backends.sim import SimBackend
    from neuronserve.config import SimConfig

    device = SimBackend(small_artifact, SimConfig(num_cores=2, latency_scale=0.0)).tick_device() if on == "sim" else None
    rng = np.random.default_rng(1)
    row_ids, col_ids = np.arange(rows), np.arange(cols)
    pairs = (rng.integers(0, rows, blocked), rng.integers(0, cols, blocked)) if blocked else (None, None)
    spec = tick.make_spec(
        k,
        [],
        3,
        rows - 1 if pool else cols,
        mutual=tick.MINIMUM if mutual else tick.ONE_WAY,
        include_label_scores=labels,
    )

    def work():
        result = ScorerService._tick(None, cache, row_ids if pool else None, row_ids, col_ids, *pairs, spec, device)
        reply = [result.ids.astype("<i8").tobytes(), tensor_proto(result.values)]
        if result.label_scores is not None:
            reply.append(tensor_proto(result.label_scores))

    estimate = tick_working_bytes(SMALL, rows, cols, k, mutual=mutual, pool=pool, labels=labels, blocked=blocked, device=device)
    assert traced_peak(work) <= estimate


@pytest.mark.parametrize("users, peers", [(2048, 2048), (100, 2048)])
def test_the_matrix_estimate_covers_its_measured_peak(cache, users, peers):
    def work():
        tensor_proto(finite_output(cache.score_matrix(np.arange(users), np.arange(peers)), "scores"))

    assert traced_peak(work) <= matrix_working_bytes(SMALL, users, peers)


def test_the_gate_refuses_at_once_and_releases():
    gate = ScoringGate(100 * MIB)
    with pytest.raises(InvalidInput, match="above the server's max_scoring_bytes"), gate.reserve(101 * MIB, "big"):
        pass
    with gate.reserve(60 * MIB, "one"):
        with pytest.raises(Overloaded, match="held by calls in progress"), gate.reserve(60 * MIB, "two"):
            pass
        assert gate.reserved == 60 * MIB
    assert gate.reserved == 0
    with gate.reserve(100 * MIB, "the whole budget"):
        pass


def test_a_cancelled_call_keeps_its_bytes_until_its_thread_returns_and_its_thread_sees_the_stop():
    gate, started, finish, stopped = ScoringGate(100 * MIB), threading.Event(), threading.Event(), []

    def work(stop: threading.Event) -> None:
        started.set()
        finish.wait(20)
        stopped.append(stop.is_set())

    async def call() -> None:
        with gate.reserve(60 * MIB, "one") as held:
            await held.run(work)

    async def scenario() -> None:
        task = asyncio.create_task(call())
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.reserved == 60 * MIB  # the call has ended; its thread still runs
        with pytest.raises(Overloaded), gate.reserve(60 * MIB, "two"):
            pass
        finish.set()
        await asyncio.wait_for(until(lambda: gate.reserved == 0), 20)

    asyncio.run(scenario())
    assert stopped == [True]


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)  # a turn of the loop: the thread's done callback runs on it


def test_the_gate_keeps_one_tick_matrix_reserved_and_gives_it_up_for_any_call():
    gate = ScoringGate(100 * MIB)
    matrix = np.empty(40 * MIB // 4, np.float32)
    gate.keep(matrix)
    assert (gate.kept_bytes, gate.reserved) == (40 * MIB, 40 * MIB)
    assert gate.take(50 * MIB) is None and gate.kept_bytes == 40 * MIB  # too small for that tick
    assert gate.take(30 * MIB) is matrix and (gate.kept_bytes, gate.reserved) == (0, 0)
    gate.keep(matrix)
    gate.keep(np.empty(MIB // 4, np.float32))  # a smaller one does not replace it
    assert gate.kept_bytes == 40 * MIB
    with gate.reserve(60 * MIB, "fits beside it"):
        assert gate.reserved == 100 * MIB
    with gate.reserve(70 * MIB, "needs its room"):
        assert (gate.kept_bytes, gate.reserved) == (0, 70 * MIB)
        gate.keep(matrix)  # no room beside the call in progress: not kept
        assert gate.kept_bytes == 0
    assert gate.reserved == 0


def test_the_default_message_size_is_the_largest_legitimate_request_plus_a_quarter():
    demo = ModelShape(64, 64, 4, 64)
    config = ServerConfig()
    largest = largest_request_bytes(demo, config.max_peers, config.batching.max_queue_rows, config.max_tick_ids)
    derived = message_bytes(config, demo)
    assert derived == math.ceil(1.25 * largest / MIB) * MIB and derived < 64 * MIB  # 21 MiB, not 64
    assert message_bytes(ServerConfig(max_message_bytes=5 * MIB), demo) == 5 * MIB  # a setting wins
    near = ServerConfig(max_peers=7_000_000)  # about 1.8 GB requests: x 1.25 would pass gRPC's 2 GiB - 1
    assert message_bytes(near, demo) == MAX_GRPC_MESSAGE_BYTES
    with pytest.raises(ConfigError, match=r"--max-peers 10000000,.* above gRPC's message limit"):
        message_bytes(ServerConfig(max_peers=10_000_000), demo)


# ---- a real server under the three bursts --------------------------------------------------------


def settings(manifest) -> list[str]:
    """Small settings: 8 calls in flight, a 2,000-row cache, ScoreMatrix up to its message's size."""
    return [
        "--artifact", str(manifest.directory), "--backend", "cpu", "--cores", "1", "--port", "0",
        "--metrics-port", "off", "--max-concurrent-rpcs", "8", "--max-peers", "1400", "--max-tick-ids", "512",
        "--cache-max-rows", str(CACHE_ROWS), "--max-queue-rows", "4096",
    ]  # fmt: skip


class Served:
    """`python -m neuronserve serve ARGS`: its port from the ready line, its log collected."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "neuronserve", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.log.append(line) for line in self.proc.stderr], daemon=True).start()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        end = time.monotonic() + 60
        while time.monotonic() < end and self.proc.poll() is None:
            try:
                match = re.search(r"grpc=\S+:(\d+)", lines.get(timeout=0.1))
            except queue.Empty:
                continue
            if match:
                self.port = int(match.group(1))
                return
        self.stop()
        raise AssertionError("no ready line:\n" + "".join(self.log[-30:]))

    def memory(self):
        return process_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def features(seed: int, rows: int) -> pb.Tensor:
    array = np.random.default_rng(seed).standard_normal((rows, 16)).astype("<f4")
    return pb.Tensor(data=array.tobytes(), shape=array.shape)


def packed(ids) -> bytes:
    return np.asarray(ids, "<i8").tobytes()


def outcomes(futures) -> list[str]:
    """Each call's status name (OK or the error's code)."""
    names = []
    for future in futures:
        try:
            future.result()
            names.append("OK")
        except grpc.RpcError as error:
            names.append(error.code().name)
    return names


def test_peak_rss_stays_within_the_budget_and_returns_to_baseline(small_artifact):
    args = settings(small_artifact)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args(args), environ={})
    server = Served(args)
    try:
        started = server.memory()  # the budget's baseline: the warm process, less its shared memory (the cache)
        budget = memory_budget(config, SMALL, started.private)
        assert any("memory budget: peak RSS <=" in line for line in server.log)
        assert any(f"max_message_bytes {message_bytes(config, SMALL)} (" in line for line in server.log)
        channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        scorer = pb_grpc.ScorerStub(channel)
        for kind in (pb.USER, pb.PEER):  # fill the cache: every id 0..1999 as a user and as a peer
            reply = scorer.UpsertEmbeddings(
                pb.UpsertEmbeddingsRequest(
                    kind=kind, ids_packed=packed(range(CACHE_ROWS)), features=features(kind, CACHE_ROWS)
                ),
                timeout=30,
            )
            assert reply.cache_rows == CACHE_ROWS
        baseline = server.memory().rss
        with open(f"/proc/{server.proc.pid}/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := VmRSS

        # 32 concurrent 63 MiB bodies: refused by gRPC before they are read (above max_message_bytes)
        body = os.urandom(BODY_BYTES)
        raw = channel.unary_unary("/neuronserve.v1.Scorer/Score")
        codes = outcomes([raw.future(body, timeout=60) for _ in range(32)])
        del body
        assert set(codes) == {"RESOURCE_EXHAUSTED"}, codes

        # 16 concurrent largest ScoreMatrix calls: the reply as large as max_message_bytes allows
        side = min(config.max_peers, math.isqrt((message_bytes(config, SMALL) - 4096) // (4 * SMALL.num_labels)))
        matrix = pb.ScoreMatrixRequest(user_ids_packed=packed(range(side)), peer_ids_packed=packed(range(side)))
        futures = [scorer.ScoreMatrix.future(matrix, timeout=60) for _ in range(16)]
        codes = outcomes(futures)
        assert "OK" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        ok = next(f.result() for f, code in zip(futures, codes, strict=True) if code == "OK")
        assert list(ok.scores.shape) == [side, side, 3]
        del futures, ok

        # a burst of upserts into the full cache: each 2,000 new ids, evicting as many
        upserts = [
            scorer.UpsertEmbeddings.future(
                pb.UpsertEmbeddingsRequest(
                    kind=(pb.USER, pb.PEER)[i % 2],
                    ids_packed=packed(range(10_000 * (i + 1), 10_000 * (i + 1) + CACHE_ROWS)),
                    features=features(i, CACHE_ROWS),
                ),
                timeout=60,
            )
            for i in range(16)
        ]
        codes = outcomes(upserts)
        assert "OK" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert all(f.result().cache_rows == CACHE_ROWS for f, code in zip(upserts, codes, strict=True) if code == "OK")
        del upserts
        channel.close()

        peak = server.memory().peak
        assert peak <= budget.total_bytes, f"peak {peak / MIB:.0f} MiB above the budget: {budget.describe()}"
        end = time.monotonic() + 20  # the trimmer looks every second
        while server.memory().rss > 1.2 * baseline and time.monotonic() < end:
            time.sleep(0.1)
        after = server.memory().rss
        print(
            f"baseline {baseline / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, after {after / MIB:.0f} MiB; {budget.describe()}"
        )
        assert after <= 1.2 * baseline, f"RSS {after / MIB:.0f} MiB after the bursts, baseline {baseline / MIB:.0f} MiB"
    finally:
        server.stop()
