/* PTX-level primitives shared by every lutflash kernel: shared-memory addresses, cp.async,
 * ldmatrix, the m16n8k16 tensor-core product for fp16/bf16, packed pairs of 16-bit floats and
 * vector atomics. Header-only; everything is in namespace lf. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace lf {

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 (or 4) bytes global -> shared, asynchronous; !valid zero-fills and reads nothing. */
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    cp_async16(smem_addr(dst), src, valid);
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
/* Waits until at most N of this thread's committed groups are pending (its own copies only:
 * a barrier is still needed before other threads read what they wrote). */
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Four 8x8 b16 matrices from shared memory (lane l gives the row address of matrix l / 8). */
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *smem) {
    ldmatrix_x4(r, smem_addr(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* A pair of 16-bit floats of type T (__half or __nv_bfloat16) in one 32-bit register: T2 is
 * the CUDA vector type. */
__device__ __forceinline__ __half2 round_pair(float lo, float hi, __half) {
    return __floats2half2_rn(lo, hi);
}
__device__ __forceinline__ __nv_bfloat162 round_pair(float lo, float hi, __nv_bfloat16) {
    return __floats2bfloat162_rn(lo, hi);
}
__device__ __forceinline__ uint16_t round_bits(float v, __half) {
    return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ uint16_t round_bits(float v, __nv_bfloat16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <typename T> struct Pair {
    using T2 = std::conditional_t<std::is_same<T, __half>::value, __half2, __nv_bfloat162>;
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        T2 h = round_pair(lo, hi, T());
        return *reinterpret_cast<uint32_t *>(&h);
    }
    /* v rounded to T in both halves */
    static __device__ __forceinline__ uint32_t broadcast(float v) {
        return (uint32_t)round_bits(v, T()) * 0x10001u;
    }
};

/* c += a · b on tensor cores: m16n8k16, A row-major (4 registers), B column-major (2), fp32
 * accumulators, inputs of type T (__half or __nv_bfloat16). */
#define LF_MMA_M16N8K16(TYPE)                                                                  \
    "mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0,%1,%2,%3}, "             \
    "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value)
        asm(LF_MMA_M16N8K16("f16")
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm(LF_MMA_M16N8K16("bf16")
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#undef LF_MMA_M16N8K16

/* dst[0..1] (8-byte aligned) += (x, y) and dst[0..3] (16-byte aligned) += v in global memory;
 * one vector atomic on compute capability 9.x, scalar ones before. */
__device__ __forceinline__ void atomic_add2(float *dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(x, y));
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}
__device__ __forceinline__ void atomic_add4(float *dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4 *>(dst), v);
#else
    atomicAdd(dst, v.x), atomicAdd(dst + 1, v.y), atomicAdd(dst + 2, v.z), atomicAdd(dst + 3, v.w);
#endif
}

}  // namespace lf
