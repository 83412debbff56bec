"""The matching tick on a device (tick_device, backends/tick_runners): on the simulated NeuronCores it
equals the host tick and the numpy reference, its executions cover the blocks and take the latency
model's time on a fake clock, and a `--backend sim` server answers ScoreTick as the cpu server does."""

from __future__ import annotations

import math
import threading

import grpc
import numpy as np
import pytest

from neuronserve import tick as T
from neuronserve.backends.sim import SimBackend
from neuronserve.backends.tick_runners import SimTick, tick_latency_s
from neuronserve.config import CoreGroup, ServerConfig, SimConfig
from neuronserve.contract import TICK_GRAPH
from neuronserve.protos import scorer_pb2 as pb
from neuronserve.protos import scorer_pb2_grpc as pb_grpc
from neuronserve.server import Server
from neuronserve.tick_reference import reference_tick
from support import LoopThread
from test_tick import COMBOS, assert_same, decode, pool_case

pytestmark = pytest.mark.timeout(120)


class FakeClock:
    """Time that moves only when a sleeper sleeps (thread-safe: the tick's threads share it)."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.slept_s = 0.0
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now_s

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now_s += seconds
            self.slept_s += seconds


def sim_tick(manifest, cores: int, block: tuple[int, int]):
    fake = FakeClock()
    backend = SimBackend(manifest, SimConfig(num_cores=cores), clock=fake.clock, sleep=fake.sleep)
    return backend, SimTick(backend, block), fake


def case(pool: bool, space: str, mutual: str, quantized: bool, n: int = 70, m: int = 45):
    """score_tick's arguments for a pool of n, or n users x m peers (each also cached the other way)."""
    ids, users, peers, bias = pool_case(3, n if pool else n + m, quantized=quantized)
    weights = [0.5, 1.25, 0.25] if mutual in (T.PRODUCT, T.HARMONIC_MEAN) else [0.5, -1.0, 2.0]
    candidates = n - 1 if pool else m
    spec = T.make_spec(7, weights, 3, candidates, label_space=space, mutual=mutual)
    rows = ids if pool else ids[:n]
    cols_all = ids if pool else ids[n:]
    order = np.argsort(cols_all)
    cols = cols_all[order]
    col_user, col_peer = (users, peers) if pool else (users[n:], peers[n:])
    excluded = T.exclusions(rows, cols, exclude_self=pool, blocked_rows=ids[:5], blocked_cols=ids[-5:], symmetric=pool)
    args = (rows, cols, users[: len(rows)], col_peer[order], bias, spec)
    extra = dict(rows_peer=peers[: len(rows)], cols_user=col_user[order], excluded=excluded)
    return args, extra


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("space,mutual", COMBOS)
def test_the_sim_tick_equals_the_host_tick_and_the_reference(small_artifact, pool, space, mutual, quantized):
    backend, device, fake = sim_tick(small_artifact, cores=2, block=(8, 12))
    args, extra = case(pool, space, mutual, quantized)
    on_sim = T.score_tick(*args, **extra, pool=pool, device=device)
    # BLAS may round a dot product differently at another matrix shape (1 ulp): equal up to near-ties;
    # quantized vectors make every dot product exact, so there every tie is exact and ids must match
    assert_same(on_sim, T.score_tick(*args, **extra, pool=pool), exact_ids=quantized)
    assert_same(on_sim, reference_tick(*args, **extra), exact_ids=quantized)
    # every block of rows against every tile of columns, per direction computed on the device
    n, m = len(args[0]), len(args[1])
    directions = 2 if mutual != T.ONE_WAY and not pool else 1
    blocks = directions * math.ceil(n / 8) * math.ceil(m / 12)
    stats = backend.stats()
    assert stats.executions[TICK_GRAPH] == blocks
    modelled_s = tick_latency_s(small_artifact.model_config.num_labels, small_artifact.model_config.label_dim, 8, 12)
    assert stats.busy_s == pytest.approx(blocks * modelled_s)
    assert fake.now_s >= blocks * modelled_s / 2 - 1e-9  # two cores: at best half of it in series


def test_a_tick_execution_queues_behind_the_pipelines_execution_on_the_same_core(small_artifact):
    """A device phase takes no in-flight slot but starts only when the core's device is free."""
    slept: list[float] = []
    backend = SimBackend(small_artifact, SimConfig(num_cores=1), clock=lambda: 0.0, sleep=slept.append)  # time stands still
    device = SimTick(backend, (8, 12))
    backend._execute("pair_scorer", CoreGroup(0), 0.25, lambda: np.zeros(1))  # the pipeline's: device busy until 0.25
    backend.device_phase(TICK_GRAPH, 0.5)
    assert slept == [0.25, 0.75]  # the tick's phase waited for the pipeline's, then ran its own 0.5 s
    stats = backend.stats()
    assert stats.cores[0].busy_s == pytest.approx(0.75) and stats.executions[TICK_GRAPH] == 1
    assert stats.cores[0].in_flight == 0 and device.executions == backend.in_flight_per_core


def test_a_sim_server_answers_score_tick_as_the_cpu_server_does(small_artifact):
    rng = np.random.default_rng(4)
    pool = rng.choice(np.arange(1, 10_000), 60, replace=False).astype(np.int64)
    cfg = small_artifact.model_config
    features = {kind: rng.standard_normal((len(pool), w)).astype("<f4") for kind, w in ((pb.USER, cfg.user_features), (pb.PEER, cfg.peer_features))}
    replies = {}
    for backend in ("cpu", "sim"):
        loop = LoopThread()
        config = ServerConfig(artifact=str(small_artifact.directory), port=0, metrics_port=None, backend=backend, cores=1, sim=SimConfig(num_cores=2, latency_scale=0.0))
        server = Server(config)
        loop.run(server.start())
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.ScorerStub(channel)
                for kind, f in features.items():
                    stub.UpsertEmbeddings(pb.UpsertEmbeddingsRequest(kind=kind, ids=pool.tolist(), features=pb.Tensor(data=f.tobytes(), shape=f.shape)), timeout=20)
                request = pb.ScoreTickRequest(pool_ids=pool.tolist(), k=5, mutual=pb.ScoreTickRequest.PRODUCT)
                replies[backend] = stub.ScoreTick(request, timeout=30)
            if backend == "sim":
                assert server.versions.current.backend.stats().executions[TICK_GRAPH] > 0
        finally:
            loop.run(server.stop(5.0))
            loop.close()
    assert_same(decode(replies["sim"], len(pool)), decode(replies["cpu"], len(pool)))
