/* FlashAttention-2 on sm_80+ tensor cores (mma.sync m16n8k16, ldmatrix, cp.async): the kernel
 * templates behind cuda/attention_fwd.cu and cuda/attention_bwd.cu, instantiated per head dim
 * in cuda/attention_{fwd,bwd}_hdim*.cu so the builds run in parallel.
 *
 * Semantics: DESIGN.md "Attention semantics", the same as csrc/attention_cpu.c (masks, softcap,
 * ALiBi, Philox dropout with the counter layout of csrc/philox.h, lse = -inf for rows that see
 * nothing). Head dims are padded up to kD in {32, 64, 96, 128, 256}: columns past d are
 * zero-filled by cp.async and never stored; d must be a multiple of 8 and every row 16-byte
 * aligned (csrc/attention.c checks, python/lutflash/attention.py pads).
 *
 * Shared-memory tiles are [rows][kD + 8]: the 16-byte pad makes consecutive rows start 8 banks
 * apart modulo 32 for every kD here, so ldmatrix phases (8 rows x 16 bytes) are conflict-free.
 *
 * Forward (attn_fwd_kernel): one CTA per (query block, batch, head); warps split the query rows
 * (16 per m16 slab), Q stays in shared memory, K and V single-buffered and interleaved as in
 * FA2 (V_j loads during QK^T, K_{j-1} during softmax and PV), online softmax in registers with
 * exp2, P reused as the A operand straight from the accumulators. Key blocks are visited from
 * the last one the band reaches down to the first; only blocks that cut the band or the
 * sequence ends are masked, and the blocks that need no mask run in a loop of their own, compiled
 * without the mask code (kFwdSplitMask). Query blocks go in reverse order (kFwdReverse) so the
 * longest causal rows start first.
 *
 * Backward (default, deterministic = 0): attn_bwd_fused_kernel, FA2's single pass per key
 * block (S, dP once; dK, dV in registers; dQ partials added to a float32 workspace with
 * atomics, then converted), after the delta kernel below. Head dim 256 and deterministic = 1
 * take the deterministic backward.
 *
 * Deterministic backward, recomputing P from lse, in three launches (no atomics):
 *  - attn_bwd_delta_kernel: delta = rowsum(dO * O) - dlse.
 *  - attn_bwd_dkdv_kernel: one CTA per (key block, batch, kv head [, head-dim half]); warps split
 *    the keys, so S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q all stay in
 *    registers. It loops over the query heads of its GQA group and their query blocks
 *    (double-buffered cp.async).
 *  - attn_bwd_dq_kernel: one CTA per (query block, batch, head); warps split the queries and
 *    dQ += dS K over the visible key blocks (double-buffered).
 * The two main kernels recompute S and dP each (7 GEMMs instead of FA2's 5) in exchange for a
 * fixed summation order and no fp32 dq workspace. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "attention_params.h"
#include "philox.h"

namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* ---------------------------------------------------------------------------------------- */
/* PTX wrappers.                                                                             */

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <typename T> struct Elem;
template <> struct Elem<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};
template <> struct Elem<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0,
                                               uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

/* ---------------------------------------------------------------------------------------- */
/* Tiles: cooperative loads and fragment addresses.                                          */

template <int kD> struct Tile {
    static constexpr int kPitch = kD + 8; /* elements per shared-memory row */
    static constexpr int kChunks = kD / 8; /* 16-byte chunks per row */
};

/* rows x kD elements from global (row stride in elements) into a shared tile; rows >= valid
 * and columns >= d are zero-filled. Each thread owns one 16-byte column chunk and walks down
 * the rows with one running pointer (precomputed per-row addresses would pin registers across
 * the main loops). */
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile(uint32_t dst, const T *src, int64_t row_stride,
                                          int valid, int d) {
    constexpr int kChunks = Tile<kD>::kChunks, kStep = kThreads / kChunks;
    const int r0 = (int)threadIdx.x / kChunks, c = (int)threadIdx.x % kChunks;
    if (r0 >= kStep) return; /* kThreads is not a multiple of kChunks (kD = 96) */
    const bool col_ok = c * 8 < d;
    const T *ptr = src + r0 * row_stride + c * 8;
    const uint32_t to = dst + (uint32_t)(r0 * Tile<kD>::kPitch + c * 8) * 2;
#pragma unroll
    for (int it = 0; it < (kRows + kStep - 1) / kStep; ++it) {
        const int r = r0 + it * kStep;
        if (kRows % kStep == 0 || r < kRows) {
            const bool ok = col_ok && r < valid;
            cp_async16(to + it * kStep * Tile<kD>::kPitch * 2, ok ? ptr : src, ok);
        }
        ptr += kStep * row_stride;
    }
}

/* Copies rows x kCols elements of a shared tile (kPitch elements per row) to global (rows <
 * valid, columns < d). */
template <int kRows, int kCols, int kPitch, int kThreads, typename T>
__device__ __forceinline__ void store_tile(T *dst, int64_t row_stride, const T *src, int valid,
                                           int d) {
    constexpr int kChunks = kCols / 8, kStep = kThreads / kChunks;
    const int r0 = (int)threadIdx.x / kChunks, c = (int)threadIdx.x % kChunks;
    if (r0 >= kStep || c * 8 >= d) return;
    T *ptr = dst + r0 * row_stride + c * 8;
#pragma unroll
    for (int it = 0; it < (kRows + kStep - 1) / kStep; ++it) {
        const int r = r0 + it * kStep;
        if ((kRows % kStep == 0 || r < kRows) && r < valid)
            *reinterpret_cast<uint4 *>(ptr) =
                *reinterpret_cast<const uint4 *>(src + r * kPitch + c * 8);
        ptr += kStep * row_stride;
    }
}

/* Byte address of lane's ldmatrix row for an A operand (16 rows x 16 columns at (row0, col0)):
 * x4 gives a0..a3. */
template <int kD>
__device__ __forceinline__ uint32_t a_frag_addr(uint32_t tile, int row0, int col0, int lane) {
    return tile + (uint32_t)((row0 + (lane & 15)) * Tile<kD>::kPitch + col0 + (lane >> 4) * 8) * 2;
}
/* A "col" B operand stored [n][k] (K for QK^T): x4 gives (b0, b1) of n-tiles n0/8 and n0/8+1
 * for the k16 step at col0. */
template <int kD>
__device__ __forceinline__ uint32_t b_frag_addr(uint32_t tile, int n0, int col0, int lane) {
    const int i = lane >> 3;
    return tile + (uint32_t)((n0 + (i >> 1) * 8 + (lane & 7)) * Tile<kD>::kPitch + col0 +
                             (i & 1) * 8) * 2;
}
/* A "row" B operand stored [k][n] (V for PV), through ldmatrix.trans: x4 gives (b0, b1) of
 * n-tiles n0/8 and n0/8+1 for the k16 step at row k0. */
template <int kD>
__device__ __forceinline__ uint32_t bt_frag_addr(uint32_t tile, int k0, int n0, int lane) {
    const int i = lane >> 3;
    return tile + (uint32_t)((k0 + (i & 1) * 8 + (lane & 7)) * Tile<kD>::kPitch + n0 +
                             (i >> 1) * 8) * 2;
}

/* C[kSlabs][16 x 8*kNTiles] += A x B^T, the QK^T-shaped product: A is kSlabs 16-row slabs of
 * a shared tile stored [m][k] (rows a_row0 + 16*slab), B is stored [n][k] (rows n0..), k runs
 * over kD. Each B fragment is loaded once for all slabs. */
template <int kD, int kSlabs, int kNTiles, typename T>
__device__ __forceinline__ void gemm_abt(float (&c)[kSlabs][kNTiles][4], uint32_t a_tile,
                                         int a_row0, uint32_t b_tile, int n0, int lane) {
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
        uint32_t a[kSlabs][4];
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl)
            ldsm_x4(a[sl], a_frag_addr<kD>(a_tile, a_row0 + sl * 16, ks * 16, lane));
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldsm_x4(b, b_frag_addr<kD>(b_tile, n0 + np * 16, ks * 16, lane));
#pragma unroll
            for (int sl = 0; sl < kSlabs; ++sl) {
                Elem<T>::mma(c[sl][2 * np], a[sl], b[0], b[1]);
                Elem<T>::mma(c[sl][2 * np + 1], a[sl], b[2], b[3]);
            }
        }
    }
}

/* C[kSlabs][16 x 8*kNTiles] += P x B where P is kSlabs accumulator tiles (16 x 8*kPTiles,
 * converted to A fragments) and B is stored [k][n] in b_tile (rows 0.., columns n0..). */
template <int kD, int kSlabs, int kPTiles, int kNTiles, typename T>
__device__ __forceinline__ void gemm_pb(float (&c)[kSlabs][kNTiles][4],
                                        const float (&pm)[kSlabs][kPTiles][4], uint32_t b_tile,
                                        int n0, int lane) {
#pragma unroll
    for (int ks = 0; ks < kPTiles / 2; ++ks) {
        uint32_t a[kSlabs][4];
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
            a[sl][0] = Elem<T>::pack(pm[sl][2 * ks][0], pm[sl][2 * ks][1]);
            a[sl][1] = Elem<T>::pack(pm[sl][2 * ks][2], pm[sl][2 * ks][3]);
            a[sl][2] = Elem<T>::pack(pm[sl][2 * ks + 1][0], pm[sl][2 * ks + 1][1]);
            a[sl][3] = Elem<T>::pack(pm[sl][2 * ks + 1][2], pm[sl][2 * ks + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldsm_x4_trans(b, bt_frag_addr<kD>(b_tile, ks * 16, n0 + np * 16, lane));
#pragma unroll
            for (int sl = 0; sl < kSlabs; ++sl) {
                Elem<T>::mma(c[sl][2 * np], a[sl], b[0], b[1]);
                Elem<T>::mma(c[sl][2 * np + 1], a[sl], b[2], b[3]);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Geometry.                                                                                 */

/* One sequence of the batch: where its rows start in q/k (varlen) and its lengths, with the
 * visible band of keys around the bottom-right aligned diagonal i + sk - sq. 32-bit fields
 * (lengths < 2^31, windows clamped by csrc/attention.c); sums are formed in 64 bits and the
 * results clamped to [-1, sk] or [-1, sq]. */
struct Sequence {
    int q_start, k_start, sq, sk, wl, wr;

    __device__ __forceinline__ Sequence(const attention_fwd_params &p, int b) {
        q_start = 0, k_start = 0, sq = (int)p.seqlen_q, sk = (int)p.seqlen_k;
        if (p.cu_seqlens_q != nullptr) {
            /* GPU offsets were never checked on the host: clamp them into the packed tensors
             * so that bad offsets give wrong rows, never accesses outside them. */
            const int64_t q0 = min(max((int64_t)p.cu_seqlens_q[b], (int64_t)0), p.total_q);
            const int64_t k0 = min(max((int64_t)p.cu_seqlens_k[b], (int64_t)0), p.total_k);
            const int64_t q1 = min((int64_t)p.cu_seqlens_q[b + 1], p.total_q);
            const int64_t k1 = min((int64_t)p.cu_seqlens_k[b + 1], p.total_k);
            q_start = (int)q0, k_start = (int)k0;  // offsets are int32, so these fit
            sq = (int)max((int64_t)0, min(q1 - q0, (int64_t)sq));
            sk = (int)max((int64_t)0, min(k1 - k0, (int64_t)sk));
        }
        wl = (int)p.window_left, wr = (int)p.window_right;
    }
    /* Keys query i sees: [first(i), last(i)] (empty when last < first). */
    __device__ __forceinline__ int first(int i) const {
        return wl >= 0 ? (int)min(max((int64_t)i + sk - sq - wl, (int64_t)0), (int64_t)sk) : 0;
    }
    __device__ __forceinline__ int last(int i) const {
        return wr >= 0 ? (int)max(min((int64_t)i + sk - sq + wr, (int64_t)sk - 1), (int64_t)-1)
                       : sk - 1;
    }
    /* Queries key j is seen by: [q_first(j), q_last(j)]. */
    __device__ __forceinline__ int q_first(int j) const {
        return wr >= 0 ? (int)min(max((int64_t)j - sk + sq - wr, (int64_t)0), (int64_t)sq) : 0;
    }
    __device__ __forceinline__ int q_last(int j) const {
        return wl >= 0 ? (int)max(min((int64_t)j - sk + sq + wl, (int64_t)sq - 1), (int64_t)-1)
                       : sq - 1;
    }
    /* Every (i, j) of the tile [i0, i0 + m) x [j0, j0 + n) is inside both sequences and the
     * band, so the tile needs no mask. */
    __device__ __forceinline__ bool full(int i0, int m, int j0, int n) const {
        return i0 + m <= sq && j0 + n <= sk && first(i0 + m - 1) <= j0 && last(i0) >= j0 + n - 1;
    }
};

/* Score transforms shared by forward and backward: softcap and ALiBi on the raw dot product x,
 * giving the score in log2 units; *chain receives d score / d x (natural units). */
__device__ __forceinline__ float transform_score(float x, float scale, float cap, float slope,
                                                 int distance, float *chain) {
    float s = x * scale;
    *chain = scale;
    if (cap > 0.0f) {
        const float t = tanhf(s / cap);
        s = cap * t;
        *chain = scale * (1.0f - t * t);
    }
    s -= slope * fabsf((float)distance);
    return s * kLog2e;
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/* ---------------------------------------------------------------------------------------- */
/* Forward.                                                                                  */

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
    kFwdLazyRescale = 4, /* skip the acc rescale when no row max of the warp changed */
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
    const Sequence seq(p, b);
    const int qblock = (kOpt & kFwdReverse) ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
    const int i0 = qblock * kBM;
    if (i0 >= seq.sq) return;
    const int rows = min(kBM, seq.sq - i0);
    const int d = (int)p.head_dim;
    const int kv_head = h / (int)(p.heads_q / p.heads_kv);
    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride +
                 (seq.q_start + i0) * p.q_row_stride + h * p.q_head_stride;
    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride +
                 seq.k_start * p.k_row_stride + kv_head * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride +
                 seq.k_start * p.v_row_stride + kv_head * p.v_head_stride;

    const int j_lo = seq.first(i0), j_hi = seq.last(i0 + rows - 1);
    const int n_lo = j_lo / kBN, n_hi = j_hi >= j_lo ? j_hi / kBN : n_lo - 1;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int warp_row0 = warp * kSlabs * 16;

    load_tile<kBM, kD, kThreads>(q_tile, q, p.q_row_stride, rows, d);
    if (n_hi >= n_lo) {
        const int j0 = n_hi * kBN;
        load_tile<kBN, kD, kThreads>(k_tile, k + j0 * p.k_row_stride, p.k_row_stride,
                                     min(kBN, seq.sk - j0), d);
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
        load_tile<kBN, kD, kThreads>(v_tile, v + j0 * p.v_row_stride, p.v_row_stride, keys, d);
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
            load_tile<kBN, kD, kThreads>(k_tile, k + jn * p.k_row_stride, p.k_row_stride, kBN, d);
        }
        cp_async_commit();

        /* Online softmax: row state in log2 units of the raw score (times scale_log2). */
        float alpha[kSlabs][2];
        bool same = true; /* no row max of this thread changed */
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                float mx = row_max[sl][hr];
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
                    mx = fmaxf(mx, fmaxf(s[sl][nt][2 * hr], s[sl][nt][2 * hr + 1]));
                mx = quad_max(mx);
                same = same && mx == row_max[sl][hr];
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
        /* acc *= alpha; with kFwdLazyRescale skipped when alpha is 1 for the whole warp (a
         * warp-uniform branch: the maxima are quad-reduced, equal max means alpha == 1). */
        if (!(kOpt & kFwdLazyRescale) || !__all_sync(0xffffffffu, same)) {
#pragma unroll
            for (int sl = 0; sl < kSlabs; ++sl)
#pragma unroll
                for (int hr = 0; hr < 2; ++hr)
#pragma unroll
                    for (int dt = 0; dt < kDT; ++dt) {
                        acc[sl][dt][2 * hr] *= alpha[sl][hr];
                        acc[sl][dt][2 * hr + 1] *= alpha[sl][hr];
                    }
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
            const bool empty = !(sum > 0.0f);
            const float inv = empty ? 0.0f : dropout_scale / sum;
            const int r = warp_row0 + sl * 16 + g + hr * 8;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
                *reinterpret_cast<uint32_t *>(sQ + r * kPitch + dt * 8 + 2 * t) =
                    Elem<T>::pack(acc[sl][dt][2 * hr] * inv, acc[sl][dt][2 * hr + 1] * inv);
            if (t == 0 && r < rows) {
                const float m = row_max[sl][hr];
                p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i0 + r] =
                    empty ? -INFINITY : (m * scale_log2 + log2f(sum)) * kLn2;
            }
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
    auto kernel = attn_fwd_kernel<kD, kBM, kBN, kWarps, T, kExtras, kMinBlocks, kOpt>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)((p.seqlen_q + kBM - 1) / kBM), (unsigned)p.batch,
                    (unsigned)p.heads_q);
    if (grid.x == 0) return cudaSuccess;
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
    return cudaGetLastError();
}

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

/* Tuning switch for benchmarks: LUTFLASH_FWD_EXP=<n> (bf16, plain scores, variant 0) picks
 * 1 = the kernel without the code options (kOpt 0, the old default tile shape; kD != 32),
 * 3 = the default plus kFwdLazyRescale (kD = 64/128), 5 = 128 x 128 x 8 warps with the default
 * options (kD = 64); anything else the default. Read per call (getenv, no device work), like
 * LUTFLASH_DECODE. */
inline int fwd_experiment() {
    const char *e = getenv("LUTFLASH_FWD_EXP");
    return e ? atoi(e) : 0;
}

/* The forward of one padded head dim and dtype, with kFwdOptDefault except plain scores at
 * kD = 32 (measured on the H100 in benchmarks/NOTES_attention_cuda.md: the mask-free loop for
 * full key blocks is worth 10-17% at kD = 64/128, 0-3% at kD = 96, nothing at kD = 256, and
 * costs 3-5% at kD = 32). Plain scores at kD = 64: FA2's 128 x 128 x 4 warps (32 rows a warp, ptxas
 * spills a few row-sum/pointer slots, 2 CTAs per SM); at kD = 128 FA2's 128 x 64 x 4 warps.
 * Softcap/ALiBi/dropout add live state: 8 warps at one CTA per SM at kD = 128, 128 x 64 x 4
 * warps at kD <= 64. `variant` (attention_fwd_params.variant, the op's variant argument;
 * nonzero also skips the decode path) picks the alternatives for plain scores at kD = 64 and
 * 128: 1 = 128 x 64 x 4 warps, 2 = 8 warps (128 x 128 at kD = 64, 128 x 64 at kD = 128, two
 * CTAs per SM), 3 = the third shape in the switch. */
template <int kD, typename T> cudaError_t run_attn_fwd_tiles(const attention_fwd_params &p,
                                                             cudaStream_t stream) {
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f;
    const int variant = p.variant;
    const int exp = IsBf16<T>::value && !extras && variant == 0 ? fwd_experiment() : 0;
    if constexpr (kD == 128) {
        if (extras) return launch_attn_fwd<kD, 128, 64, 8, T, true, 1>(p, stream);
        if constexpr (IsBf16<T>::value) {
            if (exp == 1) return launch_attn_fwd<kD, 128, 64, 4, T, false, 1, 0>(p, stream);
            if (exp == 3) return launch_attn_fwd<kD, 128, 64, 4, T, false, 1, 7>(p, stream);
        }
        switch (variant) {
        case 2: return launch_attn_fwd<kD, 128, 64, 8, T, false, 2>(p, stream);
        case 3: return launch_attn_fwd<kD, 128, 32, 4, T, false, 1>(p, stream);
        default: return launch_attn_fwd<kD, 128, 64, 4, T, false, 1>(p, stream);
        }
    } else if constexpr (kD == 64) {
        if (extras) return launch_attn_fwd<kD, 128, 64, 4, T, true, 1>(p, stream);
        if constexpr (IsBf16<T>::value) {
            if (exp == 1) return launch_attn_fwd<kD, 128, 128, 8, T, false, 2, 0>(p, stream);
            if (exp == 3) return launch_attn_fwd<kD, 128, 128, 4, T, false, 1, 7>(p, stream);
            if (exp == 5) return launch_attn_fwd<kD, 128, 128, 8, T, false, 2>(p, stream);
        }
        switch (variant) {
        case 1: return launch_attn_fwd<kD, 128, 64, 4, T, false, 1>(p, stream);
        case 2: return launch_attn_fwd<kD, 128, 128, 8, T, false, 2>(p, stream);
        case 3: return launch_attn_fwd<kD, 128, 64, 8, T, false, 2>(p, stream);
        default: return launch_attn_fwd<kD, 128, 128, 4, T, false, 1>(p, stream);
        }
    } else if constexpr (kD == 32) {
        /* plain scores keep kOpt 0: the default options measured 3-5% slower here */
        return extras ? launch_attn_fwd<kD, 128, 64, 4, T, true, 1>(p, stream)
                      : launch_attn_fwd<kD, 128, 128, 4, T, false, 1, 0>(p, stream);
    } else {
        constexpr int kWarps = kD <= 128 ? 4 : 8;
        if (extras) return launch_attn_fwd<kD, 128, 64, kWarps, T, true, 1>(p, stream);
        if constexpr (IsBf16<T>::value)
            if (exp == 1) return launch_attn_fwd<kD, 128, 64, kWarps, T, false, 1, 0>(p, stream);
        return launch_attn_fwd<kD, 128, 64, kWarps, T, false, 1>(p, stream);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Decode (flash-decoding): few query rows, long keys.                                       */
/*                                                                                           */
/* One CTA per (row group, key split, batch, kv head). Its 16 rows are (query head of the GQA   */
/* group, query) pairs, row = head_in_group * sq + i, so the heads that share a kv head read  */
/* each K/V byte once. The CTA's 4 warps split every 64-key block (16 keys each) and keep     */
/* their own online softmax; K/V blocks stream through a kStages-deep cp.async ring. At the   */
/* end the warps merge through shared memory; with one split the CTA writes out and lse,      */
/* otherwise a record (o normalized in fp32, lse in log2 units) per (row, split) goes to the  */
/* workspace and attn_decode_combine_kernel merges the splits by lse. Plain scores only       */
/* (no softcap, ALiBi or dropout); masks and varlen as in the forward.                       */
/*                                                                                           */
/* Splits (decode_splits) come from the SM count, queried once per device: about one CTA per */
/* SM, at least 4 key blocks each (B = 1 with 32 kv heads on an H100 used to run 288 CTAs on */
/* 264 slots, a 9% second wave). On sm_90 the combine is launched with programmatic dependent */
/* launch: its CTAs start while the decode kernel's last CTAs run and wait in                */
/* griddepcontrol.wait for its results, which hides the second launch's latency.             */
/* Benchmark switches (read per call): LUTFLASH_DECODE=old (the previous split rule and      */
/* serial combine, no PDL), =serial (that combine, no PDL), =nopdl, =waves (splits filling   */
/* whole waves of 2 CTAs per SM); LUTFLASH_DECODE_SPLITS=n forces n splits (clamped to what  */
/* the workspace holds).                                                                     */

constexpr int kDecodeRows = 16, kDecodeBN = 64, kDecodeWarps = 4;

template <int kD> struct DecodeConfig {
    static constexpr int kThreads = kDecodeWarps * 32;
    static constexpr int kPitch = Tile<kD>::kPitch;
    static constexpr int kStages = kD <= 128 ? 3 : 2;
    static constexpr int kTileQ = kDecodeRows * kPitch * 2, kTileKV = kDecodeBN * kPitch * 2;
    static constexpr int kRedPitch = kD + 4; /* fp32 merge rows */
    static constexpr int kRedBytes = kDecodeWarps * kDecodeRows * (kRedPitch + 2) * 4;
    static constexpr int kLoopBytes = kTileQ + kStages * 2 * kTileKV;
    static constexpr int kSmemBytes = kLoopBytes > kTileQ + kRedBytes ? kLoopBytes
                                                                      : kTileQ + kRedBytes;
};

/* Floats of one workspace record: o (d, padded to 4) and lse (log2 units), 16-byte aligned. */
__host__ __device__ __forceinline__ int64_t decode_record_floats(int64_t d) {
    return (d + 3) / 4 * 4 + 4;
}

template <int kD, typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32, 2)
    attn_decode_kernel(const attention_fwd_params p, int num_splits) {
    using Cfg = DecodeConfig<kD>;
    constexpr int kThreads = Cfg::kThreads, kPitch = Cfg::kPitch, kStages = Cfg::kStages;
    constexpr int kDT = kD / 8, kChunks = kD / 8;
    extern __shared__ __align__(16) unsigned char smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    /* The combine (launched with programmatic stream serialization) may start its CTAs once
     * every CTA here got this far; it still waits for this grid to finish (griddepcontrol.wait)
     * before it reads anything. Without a dependent launch this does nothing. */
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    const uint32_t q_tile = smem_addr(smem);
    const uint32_t kv_tiles = q_tile + Cfg::kTileQ; /* [kStages][K, V] */

    const int split = blockIdx.x % num_splits, rg = blockIdx.x / num_splits;
    const int b = blockIdx.y, kv_head = blockIdx.z;
    const Sequence seq(p, b);
    const int group = (int)(p.heads_q / p.heads_kv);
    const int rows_total = group * seq.sq;
    const int r0 = rg * kDecodeRows;
    if (r0 >= rows_total) return;
    const int d = (int)p.head_dim;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    /* Q rows: each has its own head and query index. */
    for (int c = threadIdx.x; c < kDecodeRows * kChunks; c += kThreads) {
        const int r = c / kChunks, ch = c % kChunks, ridx = r0 + r;
        const bool ok = ridx < rows_total && ch * 8 < d;
        const T *src = static_cast<const T *>(p.q);
        if (ok) {
            const int h = kv_head * group + ridx / seq.sq, i = ridx % seq.sq;
            src += b * p.q_batch_stride + ((int64_t)seq.q_start + i) * p.q_row_stride +
                   h * p.q_head_stride + ch * 8;
        }
        cp_async16(q_tile + (uint32_t)(r * kPitch + ch * 8) * 2, src, ok);
    }

    /* Key blocks of the union of the rows' bands, split evenly. */
    const int j_lo = seq.first(0), j_hi = seq.last(seq.sq - 1);
    const int n_lo = j_lo / kDecodeBN;
    const int n_all = j_hi >= j_lo && seq.sk > 0 ? j_hi / kDecodeBN - n_lo + 1 : 0;
    const int per = (n_all + num_splits - 1) / num_splits;
    const int nb_begin = n_lo + min(n_all, split * per);
    const int nb_end = n_lo + min(n_all, (split + 1) * per);
    const int blocks = nb_end - nb_begin;

    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride +
                 seq.k_start * p.k_row_stride + kv_head * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride +
                 seq.k_start * p.v_row_stride + kv_head * p.v_head_stride;
    auto load_stage = [&](int it) {
        const int j0 = (nb_begin + it) * kDecodeBN, keys = min(kDecodeBN, seq.sk - j0);
        const uint32_t kt = kv_tiles + (it % kStages) * 2 * Cfg::kTileKV;
        load_tile<kDecodeBN, kD, kThreads>(kt, k + j0 * p.k_row_stride, p.k_row_stride, keys, d);
        load_tile<kDecodeBN, kD, kThreads>(kt + Cfg::kTileKV, v + j0 * p.v_row_stride,
                                           p.v_row_stride, keys, d);
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < blocks) load_stage(s);
        cp_async_commit(); /* the first group carries Q too */
    }

    /* Visible keys of this thread's two rows (rows past the group see none). */
    int lo[2], hi[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int ridx = r0 + g + hr * 8;
        const int i = ridx % max(seq.sq, 1);
        lo[hr] = ridx < rows_total ? seq.first(i) : 1;
        hi[hr] = ridx < rows_total ? seq.last(i) : 0;
    }
    /* Every row sees all of [first(sq - 1), last(0)]: blocks inside need no mask. */
    const int full_lo = seq.first(seq.sq - 1), full_hi = seq.last(0);
    const float scale_log2 = p.softmax_scale * kLog2e;

    float acc[1][kDT][4];
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[0][dt][e] = 0.0f;

    for (int it = 0; it < blocks; ++it) {
        cp_async_wait<kStages - 2>();
        __syncthreads(); /* block it landed; every warp is done with block it - 1 */
        if (it + kStages - 1 < blocks) load_stage(it + kStages - 1);
        cp_async_commit();

        const int j0 = (nb_begin + it) * kDecodeBN;
        const uint32_t kt = kv_tiles + (it % kStages) * 2 * Cfg::kTileKV;
        float s[1][2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.0f;
        gemm_abt<kD, 1, 2, T>(s, q_tile, 0, kt, warp * 16, lane);

        const int jw = j0 + warp * 16;
        const bool masked = !(jw + 16 <= seq.sk && full_lo <= jw && full_hi >= jw + 15);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            if (masked) {
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = jw + nt * 8 + 2 * t + e;
                        if (j < lo[hr] || j > hi[hr]) s[0][nt][2 * hr + e] = -INFINITY;
                    }
            }
            float mx = row_max[hr];
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
                mx = fmaxf(mx, fmaxf(s[0][nt][2 * hr], s[0][nt][2 * hr + 1]));
            mx = quad_max(mx);
            const float shift = mx == -INFINITY ? 0.0f : mx * scale_log2;
            const float alpha = exp2f(row_max[hr] * scale_log2 - shift);
            row_max[hr] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float pr = exp2f(fmaf(s[0][nt][2 * hr + e], scale_log2, -shift));
                    s[0][nt][2 * hr + e] = pr;
                    sum += pr;
                }
            row_sum[hr] = row_sum[hr] * alpha + sum;
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt) {
                acc[0][dt][2 * hr] *= alpha;
                acc[0][dt][2 * hr + 1] *= alpha;
            }
        }
        gemm_pb<kD, 1, 2, kDT, T>(acc, s, kt + Cfg::kTileKV + warp * 16 * kPitch * 2, 0, lane);
    }

    /* Merge the warps: each writes its accumulators, max (log2 units) and sum to shared
     * memory past the Q tile. */
    cp_async_wait<0>();
    __syncthreads();
    float *red = reinterpret_cast<float *>(smem + Cfg::kTileQ); /* [warps][rows][kRedPitch] */
    float *red_max = red + kDecodeWarps * kDecodeRows * Cfg::kRedPitch; /* [warps][rows] */
    float *red_sum = red_max + kDecodeWarps * kDecodeRows;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = g + hr * 8;
        float *dst = red + (warp * kDecodeRows + r) * Cfg::kRedPitch;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
            *reinterpret_cast<float2 *>(dst + dt * 8 + 2 * t) =
                make_float2(acc[0][dt][2 * hr], acc[0][dt][2 * hr + 1]);
        const float sum = quad_sum(row_sum[hr]);
        if (t == 0) {
            red_max[warp * kDecodeRows + r] =
                row_max[hr] == -INFINITY ? -INFINITY : row_max[hr] * scale_log2;
            red_sum[warp * kDecodeRows + r] = sum;
        }
    }
    __syncthreads();

    const int valid_rows = min(kDecodeRows, rows_total - r0);
    float *ws = static_cast<float *>(p.workspace);
    const int64_t rec = decode_record_floats(d);
    /* 8 threads per row, 4 columns each per step. */
    for (int r = threadIdx.x / 8; r < valid_rows; r += kThreads / 8) {
        float m = -INFINITY;
#pragma unroll
        for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, red_max[w * kDecodeRows + r]);
        float wgt[kDecodeWarps], total = 0.0f;
#pragma unroll
        for (int w = 0; w < kDecodeWarps; ++w) {
            const float mw = red_max[w * kDecodeRows + r];
            wgt[w] = mw == -INFINITY ? 0.0f : exp2f(mw - m);
            total += wgt[w] * red_sum[w * kDecodeRows + r];
        }
        const bool empty = !(total > 0.0f);
        const float inv = empty ? 0.0f : 1.0f / total;
        const float lse2 = empty ? -INFINITY : m + log2f(total);
        const int ridx = r0 + r, h = kv_head * group + ridx / seq.sq, i = ridx % seq.sq;
        const int64_t lse_index =
            b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i;
        if (num_splits == 1) {
            T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
                     ((int64_t)seq.q_start + i) * p.out_row_stride + h * p.out_head_stride;
            for (int c = (threadIdx.x % 8) * 4; c < d; c += 32) {
                float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int w = 0; w < kDecodeWarps; ++w) {
                    const float4 a = *reinterpret_cast<const float4 *>(
                        red + (w * kDecodeRows + r) * Cfg::kRedPitch + c);
                    o[0] += wgt[w] * a.x, o[1] += wgt[w] * a.y;
                    o[2] += wgt[w] * a.z, o[3] += wgt[w] * a.w;
                }
                *reinterpret_cast<uint32_t *>(out + c) = Elem<T>::pack(o[0] * inv, o[1] * inv);
                *reinterpret_cast<uint32_t *>(out + c + 2) =
                    Elem<T>::pack(o[2] * inv, o[3] * inv);
            }
            if (threadIdx.x % 8 == 0) p.lse[lse_index] = empty ? -INFINITY : lse2 * kLn2;
        } else {
            float *dst = ws + (lse_index * num_splits + split) * rec;
            for (int c = (threadIdx.x % 8) * 4; c < d; c += 32) {
                float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int w = 0; w < kDecodeWarps; ++w) {
                    const float4 a = *reinterpret_cast<const float4 *>(
                        red + (w * kDecodeRows + r) * Cfg::kRedPitch + c);
                    o[0] += wgt[w] * a.x, o[1] += wgt[w] * a.y;
                    o[2] += wgt[w] * a.z, o[3] += wgt[w] * a.w;
                }
                *reinterpret_cast<float4 *>(dst + c) =
                    make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
            }
            if (threadIdx.x % 8 == 0) dst[rec - 4] = lse2;
        }
    }
}

/* The previous combine (LUTFLASH_DECODE=old, kept to time against): one warp per (query row,
 * batch, head), the splits visited one after the other. */
template <typename T>
__global__ void __launch_bounds__(128) attn_decode_combine_serial_kernel(
    const attention_fwd_params p, int num_splits) {
    const int b = blockIdx.y, h = blockIdx.z, lane = threadIdx.x % 32;
    const Sequence seq(p, b);
    const int i = blockIdx.x * 4 + threadIdx.x / 32;
    if (i >= seq.sq) return;
    const int d = (int)p.head_dim;
    const int64_t rec = decode_record_floats(d);
    const int64_t lse_index = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i;
    const float *src = static_cast<const float *>(p.workspace) + lse_index * num_splits * rec;
    float m = -INFINITY;
    for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, src[s * rec + rec - 4]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float total = 0.0f;
    for (int s = lane; s < num_splits; s += 32) {
        const float l = src[s * rec + rec - 4];
        total += l == -INFINITY ? 0.0f : exp2f(l - m);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
    const bool empty = !(total > 0.0f);
    const float inv = empty ? 0.0f : 1.0f / total;
    T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
             ((int64_t)seq.q_start + i) * p.out_row_stride + h * p.out_head_stride;
    for (int c = lane * 4; c < d; c += 128) {
        float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int s = 0; s < num_splits; ++s) {
            const float l = src[s * rec + rec - 4];
            if (l == -INFINITY) continue; /* an empty split's o is never written */
            const float w = exp2f(l - m);
            const float4 a = *reinterpret_cast<const float4 *>(src + s * rec + c);
            o[0] += w * a.x, o[1] += w * a.y, o[2] += w * a.z, o[3] += w * a.w;
        }
        *reinterpret_cast<uint32_t *>(out + c) = Elem<T>::pack(o[0] * inv, o[1] * inv);
        *reinterpret_cast<uint32_t *>(out + c + 2) = Elem<T>::pack(o[2] * inv, o[3] * inv);
    }
    if (lane == 0) p.lse[lse_index] = empty ? -INFINITY : (m + log2f(total)) * kLn2;
}

constexpr int kDecodeMaxSplits = 128, kDecodeMaxD = 256;

/* Merges the splits of one (head, query row) of one batch per CTA, weights 2^(lse_s - max).
 * Every warp finds the max and the sum of the weights over all splits (lanes over splits);
 * then warp w sums splits w, w + 4, ... for 4 columns a lane, 8 splits at a time with all
 * their loads (o and lse) issued before any use, and the 4 partial sums meet in shared
 * memory. A row thus costs a few L2 round trips, not one per split, spread over as many SMs
 * as rows. Launched with programmatic stream serialization on sm_90: griddepcontrol.wait
 * holds it until the decode kernel has finished and its records are visible. */
template <typename T>
__global__ void __launch_bounds__(128) attn_decode_combine_kernel(const attention_fwd_params p,
                                                                  int num_splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    constexpr int kPerLane = kDecodeMaxSplits / 32, kWarps = 4, kBatch = 8;
    __shared__ __align__(16) float part[kWarps][kDecodeMaxD];
    const int b = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.x / (int)p.seqlen_q, i = blockIdx.x % (int)p.seqlen_q;
    const Sequence seq(p, b);
    if (i >= seq.sq) return; /* the whole CTA */
    const int d = (int)p.head_dim;
    const int64_t rec = decode_record_floats(d);
    const int64_t lse_index = b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i;
    const float *src = static_cast<const float *>(p.workspace) + lse_index * num_splits * rec;
    float l[kPerLane], m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
        const int s = lane + 32 * k;
        l[k] = s < num_splits ? src[s * rec + rec - 4] : -INFINITY;
        m = fmaxf(m, l[k]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) total += l[k] == -INFINITY ? 0.0f : exp2f(l[k] - m);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);

    for (int c = lane * 4; c < d; c += 128) {
        float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int s0 = warp; s0 < num_splits; s0 += kWarps * kBatch) {
            float4 a[kBatch];
            float ls[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int s = s0 + kWarps * u;
                const bool ok = s < num_splits; /* every record is written (empty: 0, -inf) */
                ls[u] = ok ? src[s * rec + rec - 4] : -INFINITY;
                a[u] = ok ? *reinterpret_cast<const float4 *>(src + s * rec + c)
                          : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const float w = ls[u] == -INFINITY ? 0.0f : exp2f(ls[u] - m);
                o[0] += w * a[u].x, o[1] += w * a[u].y, o[2] += w * a[u].z, o[3] += w * a[u].w;
            }
        }
        *reinterpret_cast<float4 *>(&part[warp][c]) = make_float4(o[0], o[1], o[2], o[3]);
    }
    __syncthreads();
    const bool empty = !(total > 0.0f);
    const float inv = empty ? 0.0f : 1.0f / total;
    T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
             ((int64_t)seq.q_start + i) * p.out_row_stride + h * p.out_head_stride;
    for (int c = threadIdx.x * 2; c < d; c += 2 * 128) {
        float o0 = 0.0f, o1 = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) o0 += part[w][c], o1 += part[w][c + 1];
        *reinterpret_cast<uint32_t *>(out + c) = Elem<T>::pack(o0 * inv, o1 * inv);
    }
    if (threadIdx.x == 0) p.lse[lse_index] = empty ? -INFINITY : (m + log2f(total)) * kLn2;
}

/* The CTAs of the decode grid without its splits: (row groups) x batch x kv heads, 0 where
 * the decode path does not apply (more than 16 query rows). */
__host__ __device__ inline int64_t decode_ctas(int64_t batch, int64_t heads_q, int64_t heads_kv,
                                               int64_t seqlen_q) {
    if (seqlen_q < 1 || seqlen_q > 16 || heads_kv < 1 || batch < 1) return 0;
    const int64_t rows = heads_q / heads_kv * seqlen_q;
    return batch * heads_kv * ((rows + kDecodeRows - 1) / kDecodeRows);
}

/* The most splits any GPU may use for these shapes (0: no decode path), a pure function of
 * them: csrc/attention.c sizes the workspace with it (attention_cuda_forward_workspace_bytes).
 * At most one split per key block, kDecodeMaxSplits, and enough CTAs for 1024 slots. */
__host__ __device__ inline int decode_max_splits(int64_t batch, int64_t heads_q,
                                                 int64_t heads_kv, int64_t seqlen_q,
                                                 int64_t seqlen_k) {
    const int64_t ctas = decode_ctas(batch, heads_q, heads_kv, seqlen_q);
    if (ctas == 0) return 0;
    const int64_t blocks = (seqlen_k + kDecodeBN - 1) / kDecodeBN;
    int64_t splits = (1024 + ctas - 1) / ctas;
    splits = splits < blocks ? splits : blocks;
    splits = splits < kDecodeMaxSplits ? splits : kDecodeMaxSplits;
    return splits < 1 ? 1 : (int)splits;
}

/* The previous rule (LUTFLASH_DECODE=old): enough CTAs for two per SM of an H100 (264), at
 * least 2 key blocks per split, at most 128 splits. */
inline int decode_splits_old(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                             int64_t seqlen_k) {
    const int64_t ctas = decode_ctas(batch, heads_q, heads_kv, seqlen_q);
    if (ctas == 0) return 0;
    const int64_t blocks = (seqlen_k + kDecodeBN - 1) / kDecodeBN;
    int64_t splits = (264 + ctas - 1) / ctas;
    splits = splits < (blocks + 1) / 2 ? splits : (blocks + 1) / 2;
    splits = splits < 128 ? splits : 128;
    return splits < 1 ? 1 : (int)splits;
}

/* LUTFLASH_DECODE=waves: splits for a GPU that holds `slots` decode CTAs at once (SM count x
 * occupancy), minimizing waves x (key blocks per split + 2): full waves of 2 CTAs per SM. */
inline int decode_splits_waves(int64_t batch, int64_t heads_q, int64_t heads_kv,
                               int64_t seqlen_q, int64_t seqlen_k, int64_t slots) {
    const int most = decode_max_splits(batch, heads_q, heads_kv, seqlen_q, seqlen_k);
    if (most == 0) return 0;
    const int64_t ctas = decode_ctas(batch, heads_q, heads_kv, seqlen_q);
    const int64_t blocks = (seqlen_k + kDecodeBN - 1) / kDecodeBN;
    const int64_t top = (blocks + 1) / 2 < most ? (blocks + 1) / 2 : most;
    slots = slots > 0 ? slots : 1;
    int best = 1;
    int64_t best_cost = INT64_MAX;
    for (int64_t s = 1; s <= top; ++s) {
        const int64_t waves = (ctas * s + slots - 1) / slots;
        const int64_t cost = waves * ((blocks + s - 1) / s + 2);
        if (cost < best_cost) best_cost = cost, best = (int)s;
    }
    return best;
}

/* Key splits on a GPU of `sms` SMs: one CTA per SM (rounded down, or up where rounding down
 * would leave over a quarter of the SMs idle), each split at least kDecodeMinSplitBlocks key
 * blocks. Measured on an H100 (benchmarks/NOTES_attention_cuda.md,
 * forced split counts): one CTA per SM, with 64 KB of K/V in flight at d = 128, streams at the
 * rate of two, and every extra split costs a CTA prologue/epilogue and combine work; short
 * splits lose to their fixed cost (B = 1, Sk = 1k: 4 splits of 4 blocks beat 8 of 2). */
constexpr int kDecodeMinSplitBlocks = 4;
inline int decode_splits(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                         int64_t seqlen_k, int64_t sms) {
    const int most = decode_max_splits(batch, heads_q, heads_kv, seqlen_q, seqlen_k);
    if (most == 0) return 0;
    const int64_t ctas = decode_ctas(batch, heads_q, heads_kv, seqlen_q);
    const int64_t blocks = (seqlen_k + kDecodeBN - 1) / kDecodeBN;
    int64_t splits = sms / ctas;
    if (4 * ctas * splits < 3 * sms) splits += 1;
    const int64_t longest = (blocks + kDecodeMinSplitBlocks - 1) / kDecodeMinSplitBlocks;
    splits = splits < longest ? splits : longest;
    splits = splits < most ? splits : most;
    return splits < 1 ? 1 : (int)splits;
}

/* Per device, once: the SM count, decode CTAs resident at once (SM count x occupancy of
 * attn_decode_kernel) and whether programmatic dependent launch is there (compute capability
 * 9.0+). Host queries only, so CUDA-graph capture is unaffected. */
struct DecodeDevice {
    int sms, slots, pdl;
};
template <int kD, typename T> DecodeDevice decode_device() {
    static DecodeDevice cache[64];
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64)
        return DecodeDevice{132, 264, 0};
    if (cache[device].slots == 0) {
        using Cfg = DecodeConfig<kD>;
        int sms = 0, major = 0, per_sm = 0;
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        auto kernel = attn_decode_kernel<kD, T>;
        if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 Cfg::kSmemBytes) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads,
                                                          Cfg::kSmemBytes) != cudaSuccess)
            per_sm = 0;
        cudaGetLastError(); /* a failed query is not sticky; fall back below */
        sms = sms > 0 ? sms : 132;
        cache[device] = DecodeDevice{sms, sms * (per_sm > 0 ? per_sm : 1), major >= 9 ? 1 : 0};
    }
    return cache[device];
}

template <int kD, typename T> cudaError_t run_attn_decode(const attention_fwd_params &p,
                                                          int splits, bool serial, bool pdl,
                                                          cudaStream_t stream) {
    using Cfg = DecodeConfig<kD>;
    auto kernel = attn_decode_kernel<kD, T>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    const int64_t rows = p.heads_q / p.heads_kv * p.seqlen_q;
    const dim3 grid((unsigned)((rows + kDecodeRows - 1) / kDecodeRows * splits),
                    (unsigned)p.batch, (unsigned)p.heads_kv);
    kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, splits);
    err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    if (serial) {
        const dim3 cgrid((unsigned)((p.seqlen_q + 3) / 4), (unsigned)p.batch,
                         (unsigned)p.heads_q);
        attn_decode_combine_serial_kernel<T><<<cgrid, 128, 0, stream>>>(p, splits);
        return cudaGetLastError();
    }
    /* one CTA per (head, query row) of a batch */
    const dim3 cgrid((unsigned)(p.heads_q * p.seqlen_q), (unsigned)p.batch, 1);
    if (pdl) {
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cudaLaunchConfig_t config = {};
        config.gridDim = cgrid, config.blockDim = dim3(128), config.dynamicSmemBytes = 0;
        config.stream = stream, config.attrs = attr, config.numAttrs = 1;
        return cudaLaunchKernelEx(&config, attn_decode_combine_kernel<T>, p, splits);
    }
    attn_decode_combine_kernel<T><<<cgrid, 128, 0, stream>>>(p, splits);
    return cudaGetLastError();
}

/* The forward: the decode path for up to 16 query rows with plain scores (auto, variant 0,
 * when the workspace holds its records), else the tiled kernel. */
template <int kD, typename T> cudaError_t run_attn_fwd(const attention_fwd_params &p,
                                                       cudaStream_t stream) {
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f;
    const int most = decode_max_splits(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k);
    if (!extras && p.variant == 0 && most > 0 && p.seqlen_k > 0) {
        const char *mode = getenv("LUTFLASH_DECODE"), *forced = getenv("LUTFLASH_DECODE_SPLITS");
        const bool old = mode && !strcmp(mode, "old");
        const bool serial = old || (mode && !strcmp(mode, "serial"));
        const DecodeDevice dev = decode_device<kD, T>();
        const bool pdl = dev.pdl && !serial && !(mode && !strcmp(mode, "nopdl"));
        int splits =
            old ? decode_splits_old(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k)
            : mode && !strcmp(mode, "waves")
                ? decode_splits_waves(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k,
                                      dev.slots)
                : decode_splits(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, dev.sms);
        if (forced && atoi(forced) > 0) splits = atoi(forced);
        splits = splits < most ? splits : most;
        /* the largest lse index + 1: lse is (B, Hq, Sq) or (Hq, total_q), contiguous */
        const int64_t rows = p.cu_seqlens_q ? p.heads_q * p.lse_head_stride
                                            : p.batch * p.lse_batch_stride;
        const int64_t need =
            splits == 1 ? 0 : rows * splits * decode_record_floats(p.head_dim) * 4;
        if (p.workspace_bytes >= need)
            return run_attn_decode<kD, T>(p, splits, serial, pdl, stream);
    }
    return run_attn_fwd_tiles<kD, T>(p, stream);
}

/* ---------------------------------------------------------------------------------------- */
/* Backward.                                                                                 */

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
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    /* K, V of this key block; the query blocks that see one of its keys, for each query head
     * of the group, are the stages of the loop below. */
    KeyBlockQueries<kBL, kD, kThreads, T> queries(bp, seq, b, kv_head);
    queries.template load_keys<kBN>(k_tile, v_tile, j0, keys);
    const int total = queries.total;
    auto load_stage = [&](int it, int stage) {
        queries.load(it, q_tiles + stage * Cfg::kTileQ, do_tiles + stage * Cfg::kTileQ,
                     s_lse + stage * kBL, s_delta + stage * kBL);
    };
    if (total > 0) load_stage(0, 0);
    cp_async_commit();

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
        const int stage = it & 1;
        if (it + 1 < total) load_stage(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const int h = queries.head(it), i0 = queries.row0(it);
        const uint32_t q_tile = q_tiles + stage * Cfg::kTileQ;
        const uint32_t do_tile = do_tiles + stage * Cfg::kTileQ;
        const float *lse = s_lse + stage * kBL, *delta = s_delta + stage * kBL;

        /* S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kBL queries. */
        float st[1][kLT][4], dpt[1][kLT][4];
#pragma unroll
        for (int lt = 0; lt < kLT; ++lt)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[0][lt][e] = dpt[0][lt][e] = 0.0f;
        gemm_abt<kD, 1, kLT, T>(st, k_tile, key_row0, q_tile, 0, lane);
        gemm_abt<kD, 1, kLT, T>(dpt, v_tile, key_row0, do_tile, 0, lane);

        const bool masked = !seq.full(i0, kBL, j0, kBN);
        const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
        const uint32_t batch_head = (uint32_t)(b * p.heads_q + h);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int j = j0 + key_row0 + g + hr * 8;
            /* queries that see key j, relative to i0 */
            const int lo = (j < seq.sk ? seq.q_first(j) : 1) - i0;
            const int hi = (j < seq.sk ? seq.q_last(j) : 0) - i0;
#pragma unroll
            for (int lt = 0; lt < kLT; ++lt)
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
                    dpt[0][lt][2 * hr + e] = ds;
                    st[0][lt][2 * hr + e] = prob_dropped;
                }
        }

        /* dV += P^T dO, dK += dS^T Q over this CTA's column range. */
        gemm_pb<kD, 1, kLT, kOT, T>(dv, st, do_tile, d_off, lane);
        gemm_pb<kD, 1, kLT, kOT, T>(dk, dpt, q_tile, d_off, lane);
        __syncthreads(); /* the next iteration's load overwrites this stage */
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
                Elem<T>::pack(dk[0][ot][2 * hr], dk[0][ot][2 * hr + 1]);
            *reinterpret_cast<uint32_t *>(sV + r * kPitch + ot * 8 + 2 * t) =
                Elem<T>::pack(dv[0][ot][2 * hr], dv[0][ot][2 * hr + 1]);
        }
    }
    __syncthreads();
    const int64_t row = (int64_t)seq.k_start + j0;
    const int width = min(kDO, d - d_off);
    T *dk_out = static_cast<T *>(bp.dk) + b * bp.dk_batch_stride + row * bp.dk_row_stride +
                kv_head * bp.dk_head_stride + d_off;
    T *dv_out = static_cast<T *>(bp.dv) + b * bp.dv_batch_stride + row * bp.dv_row_stride +
                kv_head * bp.dv_head_stride + d_off;
    store_tile<kBN, kDO, kPitch, kThreads>(dk_out, bp.dk_row_stride, sK, keys, width);
    store_tile<kBN, kDO, kPitch, kThreads>(dv_out, bp.dv_row_stride, sV, keys, width);
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

    load_tile<kBM, kD, kThreads>(q_tile,
                                 static_cast<const T *>(p.q) + b * p.q_batch_stride +
                                     row * p.q_row_stride + h * p.q_head_stride,
                                 p.q_row_stride, rows, d);
    load_tile<kBM, kD, kThreads>(do_tile,
                                 static_cast<const T *>(bp.dout) + b * bp.dout_batch_stride +
                                     row * bp.dout_row_stride + h * bp.dout_head_stride,
                                 bp.dout_row_stride, rows, d);
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
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[0][nt][e] = dp[0][nt][e] = 0.0f;
        gemm_abt<kD, 1, kNT, T>(s, q_tile, row0, k_tile, 0, lane);
        gemm_abt<kD, 1, kNT, T>(dp, do_tile, row0, v_tile, 0, lane);

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
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = row0 + g + hr * 8;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt)
            *reinterpret_cast<uint32_t *>(sQ + r * kPitch + dt * 8 + 2 * t) =
                Elem<T>::pack(dq[0][dt][2 * hr], dq[0][dt][2 * hr + 1]);
    }
    __syncthreads();
    T *dq_out = static_cast<T *>(bp.dq) + b * bp.dq_batch_stride + row * bp.dq_row_stride +
                h * bp.dq_head_stride;
    store_tile<kBM, kD, kPitch, kThreads>(dq_out, bp.dq_row_stride, sQ, rows, d);
}

/* ---------------------------------------------------------------------------------------- */
/* Fast backward (deterministic = 0): FA2's single pass with float32 dQ atomics.            */

/* Rows of the float32 dQ accumulator (fwd.workspace, [rows][heads_q][head_dim]): query row
 * i of sequence b is row b * Sq + i (dense) or q_start + i (varlen). */
inline int64_t bwd_dq_accum_rows(const attention_fwd_params &p) {
    return p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q;
}
inline int64_t bwd_dq_accum_bytes(const attention_fwd_params &p) {
    return bwd_dq_accum_rows(p) * p.heads_q * p.head_dim * 4;
}
/* LUTFLASH_ATTN_BWD_TILE (unset: 0) picks an alternative tile shape of the fused pass. */
inline int bwd_tile_switch() {
    const char *value = getenv("LUTFLASH_ATTN_BWD_TILE");
    return value ? atoi(value) : 0;
}

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

/* dst[0..1] += (x, y) in global memory, no return value (RED). */
__device__ __forceinline__ void red_add2(float *dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

/* C[16 x 8*kNTiles] += A x B with A given as packed T fragments a[ks] of kKSteps k16 steps
 * and B stored [k][n] in b_tile (columns 0..), through ldmatrix.trans. */
template <int kD, int kKSteps, int kNTiles, typename T>
__device__ __forceinline__ void gemm_a_packed(float (&c)[kNTiles][4],
                                              const uint32_t (&a)[kKSteps][4], uint32_t b_tile,
                                              int lane) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks)
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldsm_x4_trans(b, bt_frag_addr<kD>(b_tile, ks * 16, np * 16, lane));
            Elem<T>::mma(c[2 * np], a[ks], b[0], b[1]);
            Elem<T>::mma(c[2 * np + 1], a[ks], b[2], b[3]);
        }
}

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
                pf[lt / 2][hr + 2 * (lt & 1)] = Elem<T>::pack(pv[0], pv[1]);
                dsf[lt / 2][hr + 2 * (lt & 1)] = Elem<T>::pack(dsv[0], dsv[1]);
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
            ldsm_x4_trans(a, ds_tile + (uint32_t)((ks * 16 + (lane >> 4) * 8 + (lane & 7)) *
                                                      kDsPitch +
                                                  dq_row0 + ((lane >> 3) & 1) * 8) * 2);
#pragma unroll
            for (int np = 0; np < kQT / 2; ++np) {
                uint32_t bb[4];
                ldsm_x4_trans(bb, bt_frag_addr<kD>(k_tile, ks * 16, dq_col0 + np * 16, lane));
                Elem<T>::mma(dq[2 * np], a, bb[0], bb[1]);
                Elem<T>::mma(dq[2 * np + 1], a, bb[2], bb[3]);
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
                    red_add2(dst + qt * 8, dq[qt][2 * hr], dq[qt][2 * hr + 1]);
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
                Elem<T>::pack(dk[ot][2 * hr], dk[ot][2 * hr + 1]);
            *reinterpret_cast<uint32_t *>(sV + r * kPitch + ot * 8 + 2 * t) =
                Elem<T>::pack(dv[ot][2 * hr], dv[ot][2 * hr + 1]);
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
    out.x = Elem<T>::pack(lo.x, lo.y);
    out.y = Elem<T>::pack(lo.z, lo.w);
    out.z = Elem<T>::pack(hi.x, hi.y);
    out.w = Elem<T>::pack(hi.z, hi.w);
    *reinterpret_cast<uint4 *>(dst) = out;
}

template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem_bytes,
                             cudaStream_t stream, const attention_bwd_params &bp) {
    if (grid.x == 0) return cudaSuccess;
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) return err;
    kernel<<<grid, threads, smem_bytes, stream>>>(bp);
    return cudaGetLastError();
}

/* The backward of one padded head dim and dtype (delta was computed before). */
/* The fast backward (delta was computed before): zero the accumulator, one fused pass,
 * convert dQ. */
template <int kD, int kBM, typename T>
cudaError_t run_attn_bwd_fused(const attention_bwd_params &bp, cudaStream_t stream) {
    const attention_fwd_params &p = bp.fwd;
    constexpr int kBN = 128;
    using Cfg = BwdFusedConfig<kD, kBN, kBM>;
    const int64_t rows = bwd_dq_accum_rows(p);
    cudaError_t err = cudaMemsetAsync(p.workspace, 0, (size_t)bwd_dq_accum_bytes(p), stream);
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)((p.seqlen_k + kBN - 1) / kBN), (unsigned)p.batch,
                    (unsigned)p.heads_kv);
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f;
    err = extras ? launch_with_smem(attn_bwd_fused_kernel<kD, kBN, kBM, T, true>, grid,
                                    Cfg::kThreads, Cfg::kSmemBytes, stream, bp)
                 : launch_with_smem(attn_bwd_fused_kernel<kD, kBN, kBM, T, false>, grid,
                                    Cfg::kThreads, Cfg::kSmemBytes, stream, bp);
    if (err != cudaSuccess) return err;
    const int64_t threads = rows * p.heads_q * (p.head_dim / 8);
    if (threads == 0) return cudaSuccess;
    attn_bwd_dq_convert_kernel<T>
        <<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(bp, rows);
    return cudaGetLastError();
}

/* The backward of one padded head dim and dtype (delta was computed before): the fast pass
 * unless the caller asked for determinism (or gave no accumulator); head dim 256 always takes
 * the deterministic passes (the fused kernel's accumulators would not fit in registers). */
template <int kD, typename T> cudaError_t run_attn_bwd(const attention_bwd_params &bp,
                                                       cudaStream_t stream) {
    const attention_fwd_params &p = bp.fwd;
    if constexpr (kD <= 128) {
        const int64_t need = bwd_dq_accum_bytes(p);
        if (!bp.deterministic && need > 0 && p.workspace != nullptr && p.workspace_bytes >= need) {
            /* Query block of the fused pass: 32 rows at head dim 64 (two CTAs per SM), else 64
             * (H100, benchmarks/NOTES_attention_cuda.md). LUTFLASH_ATTN_BWD_TILE=1 swaps 32
             * and 64 at head dims 64 and 128: a tuning switch for bench_attention_bwd.py. */
            constexpr int kBM = kD == 64 ? 32 : 64, kOtherBM = kBM == 32 ? 64 : 32;
            if constexpr (kD == 64 || kD == 128)
                if (bwd_tile_switch() == 1) return run_attn_bwd_fused<kD, kOtherBM, T>(bp, stream);
            return run_attn_bwd_fused<kD, kBM, T>(bp, stream);
        }
    }
    constexpr int kBN = 64, kBL = kD <= 128 ? 64 : 32, kSplit = kD <= 128 ? 1 : 2;
    using KV = BwdKVConfig<kD, kBN, kBL, kSplit>;
    const dim3 kv_grid((unsigned)((p.seqlen_k + kBN - 1) / kBN * kSplit), (unsigned)p.batch,
                       (unsigned)p.heads_kv);
    cudaError_t err = launch_with_smem(attn_bwd_dkdv_kernel<kD, kBN, kBL, kSplit, T>, kv_grid,
                                       KV::kThreads, KV::kSmemBytes, stream, bp);
    if (err != cudaSuccess) return err;
    constexpr int kBM = 64, kBK = kD <= 128 ? 64 : 32;
    using Q = BwdQConfig<kD, kBM, kBK>;
    const dim3 q_grid((unsigned)((p.seqlen_q + kBM - 1) / kBM), (unsigned)p.batch,
                      (unsigned)p.heads_q);
    return launch_with_smem(attn_bwd_dq_kernel<kD, kBM, kBK, T>, q_grid, Q::kThreads,
                            Q::kSmemBytes, stream, bp);
}

}  // namespace attn
