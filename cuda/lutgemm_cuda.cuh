/* Shared by the LUT-GEMM CUDA files: the kernels' arguments, device helpers, launchers.
 * lutgemm_lut.cu (decode: tables of partial sums), lutgemm_mma.cu (prefill: tensor cores),
 * lutgemm_cuda.cu (the plan and the C entry points). */
#ifndef LUTFLASH_LUTGEMM_CUDA_CUH
#define LUTFLASH_LUTGEMM_CUDA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lutflash_cuda.h"

constexpr int LUT_THREADS = 256;
constexpr int LUT_ROWS = LUT_THREADS * 4;   // weight rows per block
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
    int group_size, nm, mode, x_type, meta_type;
    int sm_count;
    int flags;           // lutgemm_lut1.cu: experiment knobs (LUT1_NOALLOC, ...), 0 by default
};

/* Bytes of shared memory per activation row for a chunk of `chunk` words: x, tables, Σx. */
__host__ __device__ constexpr int lut_smem_per_row(int chunk) {
    return chunk * (32 + 4 * 256 + 1) * (int)sizeof(float);
}

constexpr int MMA_BN = 128;    // weight rows per block: 4 warps × 32
constexpr int MMA_WORDS = 2;   // words of k per pipeline stage (BK = 64)
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
    int bits, group_size, nm, mode, meta_type;
};

/* Shared memory of one pipeline stage: x tile, plane words, raw metadata of ≤ 2 groups. */
struct MmaStage {
    int x_bytes, plane_bytes, meta_bytes;
    __host__ __device__ MmaStage(int bm, int bits, int nm, int meta_size)
        : x_bytes(bm * 32 * MMA_WORDS * 2), plane_bytes(MMA_WORDS * bits * MMA_BN * 4),
          meta_bytes(MMA_WORDS * nm * MMA_BN * meta_size) {}
    __host__ __device__ int bytes() const { return x_bytes + plane_bytes + meta_bytes; }
};

__host__ __device__ inline int mma_smem_bytes(int bm, int bits, int nm, int meta_size) {
    // + converted metadata: per word slot, (α_0..α_{q-1}, scale, z) as broadcast pairs
    return MMA_STAGES * MmaStage(bm, bits, nm, meta_size).bytes() +
           MMA_WORDS * (bits + 2) * MMA_BN * 4;
}

/* out (or the split-k workspace) for one launch; `bits`, `m_tile` and the metadata type pick
 * the kernel instance. */
cudaError_t lutgemm_lut_launch(int bits, int m_tile, const LutArgs &a, dim3 grid,
                               cudaStream_t stream);
/* m ≤ LUT1_MAX_M, bits ≤ 4 (lutgemm_lut1.cu): activation rows in tiles of lutgemm_lut1_rows(m)
 * (gridDim.z), k in slabs of 512 (m = 1) or 256 words, split over gridDim.y when > 1. */
constexpr int64_t LUT1_MAX_M = 8;
int lutgemm_lut1_rows(int64_t m);
int64_t lutgemm_lut1_slabs(int64_t m, int64_t words);
cudaError_t lutgemm_lut1_launch(int bits, const LutArgs &a, cudaStream_t stream);
cudaError_t lutgemm_mma_launch(int x_type, int bm, const MmaArgs &a, dim3 grid,
                               cudaStream_t stream);
cudaError_t lutgemm_permute_x(const void *x, int64_t ldx, uint16_t *xp, int64_t m, int64_t m_pad,
                              int64_t k, int64_t k_pad, cudaStream_t stream);

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

__device__ __forceinline__ void atomic_add4(float *p, float4 v) {
#if __CUDA_ARCH__ >= 900
    atomicAdd((float4 *)p, v);  // vector atomics exist on compute capability 9.x only
#else
    atomicAdd(p, v.x), atomicAdd(p + 1, v.y), atomicAdd(p + 2, v.z), atomicAdd(p + 3, v.w);
#endif
}

__device__ __forceinline__ void atomic_add2(float *p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd((float2 *)p, make_float2(a, b));
#else
    atomicAdd(p, a), atomicAdd(p + 1, b);
#endif
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

#endif
