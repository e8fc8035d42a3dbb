/* LUT-GEMM on the CPU: out = x · Ŵᵀ (+ bias) for a packed BCQ weight Ŵ.
 *
 * For every activation row, a table holds, for each run of 4 consecutive activations
 * x[4c..4c+3], the 16 signed sums Σ_t ±x[4c+t] (bit t of the index set means +). A 4-bit
 * nibble of a packed bit-plane word is then the index of the partial sum it contributes, so
 * each table lookup replaces 4 multiply-adds of a dequantized weight; the weight itself is
 * never expanded. Per (row, group, plane) the looked-up sums are accumulated and scaled by
 * alpha once; the offset z contributes z · Σ x over the group.
 *
 * Work is split over tiles of LF_ROW_TILE output rows with OpenMP; the inner loop comes in a
 * portable C version and AVX2 / AVX-512 versions chosen at run time.
 *
 * The tables are float32 (exact: the default for float32 activations) or int16 with a scale
 * per group (lutgemm_cpu_int16.h: looked up 32 or 64 rows at a time by byte shuffles, about a
 * 2^-15 relative error per entry, below the rounding of float16/bfloat16 outputs: the default
 * for those activations). */
#include "lutgemm_cpu.h"

#include <math.h>
#include <string.h>

#include "lutgemm_cpu_int16.h"
#include "scalar_convert.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_X86 1
#endif

#define LF_ROW_TILE 512  /* output rows per work item */
#define LF_X_PASS 4      /* activation rows sharing one pass over a tile's weights */
#define LF_X_PASS_INT16 8 /* the same with int16 tables (whose lookups share the weight bits) */
#define LF_X_BLOCK 64    /* activation rows whose tables are built at once */
#define LF_PARALLEL_MIN_LOOKUPS (1 << 15) /* word lookups below which one thread is faster */
#define LF_CHUNK_K 4     /* activations per table */
#define LF_TABLE 16      /* entries per table */
#define LF_CHUNKS_PER_WORD (BCQ_WORD_K / LF_CHUNK_K)

enum { VARIANT_BEST = 0, VARIANT_PORTABLE = 1, VARIANT_AVX2 = 2, VARIANT_AVX512 = 3 };

static int64_t table_floats(const lutgemm_params *p) {
    return bcq_words_per_row(p->k) * LF_CHUNKS_PER_WORD * LF_TABLE;
}

/* Floats of tables + group sums per activation row (float tables; int16 ones take less), a
 * multiple of 16 so that every row's tables stay 64-byte aligned. */
static int64_t floats_per_x_row(const lutgemm_params *p) {
    const int64_t float_tables = table_floats(p) + p->k / p->group_size;
    const int64_t int16_tables = (lutgemm_int16_row_bytes(p) + 3) / 4;
    return ((float_tables > int16_tables ? float_tables : int16_tables) + 15) / 16 * 16;
}

int64_t lutgemm_cpu_workspace_bytes(const lutgemm_params *p) {
    const int64_t rows = p->m < LF_X_BLOCK ? (p->m > 0 ? p->m : 1) : LF_X_BLOCK;
    return rows * floats_per_x_row(p) * (int64_t)sizeof(float);
}

int lutgemm_cpu_best_variant(void) {
#ifdef LF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return VARIANT_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return VARIANT_AVX2;
#endif
    return VARIANT_PORTABLE;
}

/* Tables and per-group sums of one activation row; activations past k count as 0. */
static void build_tables(const lutgemm_params *p, const void *x_row, float *table,
                         float *group_sum) {
    const int64_t chunks = bcq_words_per_row(p->k) * LF_CHUNKS_PER_WORD;
    for (int64_t c = 0; c < chunks; ++c) {
        float v[LF_CHUNK_K];
        for (int t = 0; t < LF_CHUNK_K; ++t) {
            const int64_t col = c * LF_CHUNK_K + t;
            v[t] = col < p->k ? lf_load(x_row, col, p->x_type) : 0.0f;
        }
        float *entry = table + c * LF_TABLE;
        /* entry[idx] = Σ_t (bit t of idx ? +v[t] : -v[t]), built by doubling. */
        entry[0] = -v[0] - v[1] - v[2] - v[3];
        for (int t = 0, size = 1; t < LF_CHUNK_K; ++t, size *= 2) {
            for (int i = 0; i < size; ++i) entry[size + i] = entry[i] + 2.0f * v[t];
        }
    }
    const int64_t groups = p->k / p->group_size;
    for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.0f;
        for (int64_t col = g * p->group_size; col < (g + 1) * p->group_size; ++col)
            sum += lf_load(x_row, col, p->x_type);
        group_sum[g] = sum;
    }
}

/* Metadata entry j of group g for rows [r0, r0 + rows), as float32, times `scale`. One loop
 * per type, so that the float32 one vectorizes. */
static void load_meta(const lutgemm_params *p, int64_t g, int j, int64_t r0, int64_t rows,
                      float scale, float *restrict dst) {
    const int64_t base = (g * bcq_meta_per_group(p->bits, p->mode) + j) * bcq_padded_rows(p->n) + r0;
    if (p->meta_type == LF_SCALAR_F32) {
        const float *restrict src = (const float *)p->meta + base;
        for (int64_t r = 0; r < rows; ++r) dst[r] = scale * src[r];
    } else if (p->meta_type == LF_SCALAR_F16) {
        const uint16_t *restrict src = (const uint16_t *)p->meta + base;
        for (int64_t r = 0; r < rows; ++r) dst[r] = scale * lf_f16_to_f32(src[r]);
    } else {
        const uint16_t *restrict src = (const uint16_t *)p->meta + base;
        for (int64_t r = 0; r < rows; ++r) dst[r] = scale * lf_bf16_to_f32(src[r]);
    }
}

/* sum[r] += Σ_c table[c][nibble c of words[r]] for r < rows (a multiple of 8): the 8 lookups
 * of one packed word for a run of contiguous rows. `next` is the run the caller reads next,
 * prefetched meanwhile: runs are a plane-row apart, too far for the hardware prefetcher. */
typedef void word_lookup_fn(const uint32_t *restrict words, int64_t rows,
                            const float *restrict table, float *restrict sum,
                            const uint32_t *next);

static void word_lookup_portable(const uint32_t *restrict words, int64_t rows,
                                 const float *restrict table, float *restrict sum,
                                 const uint32_t *next) {
    (void)next;
    for (int64_t r = 0; r < rows; ++r) {
        uint32_t bits = words[r];
        float s = 0.0f;
        for (int c = 0; c < LF_CHUNKS_PER_WORD; ++c, bits >>= LF_CHUNK_K)
            s += table[c * LF_TABLE + (bits & (LF_TABLE - 1))];
        sum[r] += s;
    }
}

#ifdef LF_X86
/* 8 rows at a time: a 16-entry table is two 8-float registers; permutevar8x32 looks up the
 * low 3 bits of each row's nibble in both and the nibble's top bit, shifted into the sign
 * bit, blends between them. */
#define LF_AVX2_LOOKUP(c)                                                                    \
    _mm256_blendv_ps(                                                                        \
        _mm256_permutevar8x32_ps(lo[c], _mm256_srli_epi32(w, 4 * (c))),                      \
        _mm256_permutevar8x32_ps(hi[c], _mm256_srli_epi32(w, 4 * (c))),                      \
        _mm256_castsi256_ps(_mm256_slli_epi32(w, 28 - 4 * (c))))

__attribute__((target("avx2,fma"))) static void word_lookup_avx2(
    const uint32_t *restrict words, int64_t rows, const float *restrict table,
    float *restrict sum, const uint32_t *next) {
    __m256 lo[LF_CHUNKS_PER_WORD], hi[LF_CHUNKS_PER_WORD];
    for (int c = 0; c < LF_CHUNKS_PER_WORD; ++c) {
        lo[c] = _mm256_load_ps(table + c * LF_TABLE);
        hi[c] = _mm256_load_ps(table + c * LF_TABLE + 8);
    }
    for (int64_t r = 0; r < rows; r += 8) {
        if (next && (r & 15) == 0) _mm_prefetch((const char *)(next + r), _MM_HINT_T0);
        const __m256i w = _mm256_loadu_si256((const __m256i *)(words + r));
        __m256 s0 = _mm256_add_ps(LF_AVX2_LOOKUP(0), LF_AVX2_LOOKUP(1));
        __m256 s1 = _mm256_add_ps(LF_AVX2_LOOKUP(2), LF_AVX2_LOOKUP(3));
        s0 = _mm256_add_ps(s0, _mm256_add_ps(LF_AVX2_LOOKUP(4), LF_AVX2_LOOKUP(5)));
        s1 = _mm256_add_ps(s1, _mm256_add_ps(LF_AVX2_LOOKUP(6), LF_AVX2_LOOKUP(7)));
        _mm256_storeu_ps(sum + r, _mm256_add_ps(_mm256_loadu_ps(sum + r), _mm256_add_ps(s0, s1)));
    }
}

/* 16 rows at a time: permutexvar looks up a whole 16-entry table (one register) with the
 * low 4 bits of each lane. */
#define LF_AVX512_LOOKUP(c) _mm512_permutexvar_ps(_mm512_srli_epi32(w, 4 * (c)), t[c])

__attribute__((target("avx512f"))) static void word_lookup_avx512(
    const uint32_t *restrict words, int64_t rows, const float *restrict table,
    float *restrict sum, const uint32_t *next) {
    __m512 t[LF_CHUNKS_PER_WORD];
    for (int c = 0; c < LF_CHUNKS_PER_WORD; ++c) t[c] = _mm512_load_ps(table + c * LF_TABLE);
    for (int64_t r = 0; r < rows; r += 16) {
        if (next) _mm_prefetch((const char *)(next + r), _MM_HINT_T0);
        const __mmask16 mask = rows - r >= 16 ? (__mmask16)0xffff : (__mmask16)0x00ff;
        const __m512i w = _mm512_maskz_loadu_epi32(mask, words + r);
        __m512 s0 = _mm512_add_ps(LF_AVX512_LOOKUP(0), LF_AVX512_LOOKUP(1));
        __m512 s1 = _mm512_add_ps(LF_AVX512_LOOKUP(2), LF_AVX512_LOOKUP(3));
        s0 = _mm512_add_ps(s0, _mm512_add_ps(LF_AVX512_LOOKUP(4), LF_AVX512_LOOKUP(5)));
        s1 = _mm512_add_ps(s1, _mm512_add_ps(LF_AVX512_LOOKUP(6), LF_AVX512_LOOKUP(7)));
        const __m512 old = _mm512_maskz_loadu_ps(mask, sum + r);
        _mm512_mask_storeu_ps(sum + r, mask, _mm512_add_ps(old, _mm512_add_ps(s0, s1)));
    }
}
#endif

static int resolve_variant(int variant) {
    return variant == VARIANT_BEST ? lutgemm_cpu_best_variant() : variant;
}

static word_lookup_fn *select_word_lookup(int variant) {
#ifdef LF_X86
    if (resolve_variant(variant) == VARIANT_AVX512) return word_lookup_avx512;
    if (resolve_variant(variant) == VARIANT_AVX2) return word_lookup_avx2;
#endif
    (void)variant;
    return word_lookup_portable;
}

static lutgemm_int16_word_fn *select_int16_word(int variant) {
#ifdef LF_X86
    if (resolve_variant(variant) == VARIANT_AVX512) return lutgemm_int16_word_avx512;
    if (resolve_variant(variant) == VARIANT_AVX2) return lutgemm_int16_word_avx2;
#endif
    (void)variant;
    return lutgemm_int16_word_portable;
}

const char *lutgemm_cpu_variant_isa(int variant) {
    word_lookup_fn *fn = select_word_lookup(variant);
#ifdef LF_X86
    if (fn == word_lookup_avx512) return "avx512";
    if (fn == word_lookup_avx2) return "avx2";
#endif
    (void)fn;
    return "portable";
}

/* What a tile reads: the kernel of one kind of tables and the tables of its activation rows. */
typedef struct {
    const lutgemm_params *p;
    word_lookup_fn *word_lookup;       /* float tables, or NULL */
    lutgemm_int16_word_fn *int16_word; /* int16 tables, or NULL */
    const char *tables;                /* the tables of activation row 0 of the block */
    int64_t x_stride;                  /* bytes from one activation row's tables to the next */
} tile_kernel;

/* The run of rows [r0, r0 + rows) of word w, plane `plane`. */
static const uint32_t *plane_run(const lutgemm_params *p, int64_t w, int plane, int64_t r0) {
    return p->planes + (w * p->bits + plane) * bcq_padded_rows(p->n) + r0;
}

/* The run read after word w of plane `plane`: the next word of group g, else the group's
 * first word of the next plane (NULL after the last plane): runs are a plane-row apart, too
 * far for the hardware prefetcher. */
static const uint32_t *next_run(const lutgemm_params *p, int64_t g, int64_t w, int plane,
                                int64_t r0) {
    const int64_t words_per_group = bcq_words_per_row(p->group_size);
    if (w + 1 < (g + 1) * words_per_group) return plane_run(p, w + 1, plane, r0);
    return plane + 1 < p->bits ? plane_run(p, g * words_per_group, plane + 1, r0) : NULL;
}

/* sum[i][r] = Σ over group g of the looked-up partial sums of plane `plane`, float tables. Rows
 * are the innermost loop, so each (word, plane) run of the packed weight streams from memory
 * contiguously while that word's tables stay in registers. */
static void plane_sums_float(const tile_kernel *t, int64_t g, int plane, int64_t r0, int64_t rows,
                             const char *tables, int64_t xs, float sum[][LF_ROW_TILE]) {
    const lutgemm_params *p = t->p;
    const int64_t words_per_group = bcq_words_per_row(p->group_size);
    const int64_t word_floats = LF_CHUNKS_PER_WORD * LF_TABLE;
    for (int64_t i = 0; i < xs; ++i) memset(sum[i], 0, sizeof(float) * rows);
    for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w) {
        const uint32_t *next = next_run(p, g, w, plane, r0);
        for (int64_t i = 0; i < xs; ++i)
            t->word_lookup(plane_run(p, w, plane, r0), rows,
                           (const float *)(tables + i * t->x_stride) + w * word_floats, sum[i],
                           i + 1 == xs ? next : NULL);
    }
}

/* The same with int16 tables: exact int32 sums of one group, then times the group's scale. */
static void plane_sums_int16(const tile_kernel *t, int64_t g, int plane, int64_t r0, int64_t rows,
                             const char *tables, int64_t xs, float sum[][LF_ROW_TILE]) {
    const lutgemm_params *p = t->p;
    const int64_t words_per_group = bcq_words_per_row(p->group_size);
    int32_t isum[LF_X_PASS_INT16][LF_ROW_TILE];
    for (int64_t i = 0; i < xs; ++i) memset(isum[i], 0, sizeof(int32_t) * rows);
    for (int64_t w = g * words_per_group; w < (g + 1) * words_per_group; ++w)
        t->int16_word(plane_run(p, w, plane, r0), rows,
                      (const uint8_t *)tables + w * LF_INT16_WORD_BYTES, t->x_stride, xs,
                      isum[0], LF_ROW_TILE, next_run(p, g, w, plane, r0));
    for (int64_t i = 0; i < xs; ++i) {
        const float scale = lutgemm_int16_scale(p, (const uint8_t *)tables + i * t->x_stride, g);
        for (int64_t r = 0; r < rows; ++r) sum[i][r] = scale * (float)isum[i][r];
    }
}

static float group_sum(const tile_kernel *t, const char *tables, int64_t g) {
    if (t->int16_word) return lutgemm_int16_group_sum(t->p, (const uint8_t *)tables, g);
    return ((const float *)tables)[table_floats(t->p) + g];
}

/* One tile of LF_ROW_TILE output rows for xs activation rows (x0 onwards, tables at `tables`):
 * per (group, plane) the looked-up sums, scaled by alpha; the offset z times Σ x. */
static void row_tile(const tile_kernel *t, int64_t r0, int64_t x0, int64_t xs, const char *tables) {
    const lutgemm_params *p = t->p;
    const int64_t padded = bcq_padded_rows(p->n);
    const int64_t rows = padded - r0 < LF_ROW_TILE ? padded - r0 : LF_ROW_TILE;
    const int64_t groups = p->k / p->group_size;
    float acc[LF_X_PASS_INT16][LF_ROW_TILE], sum[LF_X_PASS_INT16][LF_ROW_TILE], meta[LF_ROW_TILE];
    for (int64_t i = 0; i < xs; ++i) memset(acc[i], 0, sizeof(float) * rows);
    for (int64_t g = 0; g < groups; ++g) {
        for (int plane = 0; plane < p->bits; ++plane) {
            if (t->int16_word) plane_sums_int16(t, g, plane, r0, rows, tables, xs, sum);
            else plane_sums_float(t, g, plane, r0, rows, tables, xs, sum);
            if (p->mode == BCQ_MODE_UNIFORM) load_meta(p, g, 0, r0, rows, ldexpf(1.0f, plane - 1), meta);
            else load_meta(p, g, plane, r0, rows, 1.0f, meta);
            for (int64_t i = 0; i < xs; ++i)
                for (int64_t r = 0; r < rows; ++r) acc[i][r] += meta[r] * sum[i][r];
        }
        load_meta(p, g, bcq_meta_per_group(p->bits, p->mode) - 1, r0, rows, 1.0f, meta);
        for (int64_t i = 0; i < xs; ++i) {
            const float x_sum = group_sum(t, tables + i * t->x_stride, g);
            for (int64_t r = 0; r < rows; ++r) acc[i][r] += meta[r] * x_sum;
        }
    }
    const int64_t live = p->n - r0 < rows ? p->n - r0 : rows;
    for (int64_t i = 0; i < xs; ++i) {
        for (int64_t r = 0; r < live; ++r) {
            const float bias = p->bias ? lf_load(p->bias, r0 + r, p->x_type) : 0.0f;
            lf_store(p->out, (x0 + i) * p->ldo + r0 + r, p->x_type, acc[i][r] + bias);
        }
    }
}

void lutgemm_cpu(const lutgemm_params *p, int variant, int tables) {
    const int int16 = tables == LUTGEMM_TABLES_INT16 ||
                      (tables == LUTGEMM_TABLES_AUTO && p->x_type != LF_SCALAR_F32);
    const int64_t per_x_row = floats_per_x_row(p);
    float *workspace = (float *)p->workspace;
    const tile_kernel kernel = {p, int16 ? NULL : select_word_lookup(variant),
                                int16 ? select_int16_word(variant) : NULL, (const char *)workspace,
                                per_x_row * (int64_t)sizeof(float)};
    const int64_t x_pass = int16 ? LF_X_PASS_INT16 : LF_X_PASS;
    const int64_t tiles = (bcq_padded_rows(p->n) + LF_ROW_TILE - 1) / LF_ROW_TILE;
    const int x_elem = p->x_type == LF_SCALAR_F32 ? 4 : 2;
    /* Waking the OpenMP team costs ~10 us: small products run on the calling thread. */
    const int64_t lookups = p->m * bcq_padded_rows(p->n) * bcq_words_per_row(p->k) * p->bits;
    const int parallel = lookups >= LF_PARALLEL_MIN_LOOKUPS;
    for (int64_t x0 = 0; x0 < p->m; x0 += LF_X_BLOCK) {
        const int64_t xs = p->m - x0 < LF_X_BLOCK ? p->m - x0 : LF_X_BLOCK;
#pragma omp parallel if (parallel)
        {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < xs; ++i) {
                const char *x_row = (const char *)p->x + (x0 + i) * p->ldx * x_elem;
                float *table = workspace + i * per_x_row;
                if (int16) lutgemm_int16_build(p, x_row, (uint8_t *)table);
                else build_tables(p, x_row, table, table + table_floats(p));
            }
            const int64_t passes = (xs + x_pass - 1) / x_pass;
#pragma omp for schedule(static) collapse(2)
            for (int64_t t = 0; t < tiles; ++t) {
                for (int64_t pass = 0; pass < passes; ++pass) {
                    const int64_t first = pass * x_pass;
                    const int64_t count = xs - first < x_pass ? xs - first : x_pass;
                    row_tile(&kernel, t * LF_ROW_TILE, x0 + first, count,
                             kernel.tables + first * kernel.x_stride);
                }
            }
        }
    }
}
