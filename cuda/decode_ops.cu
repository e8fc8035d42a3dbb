/* The row-wise ops around the projections of a decoder step: RMSNorm (with the residual add
 * before it), SiLU·mul of a fused gate/up output, and the rotary embedding of q and k. A
 * decode step runs each once or twice per layer on a few rows, so each is one small launch
 * that replaces several of torch's (the add and the norm; silu and mul; neg, cat, two muls and
 * an add). Arithmetic in fp32; results rounded to the rows' dtype where torch's composition
 * rounds, so that a model gives what its own torch code gives up to the reduction order. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lutflash_cuda.h"

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
constexpr int NORM_CACHED = 4;  // vectors of a row a thread keeps in registers
constexpr int ELEMENTWISE_THREADS = 256;
constexpr int64_t MAX_GRID_Y = 65535;

/* VEC elements of T loaded or stored as one access (16 bytes when VEC = 16 / sizeof(T)). */
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
};

/* One block per row, in vectors of VEC elements. h = x (+ residual, rounded: torch's add),
 * written to sum; out = rounded(h · rsqrt(mean(h²) + eps)) · weight, rounded (Llama's RMSNorm:
 * the normalized row cast to the dtype, then multiplied by the weight). A row of a few
 * thousand elements is a few vectors per thread: their loads (x, residual, weight) all go out
 * before the first use and h stays in registers, so the kernel waits for memory about once
 * (a loop of dependent load-store pairs waited 16 times: 10.6 us for a 4096 row on the H100).
 * Rows longer than NORM_THREADS · NORM_CACHED vectors loop over the rest, reading it twice. */
template <typename T, bool RESIDUAL, int VEC>
__global__ void __launch_bounds__(NORM_THREADS) rms_norm_kernel(rms_norm_params p) {
    using V = Vec<T, VEC>;
    const int64_t row = blockIdx.x, nvec = p.hidden / VEC;
    const int tid = threadIdx.x;
    const V *__restrict__ x = (const V *)((const T *)p.x + row * p.ldx);
    const V *__restrict__ r = (const V *)((const T *)p.residual + row * p.ldr);
    const V *__restrict__ w = (const V *)p.weight;
    V *__restrict__ sum = (V *)((T *)p.sum + row * p.hidden);
    V *__restrict__ out = (V *)((T *)p.out + row * p.hidden);

    V xv[NORM_CACHED], rv[NORM_CACHED], wv[NORM_CACHED];
#pragma unroll
    for (int i = 0; i < NORM_CACHED; ++i) {
        const int64_t e = tid + (int64_t)i * NORM_THREADS;
        if (e < nvec) {
            xv[i] = x[e];
            if constexpr (RESIDUAL) rv[i] = r[e];
            wv[i] = w[e];
        }
    }
    float h[NORM_CACHED][VEC];
    float squares = 0.0f;
    auto add_row = [&](const V &xe, const V &re, float *he) {
#pragma unroll
        for (int c = 0; c < VEC; ++c) {
            float v = to_float(xe.v[c]);
            if constexpr (RESIDUAL) v = rounded<T>(v + to_float(re.v[c]));
            he[c] = v;
            squares += v * v;
        }
    };
    auto store_h = [&](const float *he, int64_t e) {
        if constexpr (RESIDUAL) {
            V s;
#pragma unroll
            for (int c = 0; c < VEC; ++c) s.v[c] = from_float<T>(he[c]);
            sum[e] = s;
        }
    };
#pragma unroll
    for (int i = 0; i < NORM_CACHED; ++i) {
        const int64_t e = tid + (int64_t)i * NORM_THREADS;
        if (e < nvec) {
            add_row(xv[i], rv[i], h[i]);
            store_h(h[i], e);
        }
    }
    for (int64_t e = tid + (int64_t)NORM_CACHED * NORM_THREADS; e < nvec; e += NORM_THREADS) {
        float he[VEC];
        add_row(x[e], RESIDUAL ? r[e] : V{}, he);
        store_h(he, e);
    }

    __shared__ float partial[NORM_THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) squares += __shfl_xor_sync(0xffffffffu, squares, o);
    if ((tid & 31) == 0) partial[tid >> 5] = squares;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) total += partial[i];
    const float inv = rsqrtf(total / (float)p.hidden + p.eps);

    auto store_out = [&](const float *he, const V &we, int64_t e) {
        V o;
#pragma unroll
        for (int c = 0; c < VEC; ++c) o.v[c] = from_float<T>(rounded<T>(he[c] * inv) * to_float(we.v[c]));
        out[e] = o;
    };
#pragma unroll
    for (int i = 0; i < NORM_CACHED; ++i) {
        const int64_t e = tid + (int64_t)i * NORM_THREADS;
        if (e < nvec) store_out(h[i], wv[i], e);
    }
    for (int64_t e = tid + (int64_t)NORM_CACHED * NORM_THREADS; e < nvec; e += NORM_THREADS) {
        // this thread wrote sum[e] above: it reads its own write back
        const V hv = RESIDUAL ? sum[e] : x[e];
        float he[VEC];
#pragma unroll
        for (int c = 0; c < VEC; ++c) he[c] = to_float(hv.v[c]);
        store_out(he, w[e], e);
    }
}

/* out[r, j] = rounded(silu(gate)) · up, rounded (torch: F.silu(gate) * up). Grid: x over
 * columns, y over rows (strided loop past the grid's limit). */
template <typename T> __global__ void silu_mul_kernel(silu_mul_params p) {
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
 * (torch: x * cos + rotate_half(x) * sin), so the result equals torch's bit for bit.
 * Grid: x over (inner row, pair), y over outer. */
template <typename T> __global__ void rotary_kernel(rotary_params p) {
    const int64_t half = p.head_dim / 2;
    const int64_t e = (int64_t)blockIdx.x * ELEMENTWISE_THREADS + threadIdx.x;
    if (e >= p.inner * half) return;
    const int64_t i = e / half, j = e - i * half;
    for (int64_t a = blockIdx.y; a < p.outer; a += gridDim.y) {
        const T *x = (const T *)p.x + a * p.xs_outer + i * p.xs_inner;
        const T *c = (const T *)p.cos + a * p.cs_outer, *s = (const T *)p.sin + a * p.cs_outer;
        const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
        // _rn: no multiply-add contraction, so float32 rounds like torch's mul then add too
        const float lo = __fadd_rn(rounded<T>(__fmul_rn(x1, to_float(c[j]))),
                                   rounded<T>(__fmul_rn(-x2, to_float(s[j]))));
        const float hi = __fadd_rn(rounded<T>(__fmul_rn(x2, to_float(c[j + half]))),
                                   rounded<T>(__fmul_rn(x1, to_float(s[j + half]))));
        T *out = (T *)p.out + (a * p.inner + i) * p.head_dim;
        out[j] = from_float<T>(lo);
        out[j + half] = from_float<T>(hi);
    }
}

dim3 elementwise_grid(int64_t columns, int64_t rows) {
    const int64_t x = (columns + ELEMENTWISE_THREADS - 1) / ELEMENTWISE_THREADS;
    return dim3((unsigned)x, (unsigned)(rows < MAX_GRID_Y ? rows : MAX_GRID_Y));
}

template <typename T, int VEC>
cudaError_t rms_norm_vec(const rms_norm_params &p, cudaStream_t stream) {
    const dim3 grid((unsigned)p.rows);  // rows ≤ 2³¹ − 1: checked by the caller
    if (p.residual)
        rms_norm_kernel<T, true, VEC><<<grid, NORM_THREADS, 0, stream>>>(p);
    else
        rms_norm_kernel<T, false, VEC><<<grid, NORM_THREADS, 0, stream>>>(p);
    return cudaGetLastError();
}

bool aligned16(const void *ptr) { return (uintptr_t)ptr % 16 == 0; }

/* 16-byte vectors where every row starts on 16 bytes, else single elements. */
template <typename T> cudaError_t rms_norm(const rms_norm_params &p, cudaStream_t stream) {
    constexpr int VEC = 16 / sizeof(T);
    const bool vec = p.hidden % VEC == 0 && p.ldx % VEC == 0 && p.ldr % VEC == 0 &&
                     aligned16(p.x) && aligned16(p.residual) && aligned16(p.weight) &&
                     aligned16(p.out) && aligned16(p.sum);
    return vec ? rms_norm_vec<T, VEC>(p, stream) : rms_norm_vec<T, 1>(p, stream);
}

template <typename T> cudaError_t silu_mul(const silu_mul_params &p, cudaStream_t stream) {
    silu_mul_kernel<T><<<elementwise_grid(p.d, p.rows), ELEMENTWISE_THREADS, 0, stream>>>(p);
    return cudaGetLastError();
}

template <typename T> cudaError_t rotary(const rotary_params &p, cudaStream_t stream) {
    rotary_kernel<T><<<elementwise_grid(p.inner * (p.head_dim / 2), p.outer),
                       ELEMENTWISE_THREADS, 0, stream>>>(p);
    return cudaGetLastError();
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
