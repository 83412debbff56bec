"""ScoreByIds' compiled kernel (csrc/cache_kernels.c through neuronserve/cache_kernels.py) against the
cache's numpy path and a float64 loop: shapes whose label_dim is and is not a multiple of the kernel's 16
lanes, slots reused by overwrites and evictions, repeated and missing ids, and a torn snapshot that must
give garbage, never a read outside the table."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from neuronserve import cache_kernels, embeddings
from neuronserve.embeddings import EmbeddingCache
from neuronserve.errors import NotFound
from neuronserve.shared_table import COUNT, STATE

pytestmark = pytest.mark.timeout(60)
needs_kernel = pytest.mark.skipif(cache_kernels.KERNEL is None, reason="the kernels were not built (no C compiler)")


def test_the_kernel_is_built_where_a_compiler_is():
    # an optional extension fails to build without a word: CI must not fall back to numpy unnoticed
    if os.environ.get("NEURONSERVE_KERNELS", "on") != "on" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("the kernels are off, or no C compiler here to build them")
    assert cache_kernels.KERNEL is not None


def test_kernels_off_leaves_the_numpy_path():
    code = "from neuronserve import cache_kernels; print(cache_kernels.KERNEL)"
    env = {**os.environ, "NEURONSERVE_KERNELS": "off"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "None", done.stderr


def numpy_path(cache: EmbeddingCache, user_id: int, peer_ids: np.ndarray) -> np.ndarray:
    kernel, embeddings.SCORE_IDS = embeddings.SCORE_IDS, None
    try:
        return cache.score_by_ids(user_id, peer_ids)
    finally:
        embeddings.SCORE_IDS = kernel


@needs_kernel
@pytest.mark.parametrize("k,d", [(4, 64), (3, 20), (1, 1), (2, 35)])
def test_the_kernel_scores_as_numpy_after_overwrites_and_evictions(k, d):
    rng = np.random.default_rng(k * 100 + d)
    cache = EmbeddingCache(model_version="v", num_labels=k, label_dim=d, label_bias=rng.standard_normal(k), max_rows=300)
    cache.upsert("user", np.arange(50) * 3, rng.standard_normal((50, k, d), dtype=np.float32), "v")
    for start in range(0, 900, 150):  # 150 new peers at a time into 300 rows: the oldest evicted, slots reused
        ids = np.arange(start, start + 200) * 7  # 50 of them overwrite the last batch's
        cache.upsert("peer", ids, rng.standard_normal((200, k, d), dtype=np.float32), "v")
    mem = cache._shared()
    cached = mem.index(int(mem.header[STATE]), 1)[0].copy()  # the 300 ids left
    assert len(cached) == 300
    for trial in range(20):
        peers = rng.choice(cached, size=int(rng.integers(1, 700)))  # repeats included
        user = int(rng.integers(50)) * 3
        scores = cache.score_by_ids(user, peers)
        assert scores.shape == (len(peers), k) and scores.dtype == np.float32 and scores.flags.c_contiguous
        np.testing.assert_allclose(scores, numpy_path(cache, user, peers), rtol=1e-5, atol=1e-5)
    u, p = cache.lookup("user", np.array([3])), cache.lookup("peer", peers[:5])
    expected = np.einsum("kd,mkd->mk", u[0].astype(np.float64), p.astype(np.float64)) + cache.label_bias
    np.testing.assert_allclose(cache.score_by_ids(3, peers[:5]), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("m", [1, 15, 16, 17, 255, 256, 257, 513, 1000])
def test_every_length_around_the_kernels_chunks_scores_each_peer_and_flags_each_miss(m):
    # the kernel searches 256 ids at a time, 16 in lockstep, then reads their rows: misses and lengths
    # on and around both boundaries
    cache = small_cache(7, 600, 1000)
    peers = np.random.default_rng(m).integers(0, 600, m)
    missing = sorted({i for i in (0, 15, 16, 255, 256, m - 1) if i < m})
    peers[missing] = 10_000 + np.arange(len(missing))  # never cached
    mem = cache._shared()
    scores, hits, found = cache_kernels.KERNEL(mem, int(mem.header[STATE]), 7, peers, cache.label_bias)
    expected_found = np.ones(m, bool)
    expected_found[missing] = False
    assert hits == m - len(missing) and np.array_equal(found, expected_found)
    assert (scores[missing] == cache.label_bias).all()  # a miss scores its bias alone; the caller refuses it
    if hits:
        np.testing.assert_allclose(scores[found], numpy_path(cache, 7, peers[found]), rtol=1e-5, atol=1e-5)


def small_cache(user_id: int, peers: int, max_rows: int) -> EmbeddingCache:
    """Two labels of 16: one cached user `user_id` and peers 0 .. peers - 1, random vectors."""
    cache = EmbeddingCache(model_version="v", num_labels=2, label_dim=16, label_bias=[0.0, 1.0], max_rows=max_rows)
    rng = np.random.default_rng(user_id)
    cache.upsert("user", np.array([user_id]), rng.standard_normal((1, 2, 16), dtype=np.float32), "v")
    cache.upsert("peer", np.arange(peers), rng.standard_normal((peers, 2, 16), dtype=np.float32), "v")
    return cache


@needs_kernel
def test_missing_ids_are_named_and_counted_as_the_numpy_path_does():
    cache = small_cache(5, 40, 100)
    with pytest.raises(NotFound, match=r"^user_id: unknown user ids: 6 \(1 of 1"):
        cache.score_by_ids(6, np.arange(3))
    with pytest.raises(NotFound, match=r"^peer_ids: unknown peer ids: 40, 41 \(2 of 5"):
        cache.score_by_ids(5, np.array([0, 40, 1, 41, 2]))
    stats = cache.stats()  # the user miss leaves its peers uncounted; then 1 user hit, 3 peer hits, 2 misses
    assert (stats.hits, stats.misses) == (4, 3)


@needs_kernel
def test_a_torn_snapshot_reads_garbage_inside_the_table_never_outside():
    cache = small_cache(1, 4, 10)
    mem = cache._shared()
    state = int(mem.header[STATE])
    buf = (state >> 1) & 1
    mem.indexes[1][buf, 1, :4] = [-(2**62), 2**62, 3, 10**9]  # slots a commit in flight could leave
    peers, bias = np.arange(4, dtype=np.int64), np.zeros(2, np.float32)
    scores, hits, found = cache_kernels.KERNEL(mem, state, 1, peers, bias)
    assert hits == 4 and found.all() and np.isfinite(scores).all()
    table = mem.vectors[1]
    user = mem.vectors[0][mem.index(state, 0)[1][0]]
    np.testing.assert_allclose(scores[0], (table[0] * user).sum(-1), rtol=1e-5, atol=1e-6)  # clipped to the first slot
    np.testing.assert_allclose(scores[1], (table[-1] * user).sum(-1), rtol=1e-5, atol=1e-6)  # and to the last
    mem.header[COUNT + 2 + buf] = 10**9  # a row count past the index buffer: clipped to its size
    scores, hits, found = cache_kernels.KERNEL(mem, state, 1, peers, bias)
    assert scores.shape == (4, 2) and 0 <= hits <= 4
