"""The fleet (`serve --embedding-store redis://...`, docs/fleet.md): a real redis-server on a free loopback
port and neuronserve replicas in subprocesses. An upsert through replica A is seen by ScoreByIds on
replica B (the lag of 1,000 is measured); the later upsert of an id wins on every replica; a replica
started after 100,000 upserts serves them all once it says SERVING; Redis stopped for OUTAGE_S under
load: scoring through both replicas keeps succeeding, upserts fail UNAVAILABLE, and once Redis is back
new upserts replicate and no acknowledged upsert is missing anywhere. Plus the pieces in-process: the
cache's sequence rule, the follower's reload after trimmed changes and after a reset store, settings.

Skipped, with the reason, when redis-server or the redis client is not installed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np
import pytest

from neuronserve.errors import Status
from test_server_e2e import Serve, tensor

REDIS_SERVER = shutil.which("redis-server")
pytestmark = [
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"),
    pytest.mark.timeout(120),
]
redis = pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")

OUTAGE_S = 10.0  # how long Redis is stopped under load (the figure)
USER = 1  # the user every ScoreByIds scores for


# ---- a real redis-server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll(condition, timeout_s: float, what: str, interval_s: float = 0.01):
    """condition() until truthy (returned) or the deadline (AssertionError naming `what`)."""
    end = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """redis-server on 127.0.0.1:<free port>, data in a temp dir, AOF on (a stop and start keeps the data)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec", "--dir", self.directory, "--logfile", os.path.join(self.directory, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                assert self.proc.poll() is None, open(os.path.join(self.directory, "redis.log")).read()[-2000:]
                return False

        poll(answers, 10, "redis-server to answer PING")
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis writes its AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def redis_server():
    with tempfile.TemporaryDirectory(prefix="neuronserve-redis-") as directory:
        server = RedisServer(directory)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# ---- replicas ----------------------------------------------------------------------------------


class Replica:
    """One `neuronserve serve --embedding-store URL` subprocess and stubs on its port."""

    def __init__(self, artifact, store_url: str, workers: int = 1) -> None:
        self.process = Serve(["--artifact", str(artifact.directory), "--backend", "cpu", "--cores", str(workers), "--workers", str(workers),
                              "--port", "0", "--metrics-port", "0", "--embedding-store", store_url, "--grace-period-s", "2", "--max-queue-delay-ms", "0"])
        self.channel = None

    def ready(self) -> "Replica":
        """Wait for the ready line (printed once health says SERVING); then the stubs."""
        from grpc_health.v1 import health_pb2_grpc

        from neuronserve.protos import scorer_pb2_grpc as pb_grpc

        ready = self.process.ready(timeout_s=60)
        self.ready_at = time.monotonic()
        self.metrics_port = int(ready["metrics"].rsplit(":", 1)[1])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{ready['port']}")
        self.stub = pb_grpc.ScorerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return self

    def upsert(self, kind: str, ids, features: np.ndarray, timeout_s: float = 10):
        from neuronserve.protos import scorer_pb2 as pb

        request = pb.UpsertEmbeddingsRequest(kind=pb.USER if kind == "user" else pb.PEER, ids=[int(i) for i in ids], features=tensor(features))
        return self.stub.UpsertEmbeddings(request, timeout=timeout_s)

    def scores(self, peer_ids, user_id: int = USER) -> np.ndarray:
        from neuronserve.protos import scorer_pb2 as pb

        reply = self.stub.ScoreByIds(pb.ScoreByIdsRequest(user_id=user_id, peer_ids=[int(i) for i in peer_ids]), timeout=10)
        return np.frombuffer(reply.scores.data, "<f4").reshape(tuple(reply.scores.shape))

    def has(self, peer_ids) -> bool:
        try:
            self.scores(peer_ids)
            return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False

    def metrics(self) -> Dict[str, float]:
        """The neuronserve_embedding_store_* samples, by name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("neuronserve_embedding_store_"):
                name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
                out[name] = float(value)
        return out

    def store_health(self) -> int:
        from grpc_health.v1 import health_pb2

        return self.health.Check(health_pb2.HealthCheckRequest(service="neuronserve.EmbeddingStore"), timeout=5).status

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.process.kill()


@pytest.fixture(scope="module")
def fleet(small_artifact, redis_server):
    """Replicas A (one process) and B (a pool of 2 workers, its follower in the supervisor) on one store,
    user USER upserted through A and seen on B."""
    replicas: List[Replica] = []
    try:
        replicas += [Replica(small_artifact, redis_server.url), Replica(small_artifact, redis_server.url, workers=2)]  # side by side
        a, b = (replica.ready() for replica in replicas)
        a.upsert("user", [USER], features(16, 1, seed=0))
        a.upsert("peer", [0], features(16, 1, seed=1))
        poll(lambda: b.has([0]), 10, "the first upsert on B")
        yield a, b
    finally:
        for replica in replicas:
            replica.close()


def features(width: int, rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


def expected_scores(artifact, store_url: str, peer_ids) -> np.ndarray:
    """ScoreByIds(USER, peer_ids) computed from the rows in the store (the source of truth)."""
    from neuronserve.fleet_store import RedisStore

    cfg = artifact.model_config
    store = RedisStore(store_url, model_name=artifact.model_name, model_version=artifact.model_version, num_labels=cfg.num_labels, label_dim=cfg.label_dim)
    rows = {}
    for kind in ("user", "peer"):
        for batch in store.scan(kind):
            rows.update({(kind, int(i)): v for i, v in zip(batch.ids, batch.vectors)})
    store.close()
    user = rows[("user", USER)]
    peers = np.stack([rows[("peer", int(i))] for i in peer_ids])
    return np.einsum("kd,mkd->mk", user, peers) + np.asarray(artifact.label_bias, np.float32)


# ---- replication ---------------------------------------------------------------------------------


def test_an_upsert_through_a_is_seen_on_b_and_the_lag_is_measured(fleet):
    """1,000 single-peer upserts through A, each then polled on B: the lag is from A's answer to the
    first ScoreByIds on B that finds it (an upper bound: it includes that call). Printed: P50/P99/max."""
    a, b = fleet
    lags = []
    for i in range(1000):
        peer = 100_000 + i
        a.upsert("peer", [peer], features(16, 1, seed=peer))
        acked = time.perf_counter()
        poll(lambda: b.has([peer]), 10, f"peer {peer} on B", interval_s=0.0005)
        lags.append(time.perf_counter() - acked)
    lags_ms = np.array(lags) * 1e3
    print(f"\nreplication lag A -> B over {len(lags)} upserts: p50 {np.percentile(lags_ms, 50):.2f} ms, "
          f"p99 {np.percentile(lags_ms, 99):.2f} ms, max {lags_ms.max():.2f} ms")
    np.testing.assert_array_equal(a.scores(range(100_000, 101_000)), b.scores(range(100_000, 101_000)))


def test_the_later_upsert_of_an_id_wins_on_every_replica(fleet, small_artifact, redis_server):
    a, b = fleet
    ids = [200_000, 200_001, 200_002]
    for round_ in range(12):  # one after the other, alternating replicas: each write is the latest
        writer, other = (a, b) if round_ % 2 == 0 else (b, a)
        writer.upsert("peer", ids, features(16, 3, seed=1000 + round_))
        written = writer.scores(ids)  # the writer applied its own write before answering
        poll(lambda: np.array_equal(other.scores(ids), written), 10, f"round {round_} on the other replica")
    # concurrent writers of the same ids through both replicas: every replica ends on the store's row
    errors: List[BaseException] = []

    def hammer(replica: Replica, seed: int) -> None:
        try:
            for i in range(40):
                replica.upsert("peer", ids, features(16, 3, seed=seed + i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(replica, seed)) for replica, seed in ((a, 5000), (b, 6000))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    truth = expected_scores(small_artifact, redis_server.url, ids)
    poll(lambda: np.allclose(a.scores(ids), truth, atol=1e-5) and np.allclose(b.scores(ids), truth, atol=1e-5), 10,
         "both replicas on the store's latest rows")
    # idempotent: the same upsert again changes nothing anywhere
    a.upsert("peer", ids, features(16, 3, seed=6039))
    b.upsert("peer", ids, features(16, 3, seed=6039))
    poll(lambda: np.array_equal(a.scores(ids), b.scores(ids)), 10, "both replicas on the repeated upsert")


def test_a_replica_started_after_100000_upserts_serves_them_all_when_it_says_serving(fleet, small_artifact, redis_server):
    from grpc_health.v1 import health_pb2

    a, _ = fleet
    ids = np.arange(1_000_000, 1_100_000)
    for start in range(0, len(ids), 1000):
        a.upsert("peer", ids[start : start + 1000], features(16, 1000, seed=start))
    c = Replica(small_artifact, redis_server.url)
    try:
        c.ready()  # its ready line: it said SERVING just before
        assert c.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        for start in range(0, len(ids), 4000):  # every one, at once: no NOT_FOUND
            np.testing.assert_array_equal(c.scores(ids[start : start + 4000]), a.scores(ids[start : start + 4000]))
        assert any("warm start: loading" in line for line in c.process.stderr)
        loaded = [line for line in c.process.stderr if "embedding store: loaded" in line]
        assert loaded and int(loaded[-1].split("loaded ", 1)[1].split(" ", 1)[0]) >= 100_000, loaded
        metrics = c.metrics()
        assert metrics["neuronserve_embedding_store_up"] == 1 and metrics["neuronserve_embedding_store_rows_loaded"] >= 100_000
        assert c.store_health() == health_pb2.HealthCheckResponse.SERVING
    finally:
        c.close()


# ---- Redis down under load ------------------------------------------------------------------------


def test_redis_down_under_load_scoring_goes_on_upserts_fail_and_nothing_acknowledged_is_lost(fleet, small_artifact, redis_server):
    from grpc_health.v1 import health_pb2

    a, b = fleet
    scored: Dict[str, List[str]] = {"a": [], "b": []}
    upserts: List[Tuple[int, str, float, str]] = []  # (peer id, replica, time answered, status)
    stop = threading.Event()
    known = list(range(400_000, 401_000))
    a.upsert("peer", known, features(16, len(known), seed=4))
    poll(lambda: b.has(known), 10, "the scored peers on B")

    def score(name: str, replica: Replica) -> None:
        rng = np.random.default_rng(len(name))
        while not stop.is_set():
            try:
                replica.scores(rng.choice(known, 100, replace=False))
                scored[name].append("OK")
            except grpc.RpcError as exc:
                scored[name].append(f"{exc.code().name}: {exc.details()}")

    def upsert() -> None:
        peer = 300_000
        while not stop.is_set():
            replica, name = (a, "a") if peer % 2 == 0 else (b, "b")
            try:
                replica.upsert("peer", [peer], features(16, 1, seed=peer), timeout_s=5)
                status = "OK"
            except grpc.RpcError as exc:
                status = f"{exc.code().name}: {exc.details()}"
            upserts.append((peer, name, time.monotonic(), status))
            peer += 1
            time.sleep(0.005)  # an upsert rate, not a wait for a result

    threads = [threading.Thread(target=score, args=("a", a)), threading.Thread(target=score, args=("b", b)), threading.Thread(target=upsert)]
    for thread in threads:
        thread.start()
    try:
        poll(lambda: len(upserts) >= 20 and min(len(scored["a"]), len(scored["b"])) >= 20, 20, "load before the outage")
        redis_server.stop()
        stopped = time.monotonic()
        poll(lambda: any(s != "OK" and t > stopped for _, _, t, s in upserts), 10, "an upsert refused after Redis stopped")
        for replica in (a, b):  # health and metrics say the copy is stale, and since when
            poll(lambda: replica.store_health() == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "store health NOT_SERVING")
            poll(lambda: replica.metrics()["neuronserve_embedding_store_stale_seconds"] > 0.5, 10, "stale seconds growing")
            metrics = replica.metrics()
            assert metrics["neuronserve_embedding_store_up"] == 0
            assert 0 < time.time() - metrics["neuronserve_embedding_store_last_contact_timestamp_seconds"] < 60
            assert replica.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        poll(lambda: time.monotonic() - stopped >= OUTAGE_S, OUTAGE_S + 5, "the end of the outage", interval_s=0.1)
        scored_during = {name: len(outcomes) for name, outcomes in scored.items()}
        redis_server.start()
        restarted = time.monotonic()
        poll(lambda: sum(1 for _, n, t, s in upserts if t > restarted and s == "OK" and n == "a") >= 5
             and sum(1 for _, n, t, s in upserts if t > restarted and s == "OK" and n == "b") >= 5, 20, "upserts acknowledged again")
        for replica in (a, b):
            poll(lambda: replica.store_health() == health_pb2.HealthCheckResponse.SERVING, 10, "store health SERVING again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    for name, outcomes in scored.items():  # scoring never failed, and went on during the outage
        assert outcomes and set(outcomes) == {"OK"}, (name, [o for o in outcomes if o != "OK"][:3])
        assert scored_during[name] > 20
    refused = [(p, s) for p, _, t, s in upserts if s != "OK"]
    assert refused and all(s.startswith("UNAVAILABLE: ") and "embedding store" in s for _, s in refused), refused[:3]
    assert all(stopped - 1 < t < restarted + 10 for _, _, t, s in upserts if s != "OK")  # only around the outage
    acked = [p for p, _, _, s in upserts if s == "OK"]
    assert sum(1 for _, _, t, s in upserts if s == "OK" and t > restarted) >= 10
    for replica in (a, b):  # every acknowledged upsert is on both replicas, and is the store's row
        poll(lambda: replica.has(acked), 10, "every acknowledged upsert replicated")
    truth = expected_scores(small_artifact, redis_server.url, acked)
    np.testing.assert_allclose(a.scores(acked), truth, atol=1e-5)
    np.testing.assert_allclose(b.scores(acked), truth, atol=1e-5)
    for replica in (a, b):
        metrics = replica.metrics()
        assert metrics["neuronserve_embedding_store_up"] == 1 and metrics["neuronserve_embedding_store_stale_seconds"] == 0


# ---- the pieces, in-process ------------------------------------------------------------------------


def small_cache(max_rows: int = 1000):
    from neuronserve.embeddings import EmbeddingCache

    return EmbeddingCache(model_version="v1", num_labels=2, label_dim=4, label_bias=[0.0, 0.0], max_rows=max_rows)


def test_the_cache_keeps_each_ids_highest_sequence_number():
    cache = small_cache()
    ones, twos = np.ones((2, 2, 4), np.float32), np.full((2, 2, 4), 2, np.float32)
    cache.upsert("peer", np.array([1, 2]), twos, "v1", seqs=np.array([20, 21]))
    cache.upsert("peer", np.array([1, 2]), ones, "v1", seqs=np.array([10, 21]))  # older and equal: both skipped
    assert (cache.lookup("peer", np.array([1, 2])) == 2).all()
    cache.upsert("peer", np.array([2, 3]), ones, "v1", seqs=np.array([30, 5]))  # newer and new: both taken
    np.testing.assert_array_equal(cache.lookup("peer", np.array([1, 2, 3]))[:, 0, 0], [2, 1, 1])
    cache.upsert("peer", np.array([4]), ones[:1], "v1")  # a local upsert after store rows: still a distinct, later sequence
    assert cache.rows("peer") == 4


def store_and_follower(url: str, cache, **kwargs):
    from neuronserve.fleet import Follower, StoreStatus
    from neuronserve.fleet_store import RedisStore

    store = RedisStore(url, model_name="m", model_version="v1", num_labels=2, label_dim=4, **kwargs)
    status = StoreStatus()
    return store, Follower(store, cache, status, block_s=0.05, backoff_s=(0.01, 0.05)), status


def test_a_follower_that_missed_trimmed_changes_reloads_and_a_reset_store_starts_it_over(redis_server):
    redis.Redis(port=redis_server.port).delete(*[f"neuronserve:{{m@v1}}:{k}" for k in ("changes", "seq", "meta")])
    store, follower, status = store_and_follower(redis_server.url, small_cache(), stream_max_entries=10)
    writer = store
    try:
        writer.write("peer", np.array([1]), np.zeros((1, 2, 4), np.float32))
        assert follower.warm_start() and follower.cache.rows("peer") == 1
        for i in range(200):  # far more than the stream keeps, before the follower reads any
            writer.write("peer", np.array([i % 50 + 10]), np.full((1, 2, 4), i, np.float32))
        follower.start()
        poll(lambda: status.state().reloads == 1 and follower.cache.rows("peer") == 51, 10, "a reload after trimmed changes")
        np.testing.assert_array_equal(follower.cache.lookup("peer", np.array([10, 59]))[:, 0, 0], [150, 199])
        redis.Redis(port=redis_server.port).flushdb()  # the store loses its data
        writer.write("peer", np.array([5]), np.full((1, 2, 4), 7, np.float32))  # sequence 1 again, a new epoch
        poll(lambda: status.state().reloads == 2 and follower.cache.rows("peer") == 1, 10, "starting over from the reset store")
        assert follower.cache.lookup("peer", np.array([5]))[0, 0, 0] == 7
    finally:
        follower.stop()
        store.close()


def test_an_unreachable_store_refuses_the_upsert_with_unavailable_naming_it():
    from neuronserve.errors import StoreUnavailable
    from neuronserve.fleet import FleetCache, StoreStatus
    from neuronserve.fleet_store import RedisStore

    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nobody listens there
    cache = small_cache()
    fleet_cache = FleetCache(cache, RedisStore(url, model_name="m", model_version="v1", num_labels=2, label_dim=4, timeout_s=0.5), StoreStatus())
    with pytest.raises(StoreUnavailable) as info:
        fleet_cache.upsert("peer", np.array([1]), np.zeros((1, 2, 4), np.float32), "v1")
    assert info.value.status is Status.UNAVAILABLE and "embedding store redis://:***@127.0.0.1" in str(info.value) and "secret" not in str(info.value)
    assert cache.rows("peer") == 0  # nothing applied locally


@pytest.mark.parametrize("value, ok", [("embedded", True), ("redis://127.0.0.1:6379/0", True), ("redis://h:6379", True),
                                       ("http://h:6379/0", False), ("redis://", False), ("redis://h:port/0", False)])
def test_the_embedding_store_setting(value, ok):
    from neuronserve.errors import ConfigError
    from neuronserve.settings import resolve_config

    from test_server_e2e import parse

    if ok:
        assert resolve_config(parse(["--embedding-store", value]), environ={}).embedding_store == value
    else:
        with pytest.raises(ConfigError, match="--embedding-store"):
            resolve_config(parse(["--embedding-store", value]), environ={})
