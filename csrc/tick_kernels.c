/* The matching tick's host kernels (neuronserve/tick_kernels.py loads this library with ctypes, which
 * releases the GIL for every call; no Python API here). Why by hand: numpy and torch have no fused
 * "matmul, sigmoid, weighted sum" nor a streaming per-row top-k, and running them as separate passes
 * costs the tick 2.8x its bare matmuls (docs/tick.md). One variant per instruction set (tick_body.h,
 * included once per target), chosen by the CPU's features. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* ---- the per-row top-k ---------------------------------------------------------------------------
 * The bound: a row's columns are split into sets; t, the k-th largest of the sets' maxima, is at most the
 * row's k-th value (k sets hold a value >= t each), so the values >= t hold the top k and every tie with
 * the k-th, and only they are sorted. A set is one lane of set_size(m, k) consecutive vectors (so the
 * maxima are vertical maxima: no horizontal reduction), about 2k sets per row (2k to 6k sets: within 10% of each other). */

#define TOP_K_GROUP 64 /* rows of a block whose values sit in the scratch at once: 64 x 4 M bytes */
enum { ONE_WAY = 0, PRODUCT = 1, MINIMUM = 2, HARMONIC_MEAN = 3 };

static inline int64_t set_size(int64_t m, int64_t k, int64_t lanes) {
    int64_t vectors = (m + lanes - 1) / lanes, size = vectors / ((2 * k + lanes - 1) / lanes);
    return size < 1 ? 1 : size > 64 ? 64 : size;
}

/* The k-th largest of x[0..n) (reordered in place), or -inf when fewer than k are above -inf. */
static float kth_largest(float *x, int64_t n, int64_t k) {
    int64_t finite = 0;
    for (int64_t i = 0; i < n; i++) finite += x[i] > -__builtin_inff();
    if (finite < k) return -__builtin_inff();
    int64_t lo = 0, hi = n - 1, want = k - 1; /* quickselect, descending */
    while (lo < hi) {
        float pivot = x[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (x[i] > pivot) i++;
            while (x[j] < pivot) j--;
            if (i <= j) {
                float tmp = x[i]; x[i] = x[j]; x[j] = tmp;
                i++, j--;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return x[want];
    }
    return x[want];
}

/* Ascending keys order by value descending, then column ascending (-0.0 and 0.0 equal). */
static inline uint64_t sort_key(float value, int64_t col) {
    int32_t bits;
    value += 0.0f;
    memcpy(&bits, &value, sizeof bits);
    int64_t ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF); /* float order as signed integers */
    return ((uint64_t)(0x7FFFFFFFLL - ordered) << 32) | (uint64_t)col;
}

static int compare_keys(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void sort_keys(uint64_t *keys, int64_t n) {
    if (n > 256) {
        qsort(keys, (size_t)n, sizeof *keys, compare_keys);
        return;
    }
    for (int64_t i = 1; i < n; i++) { /* insertion sort: the usual few k candidates */
        uint64_t key = keys[i];
        int64_t j = i;
        for (; j > 0 && keys[j - 1] > key; j--) keys[j] = keys[j - 1];
        keys[j] = key;
    }
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx2,fma")
#define SUFFIX avx512
#define LANES 16
#define ROWS 6
#include "tick_body.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SUFFIX avx2
#define LANES 8
#define ROWS 6
#include "tick_body.h"
#pragma GCC pop_options
#endif

#define SUFFIX generic
#define LANES 4
#define ROWS 4
#include "tick_body.h"

typedef void (*fill_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, const float *,
                        const float *, int, int64_t, int64_t, int64_t, float *, int64_t);
typedef int (*top_k_fn)(const float *, int64_t, const float *, int64_t, int64_t, int, int64_t, int64_t,
                        const int64_t *, const int64_t *, int64_t, int64_t *, float *, int32_t *);
struct variant {
    const char *name;
    fill_fn fill;
    top_k_fn top_k;
};

static const struct variant variants[] = {
#if defined(__x86_64__)
    {"avx512", fill_probability_avx512, top_k_avx512},
    {"avx2", fill_probability_avx2, top_k_avx2},
#endif
    {"generic", fill_probability_generic, top_k_generic},
};
static const struct variant *forced; /* tick_use_isa's choice */

static int supported(const struct variant *v) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (v->fill == fill_probability_avx512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (v->fill == fill_probability_avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return v->fill == fill_probability_generic;
}

/* The variant in use: the one tick_use_isa chose, else the first this CPU supports. */
static const struct variant *chosen(void) {
    if (forced) return forced;
    for (size_t i = 0; i < sizeof variants / sizeof *variants; i++)
        if (supported(&variants[i])) return &variants[i];
    return &variants[sizeof variants / sizeof *variants - 1];
}

/* The instruction set of the variant in use. */
const char *tick_isa(void) { return chosen()->name; }

/* Use the variant `name` (tests run every variant the CPU supports); NULL: the default again. 0, or -1
 * when this CPU or build has no such variant. */
int tick_use_isa(const char *name) {
    if (!name) {
        forced = 0;
        return 0;
    }
    for (size_t i = 0; i < sizeof variants / sizeof *variants; i++)
        if (!strcmp(variants[i].name, name) && supported(&variants[i])) {
            forced = &variants[i];
            return 0;
        }
    return -1;
}

/* out[(r - row_start) * ld_out + c] = c(r -> c) = sum_k w_k sigmoid(<left[k][r][:], right_t[k][:][c]> + bias[k])
 * for rows row_start..row_stop-1 of left [labels][n_left][dim] and columns c < m of right_t
 * [labels][dim][mp] (the column side transposed; mp a multiple of 32, columns m..mp-1 zeros). uniform
 * (every weight equal): the probabilities summed, then one multiply by weights[0]. */
void tick_fill_probability(const float *left, int64_t n_left, const float *right_t, int64_t mp, int64_t labels,
                           int64_t dim, const float *bias, const float *weights, int uniform, int64_t row_start,
                           int64_t row_stop, int64_t m, float *out, int64_t ld_out) {
    chosen()->fill(left, n_left, right_t, mp, labels, dim, bias, weights, uniform, row_start, row_stop, m, out,
                   ld_out);
}

/* Per row i < rows: the k best columns v < m by value(i, v), value descending, then column ascending,
 * into out_cols[i * k ...] and out_vals[i * k ...], counts[i] of them (the rest: column -1, value -inf).
 * value(i, v) = fwd[i * ld_f + v] (how ONE_WAY), or the product, minimum or harmonic mean (0 where both are 0)
 * of fwd[i * ld_f + v] and rev[v * ld_r + rev_col + i]
 * (rev: a mutual pool's whole forward matrix, read transposed). Never candidates: NaN, -inf, and row i's
 * columns ex_cols[ex_ptr[i] .. ex_ptr[i + 1]). Returns 0, or -1 when its scratch could not be allocated. */
int tick_top_k(const float *fwd, int64_t ld_f, const float *rev, int64_t ld_r, int64_t rev_col, int how,
               int64_t rows, int64_t m, const int64_t *ex_ptr, const int64_t *ex_cols, int64_t k,
               int64_t *out_cols, float *out_vals, int32_t *counts) {
    return chosen()->top_k(fwd, ld_f, rev, ld_r, rev_col, how, rows, m, ex_ptr, ex_cols, k, out_cols, out_vals,
                           counts);
}
