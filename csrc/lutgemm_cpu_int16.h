/* LUT-GEMM on the CPU with int16 tables looked up by byte shuffles (the kernel behind
 * lutgemm_cpu for float16/bfloat16 activations; lutgemm_cpu.c drives it).
 *
 * Per activation row, per packed word (32 activations) and per run of 4 activations, a table
 * holds the 16 signed sums Σ_t ±x[4c+t] quantized to int16 with one float scale per group of
 * the weight: its bytes are stored apart (16 low bytes, then 16 high bytes), so that a
 * vpshufb of each looks up 16 rows' entries at once. The scale of a group is the largest
 * Σ|x| over one of its words / LF_INT16_WORD_MAX, so the 8 entries one word contributes to a
 * row sum to at most LF_INT16_WORD_MAX in magnitude: a word is accumulated in int16 lanes
 * without overflow, then widened to int32 for the rest of the group. */
#ifndef LUTFLASH_LUTGEMM_CPU_INT16_H
#define LUTFLASH_LUTGEMM_CPU_INT16_H

#include "bcq_format.h"

#define LF_INT16_WORD_MAX 32760.0 /* below 32767 by the 8 half-units rounding may add */
#define LF_INT16_WORD_BYTES 256   /* table bytes per packed word: 8 runs x 16 entries x 2 */

/* Bytes of one activation row's tables, scales and group sums. */
int64_t lutgemm_int16_row_bytes(const lutgemm_params *p);
/* The tables of activation row x_row at `tables` (lutgemm_int16_row_bytes of them). */
void lutgemm_int16_build(const lutgemm_params *p, const void *x_row, uint8_t *tables);
/* Of a row's tables: the scale of the int16 sums of group g, and Σ x over group g. */
float lutgemm_int16_scale(const lutgemm_params *p, const uint8_t *tables, int64_t g);
float lutgemm_int16_group_sum(const lutgemm_params *p, const uint8_t *tables, int64_t g);

/* sums[i * sums_stride + r] += Σ_c entry c of word r's nibble c, in table i (at
 * tables + i * table_stride, the tables of one packed word), for r < rows (a multiple of 8)
 * and i < xs: one packed word of a run of rows for xs activation rows. May write sums up to
 * the next multiple of 64 rows (the values there are meaningless). `next` is the run the
 * caller reads next (or NULL), prefetched meanwhile. */
typedef void lutgemm_int16_word_fn(const uint32_t *restrict words, int64_t rows,
                                   const uint8_t *restrict tables, int64_t table_stride,
                                   int64_t xs, int32_t *restrict sums, int64_t sums_stride,
                                   const uint32_t *next);

lutgemm_int16_word_fn lutgemm_int16_word_portable;
#if defined(__x86_64__) || defined(__i386__)
lutgemm_int16_word_fn lutgemm_int16_word_avx2;
lutgemm_int16_word_fn lutgemm_int16_word_avx512;
#endif

#endif
