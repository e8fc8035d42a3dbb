/* int16 tables of activation partial sums and the word lookups that read them: portable C,
 * and AVX2 / AVX-512 (one body, lutgemm_cpu_int16_simd.h, included per instruction set).
 * The layout and the bound on the entries are described in lutgemm_cpu_int16.h. */
#include "lutgemm_cpu_int16.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "scalar_convert.h"

#define LF_CHUNK_K 4
#define LF_CHUNKS_PER_WORD (BCQ_WORD_K / LF_CHUNK_K)

/* Row bytes: the tables, per group the scale and Σ x (floats), then the row as float32 (zero
 * past k) while the tables are built. */
static int64_t tables_bytes(const lutgemm_params *p) {
    return bcq_words_per_row(p->k) * LF_INT16_WORD_BYTES;
}

static int64_t groups_bytes(const lutgemm_params *p) {
    return 2 * (p->k / p->group_size) * (int64_t)sizeof(float);
}

int64_t lutgemm_int16_row_bytes(const lutgemm_params *p) {
    return tables_bytes(p) + groups_bytes(p) + bcq_words_per_row(p->k) * BCQ_WORD_K * sizeof(float);
}

static float *group_floats(const lutgemm_params *p, uint8_t *tables) {
    return (float *)(void *)(tables + tables_bytes(p));
}

float lutgemm_int16_scale(const lutgemm_params *p, const uint8_t *tables, int64_t g) {
    return group_floats(p, (uint8_t *)tables)[g];
}

float lutgemm_int16_group_sum(const lutgemm_params *p, const uint8_t *tables, int64_t g) {
    return group_floats(p, (uint8_t *)tables)[p->k / p->group_size + g];
}

/* v rounded to the nearest integer, ties to even, for |v| < 2^22 (vectorizes, unlike lrintf) */
static inline float round_small(float v) {
    const float shift = 12582912.0f; /* 1.5 · 2^23 */
    return (v + shift) - shift;
}

void lutgemm_int16_build(const lutgemm_params *p, const void *x_row, uint8_t *tables) {
    const int64_t groups = p->k / p->group_size, words_per_group = bcq_words_per_row(p->group_size);
    float *scale = group_floats(p, tables), *x_sum = scale + groups;
    float *x = x_sum + groups;
    for (int64_t col = 0; col < bcq_words_per_row(p->k) * BCQ_WORD_K; ++col)
        x[col] = col < p->k ? lf_load(x_row, col, p->x_type) : 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t w0 = g * words_per_group;
        float largest = 0.0f; /* the largest Σ|x| over one word of the group */
        for (int64_t w = w0; w < w0 + words_per_group; ++w) {
            float word_abs = 0.0f;
            for (int j = 0; j < BCQ_WORD_K; ++j) word_abs += fabsf(x[w * BCQ_WORD_K + j]);
            largest = !(word_abs <= largest) ? word_abs : largest; /* keeps a NaN */
        }
        /* inf or NaN activations: a NaN scale makes the group's outputs NaN, as they are in
         * float32 arithmetic; the entries are then 0. Tiny ones: the inverse stays finite. */
        const double exact_inverse = LF_INT16_WORD_MAX / largest;
        const float inverse = largest > 0.0f && isfinite(largest)
                                  ? (float)(exact_inverse < FLT_MAX ? exact_inverse : FLT_MAX)
                                  : 0.0f;
        scale[g] = inverse > 0.0f ? (float)(1.0 / inverse) : largest == 0.0f ? 0.0f : NAN;
        x_sum[g] = 0.0f;
        for (int64_t col = g * p->group_size; col < (g + 1) * p->group_size; ++col)
            x_sum[g] += x[col];
        for (int64_t c = w0 * LF_CHUNKS_PER_WORD; c < (w0 + words_per_group) * LF_CHUNKS_PER_WORD; ++c) {
            const float *v = x + c * LF_CHUNK_K;
            float entry[16];
            /* entry[idx] = Σ_t (bit t of idx ? +v[t] : -v[t]), built by doubling */
            entry[0] = -v[0] - v[1] - v[2] - v[3];
            for (int t = 0, size = 1; t < LF_CHUNK_K; ++t, size *= 2)
                for (int i = 0; i < size; ++i) entry[size + i] = entry[i] + 2.0f * v[t];
            uint8_t *lo = tables + c * 32, *hi = lo + 16;
            for (int i = 0; i < 16; ++i) {
                const uint16_t q = (uint16_t)(int16_t)round_small(entry[i] * inverse);
                lo[i] = (uint8_t)(q & 0xff);
                hi[i] = (uint8_t)(q >> 8);
            }
        }
    }
}

void lutgemm_int16_word_portable(const uint32_t *restrict words, int64_t rows,
                                 const uint8_t *restrict tables, int64_t table_stride,
                                 int64_t xs, int32_t *restrict sums, int64_t sums_stride,
                                 const uint32_t *next) {
    (void)next;
    for (int64_t i = 0; i < xs; ++i) {
        const uint8_t *table = tables + i * table_stride;
        for (int64_t r = 0; r < rows; ++r) {
            uint32_t bits = words[r];
            int32_t s = 0;
            for (int c = 0; c < LF_CHUNKS_PER_WORD; ++c, bits >>= LF_CHUNK_K) {
                const unsigned nibble = bits & 15;
                s += (int16_t)(uint16_t)(table[32 * c + nibble] | table[32 * c + 16 + nibble] << 8);
            }
            sums[i * sums_stride + r] += s;
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* Within a 128-bit lane of 4 words (rows), 32-bit lane t gathers byte t of rows 0..3. */
static const uint8_t lf_byte_transpose[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

#define LF_ISA(name) name##_avx2
#define LF_TARGET __attribute__((target("avx2")))
#define lf_vec __m256i
#define LF_OP(op) _mm256_##op
#define LF_VEC_BYTES 32
#define lf_loadu(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define lf_storeu(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), v)
#define lf_and _mm256_and_si256
#define lf_zero _mm256_setzero_si256
#define lf_broadcast128(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(p)))
#define lf_even_qwords_first(v) _mm256_permute4x64_epi64(v, _MM_SHUFFLE(3, 1, 2, 0))
#define lf_widen_lo(v) _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v))
#define lf_widen_hi(v) _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1))
#include "lutgemm_cpu_int16_simd.h"
#undef LF_ISA
#undef LF_TARGET
#undef lf_vec
#undef LF_OP
#undef LF_VEC_BYTES
#undef lf_loadu
#undef lf_storeu
#undef lf_and
#undef lf_zero
#undef lf_broadcast128
#undef lf_even_qwords_first
#undef lf_widen_lo
#undef lf_widen_hi

#define LF_ISA(name) name##_avx512
#define LF_TARGET __attribute__((target("avx512f,avx512bw")))
#define lf_vec __m512i
#define LF_OP(op) _mm512_##op
#define LF_VEC_BYTES 64
#define lf_loadu(p) _mm512_loadu_si512((const void *)(p))
#define lf_storeu(p, v) _mm512_storeu_si512((void *)(p), v)
#define lf_and _mm512_and_si512
#define lf_zero _mm512_setzero_si512
#define lf_broadcast128(p) _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(const void *)(p)))
#define lf_even_qwords_first(v) _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), v)
#define lf_widen_lo(v) _mm512_cvtepi16_epi32(_mm512_castsi512_si256(v))
#define lf_widen_hi(v) _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(v, 1))
#include "lutgemm_cpu_int16_simd.h"
#endif
