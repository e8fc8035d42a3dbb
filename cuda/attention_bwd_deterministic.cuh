/* The deterministic attention backward (deterministic = 1, and head dim 256): no atomics, a
 * fixed summation order, after attn_bwd_delta_kernel.
 *  - attn_bwd_dkdv_kernel: one CTA per (key block, batch, kv head [, head-dim half]); warps
 *    split the keys, so S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q all stay in
 *    registers. It loops over the query heads of its GQA group and their query blocks
 *    (double-buffered cp.async).
 *  - attn_bwd_dq_kernel: one CTA per (query block, batch, head); warps split the queries and
 *    dQ += dS K over the visible key blocks (double-buffered).
 * The two kernels recompute S and dP each (7 GEMMs instead of FA2's 5) in exchange for a fixed
 * summation order and no fp32 dQ workspace. */
#pragma once

#include "attention_bwd_common.cuh"

namespace attn {

/* dK, dV of a key block. kBN keys (16 per warp), query blocks of kBL rows, double-buffered;
 * kSplit > 1 gives each CTA a kD/kSplit-wide column range of dK and dV (S and dP are
 * recomputed per range) to bound the accumulators at kD = 256. */
template <int kD, int kBN, int kBL, int kSplit> struct BwdKVConfig {
    static constexpr int kWarps = kBN / 16, kThreads = kWarps * 32;
    static constexpr int kPitch = Tile<kD>::kPitch;
    static constexpr int kTileK = kBN * kPitch * 2, kTileQ = kBL * kPitch * 2;
    static constexpr int kSmemBytes = 2 * kTileK + 4 * kTileQ + 4 * kBL * 4;
};

template <int kD, int kBN, int kBL, int kSplit, typename T>
__global__ void __launch_bounds__(kBN * 2, 1) attn_bwd_dkdv_kernel(const attention_bwd_params bp) {
    using Cfg = BwdKVConfig<kD, kBN, kBL, kSplit>;
    constexpr int kThreads = Cfg::kThreads, kPitch = Cfg::kPitch;
    constexpr int kLT = kBL / 8, kDO = kD / kSplit, kOT = kDO / 8;
    const attention_fwd_params &p = bp.fwd;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t k_tile = smem_addr(smem), v_tile = k_tile + Cfg::kTileK;
    const uint32_t q_tiles = v_tile + Cfg::kTileK;             /* [2] */
    const uint32_t do_tiles = q_tiles + 2 * Cfg::kTileQ;       /* [2] */
    float *s_lse = reinterpret_cast<float *>(smem + 2 * Cfg::kTileK + 4 * Cfg::kTileQ); /* [2][kBL] */
    float *s_delta = s_lse + 2 * kBL;                                                  /* [2][kBL] */

    const int split = blockIdx.x % kSplit, b = blockIdx.y, kv_head = blockIdx.z;
    const Sequence seq(p, b);
    const int j0 = (blockIdx.x / kSplit) * kBN;
    if (j0 >= seq.sk) return;
    const int keys = min(kBN, seq.sk - j0);
    const int d = (int)p.head_dim, d_off = split * kDO;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    /* K, V of this key block; the query blocks that see one of its keys, for each query head
     * of the group, are the stages of the loop below. */
    KeyBlock<kBN, kBL, kD, kThreads, T> block(bp, seq, b, kv_head, j0, keys, q_tiles, do_tiles,
                                              s_lse, s_delta);
    block.start(k_tile, v_tile);
    const int total = block.total;
    const bool transformed = scores_transformed(p), dropout = p.dropout_p > 0.0f;
    const float scale_log2 = transformed ? 1.0f : p.softmax_scale * kLog2e;
    const float dropout_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    const int key_row0 = warp * 16;

    float dk[1][kOT][4], dv[1][kOT][4];
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[0][ot][e] = dv[0][ot][e] = 0.0f;

    for (int it = 0; it < total; ++it) {
        const KeyBlockStage stage = block.next(it);

        /* S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kBL queries; then P (dropped)
         * replaces S^T and dS replaces dP^T. */
        float st[1][kLT][4], dpt[1][kLT][4];
        score_products<kD, kLT, T>(st, dpt, k_tile, v_tile, key_row0, stage.q_tile,
                                   stage.do_tile, lane);
        block.scores(stage, transformed, dropout, scale_log2, dropout_scale, true, st, dpt,
                     [&](int hr, int lt, const float (&ds)[2], const float (&p_dropped)[2]) {
#pragma unroll
                         for (int e = 0; e < 2; ++e) {
                             dpt[0][lt][2 * hr + e] = ds[e];
                             st[0][lt][2 * hr + e] = p_dropped[e];
                         }
                     });

        /* dV += P^T dO, dK += dS^T Q over this CTA's column range. */
        gemm_pb<kD, 1, kLT, kOT, T>(dv, st, stage.do_tile, d_off, lane);
        gemm_pb<kD, 1, kLT, kOT, T>(dk, dpt, stage.q_tile, d_off, lane);
        __syncthreads(); /* the next iteration's load overwrites this stage */
    }

    /* Epilogue: dK, dV through the K, V tiles (each warp owns its 16 rows). */
    T *sK = reinterpret_cast<T *>(smem), *sV = sK + kBN * kPitch;
    block.store_key_grads(sK, sV, dk[0], dv[0], d_off, min(kDO, d - d_off));
}

/* dQ of a query block: kBM queries (16 per warp), key blocks of kBN, double-buffered. */
template <int kD, int kBM, int kBN> struct BwdQConfig {
    static constexpr int kWarps = kBM / 16, kThreads = kWarps * 32;
    static constexpr int kPitch = Tile<kD>::kPitch;
    static constexpr int kTileQ = kBM * kPitch * 2, kTileK = kBN * kPitch * 2;
    static constexpr int kSmemBytes = 2 * kTileQ + 4 * kTileK;
};

template <int kD, int kBM, int kBN, typename T>
__global__ void __launch_bounds__(kBM * 2, 1) attn_bwd_dq_kernel(const attention_bwd_params bp) {
    using Cfg = BwdQConfig<kD, kBM, kBN>;
    constexpr int kThreads = Cfg::kThreads, kPitch = Cfg::kPitch;
    constexpr int kNT = kBN / 8, kDT = kD / 8;
    const attention_fwd_params &p = bp.fwd;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t q_tile = smem_addr(smem), do_tile = q_tile + Cfg::kTileQ;
    const uint32_t k_tiles = do_tile + Cfg::kTileQ, v_tiles = k_tiles + 2 * Cfg::kTileK;

    const int b = blockIdx.y, h = blockIdx.z;
    const Sequence seq(p, b);
    const int i0 = blockIdx.x * kBM;
    if (i0 >= seq.sq) return;
    const int rows = min(kBM, seq.sq - i0);
    const int d = (int)p.head_dim;
    const int kv_head = h / (int)(p.heads_q / p.heads_kv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row0 = warp * 16;
    const int64_t row = (int64_t)seq.q_start + i0;

    load_query_rows<kBM, kD, kThreads, T>(bp, q_tile, do_tile, b, row, h, rows, d);
    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride +
                 seq.k_start * p.k_row_stride + kv_head * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride +
                 seq.k_start * p.v_row_stride + kv_head * p.v_head_stride;
    const int j_lo = seq.first(i0), j_hi = seq.last(i0 + rows - 1);
    const int n_lo = j_lo / kBN, total = j_hi >= j_lo ? j_hi / kBN - n_lo + 1 : 0;
    auto load_stage = [&](int it, int stage) {
        const int j0 = (n_lo + it) * kBN;
        const int keys = min(kBN, seq.sk - j0);
        load_tile<kBN, kD, kThreads>(k_tiles + stage * Cfg::kTileK, k + j0 * p.k_row_stride,
                                     p.k_row_stride, keys, d);
        load_tile<kBN, kD, kThreads>(v_tiles + stage * Cfg::kTileK, v + j0 * p.v_row_stride,
                                     p.v_row_stride, keys, d);
    };
    if (total > 0) load_stage(0, 0);
    cp_async_commit();

    const bool transformed = scores_transformed(p), dropout = p.dropout_p > 0.0f;
    const float scale_log2 = transformed ? 1.0f : p.softmax_scale * kLog2e;
    const float dropout_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
    const uint32_t batch_head = (uint32_t)(b * p.heads_q + h);
    float shift[2], delta[2];
    int lo[2], hi[2]; /* visible keys of this thread's rows */
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = row0 + g + hr * 8;
        const int64_t index = b * p.lse_batch_stride + h * p.lse_head_stride + row + r;
        shift[hr] = r < rows ? lse_shift(p.lse[index]) : INFINITY;
        delta[hr] = r < rows ? bp.delta[index] : 0.0f;
        lo[hr] = r < rows ? seq.first(i0 + r) : 1;
        hi[hr] = r < rows ? seq.last(i0 + r) : 0;
    }

    float dq[1][kDT][4];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dq[0][dt][e] = 0.0f;

    for (int it = 0; it < total; ++it) {
        const int stage = it & 1;
        if (it + 1 < total) load_stage(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int j0 = (n_lo + it) * kBN;
        const uint32_t k_tile = k_tiles + stage * Cfg::kTileK;
        const uint32_t v_tile = v_tiles + stage * Cfg::kTileK;

        float s[1][kNT][4], dp[1][kNT][4];
        score_products<kD, kNT, T>(s, dp, q_tile, do_tile, row0, k_tile, v_tile, lane);

        const bool masked = !seq.full(i0, kBM, j0, kBN);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int i = i0 + row0 + g + hr * 8;
            const int lo_rel = lo[hr] - j0 - 2 * t, hi_rel = hi[hr] - j0 - 2 * t;
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt) {
                uint32_t keep = 3u;
                if (dropout) {
                    const int j = j0 + nt * 8 + 2 * t;
                    keep = lf_dropout_keep_bits(p.dropout_seed, p.dropout_offset, batch_head,
                                                (uint32_t)i, (uint32_t)(j >> 2),
                                                p.dropout_threshold) >>
                           (j & 3);
                }
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j0 + nt * 8 + 2 * t + e;
                    float unused;
                    s[0][nt][2 * hr + e] = bwd_score(
                        p, transformed, slope, i + seq.sk - seq.sq - j, s[0][nt][2 * hr + e],
                        dp[0][nt][2 * hr + e], scale_log2, shift[hr],
                        masked && (nt * 8 + e < lo_rel || nt * 8 + e > hi_rel), dropout,
                        [&] { return (keep >> e) & 1u ? dropout_scale : 0.0f; }, delta[hr],
                        &unused);
                }
            }
        }
        gemm_pb<kD, 1, kNT, kDT, T>(dq, s, k_tile, 0, lane);
        __syncthreads(); /* the next iteration's load overwrites this stage */
    }

    cp_async_wait<0>();
    __syncthreads();
    T *sQ = reinterpret_cast<T *>(smem);
    stage_rows<kPitch>(sQ, dq[0], row0, lane);
    __syncthreads();
    T *dq_out = static_cast<T *>(bp.dq) + b * bp.dq_batch_stride + row * bp.dq_row_stride +
                h * bp.dq_head_stride;
    store_tile<kBM, kD, kPitch, kThreads>(dq_out, bp.dq_row_stride, sQ, rows, d);
}

}  // namespace attn
