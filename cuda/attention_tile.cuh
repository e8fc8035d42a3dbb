/* Tiles of the attention kernels (mma.sync m16n8k16, ldmatrix, cp.async; cuda/ptx.cuh):
 * cooperative loads and stores of [rows][kD + 8] shared-memory tiles, fragment addresses and
 * the warp-level products QK^T-shaped (gemm_abt), PV-shaped (gemm_pb) and with packed A
 * fragments (gemm_a_packed).
 *
 * Head dims are padded up to kD in {32, 64, 96, 128, 256}: columns past d are zero-filled by
 * cp.async and never stored; d must be a multiple of 8 and every row 16-byte aligned
 * (csrc/attention.c checks, python/lutflash/attention.py pads). The 16-byte pad of a tile row
 * makes consecutive rows start 8 banks apart modulo 32 for every kD here, so ldmatrix phases
 * (8 rows x 16 bytes) are conflict-free. */
#pragma once

#include <stdint.h>

#include "ptx.cuh"

namespace attn {

using namespace lf;

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

/* load_tile for the K/V rows j0 .. j0 + kRows - 1 of `rows` (attention_mask.cuh's KvRows):
 * one running pointer for contiguous rows, each row's own address for paged ones. */
template <int kRows, int kD, int kThreads, typename Rows, typename Params>
__device__ __forceinline__ void load_kv_tile(uint32_t dst, const Rows &rows, const Params &p,
                                             int j0, int valid, int d) {
    if (!rows.paged()) {
        load_tile<kRows, kD, kThreads>(dst, rows.base + j0 * rows.stride(p), rows.stride(p),
                                       valid, d);
        return;
    }
    if constexpr (Rows::kMayPage) {
        constexpr int kChunks = Tile<kD>::kChunks, kStep = kThreads / kChunks;
        const int r0 = (int)threadIdx.x / kChunks, c = (int)threadIdx.x % kChunks;
        if (r0 >= kStep) return;
        const bool col_ok = c * 8 < d;
        const uint32_t to = dst + (uint32_t)(r0 * Tile<kD>::kPitch + c * 8) * 2;
#pragma unroll
        for (int it = 0; it < (kRows + kStep - 1) / kStep; ++it) {
            const int r = r0 + it * kStep;
            if (kRows % kStep == 0 || r < kRows) {
                const bool ok = col_ok && r < valid;
                const auto *src = ok ? rows.row(p, j0 + r) + c * 8 : rows.base;
                cp_async16(to + it * kStep * Tile<kD>::kPitch * 2, src, ok);
            }
        }
    }
}

/* load_kv_tile for paged rows whose (page, row in the page) were staged in shared memory
 * ahead of time (at[r] for row j0 + r, KvRows::page_of): the copies wait on no block-table
 * read and do no division. */
template <int kRows, int kD, int kThreads, typename Rows, typename Params>
__device__ __forceinline__ void load_paged_tile(uint32_t dst, const Rows &rows, const Params &p,
                                                const int2 *at, int valid, int d) {
    constexpr int kChunks = Tile<kD>::kChunks, kStep = kThreads / kChunks;
    const int r0 = (int)threadIdx.x / kChunks, c = (int)threadIdx.x % kChunks;
    if (r0 >= kStep) return;
    const bool col_ok = c * 8 < d;
    const uint32_t to = dst + (uint32_t)(r0 * Tile<kD>::kPitch + c * 8) * 2;
#pragma unroll
    for (int it = 0; it < (kRows + kStep - 1) / kStep; ++it) {
        const int r = r0 + it * kStep;
        if (kRows % kStep == 0 || r < kRows) {
            const bool ok = col_ok && r < valid;
            const auto *src = ok ? rows.row_at(p, at[r]) + c * 8 : rows.base;
            cp_async16(to + it * kStep * Tile<kD>::kPitch * 2, src, ok);
        }
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
            ldmatrix_x4(a[sl], a_frag_addr<kD>(a_tile, a_row0 + sl * 16, ks * 16, lane));
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4(b, b_frag_addr<kD>(b_tile, n0 + np * 16, ks * 16, lane));
#pragma unroll
            for (int sl = 0; sl < kSlabs; ++sl) {
                mma_m16n8k16<T>(c[sl][2 * np], a[sl], b[0], b[1]);
                mma_m16n8k16<T>(c[sl][2 * np + 1], a[sl], b[2], b[3]);
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
            a[sl][0] = Pair<T>::pack(pm[sl][2 * ks][0], pm[sl][2 * ks][1]);
            a[sl][1] = Pair<T>::pack(pm[sl][2 * ks][2], pm[sl][2 * ks][3]);
            a[sl][2] = Pair<T>::pack(pm[sl][2 * ks + 1][0], pm[sl][2 * ks + 1][1]);
            a[sl][3] = Pair<T>::pack(pm[sl][2 * ks + 1][2], pm[sl][2 * ks + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < kNTiles / 2; ++np) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, bt_frag_addr<kD>(b_tile, ks * 16, n0 + np * 16, lane));
#pragma unroll
            for (int sl = 0; sl < kSlabs; ++sl) {
                mma_m16n8k16<T>(c[sl][2 * np], a[sl], b[0], b[1]);
                mma_m16n8k16<T>(c[sl][2 * np + 1], a[sl], b[2], b[3]);
            }
        }
    }
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
            ldmatrix_x4_trans(b, bt_frag_addr<kD>(b_tile, ks * 16, np * 16, lane));
            mma_m16n8k16<T>(c[2 * np], a[ks], b[0], b[1]);
            mma_m16n8k16<T>(c[2 * np + 1], a[ks], b[2], b[3]);
        }
}

}  // namespace attn
