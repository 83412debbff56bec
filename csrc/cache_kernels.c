/* ScoreByIds' host kernel over the embedding cache's shared table (neuronserve/cache_kernels.py loads it
 * with ctypes, which releases the GIL; no Python API here). Why by hand: numpy needs a searchsorted, a
 * gather that copies every peer's [K, D] vectors (1 MB for 1,000 peers of the demo model) and a matmul
 * that reads the copy again; here each peer's row is found and dotted where it lies, read once
 * (docs/embeddings.md, "ScoreByIds"). Reads only: a snapshot torn by a concurrent commit yields garbage
 * the caller discards, never an access outside the table (every slot is clipped). */

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) /* one copy per instruction set, chosen at load by the CPU (GCC function multiversioning) */
#define PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PER_ISA
#endif

#define SEARCH_LANES 16 /* keys searched in lockstep: their loads overlap instead of waiting in turn */

/* Per key j < SEARCH_LANES: the slot of keys[j] in an index (ids ascending, slots beside them, n rows),
 * clipped to [0, table); -1 if absent. A branch-free lower bound (the step is masked, not branched on)
 * whose halving depends on n only, so the keys step through the index together. */
static inline void find_slots(const int64_t *ids, const int64_t *slot, int64_t n, int64_t table,
                              const int64_t *keys, int64_t *out) {
    int64_t at[SEARCH_LANES] = {0};
    for (int64_t len = n; len > 1; len -= len / 2) {
        int64_t half = len / 2;
        for (int j = 0; j < SEARCH_LANES; j++) at[j] += half & -(int64_t)(ids[at[j] + half - 1] < keys[j]);
    }
    for (int j = 0; j < SEARCH_LANES; j++) {
        int64_t k = n > 0 ? at[j] + (ids[at[j]] < keys[j]) : 0;
        int64_t s = k < n ? slot[k] : -1;
        out[j] = k >= n || ids[k] != keys[j] ? -1 : s < 0 ? 0 : s >= table ? table - 1 : s;
    }
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* for unaligned loads */
#ifdef __has_builtin
#if __has_builtin(__builtin_shufflevector) /* GCC >= 12, clang */
#define HAVE_SHUFFLE 1
#endif
#endif

/* The 16 lanes summed as a tree: lane l + lane l + 8, then + 4, + 2, + 1 (the same order either way). */
static inline float lanes_sum(v16 part) {
#ifdef HAVE_SHUFFLE /* shuffles in registers: 1.25x the whole kernel's speed on AVX-512 */
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 half = __builtin_shufflevector(part, part, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(part, part, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
#else
    float lane[16];
    memcpy(lane, &part, sizeof lane);
    for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; l++) lane[l] += lane[l + width];
    return lane[0];
#endif
}

/* <a, b> over dim floats: 16 lanes of partial sums (one register on AVX-512, two on AVX2, four on SSE)
 * summed in a fixed order, so the result does not depend on where the row sits. */
static inline float dot(const float *a, const float *b, int64_t dim) {
    v16 part = {0};
    int64_t j = 0;
    for (; j + 16 <= dim; j += 16) part += *(const v16u *)(a + j) * *(const v16u *)(b + j);
    float sum = lanes_sum(part);
    for (; j < dim; j++) sum += a[j] * b[j];
    return sum;
}

#define CHUNK 256        /* peer ids searched before their rows are read (their slots on the stack); a multiple of SEARCH_LANES */
#define PREFETCH_ROWS 4 /* rows requested ahead of the one being read: 4 KB in flight for the demo model's rows */
_Static_assert(CHUNK % SEARCH_LANES == 0, "a chunk holds whole lockstep searches");

/* Ask for a row's cache lines (none for a missing id, slot -1). */
static inline void prefetch_row(const float *vectors, int64_t slot, int64_t row) {
    for (int64_t b = 0; slot >= 0 && b < row; b += 16) __builtin_prefetch(vectors + slot * row + b);
}

PER_ISA
int64_t cache_score_ids(const int64_t *user_ids, const int64_t *user_slots, int64_t user_n, const float *user_vectors,
                        int64_t user_table, int64_t user_id, const int64_t *peer_ids_index, const int64_t *peer_slots,
                        int64_t peer_n, const float *peer_vectors, int64_t peer_table, int64_t labels, int64_t dim,
                        const float *bias, const int64_t *peer_ids, int64_t m, float *out, uint8_t *found) {
    int64_t keys[SEARCH_LANES], slots[CHUNK], hits = 0;
    for (int j = 0; j < SEARCH_LANES; j++) keys[j] = user_id;
    find_slots(user_ids, user_slots, user_n, user_table, keys, slots);
    if (slots[0] < 0) return -1;
    const int64_t row = labels * dim;
    const float *u = user_vectors + slots[0] * row;
    for (int64_t base = 0; base < m; base += CHUNK) {
        const int64_t n = m - base < CHUNK ? m - base : CHUNK;
        for (int64_t start = 0; start < n; start += SEARCH_LANES) { /* the last id repeated past n */
            for (int j = 0; j < SEARCH_LANES; j++) keys[j] = peer_ids[base + (start + j < n ? start + j : n - 1)];
            find_slots(peer_ids_index, peer_slots, peer_n, peer_table, keys, slots + start);
        }
        for (int64_t i = 0; i < PREFETCH_ROWS && i < n; i++) prefetch_row(peer_vectors, slots[i], row);
        for (int64_t i = 0; i < n; i++) {
            if (i + PREFETCH_ROWS < n) prefetch_row(peer_vectors, slots[i + PREFETCH_ROWS], row);
            const int64_t s = slots[i], at = base + i;
            found[at] = s >= 0;
            hits += s >= 0;
            for (int64_t k = 0; k < labels; k++)
                out[at * labels + k] = (s < 0 ? 0.0f : dot(peer_vectors + s * row + k * dim, u + k * dim, dim)) + bias[k];
        }
    }
    return hits;
}
