/* The packed BCQ weight format (docs/FORMAT.md) and the parameters of a lutgemm call.
 * Plain C, shared by the C extension and the CUDA kernels. */
#ifndef LUTFLASH_BCQ_FORMAT_H
#define LUTFLASH_BCQ_FORMAT_H

#include <stdint.h>

#include "scalar_type.h"

#define BCQ_FORMAT_VERSION 1
#define BCQ_MAX_BITS 8
#define BCQ_WORD_K 32  /* k positions per packed 32-bit word */
#define BCQ_ROW_PAD 8  /* rows (n) are padded to a multiple of this in the packed tensors */

typedef enum {
    BCQ_MODE_GENERAL = 0, /* per (row, group): alpha_0..alpha_{q-1}, offset */
    BCQ_MODE_UNIFORM = 1, /* per (row, group): scale s, offset; alpha_i = s * 2^(i-1) */
} bcq_mode;

static inline int64_t bcq_padded_rows(int64_t n) {
    return (n + BCQ_ROW_PAD - 1) / BCQ_ROW_PAD * BCQ_ROW_PAD;
}
static inline int64_t bcq_words_per_row(int64_t k) { return (k + BCQ_WORD_K - 1) / BCQ_WORD_K; }
static inline int bcq_meta_per_group(int bits, bcq_mode mode) {
    return mode == BCQ_MODE_GENERAL ? bits + 1 : 2;
}

/* Which CUDA kernels compute a lutgemm: chosen from x's dtype and m, or forced (tests,
 * benchmarks). The tensor cores take float16/bfloat16 x only. */
typedef enum {
    LF_PATH_AUTO = 0,
    LF_PATH_TABLES = 1, /* tables of activation partial sums (lutgemm_decode.cu, lutgemm_lut.cu) */
    LF_PATH_TENSOR_CORES = 2, /* tensor cores (lutgemm_mma.cu) */
} lutgemm_path;

/*
 * planes: 32-bit words [words_per_row(k)][bits][padded_rows(n)] (int32 tensors, read as
 *         uint32); bit j of word [w][i][r] is the code of weight (r, 32*w + j) in bit-plane i:
 *         1 means b = +1, 0 means b = -1.
 * meta:   [k / group_size][meta_per_group][padded_rows(n)] in meta_type; the last entry of
 *         each group is the offset z.
 */
typedef struct {
    const void *x;  /* (m, k), rows ldx elements apart */
    int64_t ldx;
    const uint32_t *planes;
    const void *meta;
    const void *bias; /* (n,) in x_type, or NULL */
    void *out;        /* (m, n), rows ldo elements apart, in x_type */
    int64_t ldo;
    void *workspace;
    int64_t workspace_bytes;
    /* Optional (NULL): a workspace that is all zero and that the kernels must leave all zero
     * (the m <= 8 CUDA kernel uses it to skip zeroing its split-k sums and counters). */
    void *clean_workspace;
    int64_t clean_workspace_bytes;
    int64_t m, n, k;
    int bits;
    int group_size;
    bcq_mode mode;
    lf_scalar x_type;
    lf_scalar meta_type;
    lutgemm_path path; /* CUDA kernels only; the CPU has one */
} lutgemm_params;

#endif
