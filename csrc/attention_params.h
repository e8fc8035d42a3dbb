/* The parameters of one attention call (DESIGN.md, "Attention semantics"): plain old data
 * with explicit 64-bit element strides, filled and validated by csrc/attention.c and read by
 * the CPU kernels and, later, the CUDA kernels. Plain C. */
#ifndef LUTFLASH_ATTENTION_PARAMS_H
#define LUTFLASH_ATTENTION_PARAMS_H

#include <stdint.h>

#include "scalar_type.h"

#define ATTENTION_MAX_HEAD_DIM 256

typedef struct {
    /* q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D); varlen: q (total_q, Hq, D), k and v
     * (total_k, Hkv, D) with batch strides 0 and cu_seqlens giving each sequence's first row. */
    const void *q;
    const void *k;
    const void *v;
    void *out; /* like q */
    float *lse; /* (B, Hq, Sq) or (Hq, total_q); element (b, h, i) at
                   b * lse_batch_stride + h * lse_head_stride + first_row(b) + i */
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t out_batch_stride, out_row_stride, out_head_stride;
    int64_t lse_batch_stride, lse_head_stride;

    const int32_t *cu_seqlens_q; /* (B + 1,) or NULL for dense inputs */
    const int32_t *cu_seqlens_k;
    int64_t total_q, total_k; /* varlen: rows of the packed q and k; the CUDA kernels clamp
                                 offsets (unchecked on the GPU) to them */
    int64_t batch;
    int64_t seqlen_q; /* dense: Sq; varlen: max_seqlen_q */
    int64_t seqlen_k;
    int64_t heads_q;
    int64_t heads_kv;
    int64_t head_dim;
    lf_scalar dtype; /* of q, k, v, out (and dout, dq, dk, dv) */

    float softmax_scale;
    float softcap;          /* 0: off */
    int64_t window_left;    /* -1: unbounded; causal is window_right = 0 */
    int64_t window_right;
    const float *alibi_slopes; /* (Hq,) or (B, Hq) float32, or NULL */
    int64_t alibi_batch_stride; /* 0 for (Hq,) */

    float dropout_p;
    uint32_t dropout_threshold; /* keep iff the Philox word >= this (philox.h) */
    uint64_t dropout_seed;
    uint64_t dropout_offset;

    void *workspace; /* per-thread scratch tiles */
    int64_t workspace_bytes;
    int num_threads; /* CPU: OpenMP threads */
    int variant;     /* 0: automatic; else a forced inner loop (CPU) or tile shape (CUDA) */
} attention_fwd_params;

typedef struct {
    attention_fwd_params fwd; /* out and lse are read, not written */
    const void *dout;         /* like out */
    const float *dlse;        /* like lse, or NULL when lse has no gradient */
    void *dq;                 /* like q */
    void *dk;                 /* like k */
    void *dv;                 /* like v */
    float *delta;             /* like lse: rowsum(dout * out) - dlse, written by the backward */
    int64_t dout_batch_stride, dout_row_stride, dout_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
    /* 0: CUDA takes the fast single-pass backward where it can (dQ summed with float32
     * atomics in fwd.workspace, so not bitwise repeatable); 1: the deterministic passes. The
     * CPU backward is always deterministic and ignores it. */
    int deterministic;
} attention_bwd_params;

#endif
