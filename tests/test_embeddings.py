"""Unit tests for neuronserve.embeddings: the math against plain numpy loops, and the cache's rules."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

from neuronserve import shared_table
from neuronserve.cache_ids import positions
from neuronserve.embeddings import KINDS, CacheStats, EmbeddingCache
from neuronserve.errors import ConfigError, InvalidInput, NotFound, Unavailable

pytestmark = pytest.mark.timeout(60)


def make_cache(k: int = 3, d: int = 16, max_rows: int = 100, version: str = "v1") -> EmbeddingCache:
    bias = np.linspace(-0.5, 0.5, k).tolist()
    return EmbeddingCache(model_version=version, num_labels=k, label_dim=d, label_bias=bias, max_rows=max_rows)


def vecs(rng: np.random.Generator, n: int, k: int = 3, d: int = 16) -> np.ndarray:
    return rng.standard_normal((n, k, d)).astype(np.float32)


def loop_scores(u: np.ndarray, p: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """score[n, m, k] = sum_d u[n, k, d] * p[m, k, d] + b[k], in float64, one element at a time."""
    out = np.zeros((len(u), len(p), len(bias)))
    for n in range(len(u)):
        for m in range(len(p)):
            for k in range(len(bias)):
                out[n, m, k] = float(np.dot(u[n, k].astype(np.float64), p[m, k].astype(np.float64))) + bias[k]
    return out


@pytest.mark.parametrize("k,d", [(3, 16), (4, 64), (1, 1)])
def test_scores_match_numpy_loop(k, d):
    rng = np.random.default_rng(k * 100 + d)
    cache = make_cache(k, d)
    user_ids, peer_ids = rng.permutation(1000)[:7], rng.permutation(1000)[:11] + 5000
    users, peers = vecs(rng, 7, k, d), vecs(rng, 11, k, d)
    cache.upsert("user", user_ids, users, "v1")
    cache.upsert("peer", peer_ids, peers, "v1")
    bias = np.linspace(-0.5, 0.5, k)
    # ask in a different order than upserted, with a repeated peer
    ask_u, ask_p = user_ids[[3, 0, 6]], peer_ids[[10, 2, 2, 5]]
    expected = loop_scores(users[[3, 0, 6]], peers[[10, 2, 2, 5]], bias)

    matrix = cache.score_matrix(ask_u, ask_p)
    assert matrix.shape == (3, 4, k) and matrix.dtype == np.float32 and matrix.flags.c_contiguous
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-5)

    by_ids = cache.score_by_ids(int(ask_u[0]), ask_p)
    assert by_ids.shape == (4, k) and by_ids.dtype == np.float32
    np.testing.assert_allclose(by_ids, expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(by_ids, cache.score_matrix(ask_u[:1], ask_p)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.lookup("peer", ask_p), peers[[10, 2, 2, 5]])


def test_overwrite_replaces_vectors_and_keeps_others():
    rng = np.random.default_rng(1)
    cache = make_cache()
    first = vecs(rng, 3)
    assert cache.upsert("peer", np.array([5, 1, 9]), first, "v1") == 3
    second = vecs(rng, 2)
    assert cache.upsert("peer", np.array([9, 4]), second, "v1") == 4
    got = cache.lookup("peer", np.array([1, 4, 5, 9]))
    np.testing.assert_array_equal(got, np.stack([first[1], second[1], first[0], second[0]]))
    assert cache.rows("peer") == 4 and cache.rows("user") == 0


def test_eviction_drops_least_recently_upserted_first():
    rng = np.random.default_rng(2)
    cache = make_cache(max_rows=4)
    cache.upsert("user", np.array([10, 11]), vecs(rng, 2), "v1")
    cache.upsert("user", np.array([20, 21]), vecs(rng, 2), "v1")
    cache.upsert("user", np.array([10]), vecs(rng, 1), "v1")  # refresh 10: now the newest
    assert cache.upsert("user", np.array([30, 31]), vecs(rng, 2), "v1") == 4  # evicts 11 then 20
    cache.lookup("user", np.array([10, 21, 30, 31]))
    for gone in (11, 20):
        with pytest.raises(NotFound):
            cache.lookup("user", np.array([gone]))
    assert cache.stats().evictions == 2
    with pytest.raises(InvalidInput, match="max_rows=4"):
        cache.upsert("user", np.arange(5), vecs(rng, 5), "v1")
    assert cache.rows("user") == 4  # a rejected upsert changes nothing


def test_unknown_ids_are_named_and_counted():
    rng = np.random.default_rng(3)
    cache = make_cache()
    cache.upsert("user", np.array([1]), vecs(rng, 1), "v1")
    cache.upsert("peer", np.arange(8), vecs(rng, 8), "v1")
    with pytest.raises(
        NotFound, match=r"^peer_ids: unknown peer ids: 9, 17 \(2 of 10 not in the cache; UpsertEmbeddings them first\)"
    ):
        cache.score_by_ids(1, np.array([0, 1, 2, 3, 17, 4, 5, 9, 6, 7]))
    with pytest.raises(NotFound, match="^user_ids: unknown user ids: 2 "):
        cache.score_matrix(np.array([2]), np.array([0]))
    with pytest.raises(NotFound, match=r"^peer_ids: unknown peer ids: 100, 101, .*109, \.\.\. \(30 of 30"):
        cache.lookup("peer", np.arange(100, 130))
    cache.lookup("peer", np.array([3, 3]))
    stats = cache.stats()
    # hits: user 1 + 8 known peers + 2; misses: 2 + 1 + 30
    assert (stats.hits, stats.misses) == (11, 33)


def test_version_mismatch_and_clear_for():
    rng = np.random.default_rng(4)
    cache = make_cache(version="v1")
    cache.upsert("user", np.array([1, 2]), vecs(rng, 2), "v1")
    with pytest.raises(InvalidInput, match="model version 'v2' cannot mix with 'v1'"):
        cache.upsert("user", np.array([3]), vecs(rng, 1), "v2")
    cache.clear_for("v2")
    assert cache.rows("user") == 0 and cache.stats().model_version == "v2"
    with pytest.raises(InvalidInput, match="cannot mix"):
        cache.upsert("user", np.array([3]), vecs(rng, 1), "v1")
    assert cache.upsert("user", np.array([3]), vecs(rng, 1), "v2") == 1


def test_clear_for_takes_the_new_versions_label_bias_for_every_process_sharing_the_cache():
    """A pool's cache slot passes from one version to another with clear_for: the bias must pass with the
    version tag, in shared memory (it was a per-process attribute fixed at construction: auditE D1)."""
    rng = np.random.default_rng(14)
    cache = make_cache(k=3, version="v1")
    b1, b2 = cache.label_bias, np.array([0.25, -1.5, 2.0], np.float32)
    u, p = vecs(rng, 1), vecs(rng, 4)

    def fill(version: str) -> None:
        cache.upsert("user", np.array([1]), u, version)
        cache.upsert("peer", np.arange(4), p, version)

    fill("v1")
    np.testing.assert_allclose(cache.score_by_ids(1, np.arange(4)), loop_scores(u, p, b1)[0], rtol=1e-5, atol=1e-5)
    pid = os.fork()  # another process (a pool's worker) hands the slot to version v2 with its bias
    if pid == 0:
        os._exit(0 if cache.clear_for("v2", b2) is None else 1)
    assert os.waitpid(pid, 0)[1] == 0
    np.testing.assert_array_equal(cache.label_bias, b2)
    fill("v2")
    np.testing.assert_allclose(cache.score_by_ids(1, np.arange(4)), loop_scores(u, p, b2)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.score_matrix(np.array([1]), np.arange(4)), loop_scores(u, p, b2), rtol=1e-5, atol=1e-5)
    cache.clear_for("v3")  # no bias given: the current one is kept
    np.testing.assert_array_equal(cache.label_bias, b2)
    with pytest.raises(ConfigError, match="label_bias must hold num_labels=3"):
        cache.clear_for("v4", [0.0])
    assert cache.stats().model_version == "v3"  # a refused clear_for changes nothing


def test_input_validation():
    rng = np.random.default_rng(5)
    cache = make_cache()
    with pytest.raises(InvalidInput, match="user id 7 appears more than once"):
        cache.upsert("user", np.array([7, 3, 7]), vecs(rng, 3), "v1")
    with pytest.raises(InvalidInput, match=r"vectors must be float32 \[2, 3, 16\]"):
        cache.upsert("user", np.array([1, 2]), vecs(rng, 2, d=8), "v1")
    with pytest.raises(InvalidInput, match="vectors must be float32"):
        cache.upsert("user", np.array([1, 2]), vecs(rng, 2).astype(np.float64), "v1")
    with pytest.raises(InvalidInput, match="kind must be one of user, peer"):
        cache.upsert("item", np.array([1]), vecs(rng, 1), "v1")
    cache.upsert("user", np.array([1]), vecs(rng, 1), "v1")
    cache.upsert("peer", np.array([1]), vecs(rng, 1), "v1")
    with pytest.raises(InvalidInput, match="peer_ids must be non-empty"):
        cache.score_by_ids(1, np.array([], np.int64))
    with pytest.raises(InvalidInput, match="peer_ids must be a 1-D integer array"):
        cache.score_by_ids(1, np.array([1.0]))
    with pytest.raises(InvalidInput, match="user_ids must be a 1-D integer array"):
        cache.score_matrix(np.array([[1]]), np.array([1]))
    with pytest.raises(InvalidInput, match="user_id must be an integer"):
        cache.score_by_ids(1.5, np.array([1]))
    with pytest.raises(ConfigError, match="label_bias"):
        EmbeddingCache(model_version="v", num_labels=3, label_dim=4, label_bias=[0.0], max_rows=10)
    with pytest.raises(ConfigError, match="max_rows"):
        EmbeddingCache(model_version="v", num_labels=1, label_dim=4, label_bias=[0.0], max_rows=0)
    assert cache.stats().misses == 0  # validation failures are not lookups


def test_stats_and_readers_during_concurrent_upserts():
    rng = np.random.default_rng(6)
    cache = make_cache(max_rows=50)
    cache.upsert("user", np.array([0]), vecs(rng, 1), "v1")
    base = vecs(rng, 50)
    cache.upsert("peer", np.arange(50), base, "v1")
    stats = cache.stats()
    assert isinstance(stats, CacheStats) and set(KINDS) == {"user", "peer"}
    assert (stats.user_rows, stats.peer_rows, stats.max_rows) == (1, 50, 50)
    assert stats.bytes == 51 * (3 * 16 * 4 + 8 + 8)

    # a writer refreshes all peers with vectors scaled by a constant; a reader must always see
    # one whole generation (every row scaled by the same factor), never a half update
    stop, seen = threading.Event(), []

    def writer():
        for gen in range(1, 30):
            cache.upsert("peer", np.arange(50)[::-1].copy(), (base[::-1] * gen).copy(), "v1")
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set() or not seen:
        got = cache.lookup("peer", np.arange(50))
        factors = got[:, 0, 0] / base[:, 0, 0]
        seen.append(factors)
    thread.join()
    for factors in seen:
        np.testing.assert_allclose(factors, factors[0], rtol=1e-5)
    assert cache.rows("peer") == 50 and cache.stats().evictions == 0


# -- shared across forked processes ----------------------------------------------------------------

FORK = multiprocessing.get_context("fork")


def start_child(target, *args):
    proc = FORK.Process(target=target, args=args)
    proc.start()
    return proc


def wait_child(proc, timeout: float = 30.0) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail("a child process did not finish")
    return proc.exitcode


def run_child(target, *args) -> int:
    return wait_child(start_child(target, *args))


def assert_write_lock_free(cache: EmbeddingCache) -> None:
    fcntl.lockf(cache._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises at once if a process holds it
    fcntl.lockf(cache._lock_fd, fcntl.LOCK_UN)


def test_upserts_are_seen_by_forked_processes_both_ways():
    rng = np.random.default_rng(7)
    cache = make_cache()
    users, peers = vecs(rng, 2), vecs(rng, 3)
    assert run_child(lambda: cache.upsert("user", np.array([1, 2]), users, "v1")) == 0
    np.testing.assert_array_equal(cache.lookup("user", np.array([2, 1])), users[::-1])  # right after the child returned

    upserted, reply = FORK.Event(), FORK.Queue()

    def child_reads_after_parent_upsert():
        assert upserted.wait(20)
        got = cache.lookup("peer", np.array([30, 20, 10]))
        reply.put((got, cache.stats().hits))

    child = start_child(child_reads_after_parent_upsert)  # forked before the parent's upsert
    cache.upsert("peer", np.array([10, 20, 30]), peers, "v1")
    upserted.set()
    got, child_hits = reply.get(timeout=20)
    assert wait_child(child) == 0
    np.testing.assert_array_equal(got, peers[::-1])
    assert child_hits == 3  # counters are per process: the child's count starts from zero at the fork
    assert cache.stats().hits == 2 and cache.rows("peer") == 3


def test_a_writer_killed_at_any_point_leaves_the_cache_usable(caplog):
    rng = np.random.default_rng(8)
    cache = make_cache(max_rows=8)
    base = vecs(rng, 8)
    cache.upsert("peer", np.arange(8), base, "v1")

    def dies_while_holding_the_lock():
        # scribble over everything the committed snapshot does not reference, then die mid-update
        with cache._writing() as (mem, state):
            for k in range(len(KINDS)):
                inactive = 1 - ((state >> k) & 1)
                mem.indexes[k][inactive] = 7
                mem.header[shared_table.COUNT + 2 * k + inactive] = 5
                used = np.zeros(len(mem.vectors[k]), bool)
                used[mem.index(state, k)[1]] = True
                mem.vectors[k][~used] = np.nan
            mem.header[shared_table.NEXT_SEQ] += 1000
            os.kill(os.getpid(), signal.SIGKILL)

    def dies_just_before_publishing():
        cache._commit = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
        cache.upsert("peer", np.arange(100, 108), vecs(np.random.default_rng(0), 8), "v1")  # evicts all 8 rows

    for child in (dies_while_holding_the_lock, dies_just_before_publishing):
        assert run_child(child) == -signal.SIGKILL
        assert_write_lock_free(cache)  # the kernel dropped the dead process's record lock
        np.testing.assert_array_equal(cache.lookup("peer", np.arange(8)), base)  # the committed snapshot is intact
        with pytest.raises(NotFound, match="unknown peer ids: 100"):
            cache.lookup("peer", np.array([100]))
        with caplog.at_level(logging.WARNING, logger="neuronserve.embeddings"):
            fresh = vecs(rng, 2)
            assert cache.upsert("peer", np.array([3, 50]), fresh, "v1") == 8  # 50 evicts the oldest row, 0
        assert "died in the middle of an update" in caplog.text
        caplog.clear()
        np.testing.assert_array_equal(
            cache.lookup("peer", np.array([50, 3, 7])), np.stack([fresh[1], fresh[0], base[7]])
        )
        with pytest.raises(NotFound, match="unknown peer ids: 0 "):
            cache.lookup("peer", np.array([0]))
        base = cache.lookup("peer", np.array([1, 2, 3, 4, 5, 6, 7, 50]))
        cache.upsert("peer", np.arange(8), base, "v1")  # back to ids 0..7 for the next child
        assert cache.rows("peer") == 8


def test_readers_never_wait_for_a_writer():
    rng = np.random.default_rng(9)
    cache = make_cache()
    rows = vecs(rng, 4)
    cache.upsert("user", np.arange(4), rows, "v1")
    holding, release = FORK.Event(), FORK.Event()

    def holds_the_write_lock():
        with cache._writing():
            holding.set()
            assert release.wait(20)

    child = start_child(holds_the_write_lock)
    try:
        assert holding.wait(20)
        np.testing.assert_array_equal(cache.lookup("user", np.arange(4)), rows)
        assert cache.rows("user") == 4 and cache.stats().user_rows == 4
    finally:
        release.set()
    assert wait_child(child) == 0


def test_reader_process_sees_whole_snapshots_while_a_writer_process_upserts():
    n, generations = 2000, 200
    cache = make_cache(k=4, d=32, max_rows=n)
    cache.upsert("peer", np.arange(n), np.zeros((n, 4, 32), np.float32), "v1")
    reader_ready, writer_done, report = FORK.Event(), FORK.Event(), FORK.Queue()

    def writer():
        assert reader_ready.wait(20)
        order = np.random.default_rng(10)
        for gen in range(1, generations + 1):
            ids = order.permutation(n)
            cache.upsert("peer", ids, np.full((n, 4, 32), gen, np.float32), "v1")
            cache.upsert("user", np.array([gen % 7]), np.full((1, 4, 32), gen, np.float32), "v1")
        writer_done.set()

    def reader():
        ids = np.arange(n)[::-1].copy()
        seen, lookups = set(), 0
        while lookups < 100_000:  # bounded; ends soon after the writer is done
            done = writer_done.is_set()
            got = cache.lookup("peer", ids).reshape(n, -1)
            lookups += 1
            assert (got == got[0, 0]).all(), f"lookup {lookups} mixes values {np.unique(got)[:5]}"
            seen.add(float(got[0, 0]))
            reader_ready.set()
            if done:
                break
        report.put((lookups, sorted(seen)))

    procs = [start_child(reader), start_child(writer)]
    lookups, seen = report.get(timeout=60)
    assert [wait_child(p) for p in procs] == [0, 0]
    assert seen[0] == 0 and seen[-1] == generations and len(seen) >= 2  # it read before, during and after
    np.testing.assert_array_equal(cache.lookup("peer", np.arange(n)), np.full((n, 4, 32), generations, np.float32))
    assert cache.rows("peer") == n and cache.rows("user") == 7


def test_writer_processes_are_serialised():
    cache = make_cache(k=1, d=4, max_rows=400)
    start = FORK.Event()

    def writer(first):
        def run():
            assert start.wait(20)
            for i in range(first, first + 200):  # one row per upsert: each merges into the other's index
                cache.upsert("peer", np.array([i]), np.full((1, 1, 4), i, np.float32), "v1")

        return run

    procs = [start_child(writer(0)), start_child(writer(1000))]
    start.set()
    assert [wait_child(p) for p in procs] == [0, 0]
    ids = np.concatenate([np.arange(200), np.arange(1000, 1200)])
    assert cache.rows("peer") == 400  # no upsert lost to another process's concurrent one
    np.testing.assert_array_equal(cache.lookup("peer", ids)[:, 0, 0], ids.astype(np.float32))


def test_eviction_and_version_tie_hold_across_processes():
    rng = np.random.default_rng(11)
    cache = make_cache(max_rows=4)
    evictions = FORK.Queue()

    def child_upsert(ids):
        def run():
            cache.upsert("user", np.array(ids), vecs(np.random.default_rng(0), len(ids)), "v1")
            evictions.put(cache.stats().evictions)

        return run

    cache.upsert("user", np.array([10, 11]), vecs(rng, 2), "v1")
    assert run_child(child_upsert([20, 21])) == 0 and evictions.get(timeout=5) == 0
    cache.upsert("user", np.array([10]), vecs(rng, 1), "v1")  # refresh 10: now the newest
    assert run_child(child_upsert([30, 31])) == 0 and evictions.get(timeout=5) == 2  # evicts 11 then 20
    cache.lookup("user", np.array([10, 21, 30, 31]))
    for gone in (11, 20):
        with pytest.raises(NotFound):
            cache.lookup("user", np.array([gone]))
    assert cache.stats().evictions == 0  # the evictions were the child's

    assert run_child(lambda: cache.clear_for("v2")) == 0
    stats = cache.stats()
    assert (stats.user_rows, stats.peer_rows, stats.model_version) == (0, 0, "v2")
    with pytest.raises(InvalidInput, match="model version 'v1' cannot mix with 'v2'"):
        cache.upsert("user", np.array([3]), vecs(rng, 1), "v1")
    assert run_child(child_upsert([1])) != 0  # the child's v1 upsert is refused too
    assert cache.upsert("user", np.array([3]), vecs(rng, 1), "v2") == 1


def test_model_version_size_and_close():
    with pytest.raises(ConfigError, match="at most 256 bytes"):
        make_cache(version="v" * 257)
    cache = make_cache(version="é" * 128)  # 256 bytes in UTF-8
    assert cache.stats().model_version == "é" * 128
    with pytest.raises(ConfigError, match="at most 256 bytes"):
        cache.clear_for("x" * 300)
    assert cache.stats().model_version == "é" * 128
    cache.close()
    cache.close()
    with pytest.raises(Unavailable, match="closed"):
        cache.lookup("user", np.array([1]))


def test_default_size_costs_no_memory_up_front():
    cache = EmbeddingCache(model_version="v", num_labels=4, label_dim=32, label_bias=[0.0] * 4, max_rows=1_000_000)
    assert cache._mem.size > 2 * 10**9  # vectors for 2 x max_rows slots per kind, virtual only
    assert cache.stats() == CacheStats(0, 0, 1_000_000, 0, 0, 0, 0, "v")
    cache.close()


def test_the_cache_is_not_copied_by_pickling():
    import pickle

    with pytest.raises(TypeError, match="by fork only"):
        pickle.dumps(make_cache())


@pytest.mark.parametrize("count", [1, 127, 128, 1000])
def test_id_search_in_ascending_order_gives_searchsorted_places(count):
    rng = np.random.default_rng(count)
    cached = np.sort(rng.choice(10_000, 3_000, replace=False)).astype(np.int64)
    ids = rng.integers(-5, 10_005, count)  # cached ids, absent ones, repeats and ids past both ends
    np.testing.assert_array_equal(positions(cached, ids), np.searchsorted(cached, ids))
