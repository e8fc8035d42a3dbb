/* The attention forward (FlashAttention-2 on sm_80+ tensor cores): one CTA per (query block,
 * batch, head); warps split the query rows (16 per m16 slab), Q stays in shared memory, K and
 * V single-buffered and interleaved as in FA2 (V_j loads during QK^T, K_{j-1} during softmax
 * and PV), online softmax in registers with exp2, P reused as the A operand straight from the
 * accumulators. Key blocks are visited from the last one the band reaches down to the first;
 * only blocks that cut the band or the sequence ends are masked, and the blocks that need no
 * mask run in a loop of their own, compiled without the mask code (kFwdSplitMask). Query
 * blocks go in reverse order (kFwdReverse) so the longest causal rows start first. A query
 * block whose rows see no key visits no key block and writes zeros (lse = -inf).
 *
 * Semantics: DESIGN.md "Attention semantics", the same as csrc/attention_cpu.c (masks, softcap,
 * ALiBi, Philox dropout with the counter layout of csrc/philox.h). Tile shapes per head dim are
 * chosen in attention_fwd_launch.cuh. */
#pragma once

#include "attention_mask.cuh"
#include "attention_sinks.h"
#include "attention_tile.cuh"
#include "device.cuh"
#include "philox.h"

namespace attn {

template <int kD, int kBM, int kBN, int kWarps> struct FwdConfig {
    static constexpr int kThreads = kWarps * 32;
    static constexpr int kSlabs = kBM / (16 * kWarps); /* m16 slabs per warp */
    static constexpr int kPitch = Tile<kD>::kPitch;
    static constexpr int kSmemBytes = (kBM + 2 * kBN) * kPitch * 2;
    static_assert(kBM % (16 * kWarps) == 0 && kBN % 16 == 0 && kD % 16 == 0, "tile shape");
};

/* Code-generation options of attn_fwd_kernel (kOpt bits). */
enum FwdOpt : int {
    kFwdReverse = 1,     /* query blocks in reverse order: the longest causal rows start first */
    kFwdSplitMask = 2,   /* separate loops for masked and mask-free key blocks */
};
/* How a key block is treated: needs a mask, needs none, or decided at run time. */
template <int kKind> struct FwdBlock { static constexpr int kind = kKind; };
using FwdMasked = FwdBlock<1>;
using FwdFull = FwdBlock<0>;
using FwdRuntime = FwdBlock<2>;

template <int kD, int kBM, int kBN, int kWarps, typename T, bool kExtras, int kMinBlocks,
          int kOpt>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    attn_fwd_kernel(const attention_fwd_params p) {
    using Cfg = FwdConfig<kD, kBM, kBN, kWarps>;
    constexpr int kThreads = Cfg::kThreads, kSlabs = Cfg::kSlabs, kPitch = Cfg::kPitch;
    constexpr int kNT = kBN / 8, kDT = kD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    T *sQ = reinterpret_cast<T *>(smem);
    const uint32_t q_tile = smem_addr(sQ);
    const uint32_t k_tile = q_tile + kBM * kPitch * 2, v_tile = k_tile + kBN * kPitch * 2;

    const int b = blockIdx.y, h = blockIdx.z;
    const Sequence seq(p, b, kExtras);
    const int qblock = (kOpt & kFwdReverse) ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qblock * kBM;
    if (i0 >= seq.sq) return;
    const int rows = min(kBM, seq.sq - i0);
    const int d = (int)p.head_dim;
    const int kv_head = h / (int)(p.heads_q / p.heads_kv);
    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride +
                 (seq.q_start + i0) * p.q_row_stride + h * p.q_head_stride;
    /* KV-cache calls and sinks take the kExtras instances (attention_fwd_launch.cuh). The
     * plain instances keep plain K/V pointers: with the row addresser (KvRows) ptxas spilled
     * more in their main loop and the D = 128 forward ran 10-20% slower (H200/H100 A/B). */
    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride +
                 seq.k_start * p.k_row_stride + kv_head * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride +
                 seq.k_start * p.v_row_stride + kv_head * p.v_head_stride;
    const KvRows<T, true, true, false> k_rows(p, b, kv_head, seq.k_start);
    const KvRows<T, true, true, true> v_rows(p, b, kv_head, seq.k_start);
    auto load_k = [&](int j0, int keys) {
        if constexpr (kExtras) load_kv_tile<kBN, kD, kThreads>(k_tile, k_rows, p, j0, keys, d);
        else load_tile<kBN, kD, kThreads>(k_tile, k + j0 * p.k_row_stride, p.k_row_stride, keys,
                                          d);
    };
    auto load_v = [&](int j0, int keys) {
        if constexpr (kExtras) load_kv_tile<kBN, kD, kThreads>(v_tile, v_rows, p, j0, keys, d);
        else load_tile<kBN, kD, kThreads>(v_tile, v + j0 * p.v_row_stride, p.v_row_stride, keys,
                                          d);
    };

    const int j_lo = seq.first(i0), j_hi = seq.last(i0 + rows - 1);
    const int n_lo = j_lo / kBN, n_hi = j_hi >= j_lo ? j_hi / kBN : n_lo - 1;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * kSlabs * 16;

    load_tile<kBM, kD, kThreads>(q_tile, q, p.q_row_stride, rows, d);
    if (n_hi >= n_lo) {
        const int j0 = n_hi * kBN;
        load_k(j0, min(kBN, seq.sk - j0));
    }
    cp_async_commit();

    const float scale_log2 = kExtras ? 1.0f : p.softmax_scale * kLog2e;
    const float slope =
        kExtras && p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
    const bool dropout = kExtras && p.dropout_p > 0.0f;
    const uint32_t batch_head = (uint32_t)(b * p.heads_q + h);

    float acc[kSlabs][kDT][4];
    float row_max[kSlabs][2], row_sum[kSlabs][2];
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[s][dt][e] = 0.0f;
        row_max[s][0] = row_max[s][1] = -INFINITY;
        row_sum[s][0] = row_sum[s][1] = 0.0f;
    }

    /* One key block n: S = Q K_n^T, mask (per Kind), online softmax, acc += P V_n. K_n is in
     * k_tile on entry; V_n and K_{n-1} are loaded here. */
    auto step = [&](const int n, auto kind) {
        constexpr int kKind = decltype(kind)::kind;
        const int j0 = n * kBN;
        const int keys = min(kBN, seq.sk - j0);
        cp_async_wait<0>();
        __syncthreads(); /* K_n landed; every warp is done with V_{n+1} */
        load_v(j0, keys);
        cp_async_commit();

        float s[kSlabs][kNT][4];
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl)
#pragma unroll
            for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[sl][nt][e] = 0.0f;
        gemm_abt<kD, kSlabs, kNT, T>(s, q_tile, warp_row0, k_tile, 0, lane);

        const bool masked = kKind == 2 ? !seq.full(i0, kBM, j0, kBN) : kKind == 1;
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int i = i0 + warp_row0 + sl * 16 + g + hr * 8;
                if (kExtras) {
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int j = j0 + nt * 8 + 2 * t + e;
                            float chain;
                            s[sl][nt][2 * hr + e] =
                                transform_score(s[sl][nt][2 * hr + e], p.softmax_scale,
                                                p.softcap, slope, i + seq.sk - seq.sq - j, &chain);
                        }
                }
                if (kKind != 0 && masked) {
                    /* visible columns of this row, relative to j0 */
                    const int lo = (i < seq.sq ? seq.first(i) : 1) - j0 - 2 * t;
                    const int hi = (i < seq.sq ? seq.last(i) : 0) - j0 - 2 * t;
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = nt * 8 + e;
                            if (c < lo || c > hi) s[sl][nt][2 * hr + e] = -INFINITY;
                        }
                }
            }
        }

        cp_async_wait<0>();
        __syncthreads(); /* V_n landed; every warp is done with K_n */
        if (n > n_lo) {
            const int jn = j0 - kBN;
            load_k(jn, kBN);
        }
        cp_async_commit();

        /* Online softmax: row state in log2 units of the raw score (times scale_log2). */
        float alpha[kSlabs][2];
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                float mx = row_max[sl][hr];
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
                    mx = fmaxf(mx, fmaxf(s[sl][nt][2 * hr], s[sl][nt][2 * hr + 1]));
                mx = quad_max(mx);
                const float shift = mx == -INFINITY ? 0.0f : mx * scale_log2;
                alpha[sl][hr] = exp2f(row_max[sl][hr] * scale_log2 - shift);
                row_max[sl][hr] = mx;
                float sum = 0.0f;
                const int i = i0 + warp_row0 + sl * 16 + g + hr * 8;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) {
                    const float p0 = exp2f(fmaf(s[sl][nt][2 * hr], scale_log2, -shift));
                    const float p1 = exp2f(fmaf(s[sl][nt][2 * hr + 1], scale_log2, -shift));
                    sum += p0 + p1;
                    s[sl][nt][2 * hr] = p0;
                    s[sl][nt][2 * hr + 1] = p1;
                    if (dropout) {
                        const int j = j0 + nt * 8 + 2 * t;
                        const uint32_t keep =
                            lf_dropout_keep_bits(p.dropout_seed, p.dropout_offset, batch_head,
                                                 (uint32_t)i, (uint32_t)(j >> 2),
                                                 p.dropout_threshold) >>
                            (j & 3);
                        if (!(keep & 1u)) s[sl][nt][2 * hr] = 0.0f;
                        if (!(keep & 2u)) s[sl][nt][2 * hr + 1] = 0.0f;
                    }
                }
                row_sum[sl][hr] = row_sum[sl][hr] * alpha[sl][hr] + sum;
            }
        }
        /* acc *= alpha */
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl)
#pragma unroll
            for (int hr = 0; hr < 2; ++hr)
#pragma unroll
                for (int dt = 0; dt < kDT; ++dt) {
                    acc[sl][dt][2 * hr] *= alpha[sl][hr];
                    acc[sl][dt][2 * hr + 1] *= alpha[sl][hr];
                }
        gemm_pb<kD, kSlabs, kNT, kDT, T>(acc, s, v_tile, 0, lane);
    };

    if constexpr ((kOpt & kFwdSplitMask) != 0) {
        /* Key blocks [fl, fh] need no mask (Sequence::full holds for each): every condition of
         * full() is monotone in the block index, so the masked blocks sit at both ends. The
         * visit order stays n_hi down to n_lo, only the loop changes. */
        int fl = n_lo, fh = n_lo - 1; /* empty */
        if (i0 + kBM <= seq.sq) {
            const int f_lo = (seq.first(i0 + kBM - 1) + kBN - 1) / kBN;
            const int f_hi = (min(seq.last(i0), seq.sk - 1) + 1) / kBN - 1;
            if (max(f_lo, n_lo) <= min(f_hi, n_hi)) fl = max(f_lo, n_lo), fh = min(f_hi, n_hi);
        }
        int n = n_hi;
        for (; n > fh && n >= n_lo; --n) step(n, FwdMasked());
        for (; n >= fl; --n) step(n, FwdFull());
        for (; n >= n_lo; --n) step(n, FwdMasked());
    } else {
        for (int n = n_hi; n >= n_lo; --n) step(n, FwdRuntime());
    }

    /* Epilogue: normalize, stage through the Q tile (each warp owns its rows), store. The
     * barrier matters when no key block was visited (every row of the block sees no key, as
     * when Sq > Sk with a causal mask or a window): the Q tile's cp.async copies, issued by
     * all threads, may still land on rows another warp is about to overwrite; each thread's
     * wait only covers its own copies. */
    cp_async_wait<0>();
    __syncthreads();
    const float dropout_scale = dropout ? 1.0f / (1.0f - p.dropout_p) : 1.0f;
    T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
             (seq.q_start + i0) * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
    for (int sl = 0; sl < kSlabs; ++sl) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float sum = quad_sum(row_sum[sl][hr]);
            const float *sinks = kExtras ? p.sinks : nullptr;  /* sinks take the extras */
            const float m2 = row_max[sl][hr] == -INFINITY ? -INFINITY
                                                          : row_max[sl][hr] * scale_log2;
            const float inv = dropout_scale * attention_row_factor(sinks, h, m2, sum);
            const int r = warp_row0 + sl * 16 + g + hr * 8;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
                *reinterpret_cast<uint32_t *>(sQ + r * kPitch + dt * 8 + 2 * t) =
                    Pair<T>::pack(acc[sl][dt][2 * hr] * inv, acc[sl][dt][2 * hr + 1] * inv);
            if (t == 0 && r < rows)
                p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i0 + r] =
                    attention_row_lse2(sinks, h, m2, sum) * kLn2;
        }
    }
    __syncthreads();
    store_tile<kBM, kD, kPitch, kThreads>(out, p.out_row_stride, sQ, rows, d);
}

/* The default code options: reversed block order and mask-free loops for full key blocks. */
constexpr int kFwdOptDefault = kFwdReverse | kFwdSplitMask;

template <int kD, int kBM, int kBN, int kWarps, typename T, bool kExtras, int kMinBlocks = 1,
          int kOpt = kFwdOptDefault>
cudaError_t launch_attn_fwd(const attention_fwd_params &p, cudaStream_t stream) {
    using Cfg = FwdConfig<kD, kBM, kBN, kWarps>;
    constexpr auto kernel = attn_fwd_kernel<kD, kBM, kBN, kWarps, T, kExtras, kMinBlocks, kOpt>;
    const dim3 grid((unsigned)((p.seqlen_q + kBM - 1) / kBM), (unsigned)p.batch,
                    (unsigned)p.heads_q);
    if (grid.x == 0) return cudaSuccess;
    const cudaError_t err = lf::setup_kernel<kernel>(Cfg::kThreads, Cfg::kSmemBytes, nullptr);
    if (err != cudaSuccess) return err;
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace attn
