/* The fast attention backward (deterministic = 0, head dims up to 128): FA2's single pass per
 * key block (S, dP once; dK, dV in registers; dQ partials added to a float32 workspace with
 * atomics, then converted by attn_bwd_dq_convert_kernel), after attn_bwd_delta_kernel. */
#pragma once

#include "attention_bwd_common.cuh"

namespace attn {

/* One CTA per (key block of kBN keys, batch, kv head), kBN / 16 warps of 16 keys each, looping
 * over the query blocks (kBM rows, Q and dO double-buffered by cp.async) of every query head
 * of the GQA group that sees the block. Per query block:
 *   S^T = K Q^T, dP^T = V dO^T  (each warp: its 16 keys x kBM queries, in registers)
 *   P, dS as in attn_bwd_dkdv_kernel; dS^T also goes to shared memory (T-rounded)
 *   dV += P^T dO, dK += dS^T Q  (registers, A operands straight from the accumulators)
 *   dQ_partial = dS K           (warps split the kBM x kD product: 16-row slabs x column parts;
 *                                A = dS through ldmatrix.trans of dS^T, B = K through .trans)
 * and the dQ partial is added to the float32 accumulator with (vector) float atomics, so the
 * summation order over key blocks varies from run to run. 5 GEMMs per tile instead of 7. */
template <int kD, int kBN, int kBM> struct BwdFusedConfig {
    static constexpr int kWarps = kBN / 16, kThreads = kWarps * 32;
    static constexpr int kPitch = Tile<kD>::kPitch, kDsPitch = kBM + 8;
    static constexpr int kTileK = kBN * kPitch * 2, kTileQ = kBM * kPitch * 2;
    static constexpr int kTileDs = kBN * kDsPitch * 2;
    static constexpr int kSmemBytes = 2 * kTileK + 4 * kTileQ + kTileDs + 4 * kBM * 4;
    /* the dQ product: kRowSlabs 16-row slabs x kColParts column ranges of kDQ columns */
    static constexpr int kRowSlabs = kBM / 16, kColParts = kWarps / kRowSlabs;
    static constexpr int kDQ = kD / kColParts;
    static_assert(kWarps % kRowSlabs == 0 && kDQ % 16 == 0 && kBM % 16 == 0, "tile shape");
    /* kD <= 64 with 32-query blocks fits two CTAs per SM (128 registers, ~64 KB each) */
    static constexpr int kMinBlocks = kD <= 64 && kBM <= 32 ? 2 : 1;
};

template <int kD, int kBN, int kBM, typename T, bool kExtras>
__global__ void __launch_bounds__(kBN * 2, BwdFusedConfig<kD, kBN, kBM>::kMinBlocks)
    attn_bwd_fused_kernel(const attention_bwd_params bp) {
    using Cfg = BwdFusedConfig<kD, kBN, kBM>;
    constexpr int kThreads = Cfg::kThreads, kPitch = Cfg::kPitch, kDsPitch = Cfg::kDsPitch;
    constexpr int kLT = kBM / 8, kOT = kD / 8, kQT = Cfg::kDQ / 8;
    const attention_fwd_params &p = bp.fwd;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t k_tile = smem_addr(smem), v_tile = k_tile + Cfg::kTileK;
    const uint32_t q_tiles = v_tile + Cfg::kTileK;             /* [2] */
    const uint32_t do_tiles = q_tiles + 2 * Cfg::kTileQ;       /* [2] */
    const uint32_t ds_tile = do_tiles + 2 * Cfg::kTileQ;       /* dS^T: [kBN][kDsPitch] */
    T *sDs = reinterpret_cast<T *>(smem + 2 * Cfg::kTileK + 4 * Cfg::kTileQ);
    float *s_lse = reinterpret_cast<float *>(smem + 2 * Cfg::kTileK + 4 * Cfg::kTileQ +
                                             Cfg::kTileDs); /* [2][kBM] */
    float *s_delta = s_lse + 2 * kBM;                       /* [2][kBM] */

    const int b = blockIdx.y, kv_head = blockIdx.z;
    const Sequence seq(p, b);
    const int j0 = blockIdx.x * kBN;
    if (j0 >= seq.sk) return;
    const int keys = min(kBN, seq.sk - j0);
    const int d = (int)p.head_dim;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    /* K, V of this key block; the query blocks that see one of its keys, for each query head
     * of the group, are the stages of the loop below. */
    KeyBlockQueries<kBM, kD, kThreads, T> queries(bp, seq, b, kv_head);
    queries.template load_keys<kBN>(k_tile, v_tile, j0, keys);
    const int total = queries.total;
    auto load_stage = [&](int it, int stage) {
        queries.load(it, q_tiles + stage * Cfg::kTileQ, do_tiles + stage * Cfg::kTileQ,
                     s_lse + stage * kBM, s_delta + stage * kBM);
    };
    if (total > 0) load_stage(0, 0);
    cp_async_commit();

    /* kExtras = false: plain scores, no dropout (fewer live registers in the main loop) */
    const bool transformed = kExtras && scores_transformed(p);
    const bool dropout = kExtras && p.dropout_p > 0.0f;
    const float scale_log2 = transformed ? 1.0f : p.softmax_scale * kLog2e;
    const float dropout_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    const int key_row0 = warp * 16;
    /* this warp's part of the dQ product */
    const int dq_row0 = (warp % Cfg::kRowSlabs) * 16, dq_col0 = (warp / Cfg::kRowSlabs) * Cfg::kDQ;
    float *dq_accum = static_cast<float *>(p.workspace);
    const int64_t accum_row0 = (p.cu_seqlens_q ? 0 : (int64_t)b * p.seqlen_q) + seq.q_start;

    float dk[kOT][4], dv[kOT][4];
#pragma unroll
    for (int ot = 0; ot < kOT; ++ot)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[ot][e] = dv[ot][e] = 0.0f;

    for (int it = 0; it < total; ++it) {
        const int stage = it & 1;
        /* The other stage was last read before the previous iteration's middle barrier. */
        if (it + 1 < total) load_stage(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads(); /* this stage landed; every warp is done with the previous dS */

        const int h = queries.head(it), i0 = queries.row0(it);
        const uint32_t q_tile = q_tiles + stage * Cfg::kTileQ;
        const uint32_t do_tile = do_tiles + stage * Cfg::kTileQ;
        const float *lse = s_lse + stage * kBM, *delta = s_delta + stage * kBM;

        /* S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kBM queries. */
        float st[1][kLT][4], dpt[1][kLT][4];
#pragma unroll
        for (int lt = 0; lt < kLT; ++lt)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[0][lt][e] = dpt[0][lt][e] = 0.0f;
        gemm_abt<kD, 1, kLT, T>(st, k_tile, key_row0, q_tile, 0, lane);
        gemm_abt<kD, 1, kLT, T>(dpt, v_tile, key_row0, do_tile, 0, lane);

        const bool masked = !seq.full(i0, kBM, j0, kBN);
        const float slope =
            kExtras && p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
        const uint32_t batch_head = (uint32_t)(b * p.heads_q + h);
        /* P^T and dS^T packed to T as the A fragments of the dV and dK products, as soon as
         * they are computed (the float accumulators die early): pf[ks][hr + 2 * (lt & 1)]
         * holds the pair (key row g + 8 hr, query columns 8 lt + 2t..) of k16 step ks = lt/2. */
        uint32_t pf[kLT / 2][4], dsf[kLT / 2][4];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int j = j0 + key_row0 + g + hr * 8;
            /* queries that see key j, relative to i0 */
            const int lo = (j < seq.sk ? seq.q_first(j) : 1) - i0;
            const int hi = (j < seq.sk ? seq.q_last(j) : 0) - i0;
            const int r = key_row0 + g + hr * 8;
#pragma unroll
            for (int lt = 0; lt < kLT; ++lt) {
                float pv[2], dsv[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = lt * 8 + 2 * t + e;
                    const int i = i0 + c;
                    float prob_dropped;
                    const float ds = bwd_score(
                        p, transformed, slope, i + seq.sk - seq.sq - j, st[0][lt][2 * hr + e],
                        dpt[0][lt][2 * hr + e], scale_log2, lse_shift(lse[c]),
                        masked && (c < lo || c > hi), dropout,
                        [&] { return dropout_factor(p, batch_head, i, j, dropout_scale); },
                        delta[c], &prob_dropped);
                    dsv[e] = ds;
                    pv[e] = prob_dropped;
                }
                pf[lt / 2][hr + 2 * (lt & 1)] = Pair<T>::pack(pv[0], pv[1]);
                dsf[lt / 2][hr + 2 * (lt & 1)] = Pair<T>::pack(dsv[0], dsv[1]);
                /* dS^T to shared memory for the dQ product */
                *reinterpret_cast<uint32_t *>(sDs + r * kDsPitch + lt * 8 + 2 * t) =
                    dsf[lt / 2][hr + 2 * (lt & 1)];
            }
        }

        /* dV += P^T dO, dK += dS^T Q. */
        gemm_a_packed<kD, kLT / 2, kOT, T>(dv, pf, do_tile, lane);
        gemm_a_packed<kD, kLT / 2, kOT, T>(dk, dsf, q_tile, lane);
        __syncthreads(); /* dS^T complete */

        /* dQ partial = dS K over this block's kBN keys: rows dq_row0.., columns dq_col0.. */
        float dq[kQT][4];
#pragma unroll
        for (int qt = 0; qt < kQT; ++qt)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[qt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ++ks) {
            /* A (queries x keys) from dS^T stored [key][query]: matrices (m0-7, k0-7),
             * (m8-15, k0-7), (m0-7, k8-15), (m8-15, k8-15), transposed by ldmatrix. */
            uint32_t a[4];
            ldmatrix_x4_trans(a, ds_tile + (uint32_t)((ks * 16 + (lane >> 4) * 8 + (lane & 7)) *
                                                      kDsPitch +
                                                  dq_row0 + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll
            for (int np = 0; np < kQT / 2; ++np) {
                uint32_t bb[4];
                ldmatrix_x4_trans(bb, bt_frag_addr<kD>(k_tile, ks * 16, dq_col0 + np * 16, lane));
                mma_m16n8k16<T>(dq[2 * np], a, bb[0], bb[1]);
                mma_m16n8k16<T>(dq[2 * np + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int i = i0 + dq_row0 + g + hr * 8;
            if (i >= seq.sq) continue;
            float *dst = dq_accum + ((accum_row0 + i) * p.heads_q + h) * d + dq_col0 + 2 * t;
#pragma unroll
            for (int qt = 0; qt < kQT; ++qt)
                if (dq_col0 + qt * 8 + 2 * t < d)
                    atomic_add2(dst + qt * 8, dq[qt][2 * hr], dq[qt][2 * hr + 1]);
        }
    }

    /* Epilogue: stage dK, dV through the K, V tiles (each warp owns its 16 rows). */
    cp_async_wait<0>();
    __syncthreads();
    T *sK = reinterpret_cast<T *>(smem), *sV = sK + kBN * kPitch;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = key_row0 + g + hr * 8;
#pragma unroll
        for (int ot = 0; ot < kOT; ++ot) {
            *reinterpret_cast<uint32_t *>(sK + r * kPitch + ot * 8 + 2 * t) =
                Pair<T>::pack(dk[ot][2 * hr], dk[ot][2 * hr + 1]);
            *reinterpret_cast<uint32_t *>(sV + r * kPitch + ot * 8 + 2 * t) =
                Pair<T>::pack(dv[ot][2 * hr], dv[ot][2 * hr + 1]);
        }
    }
    __syncthreads();
    const int64_t row = (int64_t)seq.k_start + j0;
    T *dk_out = static_cast<T *>(bp.dk) + b * bp.dk_batch_stride + row * bp.dk_row_stride +
                kv_head * bp.dk_head_stride;
    T *dv_out = static_cast<T *>(bp.dv) + b * bp.dv_batch_stride + row * bp.dv_row_stride +
                kv_head * bp.dv_head_stride;
    store_tile<kBN, kD, kPitch, kThreads>(dk_out, bp.dk_row_stride, sK, keys, d);
    store_tile<kBN, kD, kPitch, kThreads>(dv_out, bp.dv_row_stride, sV, keys, d);
}

/* dq (T, caller's strides) from the float32 accumulator: one thread per 8 columns of a
 * (row, head); every accumulator row is written (rows of no varlen sequence get 0). */
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_dq_convert_kernel(const attention_bwd_params bp,
                                                                  int64_t rows) {
    const attention_fwd_params &p = bp.fwd;
    const int chunks = (int)p.head_dim / 8;
    const int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (index >= rows * p.heads_q * chunks) return;
    const int c = (int)(index % chunks);
    const int64_t rh = index / chunks;
    const int h = (int)(rh % p.heads_q);
    const int64_t r = rh / p.heads_q;
    const float4 *src = reinterpret_cast<const float4 *>(static_cast<const float *>(p.workspace) +
                                                         rh * p.head_dim + c * 8);
    const float4 lo = src[0], hi = src[1];
    int64_t b = 0, i = r;
    if (p.cu_seqlens_q == nullptr) b = r / p.seqlen_q, i = r % p.seqlen_q;
    T *dst = static_cast<T *>(bp.dq) + b * bp.dq_batch_stride + i * bp.dq_row_stride +
             h * bp.dq_head_stride + c * 8;
    uint4 out;
    out.x = Pair<T>::pack(lo.x, lo.y);
    out.y = Pair<T>::pack(lo.z, lo.w);
    out.z = Pair<T>::pack(hi.x, hi.y);
    out.w = Pair<T>::pack(hi.z, hi.w);
    *reinterpret_cast<uint4 *>(dst) = out;
}

}  // namespace attn
