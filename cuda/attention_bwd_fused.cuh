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
    const int keys = min(kBN, seq.sk - j0), d = (int)p.head_dim;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    /* K, V of this key block; the query blocks that see one of its keys, for each query head
     * of the group, are the stages of the loop below. */
    KeyBlock<kBN, kBM, kD, kThreads, T> block(bp, seq, b, kv_head, j0, keys, q_tiles, do_tiles,
                                              s_lse, s_delta);
    block.start(k_tile, v_tile);
    const int total = block.total;
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
        /* The other stage was last read before the previous iteration's middle barrier; after
         * next(), this stage landed and every warp is done with the previous dS. */
        const KeyBlockStage stage = block.next(it);
        const int h = stage.h, i0 = stage.i0;

        /* S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kBM queries. */
        float st[1][kLT][4], dpt[1][kLT][4];
        score_products<kD, kLT, T>(st, dpt, k_tile, v_tile, key_row0, stage.q_tile,
                                   stage.do_tile, lane);

        /* P^T and dS^T packed to T as the A fragments of the dV and dK products, as soon as
         * they are computed (the float accumulators die early): pf[ks][hr + 2 * (lt & 1)]
         * holds the pair (key row g + 8 hr, query columns 8 lt + 2t..) of k16 step ks = lt/2. */
        uint32_t pf[kLT / 2][4], dsf[kLT / 2][4];
        block.scores(stage, transformed, dropout, scale_log2, dropout_scale, kExtras, st, dpt,
                     [&](int hr, int lt, const float (&ds)[2], const float (&p_dropped)[2]) {
                         const int r = key_row0 + g + hr * 8;
                         pf[lt / 2][hr + 2 * (lt & 1)] = Pair<T>::pack(p_dropped[0], p_dropped[1]);
                         dsf[lt / 2][hr + 2 * (lt & 1)] = Pair<T>::pack(ds[0], ds[1]);
                         /* dS^T to shared memory for the dQ product */
                         *reinterpret_cast<uint32_t *>(sDs + r * kDsPitch + lt * 8 + 2 * t) =
                             dsf[lt / 2][hr + 2 * (lt & 1)];
                     });

        /* dV += P^T dO, dK += dS^T Q. */
        gemm_a_packed<kD, kLT / 2, kOT, T>(dv, pf, stage.do_tile, lane);
        gemm_a_packed<kD, kLT / 2, kOT, T>(dk, dsf, stage.q_tile, lane);
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

    /* Epilogue: dK, dV through the K, V tiles (each warp owns its 16 rows). */
    T *sK = reinterpret_cast<T *>(smem), *sV = sK + kBN * kPitch;
    block.store_key_grads(sK, sV, dk, dv, 0, d);
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
