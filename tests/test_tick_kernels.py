"""The tick's compiled kernels (csrc/tick_kernels.c through neuronserve/tick_kernels.py),
every instruction-set variant this CPU runs, against numpy: the fused fill against float64, the per-row
top-k against a full sort (ties, -inf, NaN, exclusions, the mutual combinations read transposed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from neuronserve import tick as T
from neuronserve.tick_kernels import HOW, KERNELS

ISAS = ["avx512", "avx2", "generic"]
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the tick kernels were not built (no C compiler)")


def test_the_kernels_combinations_are_the_ticks():
    assert list(HOW) == list(T.MUTUALS) and list(HOW.values()) == list(range(len(T.MUTUALS)))


def test_the_tick_kernels_are_built_where_a_compiler_is():
    # an optional extension fails to build without a word: CI must not fall back to numpy unnoticed
    if os.environ.get("NEURONSERVE_KERNELS", "on") != "on" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("the kernels are off, or no C compiler here to build them")
    assert KERNELS is not None and KERNELS.isa in ISAS


@needs_kernels
def test_the_environment_picks_a_variant_or_names_the_choices():
    def isa_under(setting: str) -> subprocess.CompletedProcess:
        code = "from neuronserve.tick_kernels import KERNELS; print(KERNELS and KERNELS.isa)"
        env = {**os.environ, "NEURONSERVE_KERNELS": setting}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)

    assert isa_under("generic").stdout.strip() == "generic"  # every CPU runs the generic variant
    assert isa_under("off").stdout.strip() == "None"
    bad = isa_under("neon-on-x86")
    assert bad.returncode != 0 and "NEURONSERVE_KERNELS=neon-on-x86" in bad.stderr and "avx2 or generic" in bad.stderr


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one variant (skipped where this CPU has none such, or the kernels were not built)."""
    if KERNELS is None:
        pytest.skip("the tick kernels were not built (no C compiler)")
    if not KERNELS.use_isa(request.param):
        pytest.skip(f"this CPU runs no {request.param} variant")
    yield request.param
    KERNELS.use_isa(None)


def reference_fill(left, cols, bias, weights):
    logits = np.einsum("knd,mkd->nmk", left.astype(np.float64), cols.astype(np.float64)) + bias
    return (1 / (1 + np.exp(-logits))) @ weights.astype(np.float64)


@pytest.mark.parametrize("weights", [[0.25] * 4, [0.5, -1.0, 2.0, 0.25]], ids=["uniform", "weighted"])
@pytest.mark.parametrize("m", [77, 96])
def test_fill_probability_equals_float64_and_ties_wherever_they_sit(isa, weights, m):
    assert KERNELS is not None
    rng = np.random.default_rng(m)
    labels, n, dim = 4, 29, 24  # rows and columns that leave partial micro-tiles and vectors
    left = rng.standard_normal((labels, n, dim)).astype(np.float32)
    cols = rng.standard_normal((m, labels, dim)).astype(np.float32)
    cols[-5:] = cols[:5]  # equal columns in the body and in the ragged tail
    left[:, -3:] = left[:, :3] * 40  # large logits: the sigmoid's clamped ends
    bias, w = rng.standard_normal(labels).astype(np.float32), np.asarray(weights, np.float32)
    out = np.full((n - 4, m + 3), 7.0, np.float32)  # rows 2..n-2, into a wider matrix
    KERNELS.fill_probability(left, KERNELS.transposed_columns(cols), m, bias, w, bool((w == w[0]).all()), 2, n - 2, out[:, :m])
    np.testing.assert_allclose(out[:, :m], reference_fill(left, cols, bias, w)[2 : n - 2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[:, m - 5 : m], out[:, :5])  # equal logits, equal values: exactly
    assert (out[:, m:] == 7.0).all()  # nothing past m written


@pytest.mark.parametrize("scale", [1e7, 1e15, 1e30, 1e38])
def test_fill_probability_saturates_for_huge_logits_and_keeps_nan(isa, scale):
    # sigmoid(+huge) is 1 and sigmoid(-huge) 0 on every variant (AVX-512 once gave 0 for +2.5e13 and up)
    assert KERNELS is not None
    labels, dim, m = 4, 1, 40
    left = np.ones((labels, 3, dim), np.float32)
    left[:, 2] = np.nan
    cols = np.zeros((m, labels, dim), np.float32)
    cols[: m // 2] = scale
    cols[m // 2 :] = -scale
    w = np.full(labels, 0.25, np.float32)
    out = np.zeros((3, m), np.float32)
    KERNELS.fill_probability(left, KERNELS.transposed_columns(cols), m, np.zeros(labels, np.float32), w, True, 0, 3, out)
    np.testing.assert_array_equal(out[:2, : m // 2], 1.0)
    np.testing.assert_allclose(out[:2, m // 2 :], 0.0, atol=1e-30)
    assert np.isnan(out[2]).all()


def full_sort(values: np.ndarray, k: int):
    """The k best columns per row by value descending, ties by the lower column; -inf and NaN never."""
    cols, vals, counts = [], [], []
    for row in values:
        ok = np.flatnonzero(np.isfinite(row) | (row == np.inf))
        best = ok[np.lexsort((ok, -row[ok]))][:k]
        counts.append(len(best))
        cols.append(np.concatenate([best, np.full(k - len(best), -1)]))
        vals.append(np.concatenate([row[best], np.full(k - len(best), -np.inf, np.float32)]))
    return np.array(cols), np.array(vals, np.float32), np.array(counts)


@pytest.mark.parametrize("m", [40, 333, 2000])
@pytest.mark.parametrize("k", [1, 7, 50])
def test_top_k_equals_a_full_sort_with_ties_infinities_nan_and_exclusions(isa, m, k):
    assert KERNELS is not None
    rng = np.random.default_rng(m + k)
    values = rng.standard_normal((70, m)).astype(np.float32)
    values[:20] = rng.integers(0, 4, (20, m))  # four values: ties everywhere, at the bound too
    values[20, :] = -np.inf
    values[20, :3] = [1, np.nan, 2]  # fewer finite values than k
    values[21, rng.integers(0, m, m // 3)] = np.nan
    values[22, ::2] = -0.0
    values[22, 1::2] = 0.0  # -0.0 and 0.0 are equal: the lower column first
    excluded = [np.unique(rng.integers(0, m, rng.integers(0, 6))) for _ in range(70)]
    excluded[23] = np.arange(m - 2)  # all but two excluded
    ptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])])
    cols, vals, counts = KERNELS.top_k(values, k, excluded_ptr=ptr, excluded_cols=np.concatenate(excluded))
    masked = values.copy()
    for row, gone in enumerate(excluded):
        masked[row, gone] = -np.inf
    want_cols, want_vals, want_counts = full_sort(masked, k)
    np.testing.assert_array_equal(counts, want_counts)
    np.testing.assert_array_equal(cols, want_cols)
    np.testing.assert_array_equal(vals, want_vals)


@pytest.mark.parametrize("how", ["product", "minimum", "harmonic_mean"])
def test_top_k_combines_a_pool_matrix_with_its_transpose(isa, how):
    assert KERNELS is not None
    rng = np.random.default_rng(3)
    n = 150
    matrix = rng.random((n, n)).astype(np.float32)
    matrix[:40, :40] = rng.integers(0, 3, (40, 40)) * 0.5  # ties, and 0 + 0 for the harmonic mean
    start, rows, k = 37, 70, 9  # a block of rows that is not a whole number of groups or vectors
    cols, vals, _ = KERNELS.top_k(matrix[start : start + rows], k, how, matrix, start)
    block, back = matrix[start : start + rows], matrix[:, start : start + rows].T
    want = T._mutual(block.copy(), np.ascontiguousarray(back), how)
    want_cols, want_vals, _ = full_sort(want, k)
    np.testing.assert_array_equal(cols, want_cols)
    np.testing.assert_array_equal(vals, want_vals)


@needs_kernels
def test_the_kernels_refuse_arrays_they_cannot_read():
    assert KERNELS is not None
    cols, values, counts = KERNELS.top_k(np.zeros((3, 0), np.float32), 2)  # no columns: nothing chosen
    assert (cols == -1).all() and np.isneginf(values).all() and (counts == 0).all()
    with pytest.raises(ValueError, match="k must be >= 1"):
        KERNELS.top_k(np.zeros((4, 8), np.float32), 0)
    with pytest.raises(ValueError, match="contiguous rows"):
        KERNELS.top_k(np.zeros((4, 8), np.float32)[:, ::2], 2)
    with pytest.raises(ValueError, match="reverse"):
        KERNELS.top_k(np.zeros((4, 8), np.float32), 2, "product")
    with pytest.raises(ValueError, match="excluded"):
        KERNELS.top_k(np.zeros((2, 8), np.float32), 2, excluded_ptr=np.array([0, 1, 1]), excluded_cols=np.array([8]))
    left, right_t = np.zeros((2, 3, 4), np.float32), np.zeros((2, 4, 32), np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        KERNELS.fill_probability(left.astype(np.float64), right_t, 5, np.zeros(2, np.float32), np.ones(2, np.float32), True, 0, 3, np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="rows 2:4"):
        KERNELS.fill_probability(left, right_t, 5, np.zeros(2, np.float32), np.ones(2, np.float32), True, 2, 4, np.zeros((2, 5), np.float32))
