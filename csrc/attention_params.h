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

    /* (Hq,) float32 attention sinks (csrc/attention_sinks.h), or NULL */
    const float *sinks;

    float dropout_p;
    uint32_t dropout_threshold; /* keep iff the Philox word >= this (philox.h) */
    uint64_t dropout_seed;
    uint64_t dropout_offset;

    /* KV caches (flash_attention_with_kvcache; dense inputs only, NULL / 0 otherwise).
     * cache_seqlens (B,): sequence b attends to its first min(cache_seqlens[b] + seqlen_new,
     * seqlen_k) keys (the GPU clamps the count into [0, seqlen_k]; the host checks CPU
     * values); the queries are the last Sq of them (bottom-right alignment on that count). */
    const int32_t *cache_seqlens;
    int64_t seqlen_new;
    /* (B,): the k/v batch row that sequence b reads (cache_batch_idx), or NULL for row b;
     * kv_batch is the number of k/v rows (the GPU clamps indices into [0, kv_batch - 1]). */
    const int32_t *kv_batch_idx;
    int64_t kv_batch;
    /* Paged k/v: k (num_pages, page_size, Hkv, D); key j of sequence b is row j % page_size
     * of page block_table[b * block_table_stride + j / page_size], so k_batch_stride steps
     * pages and seqlen_k = pages per sequence * page_size. NULL: not paged. The GPU clamps
     * page numbers into [0, num_pages - 1]; the host checks CPU values. */
    const int32_t *block_table;
    int64_t block_table_stride;
    int64_t page_size;
    int64_t num_pages;

    void *workspace; /* per-thread scratch tiles */
    int64_t workspace_bytes;
    int num_threads; /* CPU: OpenMP threads */
    int variant;     /* 0: automatic; else a forced inner loop (CPU) or tile shape (CUDA) */
} attention_fwd_params;

/* The first half of a KV-cache call: k_new/v_new (B, Sn, Hkv, D) written into the cache
 * (addressed like the k/v of attention_fwd_params, with its cache fields) at rows
 * cache_seqlens[b] + i, rotated first when cos is given; and q (B, Sq, Hq, D) rotated into
 * q_out (dense, like q) when q_out is given. Rows that would land outside the cache are not
 * written (the host checks CPU values). Rotary (flash-attn's convention): cos and sin
 * (seqlen_ro, rotary_dim / 2), dense, of the data's dtype; the first rotary_dim features of a
 * row rotate, pairs (2t, 2t + 1) when interleaved, else (t, t + rotary_dim / 2); key i of
 * sequence b is at position cache_seqlens[b] + i, query i at cache_seqlens[b] + i when
 * q_positions_follow (causal or windowed attention), else at cache_seqlens[b]. Positions
 * past seqlen_ro are clamped on the GPU (the host checks CPU values). The rest of a row is
 * copied. Math in float32, one rounding to the dtype per element. */
typedef struct {
    const attention_fwd_params *cache; /* k, v, strides, cache_seqlens, kv_batch_idx, paging */
    const void *k_new, *v_new;          /* NULL: nothing to append */
    int64_t kn_batch_stride, kn_row_stride, kn_head_stride;
    int64_t vn_batch_stride, vn_row_stride, vn_head_stride;
    const void *q;                      /* read when q_out is given */
    void *q_out;                        /* dense (B, Sq, Hq, D), or NULL */
    const void *cos, *sin;              /* NULL: no rotary */
    int64_t seqlen_ro, rotary_dim;
    int interleaved, q_positions_follow;
} kvcache_append_params;

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
