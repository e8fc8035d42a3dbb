/* Exact attention on the CPU (FlashAttention-2's algorithm, DESIGN.md "Attention semantics").
 *
 * Score tiles are kept transposed, Sᵀ = K·Qᵀ (keys × queries), so that the BLOCK_Q queries of
 * a tile are the vector lanes: the online-softmax state (running max m and sum ℓ, in log2
 * units with log2(e) folded into the scale, so every exponential is an exp2) is one vector per
 * 16 queries, the masks are lane compares, and no tile is transposed in the inner loop. K and V
 * are read in their natural row layout (straight from the input when it is fp32); only the
 * query block is transposed, once per work item.
 *
 * Forward: one work item is (batch, query head, query block). It streams the key blocks its
 * rows can see, computes Sᵀ, updates m and ℓ, rescales the fp32 output accumulator when m
 * grows and accumulates P·V. No Sq×Sk buffer exists: per thread there is one BLOCK_K×BLOCK_Q
 * tile.
 *
 * Backward: recomputes P from the saved lse instead of storing it. A first pass computes
 * Δ = rowsum(dO∘O) − dlse and the transposed query and dO blocks (kept in the workspace, as
 * big as q); then dq is computed per (batch, query head, query block) and dk, dv per (batch,
 * kv head, key block), each recomputing P and dP for its tiles: every output element has
 * exactly one writer and a fixed summation order, so the backward is race-free and
 * deterministic.
 *
 * The tile products run on a register-blocked matmul (AVX-512 chosen at run time, portable C
 * otherwise); all accumulation is fp32. */
#include "attention_cpu.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#include "attention_sinks.h"
#include "philox.h"
#include "scalar_convert.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ATTENTION_X86 1
#endif

#define BLOCK_Q 64 /* queries per work item: the lanes of a score tile, a multiple of 16 */
#define BLOCK_K 64 /* keys per score tile, a multiple of 4 (one Philox draw) */
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

enum { VARIANT_BEST = 0, VARIANT_PORTABLE = 1, VARIANT_AVX512 = 3 };

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
/* Head dim rounded up to whole vectors: the width of tiles used as a matmul's right operand. */
static inline int64_t padded_head_dim(int64_t d) { return (d + 15) / 16 * 16; }
/* Floats rounded up to 64 bytes, so that every scratch tile starts cache-line aligned. */
static inline int64_t aligned_floats(int64_t n) { return (n + 15) / 16 * 16; }
static inline int element_size(lf_scalar type) { return type == LF_SCALAR_F32 ? 4 : 2; }

/* ---------------------------------------------------------------------------------------- */
/* Inner loops, one set per instruction set.                                                 */

/* The per-query state of the score tile being processed; every array has BLOCK_Q lanes. */
typedef struct {
    const int32_t *first, *last; /* visible keys of each query (last < first: none) */
    float *row_max;              /* running max, log2 units (forward) */
    float *row_sum;              /* running sum (forward) */
    float *alpha;                /* rescale factor of this step (forward) */
    const float *shift;          /* lse in log2 units, finite (backward) */
} lane_state;

typedef struct {
    /* c[m×n] (+)= a·b with a[r][t] at a[r·a_row + t·a_step]; b, c row-major; n a multiple of
     * 16. */
    void (*matmul)(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_row,
                   int64_t a_step, const float *b, int64_t ldb, float *c, int64_t ldc,
                   int accumulate);
    /* One online-softmax step on a tile of `rows` keys (j0 the first) × BLOCK_Q queries:
     * scales by `factor`, masks keys outside [first, last] to probability 0, updates row_max
     * and row_sum, sets alpha, and leaves exp2(score - row_max) in the tile. */
    void (*softmax_step)(float *tile, int64_t rows, int64_t j0, float factor, lane_state *lanes);
    /* The backward's tile of probabilities: exp2(factor·score − shift), 0 where masked. */
    void (*probabilities)(float *tile, int64_t rows, int64_t j0, float factor,
                          const lane_state *lanes);
} attention_kernels;

static void matmul_portable(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_row,
                            int64_t a_step, const float *b, int64_t ldb, float *c, int64_t ldc,
                            int accumulate) {
    for (int64_t i = 0; i < m; ++i) {
        float *c_row = c + i * ldc;
        if (!accumulate) memset(c_row, 0, (size_t)n * sizeof(float));
        for (int64_t t = 0; t < k; ++t) {
            const float a_it = a[i * a_row + t * a_step];
            const float *b_row = b + t * ldb;
            for (int64_t j = 0; j < n; ++j) c_row[j] += a_it * b_row[j];
        }
    }
}

static void softmax_step_portable(float *tile, int64_t rows, int64_t j0, float factor,
                                  lane_state *lanes) {
    for (int64_t i = 0; i < BLOCK_Q; ++i) {
        float best = lanes->row_max[i];
        for (int64_t r = 0; r < rows; ++r) {
            float *x = tile + r * BLOCK_Q + i;
            const int64_t j = j0 + r;
            *x = j >= lanes->first[i] && j <= lanes->last[i] ? *x * factor : -INFINITY;
            best = fmaxf(best, *x);
        }
        /* With no visible key yet, subtract 0 instead of -inf so that exp2 gives 0, not NaN. */
        const float shift = best == -INFINITY ? 0.0f : best;
        float sum = 0.0f;
        for (int64_t r = 0; r < rows; ++r) {
            float *x = tile + r * BLOCK_Q + i;
            *x = exp2f(*x - shift);
            sum += *x;
        }
        lanes->alpha[i] = exp2f(lanes->row_max[i] - shift);
        lanes->row_sum[i] = lanes->row_sum[i] * lanes->alpha[i] + sum;
        lanes->row_max[i] = best;
    }
}

static void probabilities_portable(float *tile, int64_t rows, int64_t j0, float factor,
                                   const lane_state *lanes) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t j = j0 + r;
        for (int64_t i = 0; i < BLOCK_Q; ++i) {
            float *x = tile + r * BLOCK_Q + i;
            *x = j >= lanes->first[i] && j <= lanes->last[i]
                     ? exp2f(*x * factor - lanes->shift[i]) : 0.0f;
        }
    }
}

static const attention_kernels kernels_portable = {matmul_portable, softmax_step_portable,
                                                   probabilities_portable};

#ifdef ATTENTION_X86
#define MICRO_ROWS 6    /* rows of c per register tile */
#define MICRO_VECTORS 4 /* 16-float vectors of c per register tile: 24 accumulators */

/* One register tile of c: rows × vectors are compile-time constants after inlining, so the
 * accumulators live in zmm registers; per step of k, `vectors` loads of b are reused by
 * `rows` broadcasts of a. */
__attribute__((target("avx512f"), always_inline)) static inline void micro_tile_avx512(
    const int rows, const int vectors, int64_t k, const float *a, int64_t a_row,
    int64_t a_step, const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate) {
    __m512 acc[MICRO_ROWS][MICRO_VECTORS];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vectors; ++v)
            acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
    for (int64_t t = 0; t < k; ++t) {
        __m512 b_vec[MICRO_VECTORS];
        for (int v = 0; v < vectors; ++v) b_vec[v] = _mm512_loadu_ps(b + t * ldb + 16 * v);
        for (int r = 0; r < rows; ++r) {
            const __m512 a_bcast = _mm512_set1_ps(a[r * a_row + t * a_step]);
            for (int v = 0; v < vectors; ++v)
                acc[r][v] = _mm512_fmadd_ps(a_bcast, b_vec[v], acc[r][v]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < vectors; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

__attribute__((target("avx512f"), always_inline)) static inline void micro_rows_avx512(
    const int rows, int vectors, int64_t k, const float *a, int64_t a_row, int64_t a_step,
    const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate) {
    switch (vectors) {
    case 1: micro_tile_avx512(rows, 1, k, a, a_row, a_step, b, ldb, c, ldc, accumulate); break;
    case 2: micro_tile_avx512(rows, 2, k, a, a_row, a_step, b, ldb, c, ldc, accumulate); break;
    case 3: micro_tile_avx512(rows, 3, k, a, a_row, a_step, b, ldb, c, ldc, accumulate); break;
    default: micro_tile_avx512(rows, 4, k, a, a_row, a_step, b, ldb, c, ldc, accumulate); break;
    }
}

__attribute__((target("avx512f"))) static void matmul_avx512(int64_t m, int64_t n, int64_t k,
                                                             const float *a, int64_t a_row,
                                                             int64_t a_step, const float *b,
                                                             int64_t ldb, float *c, int64_t ldc,
                                                             int accumulate) {
    for (int64_t col = 0; col < n; col += 16 * MICRO_VECTORS) {
        const int vectors = (int)min_i64(MICRO_VECTORS, (n - col) / 16);
        for (int64_t row = 0; row < m; row += MICRO_ROWS) {
            const float *at = a + row * a_row;
            const float *bt = b + col;
            float *ct = c + row * ldc + col;
            switch (min_i64(MICRO_ROWS, m - row)) {
            case 1: micro_rows_avx512(1, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            case 2: micro_rows_avx512(2, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            case 3: micro_rows_avx512(3, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            case 4: micro_rows_avx512(4, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            case 5: micro_rows_avx512(5, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            default: micro_rows_avx512(6, vectors, k, at, a_row, a_step, bt, ldb, ct, ldc, accumulate); break;
            }
        }
    }
}

/* 2^x: x = n + f with n an integer and |f| <= 1/2; 2^f by its degree-7 Taylor polynomial
 * (relative error < 1e-8), 2^n applied exactly by scalef. Inputs below -150 give 0, so -inf
 * (a masked score) maps to 0; NaN propagates. */
__attribute__((target("avx512f"))) static inline __m512 exp2_avx512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 poly = _mm512_set1_ps(1.5252733804059841e-5f);
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.5403530393381608e-4f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.3333558146428443e-3f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.6181291076284772e-3f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.5504108664821580e-2f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.4022650695910071e-1f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.9314718055994531e-1f));
    poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(poly, n);
}

__attribute__((target("avx512f"))) static inline __mmask16 visible_avx512(int64_t j,
                                                                          __m512i first,
                                                                          __m512i last) {
    const __m512i key = _mm512_set1_epi32((int)j);
    return _mm512_cmple_epi32_mask(first, key) & _mm512_cmple_epi32_mask(key, last);
}

__attribute__((target("avx512f"))) static void softmax_step_avx512(float *tile, int64_t rows,
                                                                   int64_t j0, float factor,
                                                                   lane_state *lanes) {
    const __m512 scale = _mm512_set1_ps(factor), neg_inf = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < BLOCK_Q; i += 16) {
        const __m512i first = _mm512_loadu_si512(lanes->first + i);
        const __m512i last = _mm512_loadu_si512(lanes->last + i);
        const __m512 old_max = _mm512_loadu_ps(lanes->row_max + i);
        __m512 best = old_max;
        for (int64_t r = 0; r < rows; ++r) {
            float *x = tile + r * BLOCK_Q + i;
            const __m512 s = _mm512_mask_mul_ps(neg_inf, visible_avx512(j0 + r, first, last),
                                                _mm512_loadu_ps(x), scale);
            _mm512_storeu_ps(x, s);
            best = _mm512_max_ps(best, s);
        }
        /* With no visible key yet, subtract 0 instead of -inf so that exp2 gives 0, not NaN. */
        const __m512 shift =
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask(best, neg_inf, _CMP_EQ_OQ), best,
                                 _mm512_setzero_ps());
        __m512 sum = _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; ++r) {
            float *x = tile + r * BLOCK_Q + i;
            const __m512 e = exp2_avx512(_mm512_sub_ps(_mm512_loadu_ps(x), shift));
            _mm512_storeu_ps(x, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 alpha = exp2_avx512(_mm512_sub_ps(old_max, shift));
        _mm512_storeu_ps(lanes->alpha + i, alpha);
        _mm512_storeu_ps(lanes->row_sum + i,
                         _mm512_fmadd_ps(_mm512_loadu_ps(lanes->row_sum + i), alpha, sum));
        _mm512_storeu_ps(lanes->row_max + i, best);
    }
}

__attribute__((target("avx512f"))) static void probabilities_avx512(float *tile, int64_t rows,
                                                                    int64_t j0, float factor,
                                                                    const lane_state *lanes) {
    const __m512 scale = _mm512_set1_ps(factor);
    for (int64_t i = 0; i < BLOCK_Q; i += 16) {
        const __m512i first = _mm512_loadu_si512(lanes->first + i);
        const __m512i last = _mm512_loadu_si512(lanes->last + i);
        const __m512 shift = _mm512_loadu_ps(lanes->shift + i);
        for (int64_t r = 0; r < rows; ++r) {
            float *x = tile + r * BLOCK_Q + i;
            const __m512 e = exp2_avx512(_mm512_fmsub_ps(_mm512_loadu_ps(x), scale, shift));
            _mm512_storeu_ps(x, _mm512_maskz_mov_ps(visible_avx512(j0 + r, first, last), e));
        }
    }
}

static const attention_kernels kernels_avx512 = {matmul_avx512, softmax_step_avx512,
                                                 probabilities_avx512};
#endif

static const attention_kernels *kernels_for(int variant) {
#ifdef ATTENTION_X86
    if (variant == VARIANT_AVX512 || variant == VARIANT_BEST) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f")) return &kernels_avx512;
    }
#else
    (void)variant;
#endif
    return &kernels_portable;
}

const char *attention_cpu_variant_isa(int variant) {
#ifdef ATTENTION_X86
    if (kernels_for(variant) == &kernels_avx512) return "avx512";
#else
    (void)variant;
#endif
    return "portable";
}

/* ---------------------------------------------------------------------------------------- */
/* Geometry: sequences, visible keys, tiles.                                                 */

typedef struct {
    int64_t q_start, k_start; /* first row of the sequence in q / k (varlen), else 0 */
    int64_t seqlen_q, seqlen_k;
} sequence_extent;

static sequence_extent sequence_of(const attention_fwd_params *p, int64_t b) {
    sequence_extent s = {0, 0, p->seqlen_q, p->seqlen_k};
    if (p->cu_seqlens_q != NULL) {
        s.q_start = p->cu_seqlens_q[b];
        s.seqlen_q = p->cu_seqlens_q[b + 1] - s.q_start;
        s.k_start = p->cu_seqlens_k[b];
        s.seqlen_k = p->cu_seqlens_k[b + 1] - s.k_start;
    }
    if (p->cache_seqlens != NULL) /* a KV cache: its valid length, clamped into the cache */
        s.seqlen_k = min_i64(max_i64((int64_t)p->cache_seqlens[b] + p->seqlen_new, 0),
                             p->seqlen_k);
    return s;
}

/* Keys query row i may see, [first, last] clipped to the sequence (empty when last < first):
 * the band around the bottom-right aligned diagonal i + Sk - Sq. */
static void key_band(const attention_fwd_params *p, const sequence_extent *s, int64_t i,
                     int64_t *first, int64_t *last) {
    const int64_t diagonal = i + s->seqlen_k - s->seqlen_q;
    *first = max_i64(p->window_left >= 0 ? diagonal - p->window_left : 0, 0);
    *last = min_i64(p->window_right >= 0 ? diagonal + p->window_right : s->seqlen_k - 1,
                    s->seqlen_k - 1);
}

/* Query rows that may see a key of [j_begin, j_end), as [*first, *last]. */
static void query_band(const attention_fwd_params *p, const sequence_extent *s, int64_t j_begin,
                       int64_t j_end, int64_t *first, int64_t *last) {
    const int64_t shift = s->seqlen_k - s->seqlen_q;
    *first = max_i64(p->window_right >= 0 ? j_begin - shift - p->window_right : 0, 0);
    *last = min_i64(p->window_left >= 0 ? j_end - 1 - shift + p->window_left : s->seqlen_q - 1,
                    s->seqlen_q - 1);
}

/* Fills the visible-key lanes of queries i0 .. i0+nq-1; lanes past nq see nothing. */
static void fill_key_bands(const attention_fwd_params *p, const sequence_extent *s, int64_t i0,
                           int64_t nq, int32_t *first, int32_t *last) {
    for (int64_t r = 0; r < BLOCK_Q; ++r) {
        int64_t lo = 1, hi = 0;
        if (r < nq) key_band(p, s, i0 + r, &lo, &hi);
        if (hi < lo) lo = 1, hi = 0; /* keeps both within int32 */
        first[r] = (int32_t)lo;
        last[r] = (int32_t)hi;
    }
}

/* The keys any of the first nq lanes can see, as [*first, *last] (empty when last < first). */
static void lanes_key_range(const int32_t *first, const int32_t *last, int64_t nq,
                            int64_t *range_first, int64_t *range_last) {
    *range_first = INT32_MAX;
    *range_last = -1;
    for (int64_t r = 0; r < nq; ++r) {
        if (last[r] < first[r]) continue;
        *range_first = min_i64(*range_first, first[r]);
        *range_last = max_i64(*range_last, last[r]);
    }
}

static const char *element_at(const void *base, int64_t offset, lf_scalar type) {
    return (const char *)base + offset * element_size(type);
}

/* dst[r·ld + c] = src[r][c] for r < rows, c < cols, and 0 for cols <= c < ld;
 * src rows are row_stride elements apart. */
static void load_tile(const char *src, int64_t row_stride, int64_t rows, int64_t cols,
                      lf_scalar type, float *dst, int64_t ld) {
    const int64_t row_bytes = row_stride * element_size(type);
    for (int64_t r = 0; r < rows; ++r, src += row_bytes) {
        float *out = dst + r * ld;
        if (type == LF_SCALAR_F32) {
            memcpy(out, src, (size_t)cols * sizeof(float));
        } else if (type == LF_SCALAR_F16) {
            const uint16_t *in = (const uint16_t *)src;
            for (int64_t c = 0; c < cols; ++c) out[c] = lf_f16_to_f32(in[c]);
        } else {
            const uint16_t *in = (const uint16_t *)src;
            for (int64_t c = 0; c < cols; ++c) out[c] = lf_bf16_to_f32(in[c]);
        }
        for (int64_t c = cols; c < ld; ++c) out[c] = 0.0f;
    }
}

/* dst[c·BLOCK_Q + r] = src[r][c] for r < rows, c < cols; lanes rows..BLOCK_Q are 0. Done one
 * row at a time through a small buffer so that the conversion loop stays contiguous. */
static void load_tile_transposed(const char *src, int64_t row_stride, int64_t rows,
                                 int64_t cols, lf_scalar type, float *dst) {
    float row[ATTENTION_MAX_HEAD_DIM];
    for (int64_t r = 0; r < BLOCK_Q; ++r) {
        if (r < rows) load_tile(src + r * row_stride * element_size(type), row_stride, 1, cols,
                                type, row, cols);
        else memset(row, 0, (size_t)cols * sizeof(float));
        for (int64_t c = 0; c < cols; ++c) dst[c * BLOCK_Q + r] = row[c];
    }
}

/* Rows of a head as fp32 with row stride *ld: the tensor itself when it is fp32 (and, for a
 * right operand that needs whole vectors, d is a multiple of 16); else converted into buffer,
 * zero-padded to whole vectors. */
static const float *rows_as_f32(const void *base, int64_t offset, int64_t row_stride,
                                int64_t rows, int64_t d, int right_operand, lf_scalar type,
                                float *buffer, int64_t *ld) {
    if (type == LF_SCALAR_F32 && (!right_operand || d % 16 == 0)) {
        *ld = row_stride;
        return (const float *)base + offset;
    }
    *ld = padded_head_dim(d);
    load_tile(element_at(base, offset, type), row_stride, rows, d, type, buffer, *ld);
    return buffer;
}

/* Where the rows of k or v live: a base and its element strides. */
typedef struct {
    const void *base;
    int64_t batch_stride, row_stride, head_stride;
} key_source;

static key_source keys_of(const attention_fwd_params *p) {
    return (key_source){p->k, p->k_batch_stride, p->k_row_stride, p->k_head_stride};
}

static key_source values_of(const attention_fwd_params *p) {
    return (key_source){p->v, p->v_batch_stride, p->v_row_stride, p->v_head_stride};
}

/* Keys j0 .. j0+rows-1 of sequence b, kv head h, as fp32 rows, like rows_as_f32. Rows of one
 * page (or of an unpaged k/v) are row_stride apart and read in place when they can be; a
 * block that spans pages is gathered into buffer one page run at a time. */
static const float *key_rows_as_f32(const attention_fwd_params *p, const key_source *t,
                                    int64_t b, int64_t h, int64_t j0, int64_t rows,
                                    int right_operand, float *buffer, int64_t *ld) {
    const int64_t page = p->block_table ? p->page_size : INT64_MAX;
    const int64_t d = p->head_dim;
    if (rows <= page - j0 % page)
        return rows_as_f32(t->base, attention_key_offset(p, t->batch_stride, t->row_stride,
                                                         t->head_stride, b, j0, h),
                           t->row_stride, rows, d, right_operand, p->dtype, buffer, ld);
    *ld = padded_head_dim(d);
    for (int64_t r = 0, run; r < rows; r += run) {
        const int64_t j = j0 + r;
        run = min_i64(rows - r, page - j % page);
        load_tile(element_at(t->base, attention_key_offset(p, t->batch_stride, t->row_stride,
                                                           t->head_stride, b, j, h),
                             p->dtype),
                  t->row_stride, run, d, p->dtype, buffer + r * *ld, *ld);
    }
    return buffer;
}

/* dst[c] = scale · src[c] in `type`. */
static void store_row(char *dst, const float *src, int64_t cols, float scale, lf_scalar type) {
    if (type == LF_SCALAR_F32) {
        float *out = (float *)dst;
        for (int64_t c = 0; c < cols; ++c) out[c] = scale * src[c];
    } else if (type == LF_SCALAR_F16) {
        uint16_t *out = (uint16_t *)dst;
        for (int64_t c = 0; c < cols; ++c) out[c] = lf_f32_to_f16(scale * src[c]);
    } else {
        uint16_t *out = (uint16_t *)dst;
        for (int64_t c = 0; c < cols; ++c) out[c] = lf_f32_to_bf16(scale * src[c]);
    }
}

/* Carves 64-byte aligned tiles out of a thread's scratch; with a NULL base it only counts. */
typedef struct {
    char *base;
    int64_t used;
} scratch_carver;

static void *carve(scratch_carver *c, int64_t bytes) {
    void *at = c->base ? c->base + c->used : NULL;
    c->used += (bytes + 63) / 64 * 64;
    return at;
}

static float *carve_floats(scratch_carver *c, int64_t n) {
    return carve(c, aligned_floats(n) * (int64_t)sizeof(float));
}

/* K and V rows of a key block, BLOCK_K × dp floats each, as every work item carves them. */
static void carve_key_rows(scratch_carver *c, int64_t dp, float **k, float **v) {
    *k = carve_floats(c, BLOCK_K * dp);
    *v = carve_floats(c, BLOCK_K * dp);
}

/* ---------------------------------------------------------------------------------------- */
/* Scores.                                                                                   */

static int scores_need_transform(const attention_fwd_params *p) {
    return p->softcap > 0.0f || p->alibi_slopes != NULL;
}

static float alibi_slope(const attention_fwd_params *p, int64_t b, int64_t h) {
    return p->alibi_slopes ? p->alibi_slopes[b * p->alibi_batch_stride + h] : 0.0f;
}

/* Softcap and ALiBi on a tile of raw dot products (keys j0.., queries i0..), leaving scores
 * in log2 units. grad, when given, receives d score / d(q·k) in natural units. */
static void transform_scores(const attention_fwd_params *p, const sequence_extent *s,
                             float *tile, float *grad, int64_t rows, float slope, int64_t i0,
                             int64_t j0) {
    const float scale = p->softmax_scale, cap = p->softcap;
    const int64_t shift = s->seqlen_k - s->seqlen_q;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < BLOCK_Q; ++i) {
            const int64_t at = r * BLOCK_Q + i;
            float x = tile[at] * scale;
            if (cap > 0.0f) {
                const float t = tanhf(x / cap);
                x = cap * t;
                if (grad) grad[at] = scale * (1.0f - t * t);
            }
            x -= slope * fabsf((float)(i0 + i + shift - (j0 + r)));
            tile[at] = x * LOG2E;
        }
    }
}

/* Multiplies the kept elements of a tile (keys j0 .. j0+rows-1, queries i0 .. i0+nq-1) by
 * `scale` and zeroes the dropped ones. j0 is a multiple of 4, so Philox groups of 4 keys
 * align with the tile; groups a query cannot see are skipped. */
static void apply_dropout(const attention_fwd_params *p, const lane_state *lanes, float *tile,
                          int64_t rows, uint32_t batch_head, int64_t i0, int64_t nq, int64_t j0,
                          float scale) {
    for (int64_t i = 0; i < nq; ++i) {
        const int64_t begin = max_i64(lanes->first[i] - j0, 0);
        const int64_t end = min_i64(lanes->last[i] - j0 + 1, rows);
        for (int64_t group = begin / 4; group < ceil_div(end, 4); ++group) {
            const uint32_t keep = lf_dropout_keep_bits(
                p->dropout_seed, p->dropout_offset, batch_head, (uint32_t)(i0 + i),
                (uint32_t)((j0 >> 2) + group), p->dropout_threshold);
            for (int t = 0; t < 4 && 4 * group + t < rows; ++t)
                tile[(4 * group + t) * BLOCK_Q + i] *= (keep >> t) & 1u ? scale : 0.0f;
        }
    }
}

static float dropout_scale_of(const attention_fwd_params *p) {
    return p->dropout_p > 0.0f ? 1.0f / (1.0f - p->dropout_p) : 1.0f;
}

static int64_t lse_index(const attention_fwd_params *p, const sequence_extent *seq, int64_t b,
                         int64_t h, int64_t i) {
    return b * p->lse_batch_stride + h * p->lse_head_stride + seq->q_start + i;
}

/* Where a query-block work item of query head h starts: its sequence, rows [i0, i0 + nq), the
 * head dim d (padded dp) and the kv head. 0 when the block lies past the sequence's end. */
typedef struct {
    sequence_extent seq;
    int64_t i0, nq, d, dp, kv_head;
} query_block;

static int query_block_of(const attention_fwd_params *p, int64_t b, int64_t h, int64_t block,
                          query_block *q) {
    q->seq = sequence_of(p, b);
    q->i0 = block * BLOCK_Q;
    if (q->i0 >= q->seq.seqlen_q) return 0;
    q->nq = min_i64(BLOCK_Q, q->seq.seqlen_q - q->i0);
    q->d = p->head_dim, q->dp = padded_head_dim(q->d);
    q->kv_head = h / (p->heads_q / p->heads_kv);
    return 1;
}

static int threads_for(const attention_fwd_params *p, int64_t thread_bytes,
                       int64_t shared_bytes) {
    const int64_t fit = (p->workspace_bytes - shared_bytes) / thread_bytes;
    return (int)max_i64(1, min_i64(p->num_threads, fit));
}

/* ---------------------------------------------------------------------------------------- */
/* Forward.                                                                                  */

typedef struct {
    float *qt;      /* d × BLOCK_Q: the query block transposed */
    float *k;       /* BLOCK_K × d, when k needs converting */
    float *v;       /* BLOCK_K × dp, when v needs converting */
    float *tile;    /* BLOCK_K × BLOCK_Q scores, then probabilities */
    float *o;       /* BLOCK_Q × dp unnormalized output */
    int32_t *first, *last;
    float *row_max, *row_sum, *alpha;
} forward_scratch;

static int64_t forward_scratch_layout(int64_t d, char *base, forward_scratch *s) {
    const int64_t dp = padded_head_dim(d);
    scratch_carver c = {base, 0};
    s->qt = carve_floats(&c, d * BLOCK_Q);
    carve_key_rows(&c, dp, &s->k, &s->v);
    s->tile = carve_floats(&c, BLOCK_K * BLOCK_Q);
    s->o = carve_floats(&c, BLOCK_Q * dp);
    s->first = carve(&c, BLOCK_Q * (int64_t)sizeof(int32_t));
    s->last = carve(&c, BLOCK_Q * (int64_t)sizeof(int32_t));
    s->row_max = carve_floats(&c, BLOCK_Q);
    s->row_sum = carve_floats(&c, BLOCK_Q);
    s->alpha = carve_floats(&c, BLOCK_Q);
    return c.used;
}

int64_t attention_cpu_forward_thread_bytes(int64_t head_dim) {
    return forward_scratch_layout(head_dim, NULL, &(forward_scratch){0});
}

static void forward_query_block(const attention_fwd_params *p, const attention_kernels *kern,
                                char *scratch, int64_t b, int64_t h, int64_t block) {
    query_block qb;
    if (!query_block_of(p, b, h, block, &qb)) return;
    const sequence_extent seq = qb.seq;
    const int64_t i0 = qb.i0, nq = qb.nq, d = qb.d, dp = qb.dp, kv_head = qb.kv_head;
    const lf_scalar type = p->dtype;
    forward_scratch s;
    forward_scratch_layout(d, scratch, &s);
    lane_state lanes = {s.first, s.last, s.row_max, s.row_sum, s.alpha, NULL};

    load_tile_transposed(element_at(p->q, b * p->q_batch_stride +
                                              (seq.q_start + i0) * p->q_row_stride +
                                              h * p->q_head_stride, type),
                         p->q_row_stride, nq, d, type, s.qt);
    fill_key_bands(p, &seq, i0, nq, s.first, s.last);
    for (int64_t r = 0; r < BLOCK_Q; ++r) {
        s.row_max[r] = -INFINITY;
        s.row_sum[r] = 0.0f;
    }
    memset(s.o, 0, (size_t)(BLOCK_Q * dp) * sizeof(float));

    const int transform = scores_need_transform(p);
    const float factor = transform ? 1.0f : p->softmax_scale * LOG2E;
    const float slope = alibi_slope(p, b, h);
    const uint32_t batch_head = (uint32_t)(b * p->heads_q + h);
    const key_source keys = keys_of(p), values = values_of(p);
    int64_t band_first, band_last;
    lanes_key_range(s.first, s.last, nq, &band_first, &band_last);

    for (int64_t kb = band_first / BLOCK_K; band_first <= band_last && kb <= band_last / BLOCK_K;
         ++kb) {
        const int64_t j0 = kb * BLOCK_K, nk = min_i64(BLOCK_K, seq.seqlen_k - j0);
        int64_t ldk, ldv;
        const float *k = key_rows_as_f32(p, &keys, b, kv_head, j0, nk, 0, s.k, &ldk);
        const float *v = key_rows_as_f32(p, &values, b, kv_head, j0, nk, 1, s.v, &ldv);
        kern->matmul(nk, BLOCK_Q, d, k, ldk, 1, s.qt, BLOCK_Q, s.tile, BLOCK_Q, 0);
        if (transform) transform_scores(p, &seq, s.tile, NULL, nk, slope, i0, j0);
        kern->softmax_step(s.tile, nk, j0, factor, &lanes);
        for (int64_t r = 0; r < nq; ++r) {
            if (s.alpha[r] == 1.0f) continue;
            float *o_row = s.o + r * dp;
            for (int64_t c = 0; c < dp; ++c) o_row[c] *= s.alpha[r];
        }
        if (p->dropout_p > 0.0f)
            apply_dropout(p, &lanes, s.tile, nk, batch_head, i0, nq, j0, 1.0f);
        kern->matmul(nq, dp, nk, s.tile, 1, BLOCK_Q, v, ldv, s.o, dp, 1);
    }

    const float dropout_scale = dropout_scale_of(p);
    for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = i0 + r;
        const float m2 = s.row_max[r], sum = s.row_sum[r];
        const float factor = attention_row_factor(p->sinks, h, m2, sum);
        char *out_row = (char *)p->out + (b * p->out_batch_stride +
                                          (seq.q_start + i) * p->out_row_stride +
                                          h * p->out_head_stride) * element_size(type);
        store_row(out_row, s.o + r * dp, d, dropout_scale * factor, type);
        p->lse[lse_index(p, &seq, b, h, i)] = attention_row_lse2(p->sinks, h, m2, sum) * LN2;
    }
}

void attention_forward_cpu(const attention_fwd_params *p, int variant) {
    const attention_kernels *kern = kernels_for(variant);
    const int64_t thread_bytes = attention_cpu_forward_thread_bytes(p->head_dim);
    const int64_t blocks = ceil_div(p->seqlen_q, BLOCK_Q);
    const int64_t items = p->batch * p->heads_q * blocks;
#pragma omp parallel num_threads(threads_for(p, thread_bytes, 0))
    {
        char *scratch = (char *)p->workspace + (int64_t)omp_get_thread_num() * thread_bytes;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t block = item % blocks, bh = item / blocks;
            forward_query_block(p, kern, scratch, bh / p->heads_q, bh % p->heads_q, block);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Backward.                                                                                 */

typedef struct {
    float *k;       /* BLOCK_K × dp */
    float *v;       /* BLOCK_K × d */
    float *q;       /* BLOCK_Q × dp, when q needs converting */
    float *dout;    /* BLOCK_Q × dp, when dout needs converting */
    float *tile;    /* BLOCK_K × BLOCK_Q: scores, then P as the output used it */
    float *dtile;   /* BLOCK_K × BLOCK_Q: dO·Vᵀ, then dS scaled to d(q·k) */
    float *grad;    /* BLOCK_K × BLOCK_Q: d score / d(q·k) under softcap */
    float *acc0;    /* BLOCK_Q × dp (dq) or BLOCK_K × dp (dk) */
    float *acc1;    /* BLOCK_K × dp (dv) */
    int32_t *first, *last;
    float *shift, *delta;
} backward_scratch;

static int64_t backward_scratch_layout(int64_t d, char *base, backward_scratch *s) {
    const int64_t dp = padded_head_dim(d);
    scratch_carver c = {base, 0};
    carve_key_rows(&c, dp, &s->k, &s->v);
    s->q = carve_floats(&c, BLOCK_Q * dp);
    s->dout = carve_floats(&c, BLOCK_Q * dp);
    s->tile = carve_floats(&c, BLOCK_K * BLOCK_Q);
    s->dtile = carve_floats(&c, BLOCK_K * BLOCK_Q);
    s->grad = carve_floats(&c, BLOCK_K * BLOCK_Q);
    s->acc0 = carve_floats(&c, max_i64(BLOCK_Q, BLOCK_K) * dp);
    s->acc1 = carve_floats(&c, BLOCK_K * dp);
    s->first = carve(&c, BLOCK_Q * (int64_t)sizeof(int32_t));
    s->last = carve(&c, BLOCK_Q * (int64_t)sizeof(int32_t));
    /* shift, then delta: BLOCK_Q floats fill whole 64-byte lines, so one carve of both is
     * the layout of two */
    s->shift = carve_floats(&c, 2 * BLOCK_Q);
    s->delta = s->shift + BLOCK_Q;
    return c.used;
}

int64_t attention_cpu_backward_thread_bytes(int64_t head_dim) {
    return backward_scratch_layout(head_dim, NULL, &(backward_scratch){0});
}

/* The transposed query and dO blocks of every (head, sequence, block), computed once and
 * read by both passes: block_base[b] numbers the blocks of sequence b. */
typedef struct {
    int64_t *block_base; /* batch + 1 */
    float *qt, *dout_t;  /* [heads_q][block_base[batch]][d][BLOCK_Q] */
} backward_shared;

int64_t attention_cpu_backward_shared_bytes(int64_t head_dim, int64_t heads_q, int64_t batch,
                                            int64_t total_q) {
    const int64_t blocks = total_q / BLOCK_Q + batch;
    scratch_carver c = {NULL, 0};
    carve(&c, (batch + 1) * (int64_t)sizeof(int64_t));
    carve_floats(&c, heads_q * blocks * head_dim * BLOCK_Q);
    carve_floats(&c, heads_q * blocks * head_dim * BLOCK_Q);
    return c.used;
}

static backward_shared backward_shared_layout(const attention_fwd_params *p, char *base) {
    backward_shared shared;
    scratch_carver c = {base, 0};
    shared.block_base = carve(&c, (p->batch + 1) * (int64_t)sizeof(int64_t));
    shared.block_base[0] = 0;
    for (int64_t b = 0; b < p->batch; ++b) {
        const sequence_extent seq = sequence_of(p, b);
        shared.block_base[b + 1] = shared.block_base[b] + ceil_div(seq.seqlen_q, BLOCK_Q);
    }
    const int64_t tile = p->head_dim * BLOCK_Q;
    shared.qt = carve_floats(&c, p->heads_q * shared.block_base[p->batch] * tile);
    shared.dout_t = carve_floats(&c, p->heads_q * shared.block_base[p->batch] * tile);
    return shared;
}

static int64_t shared_tile_offset(const attention_fwd_params *p, const backward_shared *shared,
                                  int64_t b, int64_t h, int64_t block) {
    return (h * shared->block_base[p->batch] + shared->block_base[b] + block) * p->head_dim *
           BLOCK_Q;
}

/* First pass, per (b, h, query block): Δ and the transposed q and dO blocks. */
static void backward_prepare_block(const attention_bwd_params *bp, const backward_shared *shared,
                                   int64_t b, int64_t h, int64_t block) {
    const attention_fwd_params *p = &bp->fwd;
    const sequence_extent seq = sequence_of(p, b);
    const int64_t i0 = block * BLOCK_Q;
    if (i0 >= seq.seqlen_q) return;
    const int64_t nq = min_i64(BLOCK_Q, seq.seqlen_q - i0), d = p->head_dim;
    const lf_scalar type = p->dtype;
    const int64_t row = seq.q_start + i0;
    const char *dout = element_at(bp->dout, b * bp->dout_batch_stride + row * bp->dout_row_stride +
                                                h * bp->dout_head_stride, type);
    const char *out = element_at(p->out, b * p->out_batch_stride + row * p->out_row_stride +
                                             h * p->out_head_stride, type);
    const int64_t tile = shared_tile_offset(p, shared, b, h, block);
    load_tile_transposed(element_at(p->q, b * p->q_batch_stride + row * p->q_row_stride +
                                              h * p->q_head_stride, type),
                         p->q_row_stride, nq, d, type, shared->qt + tile);
    load_tile_transposed(dout, bp->dout_row_stride, nq, d, type, shared->dout_t + tile);
    float o_row[ATTENTION_MAX_HEAD_DIM];
    for (int64_t r = 0; r < nq; ++r) {
        load_tile(out + r * p->out_row_stride * element_size(type), p->out_row_stride, 1, d, type,
                  o_row, d);
        float sum = 0.0f;
        for (int64_t c = 0; c < d; ++c) sum += o_row[c] * shared->dout_t[tile + c * BLOCK_Q + r];
        const int64_t index = lse_index(p, &seq, b, h, i0 + r);
        bp->delta[index] = sum - (bp->dlse ? bp->dlse[index] : 0.0f);
    }
}

/* Per-query lanes of a query block for the backward: visible keys, lse (log2 units, 0 for
 * rows that see nothing) and Δ. */
static void load_query_lanes(const attention_bwd_params *bp, const backward_scratch *s,
                             const sequence_extent *seq, int64_t b, int64_t h, int64_t i0,
                             int64_t nq) {
    const attention_fwd_params *p = &bp->fwd;
    fill_key_bands(p, seq, i0, nq, s->first, s->last);
    for (int64_t r = 0; r < BLOCK_Q; ++r) {
        s->shift[r] = 0.0f;
        s->delta[r] = 0.0f;
        if (r >= nq) continue;
        const int64_t index = lse_index(p, seq, b, h, i0 + r);
        const float lse = p->lse[index];
        s->shift[r] = lse == -INFINITY ? 0.0f : lse * LOG2E;
        s->delta[r] = bp->delta[index];
    }
}

/* Given the tile Sᵀ = K·Qᵀ and dtile = V·dOᵀ of keys j0.. and queries i0.., leaves in the
 * tile P as the output used it (dropped and scaled) and in dtile dS, the gradient with respect
 * to q·k. */
static void backward_scores(const attention_fwd_params *p, const attention_kernels *kern,
                            const backward_scratch *s, const sequence_extent *seq, int64_t b,
                            int64_t h, int64_t i0, int64_t nq, int64_t j0, int64_t nk) {
    const int transform = scores_need_transform(p);
    const int softcapped = p->softcap > 0.0f, dropout = p->dropout_p > 0.0f;
    const float factor = transform ? 1.0f : p->softmax_scale * LOG2E;
    const float dropout_scale = dropout_scale_of(p);
    const uint32_t batch_head = (uint32_t)(b * p->heads_q + h);
    lane_state lanes = {s->first, s->last, NULL, NULL, NULL, s->shift};
    if (transform)
        transform_scores(p, seq, s->tile, softcapped ? s->grad : NULL, nk, alibi_slope(p, b, h),
                         i0, j0);
    kern->probabilities(s->tile, nk, j0, factor, &lanes);
    if (dropout) apply_dropout(p, &lanes, s->dtile, nk, batch_head, i0, nq, j0, dropout_scale);
    for (int64_t r = 0; r < nk; ++r) {
        float *prob = s->tile + r * BLOCK_Q, *grad = s->dtile + r * BLOCK_Q;
        const float *chain = s->grad + r * BLOCK_Q;
        if (softcapped) {
            for (int64_t i = 0; i < BLOCK_Q; ++i)
                grad[i] = prob[i] * (grad[i] - s->delta[i]) * chain[i];
        } else {
            for (int64_t i = 0; i < BLOCK_Q; ++i)
                grad[i] = prob[i] * (grad[i] - s->delta[i]) * p->softmax_scale;
        }
    }
    if (dropout) apply_dropout(p, &lanes, s->tile, nk, batch_head, i0, nq, j0, dropout_scale);
}

/* K (zero-padded, both a left and a right operand) and V rows of a key block. */
static void load_key_block(const attention_fwd_params *p, const backward_scratch *s, int64_t b,
                           int64_t kv_head, int64_t j0, int64_t nk, const float **k,
                           int64_t *ldk, const float **v, int64_t *ldv) {
    const key_source keys = keys_of(p), values = values_of(p);
    *k = key_rows_as_f32(p, &keys, b, kv_head, j0, nk, 1, s->k, ldk);
    *v = key_rows_as_f32(p, &values, b, kv_head, j0, nk, 0, s->v, ldv);
}

/* dq for queries i0.. of (b, h): Σ over visible key blocks of dS·K. */
static void backward_dq_block(const attention_bwd_params *bp, const backward_shared *shared,
                              const attention_kernels *kern, char *scratch, int64_t b, int64_t h,
                              int64_t block) {
    const attention_fwd_params *p = &bp->fwd;
    query_block qb;
    if (!query_block_of(p, b, h, block, &qb)) return;
    const sequence_extent seq = qb.seq;
    const int64_t i0 = qb.i0, nq = qb.nq, d = qb.d, dp = qb.dp, kv_head = qb.kv_head;
    backward_scratch s;
    backward_scratch_layout(d, scratch, &s);
    load_query_lanes(bp, &s, &seq, b, h, i0, nq);
    const int64_t tile = shared_tile_offset(p, shared, b, h, block);
    memset(s.acc0, 0, (size_t)(BLOCK_Q * dp) * sizeof(float));

    int64_t band_first, band_last;
    lanes_key_range(s.first, s.last, nq, &band_first, &band_last);
    for (int64_t kb = band_first / BLOCK_K; band_first <= band_last && kb <= band_last / BLOCK_K;
         ++kb) {
        const int64_t j0 = kb * BLOCK_K, nk = min_i64(BLOCK_K, seq.seqlen_k - j0);
        const float *k, *v;
        int64_t ldk, ldv;
        load_key_block(p, &s, b, kv_head, j0, nk, &k, &ldk, &v, &ldv);
        kern->matmul(nk, BLOCK_Q, d, k, ldk, 1, shared->qt + tile, BLOCK_Q, s.tile, BLOCK_Q, 0);
        kern->matmul(nk, BLOCK_Q, d, v, ldv, 1, shared->dout_t + tile, BLOCK_Q, s.dtile, BLOCK_Q,
                     0);
        backward_scores(p, kern, &s, &seq, b, h, i0, nq, j0, nk);
        kern->matmul(nq, dp, nk, s.dtile, 1, BLOCK_Q, k, ldk, s.acc0, dp, 1);
    }
    for (int64_t r = 0; r < nq; ++r) {
        char *dq_row = (char *)bp->dq + (b * bp->dq_batch_stride +
                                         (seq.q_start + i0 + r) * bp->dq_row_stride +
                                         h * bp->dq_head_stride) * element_size(p->dtype);
        store_row(dq_row, s.acc0 + r * dp, d, 1.0f, p->dtype);
    }
}

/* dk and dv for keys j0.. of (b, kv_head): Σ over the group's query heads and visible query
 * blocks of dSᵀ·Q and Pᵀ·dO. */
static void backward_dkdv_block(const attention_bwd_params *bp, const backward_shared *shared,
                                const attention_kernels *kern, char *scratch, int64_t b,
                                int64_t kv_head, int64_t block) {
    const attention_fwd_params *p = &bp->fwd;
    const sequence_extent seq = sequence_of(p, b);
    const int64_t j0 = block * BLOCK_K;
    if (j0 >= seq.seqlen_k) return;
    const int64_t nk = min_i64(BLOCK_K, seq.seqlen_k - j0);
    const int64_t d = p->head_dim, dp = padded_head_dim(d);
    const int64_t group = p->heads_q / p->heads_kv;
    const lf_scalar type = p->dtype;
    backward_scratch s;
    backward_scratch_layout(d, scratch, &s);
    const float *k, *v;
    int64_t ldk, ldv;
    load_key_block(p, &s, b, kv_head, j0, nk, &k, &ldk, &v, &ldv);
    memset(s.acc0, 0, (size_t)(BLOCK_K * dp) * sizeof(float));
    memset(s.acc1, 0, (size_t)(BLOCK_K * dp) * sizeof(float));

    int64_t rows_first, rows_last;
    query_band(p, &seq, j0, j0 + nk, &rows_first, &rows_last);
    for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        for (int64_t qb = rows_first / BLOCK_Q;
             rows_first <= rows_last && qb <= rows_last / BLOCK_Q; ++qb) {
            const int64_t i0 = qb * BLOCK_Q, nq = min_i64(BLOCK_Q, seq.seqlen_q - i0);
            const int64_t row = seq.q_start + i0;
            const int64_t tile = shared_tile_offset(p, shared, b, h, qb);
            load_query_lanes(bp, &s, &seq, b, h, i0, nq);
            kern->matmul(nk, BLOCK_Q, d, k, ldk, 1, shared->qt + tile, BLOCK_Q, s.tile, BLOCK_Q, 0);
            kern->matmul(nk, BLOCK_Q, d, v, ldv, 1, shared->dout_t + tile, BLOCK_Q, s.dtile,
                         BLOCK_Q, 0);
            backward_scores(p, kern, &s, &seq, b, h, i0, nq, j0, nk);
            int64_t ldq, ldo;
            const float *q = rows_as_f32(p->q, b * p->q_batch_stride + row * p->q_row_stride +
                                                   h * p->q_head_stride,
                                         p->q_row_stride, nq, d, 1, type, s.q, &ldq);
            const float *dout = rows_as_f32(bp->dout, b * bp->dout_batch_stride +
                                                          row * bp->dout_row_stride +
                                                          h * bp->dout_head_stride,
                                            bp->dout_row_stride, nq, d, 1, type, s.dout, &ldo);
            kern->matmul(nk, dp, nq, s.tile, BLOCK_Q, 1, dout, ldo, s.acc1, dp, 1);
            kern->matmul(nk, dp, nq, s.dtile, BLOCK_Q, 1, q, ldq, s.acc0, dp, 1);
        }
    }
    const int esize = element_size(type);
    for (int64_t r = 0; r < nk; ++r) {
        const int64_t row = seq.k_start + j0 + r;
        store_row((char *)bp->dk + (b * bp->dk_batch_stride + row * bp->dk_row_stride +
                                    kv_head * bp->dk_head_stride) * esize,
                  s.acc0 + r * dp, d, 1.0f, type);
        store_row((char *)bp->dv + (b * bp->dv_batch_stride + row * bp->dv_row_stride +
                                    kv_head * bp->dv_head_stride) * esize,
                  s.acc1 + r * dp, d, 1.0f, type);
    }
}

void attention_backward_cpu(const attention_bwd_params *bp, int variant) {
    const attention_fwd_params *p = &bp->fwd;
    const attention_kernels *kern = kernels_for(variant);
    const int64_t thread_bytes = attention_cpu_backward_thread_bytes(p->head_dim);
    const backward_shared shared = backward_shared_layout(p, p->workspace);
    const int64_t shared_bytes = attention_cpu_backward_shared_bytes(
        p->head_dim, p->heads_q, p->batch, p->cu_seqlens_q ? p->lse_head_stride
                                                           : p->batch * p->seqlen_q);
    const int64_t q_blocks = ceil_div(p->seqlen_q, BLOCK_Q);
    const int64_t k_blocks = ceil_div(p->seqlen_k, BLOCK_K);
    const int64_t q_items = p->batch * p->heads_q * q_blocks;
    const int64_t kv_items = p->batch * p->heads_kv * k_blocks;
#pragma omp parallel num_threads(threads_for(p, thread_bytes, shared_bytes))
    {
        char *scratch = (char *)p->workspace + shared_bytes +
                        (int64_t)omp_get_thread_num() * thread_bytes;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < q_items; ++item) {
            const int64_t bh = item / q_blocks;
            backward_prepare_block(bp, &shared, bh / p->heads_q, bh % p->heads_q,
                                   item % q_blocks);
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t item = 0; item < q_items; ++item) {
            const int64_t bh = item / q_blocks;
            backward_dq_block(bp, &shared, kern, scratch, bh / p->heads_q, bh % p->heads_q,
                              item % q_blocks);
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < kv_items; ++item) {
            const int64_t bh = item / k_blocks;
            backward_dkdv_block(bp, &shared, kern, scratch, bh / p->heads_kv, bh % p->heads_kv,
                                item % k_blocks);
        }
    }
}
