/* One ISA's variant of the tick kernels: included by tick_kernels.c once per target, with SUFFIX (the
 * name suffix), LANES (floats in one of the target's vector registers: 16, 8 or 4), ROWS (the fill's
 * micro-tile rows: ROWS x 2 vectors of accumulators fit the registers) defined. Plain C with
 * GCC vector extensions in the target's native width. */

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(name) CAT(name, SUFFIX)
#define vf NAME(vf)
#define vfu NAME(vfu)
#define vi NAME(vi)
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vfu __attribute__((vector_size(LANES * 4), aligned(4))); /* for unaligned loads and stores */
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

/* Bit j set where lane j of a is >= lane j of b. */
static inline __attribute__((always_inline)) uint32_t NAME(ge_mask)(vf a, vf b) {
#if defined(__x86_64__) && LANES == 16
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ);
#elif defined(__x86_64__) && LANES == 8
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GE_OQ));
#else
    vi ge = a >= b;
    uint32_t mask = 0;
    for (int j = 0; j < LANES; j++) mask |= (uint32_t)(ge[j] & 1) << j;
    return mask;
#endif
}

/* sigmoid(s) = 1 / (1 + exp(-s)), elementwise: exp by range reduction to [-ln2/2, ln2/2] and Cephes'
 * expf polynomial (relative error ~1e-7), the power of two built from the exponent bits. The same
 * arithmetic for every lane, so a value depends on its input only, never on where it sits. */
static inline __attribute__((always_inline)) vf NAME(sigmoid)(vf s) {
#if defined(__x86_64__) && LANES == 16 /* AVX-512: vscalefps builds 2^n, so no exponent-bit overflow; the clamp
    keeps f = t - n ln2 small (past |t| ~ 2.5e13 its rounding error reaches the polynomial's inf) */
    __m512 t = _mm512_sub_ps(_mm512_setzero_ps(), (__m512)s);
    t = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), t)); /* NaN stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), t);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
#else
    const vf lo = (vf){} - 87.0f, hi = (vf){} + 88.0f;
    vf t = -s;
    vi below = t < lo, above = t > hi; /* lanes: -1 where true */
    t = (vf)(((vi)lo & below) | ((vi)t & ~below));
    t = (vf)(((vi)hi & above) | ((vi)t & ~above));
    const vf magic = (vf){} + 12582912.0f; /* 1.5 * 2**23: adding it rounds to an integer */
    vf j = t * 1.44269504088896341f + magic;
    vf n = j - magic;
    vi ni = (vi)j - (vi)magic;
    vf f = t - n * 0.693359375f;
    f = f - n * -2.12194440e-4f;
#endif
    vf z = (vf)f * (vf)f;
    vf p = (vf)f * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * (vf)f + 8.3334519073e-3f;
    p = p * (vf)f + 4.1665795894e-2f;
    p = p * (vf)f + 1.6666665459e-1f;
    p = p * (vf)f + 5.0000001201e-1f;
    p = p * z + (vf)f + 1.0f;
#if defined(__x86_64__) && LANES == 16
    return 1.0f / (1.0f + (vf)_mm512_scalef_ps((__m512)p, n));
#else
    return 1.0f / (1.0f + p * (vf)((ni + 127) << 23));
#endif
}

/* tick_fill_probability (tick_kernels.c states the contract): micro-tiles of ROWS rows x 2 vectors of
 * columns, their accumulators in registers through the dim products, then the sigmoid, weighted, added
 * into the tile's sum; labels summed in order ((p_1 + p_2) + p_3) + ... Strips of ROWS * 16 rows reuse a
 * 2-vector column strip of right_t from L1. */
static void NAME(fill_probability)(const float *left, int64_t n_left, const float *right_t, int64_t mp,
                                   int64_t labels, int64_t dim, const float *bias, const float *weights,
                                   int uniform, int64_t row_start, int64_t row_stop, int64_t m,
                                   float *out, int64_t ld_out) {
    const int64_t strip_rows = ROWS * 16; /* rows per strip: their vectors stay in L2 */
    for (int64_t rb = row_start; rb < row_stop; rb += strip_rows) {
        int64_t rb_stop = rb + strip_rows < row_stop ? rb + strip_rows : row_stop;
        for (int64_t c0 = 0; c0 < m; c0 += 2 * LANES) {
            for (int64_t r0 = rb; r0 < rb_stop; r0 += ROWS) {
                vf tile[ROWS][2];
                for (int64_t k = 0; k < labels; k++) {
                    const float *pk = right_t + k * dim * mp + c0;
                    const float *uk[ROWS];
                    vf acc[ROWS][2];
                    vf b = (vf){} + bias[k];
#pragma GCC unroll 16
                    for (int r = 0; r < ROWS; r++) {
                        int64_t row = r0 + r < rb_stop ? r0 + r : rb_stop - 1;
                        uk[r] = left + (k * n_left + row) * dim;
                        acc[r][0] = b;
                        acc[r][1] = b;
                    }
                    for (int64_t d = 0; d < dim; d++) {
                        vf p0 = *(const vfu *)(pk + d * mp);
                        vf p1 = *(const vfu *)(pk + d * mp + LANES);
#pragma GCC unroll 16
                        for (int r = 0; r < ROWS; r++) {
                            float u = uk[r][d];
                            acc[r][0] += u * p0;
                            acc[r][1] += u * p1;
                        }
                    }
                    vf w = (vf){} + weights[k];
#pragma GCC unroll 16
                    for (int r = 0; r < ROWS; r++) {
                        for (int h = 0; h < 2; h++) {
                            vf p = NAME(sigmoid)(acc[r][h]);
                            if (!uniform) p = p * w;
                            tile[r][h] = k == 0 ? p : tile[r][h] + p;
                        }
                    }
                }
                vf w0 = (vf){} + weights[0];
                int64_t width = m - c0 < 2 * LANES ? m - c0 : 2 * LANES;
                for (int r = 0; r < ROWS && r0 + r < rb_stop; r++) {
                    float *dst = out + (r0 + r - row_start) * ld_out + c0;
                    float row[2 * LANES] __attribute__((aligned(64)));
                    *(vf *)row = uniform ? tile[r][0] * w0 : tile[r][0];
                    *(vf *)(row + LANES) = uniform ? tile[r][1] * w0 : tile[r][1];
                    if (width == 2 * LANES) {
                        *(vfu *)dst = *(vf *)row;
                        *(vfu *)(dst + LANES) = *(vf *)(row + LANES);
                    } else {
                        for (int64_t c = 0; c < width; c++) dst[c] = row[c];
                    }
                }
            }
        }
    }
}

#if defined(__x86_64__) && LANES == 16
/* dst[j][c] = src[c][j] for a 16 x 16 tile (rows ld_s and ld_d floats apart): 64 shuffles in registers. */
static inline __attribute__((always_inline)) void NAME(transpose16)(const float *src, int64_t ld_s, float *dst,
                                                                    int64_t ld_d) {
    __m512 r[16], t[16];
    for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_ps(src + j * ld_s);
    for (int j = 0; j < 8; j++) {
        t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) {
        __m512d a = _mm512_castps_pd(t[4 * j]), b = _mm512_castps_pd(t[4 * j + 2]);
        __m512d c = _mm512_castps_pd(t[4 * j + 1]), d = _mm512_castps_pd(t[4 * j + 3]);
        r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
        t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
        t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
        t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xdd);
    }
    for (int j = 0; j < 8; j++) {
        _mm512_storeu_ps(dst + j * ld_d, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
        _mm512_storeu_ps(dst + (j + 8) * ld_d, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
    }
}
#define TILE 16
#else
#define TILE 0
#endif

/* values[i][v] = rev[v * ld_r + i] for v < m, i < rows (values' rows ld_b apart): the reverse side's
 * values of a group of rows, transposed. A column's values of the rows are contiguous in rev (whole
 * lines); the next columns' lines are prefetched (the hardware does not prefetch across rows); with
 * AVX-512, 16 x 16 tiles are transposed in registers. */
static void NAME(copy_transposed)(const float *rev, int64_t ld_r, int64_t rows, int64_t m, float *values,
                                  int64_t ld_b) {
    int64_t v = 0;
#if TILE
    int64_t tiled_rows = rows - rows % TILE;
    for (; v + TILE <= m; v += TILE) {
        if (v + 2 * TILE <= m)
            for (int64_t j = TILE; j < 2 * TILE; j++)
                for (int64_t i = 0; i < rows; i += 16) __builtin_prefetch(rev + (v + j) * ld_r + i);
        for (int64_t i = 0; i < tiled_rows; i += TILE)
            NAME(transpose16)(rev + v * ld_r + i, ld_r, values + i * ld_b + v, ld_b);
        for (int64_t j = v; j < v + TILE; j++)
            for (int64_t i = tiled_rows; i < rows; i++) values[i * ld_b + j] = rev[j * ld_r + i];
    }
#endif
    for (; v < m; v++) {
        const float *src = rev + v * ld_r;
        if (v + 8 < m)
            for (int64_t i = 0; i < rows; i += 16) __builtin_prefetch(src + 8 * ld_r + i);
        for (int64_t i = 0; i < rows; i++) values[i * ld_b + v] = src[i];
    }
}
#undef TILE

/* row[v] = value(i, v) for v < m from the forward values a[v] and (mutual) the reverse values already in
 * row; -inf for NaN, past m (up to whole vectors) and at the excluded columns. */
static void NAME(row_values)(const float *a, float *row, int how, int64_t m, const int64_t *excluded,
                             int64_t n_excluded) {
    const vf minus_inf = (vf){} - __builtin_inff();
    for (int64_t v0 = 0; v0 < m; v0 += LANES) {
        __builtin_prefetch(a + v0 + 1024); /* the row is 4 m bytes: prefetch runs past page ends */
        vf value, r = how == ONE_WAY ? minus_inf : *(const vf *)(row + v0);
        if (v0 + LANES <= m) {
            value = *(const vfu *)(a + v0);
        } else { /* the row's last, partial vector */
            float tail[LANES] __attribute__((aligned(64)));
            for (int j = 0; j < LANES; j++) tail[j] = v0 + j < m ? a[v0 + j] : -__builtin_inff();
            value = *(const vf *)tail;
        }
        if (how == PRODUCT) {
            value = value * r;
        } else if (how == MINIMUM) {
            vi less = value < r;
            value = (vf)(((vi)value & less) | ((vi)r & ~less));
        } else if (how == HARMONIC_MEAN) { /* 2ab / (a + b), 0 where a + b == 0 */
            vf total = value + r;
            vi zero = total == 0.0f;
            vf hm = (value * r * 2.0f) / total;
            value = (vf)((vi)hm & ~zero);
        }
        vi number = value == value;
        *(vf *)(row + v0) = (vf)(((vi)value & number) | ((vi)minus_inf & ~number));
    }
    for (int64_t v = m; v % LANES; v++) row[v] = -__builtin_inff();
    for (int64_t e = 0; e < n_excluded; e++) row[excluded[e]] = -__builtin_inff();
}

/* The k best of row[0..m) (whole vectors, -inf: never a candidate) into cols and vals, -1 and -inf past
 * the count it returns. maxima and keys: scratch of the row's sets' maxima and of m keys. */
static int64_t NAME(row_top_k)(const float *row, int64_t m, int64_t k, float *maxima, uint64_t *keys,
                               int64_t *cols, float *vals) {
    const int64_t vectors = (m + LANES - 1) / LANES, per_set = set_size(m, k, LANES);
    const int64_t sets = (vectors + per_set - 1) / per_set;
    for (int64_t set = 0; set < sets; set++) {
        vf top = (vf){} - __builtin_inff();
        int64_t last = (set + 1) * per_set < vectors ? (set + 1) * per_set : vectors;
        for (int64_t q = set * per_set; q < last; q++) {
            vf x = *(const vf *)(row + LANES * q);
            vi more = x > top;
            top = (vf)(((vi)x & more) | ((vi)top & ~more));
        }
        *(vf *)(maxima + LANES * set) = top;
    }
    float t = kth_largest(maxima, sets * LANES, k);
    vf tv = (vf){} + t;
    int64_t c = 0;
    for (int64_t v0 = 0; v0 < vectors * LANES; v0 += LANES) {
        for (uint32_t mask = NAME(ge_mask)(*(const vf *)(row + v0), tv); mask; mask &= mask - 1) {
            int64_t v = v0 + __builtin_ctz(mask);
            if (row[v] > -__builtin_inff()) keys[c++] = sort_key(row[v], v);
        }
    }
    sort_keys(keys, c);
    int64_t got = c < k ? c : k;
    for (int64_t j = 0; j < k; j++) {
        cols[j] = j < got ? (int64_t)(keys[j] & 0xFFFFFFFFu) : -1;
        vals[j] = j < got ? row[cols[j]] : -__builtin_inff();
    }
    return got;
}

/* tick_top_k (tick_kernels.c states the contract and the bound), TOP_K_GROUP rows at a time. */
static int NAME(top_k)(const float *fwd, int64_t ld_f, const float *rev, int64_t ld_r, int64_t rev_col, int how,
                       int64_t rows, int64_t m, const int64_t *ex_ptr, const int64_t *ex_cols, int64_t k,
                       int64_t *out_cols, float *out_vals, int32_t *counts) {
    const int64_t vectors = (m + LANES - 1) / LANES, ld_b = vectors * LANES + 16; /* + 16: rows do not alias */
    float *values = aligned_alloc(64, (size_t)(TOP_K_GROUP * ld_b) * sizeof(float)); /* 64 rows: whole 64 B */
    float *maxima = aligned_alloc(64, (size_t)((vectors * LANES + 15) / 16 * 16) * sizeof(float));
    uint64_t *keys = malloc((size_t)(vectors * LANES) * sizeof(uint64_t));
    if (!values || !maxima || !keys) {
        free(values), free(maxima), free(keys);
        return -1;
    }
    for (int64_t g = 0; g < rows; g += TOP_K_GROUP) {
        int64_t group = rows - g < TOP_K_GROUP ? rows - g : TOP_K_GROUP;
        if (how != ONE_WAY) NAME(copy_transposed)(rev + rev_col + g, ld_r, group, m, values, ld_b);
        for (int64_t i = g; i < g + group; i++) {
            float *row = values + (i - g) * ld_b;
            NAME(row_values)(fwd + i * ld_f, row, how, m, ex_cols + ex_ptr[i], ex_ptr[i + 1] - ex_ptr[i]);
            counts[i] = (int32_t)NAME(row_top_k)(row, m, k, maxima, keys, out_cols + i * k, out_vals + i * k);
        }
    }
    free(values), free(maxima), free(keys);
    return 0;
}

#undef vf
#undef vfu
#undef vi
#undef NAME
#undef ROWS
#undef LANES
#undef SUFFIX
#undef CAT
#undef CAT2
