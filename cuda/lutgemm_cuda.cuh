/* Shared by the LUT-GEMM CUDA files: the kernels' arguments, device helpers, launchers.
 * lutgemm_decode.cu (m ≤ 8, bits ≤ 4: tables of partial sums, the decode GEMV),
 * lutgemm_lut.cu (the general table kernel: fp32 x at any m, bits 5..8 at small m),
 * lutgemm_mma.cu (prefill: tensor cores), lutgemm_cuda.cu (the plan and the C entry points). */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lutflash_cuda.h"

constexpr int LUT_THREADS = 256;
constexpr int LUT_ROWS = LUT_THREADS * 4;   // weight rows per block
constexpr int LUT_M_TILE = 4;               // activation rows per block (gridDim.z tiles)
constexpr int LUT_MAX_CHUNK = 8;            // words of k whose tables are built at once
constexpr int LUT_SMEM_LIMIT = 48 * 1024;   // stay under the default dynamic smem limit

struct LutArgs {
    const void *x;
    int64_t ldx;
    const uint32_t *planes;
    const void *meta;
    const void *bias;
    void *out;
    int64_t ldo;
    float *acc;          // (m, n_pad) fp32 partial sums when split, else unused
    unsigned *counters;  // one per (m tile, row block) when split
    int64_t m, n, n_pad, k;
    int words, words_per_split, chunk;
    int group_size;
    int nm;              // metadata entries per (row, group): bcq_meta_per_group
    int mode, x_type, meta_type;
    int sm_count;
};

/* Bytes of shared memory per activation row for a chunk of `chunk` words: x, tables, Σx. */
__host__ __device__ constexpr int lut_smem_per_row(int chunk) {
    return chunk * (32 + 4 * 256 + 1) * (int)sizeof(float);
}

/* The tensor-core kernel (lutgemm_mma.cu): CTA tiles of BM activation rows × MMA_BN weight
 * rows, a ring of MMA_STAGES stages of MMA_WORDS words of k (3 stages for bits > 4, whose
 * larger stages would not fit 4 in an A100's shared memory). */
constexpr int MMA_BN = 256;
constexpr int MMA_WORDS = 2;   // BK = 64
constexpr int MMA_STAGES = 4;

struct MmaArgs {
    const uint16_t *xp;  // (m_pad, k_pad), permuted
    const uint32_t *planes;
    const void *meta;
    const void *bias;
    void *out;
    int64_t ldo;
    float *acc;
    unsigned *counters;
    int64_t m, n, n_pad, k_pad;
    int words, words_per_split;
    int bits, group_size, mode, meta_type;
};

/* out (or the split-k workspace) for one launch of the general table kernel; `bits` and the
 * metadata type pick the kernel instance. */
cudaError_t lutgemm_lut_launch(int bits, const LutArgs &a, dim3 grid, cudaStream_t stream);
/* m ≤ DECODE_MAX_M, bits ≤ 4 (lutgemm_decode.cu): activation rows in tiles of
 * lutgemm_decode_rows(m) (gridDim.z), k in slabs of 512 (m = 1) or 256 words, split over
 * gridDim.y when > 1. */
constexpr int64_t DECODE_MAX_M = 8;
int lutgemm_decode_rows(int64_t m);
int64_t lutgemm_decode_slabs(int64_t m, int64_t words);
cudaError_t lutgemm_decode_launch(int bits, const LutArgs &a, cudaStream_t stream);
/* The tensor-core kernel, BM ∈ {16, 64, 128}. With blocks_per_sm non-null it launches nothing
 * and stores how many blocks of that instance fit on one SM. */
cudaError_t lutgemm_mma_launch(int x_type, int bm, const MmaArgs &a, dim3 grid,
                               cudaStream_t stream, int *blocks_per_sm);
/* x copied to xp with each word's columns permuted for the tensor-core kernel, and
 * zero_bytes (a multiple of 16) at `zero` (the split-k workspace) zeroed: one launch. */
cudaError_t lutgemm_permute_x(const void *x, int64_t ldx, uint16_t *xp, int64_t m, int64_t m_pad,
                              int64_t k, int64_t k_pad, void *zero, int64_t zero_bytes,
                              cudaStream_t stream);

#ifdef __CUDACC__
__device__ __forceinline__ float load_scalar(const void *base, int64_t i, int type) {
    if (type == LF_SCALAR_F16) return __half2float(((const __half *)base)[i]);
    if (type == LF_SCALAR_BF16) return __bfloat162float(((const __nv_bfloat16 *)base)[i]);
    return ((const float *)base)[i];
}

__device__ __forceinline__ void store_scalar(void *base, int64_t i, int type, float v) {
    if (type == LF_SCALAR_F16) ((__half *)base)[i] = __float2half_rn(v);
    else if (type == LF_SCALAR_BF16) ((__nv_bfloat16 *)base)[i] = __float2bfloat16_rn(v);
    else ((float *)base)[i] = v;
}

/* After this block's atomics: true in the one block of the tile that arrives last. */
__device__ __forceinline__ bool last_block_of_tile(unsigned *counter, unsigned blocks) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == blocks - 1;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

#endif
