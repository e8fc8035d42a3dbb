/* What the attention backward kernels share: the recomputed score and its gradient
 * (bwd_score), the dropout multiplier, delta = rowsum(dO * O) - dlse (attn_bwd_delta_kernel,
 * run before either backward), and the prologue of the two key-block kernels
 * (KeyBlockQueries). The backwards recompute P from the forward's lse; their launchers are in
 * attention_bwd_launch.cuh. */
#pragma once

#include "attention_mask.cuh"
#include "attention_tile.cuh"
#include "philox.h"

namespace attn {

__device__ __forceinline__ bool scores_transformed(const attention_fwd_params &p) {
    return p.softcap > 0.0f || p.alibi_slopes != nullptr;
}

/* lse in log2 units as the exponent shift; +inf for rows that see nothing, so P = 0. */
__device__ __forceinline__ float lse_shift(float lse) {
    return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

/* One score of the backward, recomputed from the raw score x = q_i . k_j and dp = dO_i . v_j:
 * P = exp2(x' * scale_log2 - shift), x' the forward's transformed score (rel: its ALiBi
 * distance), 0 where `hidden` (outside the band). With dropout, factor() is the multiplier of
 * (i, j) (0 or 1 / (1 - p)) and is only evaluated then. Returns dS = P (dp * factor - delta)
 * dx'/dx and sets *p_dropped = P * factor, the operand of dV += P^T dO. */
template <typename Factor>
__device__ __forceinline__ float bwd_score(const attention_fwd_params &p, bool transformed,
                                           float slope, int rel, float x, float dp,
                                           float scale_log2, float shift, bool hidden,
                                           bool dropout, Factor factor, float delta,
                                           float *p_dropped) {
    float chain = p.softmax_scale;
    if (transformed) x = transform_score(x, p.softmax_scale, p.softcap, slope, rel, &chain);
    float prob = exp2f(fmaf(x, scale_log2, -shift));
    if (hidden) prob = 0.0f;
    float prob_dropped = prob;
    if (dropout) {
        const float f = factor();
        dp *= f;
        prob_dropped *= f;
    }
    *p_dropped = prob_dropped;
    return prob * (dp - delta) * chain;
}

/* The dropout multiplier of query i and key j (the forward's Philox mask): 0 where the
 * probability was dropped, else 1 / (1 - p). */
__device__ __forceinline__ float dropout_factor(const attention_fwd_params &p, uint32_t batch_head,
                                                int i, int j, float dropout_scale) {
    const uint32_t keep = lf_dropout_keep_bits(p.dropout_seed, p.dropout_offset, batch_head,
                                               (uint32_t)i, (uint32_t)(j >> 2),
                                               p.dropout_threshold) >>
                          (j & 3);
    return (keep & 1u) ? dropout_scale : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(128) attn_bwd_delta_kernel(const attention_bwd_params bp) {
    const attention_fwd_params &p = bp.fwd;
    const int b = blockIdx.y, h = blockIdx.z, lane = threadIdx.x % 32;
    const Sequence seq(p, b);
    const int i = blockIdx.x * 4 + threadIdx.x / 32;
    if (i >= seq.sq) return;
    const int64_t row = (int64_t)seq.q_start + i;
    const T *o = static_cast<const T *>(p.out) + b * p.out_batch_stride + row * p.out_row_stride +
                 h * p.out_head_stride;
    const T *dout = static_cast<const T *>(bp.dout) + b * bp.dout_batch_stride +
                    row * bp.dout_row_stride + h * bp.dout_head_stride;
    float sum = 0.0f;
    for (int c = lane * 8; c < p.head_dim; c += 32 * 8) {
        const uint4 ov = *reinterpret_cast<const uint4 *>(o + c);
        const uint4 dv = *reinterpret_cast<const uint4 *>(dout + c);
        const T *oe = reinterpret_cast<const T *>(&ov), *de = reinterpret_cast<const T *>(&dv);
#pragma unroll
        for (int e = 0; e < 8; ++e) sum += (float)oe[e] * (float)de[e];
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
        const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + row;
        bp.delta[index] = sum - (bp.dlse ? bp.dlse[index] : 0.0f);
    }
}

/* The prologue shared by the two key-block backward kernels (dkdv and fused): K and V of the
 * keys [j0, j0 + keys) of one kv head go to their tiles, and the query blocks of kBL rows that
 * see one of those keys, for every query head of the GQA group, form `total` stages; stage
 * `it` is query head head(it), rows from row0(it), staged (Q, dO, lse, delta) into one of two
 * buffers by load(). */
template <int kBL, int kD, int kThreads, typename T> struct KeyBlockQueries {
    const attention_fwd_params &p;
    const attention_bwd_params &bp;
    const Sequence &seq;
    const int b, kv_head, group, d;
    int m_lo, blocks, total;

    __device__ KeyBlockQueries(const attention_bwd_params &bp_, const Sequence &seq_, int b_,
                               int kv_head_)
        : p(bp_.fwd), bp(bp_), seq(seq_), b(b_), kv_head(kv_head_),
          group((int)(bp_.fwd.heads_q / bp_.fwd.heads_kv)), d((int)bp_.fwd.head_dim) {}

    template <int kBN> __device__ void load_keys(uint32_t k_tile, uint32_t v_tile, int j0,
                                                 int keys) {
        const int64_t k_row = (int64_t)seq.k_start + j0;
        load_tile<kBN, kD, kThreads>(k_tile,
                                     static_cast<const T *>(p.k) + b * p.k_batch_stride +
                                         k_row * p.k_row_stride + kv_head * p.k_head_stride,
                                     p.k_row_stride, keys, d);
        load_tile<kBN, kD, kThreads>(v_tile,
                                     static_cast<const T *>(p.v) + b * p.v_batch_stride +
                                         k_row * p.v_row_stride + kv_head * p.v_head_stride,
                                     p.v_row_stride, keys, d);
        const int qf = seq.q_first(j0), ql = seq.q_last(j0 + keys - 1);
        m_lo = qf / kBL;
        blocks = ql >= qf ? ql / kBL - m_lo + 1 : 0;
        total = blocks * group;
    }

    __device__ int head(int it) const { return kv_head * group + it / blocks; }
    __device__ int row0(int it) const { return (m_lo + it % blocks) * kBL; }

    __device__ void load(int it, uint32_t q_tile, uint32_t do_tile, float *s_lse,
                         float *s_delta) const {
        const int h = head(it), i0 = row0(it);
        const int rows = min(kBL, seq.sq - i0);
        const int64_t row = (int64_t)seq.q_start + i0;
        load_tile<kBL, kD, kThreads>(q_tile,
                                     static_cast<const T *>(p.q) + b * p.q_batch_stride +
                                         row * p.q_row_stride + h * p.q_head_stride,
                                     p.q_row_stride, rows, d);
        load_tile<kBL, kD, kThreads>(do_tile,
                                     static_cast<const T *>(bp.dout) + b * bp.dout_batch_stride +
                                         row * bp.dout_row_stride + h * bp.dout_head_stride,
                                     bp.dout_row_stride, rows, d);
        const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + row;
        for (int r = threadIdx.x; r < 2 * kBL; r += kThreads) {
            const int rr = r % kBL;
            const float *src = r < kBL ? p.lse + index : bp.delta + index;
            float *dst = r < kBL ? s_lse : s_delta;
            cp_async4(smem_addr(dst + rr), rr < rows ? src + rr : src, rr < rows);
        }
    }
};

/* dK, dV of a key block. kBN keys (16 per warp), query blocks of kBL rows, double-buffered;
 * kSplit > 1 gives each CTA a kD/kSplit-wide column range of dK and dV (S and dP are
 * recomputed per range) to bound the accumulators at kD = 256. */

}  // namespace attn
