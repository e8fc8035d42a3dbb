/* What the attention backward kernels share: the recomputed score and its gradient
 * (bwd_score), the dropout multiplier, delta = rowsum(dO * O) - dlse (attn_bwd_delta_kernel,
 * run before either backward), the loads, score products and staging of their tiles, and what
 * the two key-block kernels share (KeyBlock). The backwards recompute P from the forward's
 * lse; their launchers are in attention_bwd_launch.cuh. */
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

/* Rows [row, row + rows) of one head of a (batch, row, head, dim) tensor (strides in
 * elements) into a shared tile of kRows rows (load_tile zero-fills the rest). */
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_head_rows(uint32_t tile, const void *base,
                                               int64_t batch_stride, int64_t row_stride,
                                               int64_t head_stride, int b, int64_t row, int head,
                                               int rows, int d) {
    load_tile<kRows, kD, kThreads>(tile,
                                   static_cast<const T *>(base) + b * batch_stride +
                                       row * row_stride + head * head_stride,
                                   row_stride, rows, d);
}

/* Q and dO of the query rows [row, row + rows) of head h: the operands of a query block. */
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_query_rows(const attention_bwd_params &bp, uint32_t q_tile,
                                                uint32_t do_tile, int b, int64_t row, int h,
                                                int rows, int d) {
    const attention_fwd_params &p = bp.fwd;
    load_head_rows<kRows, kD, kThreads, T>(q_tile, p.q, p.q_batch_stride, p.q_row_stride,
                                           p.q_head_stride, b, row, h, rows, d);
    load_head_rows<kRows, kD, kThreads, T>(do_tile, bp.dout, bp.dout_batch_stride,
                                           bp.dout_row_stride, bp.dout_head_stride, b, row, h,
                                           rows, d);
}

/* The two score products of a tile, this warp's 16 rows of A from a_row0 against all
 * 8 * kNT rows of B: s = A B^T and dp = dA dB^T, with (A, dA, B, dB) = (K, V, Q, dO) for S^T
 * and dP^T of a key block, or (Q, dO, K, V) for S and dP of a query block. */
template <int kD, int kNT, typename T>
__device__ __forceinline__ void score_products(float (&s)[1][kNT][4], float (&dp)[1][kNT][4],
                                               uint32_t a_tile, uint32_t da_tile, int a_row0,
                                               uint32_t b_tile, uint32_t db_tile, int lane) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[0][nt][e] = dp[0][nt][e] = 0.0f;
    gemm_abt<kD, 1, kNT, T>(s, a_tile, a_row0, b_tile, 0, lane);
    gemm_abt<kD, 1, kNT, T>(dp, da_tile, a_row0, db_tile, 0, lane);
}

/* This warp's 16 accumulator rows from row0 (kNT column tiles of 8, mma layout) rounded to T
 * into a shared tile of kPitch elements per row, to be stored by store_tile. */
template <int kPitch, int kNT, typename T>
__device__ __forceinline__ void stage_rows(T *tile, const float (&acc)[kNT][4], int row0,
                                           int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = row0 + g + hr * 8;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
            *reinterpret_cast<uint32_t *>(tile + r * kPitch + nt * 8 + 2 * t) =
                Pair<T>::pack(acc[nt][2 * hr], acc[nt][2 * hr + 1]);
    }
}

/* One stage of a KeyBlock: query head h, rows from i0, its Q and dO tiles and its lse and
 * delta in shared memory. */
struct KeyBlockStage {
    int h, i0;
    uint32_t q_tile, do_tile;
    const float *lse, *delta;
};


/* What the two key-block backward kernels (dkdv and fused) share: the keys [j0, j0 + keys)
 * of one kv head, whose K and V start() loads into their tiles, and the query blocks of kBL
 * rows that see one of those keys, for every query head of the GQA group: `total` stages,
 * stage `it` being query head head(it), rows from row0(it), its Q, dO, lse and delta staged
 * in buffer it & 1 (double-buffered cp.async: next(it) prefetches stage it + 1 and waits for
 * stage it). Each warp owns 16 keys from key_row0(); scores() recomputes dS and P of its rows
 * of a stage and store_key_grads() writes dK, dV at the end. */
template <int kBN, int kBL, int kD, int kThreads, typename T> struct KeyBlock {
    static constexpr int kPitch = Tile<kD>::kPitch, kTileQ = kBL * kPitch * 2;
    const attention_fwd_params &p;
    const attention_bwd_params &bp;
    const Sequence &seq;
    const int b, kv_head, j0, keys, group, d;
    const uint32_t q_tiles, do_tiles; /* [2] tiles of kBL rows */
    float *const s_lse, *const s_delta; /* [2][kBL] */
    int m_lo, blocks, total;

    __device__ __forceinline__ KeyBlock(const attention_bwd_params &bp_, const Sequence &seq_,
                                        int b_, int kv_head_, int j0_, int keys_,
                                        uint32_t q_tiles_, uint32_t do_tiles_, float *s_lse_,
                                        float *s_delta_)
        : p(bp_.fwd), bp(bp_), seq(seq_), b(b_), kv_head(kv_head_), j0(j0_), keys(keys_),
          group((int)(bp_.fwd.heads_q / bp_.fwd.heads_kv)), d((int)bp_.fwd.head_dim),
          q_tiles(q_tiles_), do_tiles(do_tiles_), s_lse(s_lse_), s_delta(s_delta_) {}

    /* K and V to their tiles, then stage 0 (one cp.async group). */
    __device__ __forceinline__ void start(uint32_t k_tile, uint32_t v_tile) {
        const int64_t k_row = (int64_t)seq.k_start + j0;
        load_head_rows<kBN, kD, kThreads, T>(k_tile, p.k, p.k_batch_stride, p.k_row_stride,
                                             p.k_head_stride, b, k_row, kv_head, keys, d);
        load_head_rows<kBN, kD, kThreads, T>(v_tile, p.v, p.v_batch_stride, p.v_row_stride,
                                             p.v_head_stride, b, k_row, kv_head, keys, d);
        const int qf = seq.q_first(j0), ql = seq.q_last(j0 + keys - 1);
        m_lo = qf / kBL;
        blocks = ql >= qf ? ql / kBL - m_lo + 1 : 0;
        total = blocks * group;
        if (total > 0) load(0, 0);
        cp_async_commit();
    }

    __device__ __forceinline__ int head(int it) const { return kv_head * group + it / blocks; }
    __device__ __forceinline__ int row0(int it) const { return (m_lo + it % blocks) * kBL; }
    __device__ __forceinline__ static int key_row0() { return (int)(threadIdx.x / 32) * 16; }

    /* Stage it: Q, dO, lse and delta of its query block to buffer `stage` (it & 1). */
    __device__ __forceinline__ void load(int it, int stage) const {
        const uint32_t q_tile = q_tiles + stage * kTileQ, do_tile = do_tiles + stage * kTileQ;
        float *lse = s_lse + stage * kBL, *delta = s_delta + stage * kBL;
        const int h = head(it), i0 = row0(it);
        const int rows = min(kBL, seq.sq - i0);
        const int64_t row = (int64_t)seq.q_start + i0;
        load_query_rows<kBL, kD, kThreads, T>(bp, q_tile, do_tile, b, row, h, rows, d);
        const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + row;
        for (int r = threadIdx.x; r < 2 * kBL; r += kThreads) {
            const int rr = r % kBL;
            const float *src = r < kBL ? p.lse + index : bp.delta + index;
            float *dst = r < kBL ? lse : delta;
            cp_async4(smem_addr(dst + rr), rr < rows ? src + rr : src, rr < rows);
        }
    }

    /* Stage it, after starting the load of stage it + 1 into the other buffer and waiting for
     * stage it (a barrier: every warp is also past the previous stage). */
    __device__ __forceinline__ KeyBlockStage next(int it) const {
        const int stage = it & 1;
        if (it + 1 < total) load(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        return {head(it), row0(it), q_tiles + stage * kTileQ, do_tiles + stage * kTileQ,
                s_lse + stage * kBL, s_delta + stage * kBL};
    }

    /* dS and the dropped P (bwd_score) of this thread's elements of a stage, from S^T (st) and
     * dP^T (dpt) of the warp's keys: those of key row g + 8 hr and query columns
     * c = 8 lt + 2t + e (e = 0, 1) go to out(hr, lt, ds[2], p_dropped[2]). alibi = false
     * (the fused kernel's plain instance) leaves the slope 0 without loading it. */
    template <int kLT, typename Out>
    __device__ __forceinline__ void scores(const KeyBlockStage &stage, bool transformed,
                                           bool dropout, float scale_log2, float dropout_scale,
                                           bool alibi, const float (&st)[1][kLT][4],
                                           const float (&dpt)[1][kLT][4], Out out) const {
        const int h = stage.h, i0 = stage.i0;
        const float *lse = stage.lse, *delta = stage.delta;
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const bool masked = !seq.full(i0, kBL, j0, kBN);
        const float slope =
            alibi && p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
        const uint32_t batch_head = (uint32_t)(b * p.heads_q + h);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int j = j0 + key_row0() + g + hr * 8;
            /* queries that see key j, relative to i0 */
            const int lo = (j < seq.sk ? seq.q_first(j) : 1) - i0;
            const int hi = (j < seq.sk ? seq.q_last(j) : 0) - i0;
#pragma unroll
            for (int lt = 0; lt < kLT; ++lt) {
                float ds[2], p_dropped[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = lt * 8 + 2 * t + e;
                    const int i = i0 + c;
                    ds[e] = bwd_score(
                        p, transformed, slope, i + seq.sk - seq.sq - j, st[0][lt][2 * hr + e],
                        dpt[0][lt][2 * hr + e], scale_log2, lse_shift(lse[c]),
                        masked && (c < lo || c > hi), dropout,
                        [&] { return dropout_factor(p, batch_head, i, j, dropout_scale); },
                        delta[c], &p_dropped[e]);
                }
                out(hr, lt, ds, p_dropped);
            }
        }
    }

    /* The epilogue: dK and dV (the warp's 16 keys, kNT column tiles) staged through the K and
     * V tiles (sK, sV) and stored to columns [d_off, d_off + width) of the block's rows. */
    template <int kNT>
    __device__ __forceinline__ void store_key_grads(T *sK, T *sV, const float (&dk)[kNT][4],
                                                    const float (&dv)[kNT][4], int d_off,
                                                    int width) const {
        cp_async_wait<0>();
        __syncthreads();
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int r = key_row0() + g + hr * 8;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                *reinterpret_cast<uint32_t *>(sK + r * kPitch + nt * 8 + 2 * t) =
                    Pair<T>::pack(dk[nt][2 * hr], dk[nt][2 * hr + 1]);
                *reinterpret_cast<uint32_t *>(sV + r * kPitch + nt * 8 + 2 * t) =
                    Pair<T>::pack(dv[nt][2 * hr], dv[nt][2 * hr + 1]);
            }
        }
        __syncthreads();
        const int64_t row = (int64_t)seq.k_start + j0;
        T *dk_out = static_cast<T *>(bp.dk) + b * bp.dk_batch_stride + row * bp.dk_row_stride +
                    kv_head * bp.dk_head_stride + d_off;
        T *dv_out = static_cast<T *>(bp.dv) + b * bp.dv_batch_stride + row * bp.dv_row_stride +
                    kv_head * bp.dv_head_stride + d_off;
        store_tile<kBN, kNT * 8, kPitch, kThreads>(dk_out, bp.dk_row_stride, sK, keys, width);
        store_tile<kBN, kNT * 8, kPitch, kThreads>(dv_out, bp.dv_row_stride, sV, keys, width);
    }
};

}  // namespace attn
