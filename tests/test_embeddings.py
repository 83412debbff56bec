"""Unit tests for neuronserve.embeddings: the math against plain numpy loops, and the cache's rules."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from neuronserve.embeddings import KINDS, CacheStats, EmbeddingCache
from neuronserve.errors import ConfigError, InvalidInput, NotFound

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
    with pytest.raises(NotFound, match=r"unknown peer ids: 9, 17 \(2 of 10 not in the cache; UpsertEmbeddings them first\)"):
        cache.score_by_ids(1, np.array([0, 1, 2, 3, 17, 4, 5, 9, 6, 7]))
    with pytest.raises(NotFound, match="unknown user ids: 2 "):
        cache.score_matrix(np.array([2]), np.array([0]))
    with pytest.raises(NotFound, match=r"unknown peer ids: 100, 101, .*109, \.\.\. \(30 of 30"):
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
