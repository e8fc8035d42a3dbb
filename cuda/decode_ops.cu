/* The row-wise ops around the projections of a decoder step: RMSNorm (with the residual add
 * before it), SiLU·mul of a fused gate/up output, and the rotary embedding of q and k. A
 * decode step runs each once or twice per layer on a few rows, so each is one small launch
 * that replaces several of torch's (the add and the norm; silu and mul; neg, cat, two muls and
 * an add), and each is launched overlapped (lf::launch_overlapped): it lets the next kernel
 * (a lutgemm decode kernel prefetching its weights) launch at once, then waits for the one
 * before it. Arithmetic in fp32; results rounded to the rows' dtype where torch's composition
 * rounds, so that a model gives what its own torch code gives up to the reduction order. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device.cuh"
#include "lutflash_cuda.h"
#include "ptx.cuh"

namespace {

template <typename T> __device__ __forceinline__ float to_float(T v) { return (float)v; }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
    return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v) { return v; }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
}
/* v rounded to T and back: what a torch op on T tensors stores. */
template <typename T> __device__ __forceinline__ float rounded(float v) {
    return to_float(from_float<T>(v));
}

constexpr int NORM_THREADS = 256;
constexpr int ELEMENTWISE_THREADS = 256;
constexpr int64_t MAX_GRID_Y = 65535;

/* One block per row. h = x (+ residual, rounded: torch's add), written to sum; then
 * out = rounded(h · rsqrt(mean(h²) + eps)) · weight, rounded (Llama's RMSNorm: the normalized
 * row cast to the dtype, then multiplied by the weight). */
template <typename T, bool RESIDUAL>
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_kernel(rms_norm_params p) {
    lf::allow_next_grid();
    lf::wait_prior_grid();
    const int64_t row = blockIdx.x;
    const T *x = (const T *)p.x + row * p.ldx;
    const T *r = (const T *)p.residual + row * p.ldr;
    const T *w = (const T *)p.weight;
    T *sum = (T *)p.sum + row * p.hidden;
    T *out = (T *)p.out + row * p.hidden;
    float squares = 0.0f;
    for (int64_t j = threadIdx.x; j < p.hidden; j += NORM_THREADS) {
        float v = to_float(x[j]);
        if constexpr (RESIDUAL) {
            v = rounded<T>(v + to_float(r[j]));
            sum[j] = from_float<T>(v);
        }
        squares += v * v;
    }
    __shared__ float partial[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = squares;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) total += partial[i];
    const float inv = rsqrtf(total / (float)p.hidden + p.eps);
    for (int64_t j = threadIdx.x; j < p.hidden; j += NORM_THREADS) {
        // this thread wrote sum[j] above: it reads its own write back
        const float v = RESIDUAL ? to_float(sum[j]) : to_float(x[j]);
        out[j] = from_float<T>(rounded<T>(v * inv) * to_float(w[j]));
    }
}

/* out[r, j] = rounded(silu(gate)) · up, rounded (torch: F.silu(gate) * up). Grid: x over
 * columns, y over rows (strided loop past the grid's limit). */
template <typename T> __global__ void silu_mul_kernel(silu_mul_params p) {
    lf::allow_next_grid();
    lf::wait_prior_grid();
    const int64_t j = (int64_t)blockIdx.x * ELEMENTWISE_THREADS + threadIdx.x;
    if (j >= p.d) return;
    for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
        const T *x = (const T *)p.x + row * p.ldx;
        const float g = to_float(x[j]), u = to_float(x[p.d + j]);
        const float silu = rounded<T>(g / (1.0f + __expf(-g)));
        ((T *)p.out)[row * p.d + j] = from_float<T>(silu * u);
    }
}

/* One thread per pair (j, j + D/2) of a row: out_j = x_j·cos_j − x_{j+D/2}·sin_j and
 * out_{j+D/2} = x_{j+D/2}·cos_{j+D/2} + x_j·sin_{j+D/2}, each product and the sum rounded
 * (torch: x * cos + rotate_half(x) * sin). Grid: x over (inner row, pair), y over outer. */
template <typename T> __global__ void rotary_kernel(rotary_params p) {
    lf::allow_next_grid();
    lf::wait_prior_grid();
    const int64_t half = p.head_dim / 2;
    const int64_t e = (int64_t)blockIdx.x * ELEMENTWISE_THREADS + threadIdx.x;
    if (e >= p.inner * half) return;
    const int64_t i = e / half, j = e - i * half;
    for (int64_t a = blockIdx.y; a < p.outer; a += gridDim.y) {
        const T *x = (const T *)p.x + a * p.xs_outer + i * p.xs_inner;
        const T *c = (const T *)p.cos + a * p.cs_outer, *s = (const T *)p.sin + a * p.cs_outer;
        const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
        const float lo = rounded<T>(x1 * to_float(c[j])) + rounded<T>(-x2 * to_float(s[j]));
        const float hi = rounded<T>(x2 * to_float(c[j + half])) +
                         rounded<T>(x1 * to_float(s[j + half]));
        T *out = (T *)p.out + (a * p.inner + i) * p.head_dim;
        out[j] = from_float<T>(lo);
        out[j + half] = from_float<T>(hi);
    }
}

dim3 elementwise_grid(int64_t columns, int64_t rows) {
    const int64_t x = (columns + ELEMENTWISE_THREADS - 1) / ELEMENTWISE_THREADS;
    return dim3((unsigned)x, (unsigned)(rows < MAX_GRID_Y ? rows : MAX_GRID_Y));
}

template <typename T> cudaError_t rms_norm(const rms_norm_params &p, cudaStream_t stream) {
    const dim3 grid((unsigned)p.rows);  // rows ≤ 2³¹ − 1: checked by the caller
    return p.residual ? lf::launch_overlapped(rms_norm_kernel<T, true>, grid, dim3(NORM_THREADS),
                                              0, stream, p)
                      : lf::launch_overlapped(rms_norm_kernel<T, false>, grid,
                                              dim3(NORM_THREADS), 0, stream, p);
}

template <typename T> cudaError_t silu_mul(const silu_mul_params &p, cudaStream_t stream) {
    return lf::launch_overlapped(silu_mul_kernel<T>, elementwise_grid(p.d, p.rows),
                                 dim3(ELEMENTWISE_THREADS), 0, stream, p);
}

template <typename T> cudaError_t rotary(const rotary_params &p, cudaStream_t stream) {
    return lf::launch_overlapped(rotary_kernel<T>,
                                 elementwise_grid(p.inner * (p.head_dim / 2), p.outer),
                                 dim3(ELEMENTWISE_THREADS), 0, stream, p);
}

/* fn<T>(p, stream) for the lf_scalar `type`. */
template <template <typename> class Fn, typename P>
int by_type(int type, const P &p, void *stream) {
    const cudaStream_t s = (cudaStream_t)stream;
    switch (type) {
    case LF_SCALAR_F16: return (int)Fn<__half>::run(p, s);
    case LF_SCALAR_BF16: return (int)Fn<__nv_bfloat16>::run(p, s);
    case LF_SCALAR_F32: return (int)Fn<float>::run(p, s);
    default: return (int)cudaErrorInvalidValue;
    }
}
template <typename T> struct RmsNorm {
    static cudaError_t run(const rms_norm_params &p, cudaStream_t s) { return rms_norm<T>(p, s); }
};
template <typename T> struct SiluMul {
    static cudaError_t run(const silu_mul_params &p, cudaStream_t s) { return silu_mul<T>(p, s); }
};
template <typename T> struct Rotary {
    static cudaError_t run(const rotary_params &p, cudaStream_t s) { return rotary<T>(p, s); }
};

}  // namespace

extern "C" int rms_norm_cuda(const rms_norm_params *p, void *stream) {
    return p->rows > 0 ? by_type<RmsNorm>(p->x_type, *p, stream) : 0;
}

extern "C" int silu_mul_cuda(const silu_mul_params *p, void *stream) {
    return p->rows > 0 && p->d > 0 ? by_type<SiluMul>(p->x_type, *p, stream) : 0;
}

extern "C" int rotary_cuda(const rotary_params *p, void *stream) {
    return p->outer > 0 && p->inner > 0 ? by_type<Rotary>(p->x_type, *p, stream) : 0;
}
