/* The first half of a KV-cache call (flash_attention_with_kvcache): the new keys and values
 * written into the cache at their positions, the keys (and q) rotated on the way when rotary
 * tables are given. One thread per element: a decode step appends a few rows (B · Hkv rows
 * of D), so this is one small launch; a prefill-sized append is a plain copy at the copy rate
 * give or take the partner reads of the rotation. Semantics: attention_params.h's
 * kvcache_append_params, the same as csrc's CPU version (float32 math, products and the sum
 * rounded without contraction, one rounding to the dtype). */
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device.cuh"
#include "lutflash_cuda.h"

namespace {

constexpr int THREADS = 256;

template <typename T> __device__ __forceinline__ float load(const T *p) { return (float)*p; }
template <> __device__ __forceinline__ float load(const __half *p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16 *p) {
    return __bfloat162float(*p);
}
template <typename T> __device__ __forceinline__ void store(T *p, float v) { *p = v; }
template <> __device__ __forceinline__ void store(__half *p, float v) { *p = __float2half_rn(v); }
template <> __device__ __forceinline__ void store(__nv_bfloat16 *p, float v) {
    *p = __float2bfloat16_rn(v);
}

/* Element e of row x at position pos, rotated when the call has rotary tables and e is one of
 * the first rotary_dim features: pairs (2t, 2t + 1) interleaved, else (t, t + rotary_dim / 2);
 * the first of a pair becomes x·cos − x'·sin, the second x·cos + x'·sin. */
template <typename T>
__device__ __forceinline__ float rotated(const kvcache_append_params &a, const T *x, int e,
                                         int64_t pos) {
    const float v = load(x + e);
    if (a.cos == nullptr || e >= a.rotary_dim) return v;
    const int half = (int)(a.rotary_dim / 2);
    bool first;
    int t, partner;
    if (a.interleaved) {
        t = e / 2, first = (e & 1) == 0, partner = first ? e + 1 : e - 1;
    } else {
        first = e < half, t = first ? e : e - half, partner = first ? e + half : e - half;
    }
    /* positions were checked on the host only for CPU values: clamped into the tables */
    pos = min(max(pos, (int64_t)0), a.seqlen_ro - 1);
    const float c = load((const T *)a.cos + pos * half + t);
    const float s = load((const T *)a.sin + pos * half + t);
    const float xp = load(x + partner);
    const float vc = __fmul_rn(v, c), ps = __fmul_rn(xp, s);
    return first ? __fsub_rn(vc, ps) : __fadd_rn(vc, ps);
}

/* Where row `pos` of sequence b lives in the cache tensor `data` (k or v), or nullptr when
 * it falls outside the cache (not written). */
template <typename T>
__device__ __forceinline__ T *cache_row(const attention_fwd_params &c, void *data,
                                        int64_t batch_stride, int64_t row_stride, int b,
                                        int64_t pos) {
    if (pos < 0 || pos >= c.seqlen_k) return nullptr;
    if (c.block_table != nullptr) {
        int64_t page = c.block_table[b * c.block_table_stride + pos / c.page_size];
        page = min(max(page, (int64_t)0), c.num_pages - 1);
        return (T *)data + page * batch_stride + (pos % c.page_size) * row_stride;
    }
    int64_t row = b;
    if (c.kv_batch_idx != nullptr)
        row = min(max((int64_t)c.kv_batch_idx[b], (int64_t)0), c.kv_batch - 1);
    return (T *)data + row * batch_stride + pos * row_stride;
}

/* Threads cover [k_new rows | v_new rows | q rows] × head_dim elements. The cache params
 * come by value (a.cache points to host memory). */
template <typename T>
__global__ void __launch_bounds__(THREADS)
    append_kernel(const kvcache_append_params a, const attention_fwd_params c) {
    const int64_t d = c.head_dim;
    const int64_t kv_rows = a.k_new ? c.batch * c.seqlen_new * c.heads_kv : 0;
    const int64_t q_rows = a.q_out ? c.batch * c.seqlen_q * c.heads_q : 0;
    const int64_t total = (2 * kv_rows + q_rows) * d;
    for (int64_t idx = (int64_t)blockIdx.x * THREADS + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * THREADS) {
        int64_t row = idx / d;
        const int e = (int)(idx - row * d);
        if (row < 2 * kv_rows) {
            const bool is_v = row >= kv_rows;
            if (is_v) row -= kv_rows;
            const int64_t h = row % c.heads_kv, bi = row / c.heads_kv;
            const int64_t i = bi % c.seqlen_new;
            const int b = (int)(bi / c.seqlen_new);
            const int64_t pos = (int64_t)c.cache_seqlens[b] + i;
            T *dst = is_v ? cache_row<T>(c, (void *)c.v, c.v_batch_stride, c.v_row_stride, b, pos)
                          : cache_row<T>(c, (void *)c.k, c.k_batch_stride, c.k_row_stride, b, pos);
            if (dst == nullptr) continue;
            if (is_v) {
                const T *src = (const T *)a.v_new + b * a.vn_batch_stride + i * a.vn_row_stride +
                               h * a.vn_head_stride;
                dst[h * c.v_head_stride + e] = src[e];
            } else {
                const T *src = (const T *)a.k_new + b * a.kn_batch_stride + i * a.kn_row_stride +
                               h * a.kn_head_stride;
                store(dst + h * c.k_head_stride + e, rotated(a, src, e, pos));
            }
        } else {
            row -= 2 * kv_rows;  // (b, i, h) of q, dense q_out
            const int64_t h = row % c.heads_q, bi = row / c.heads_q;
            const int64_t i = bi % c.seqlen_q;
            const int b = (int)(bi / c.seqlen_q);
            const int64_t pos = (int64_t)c.cache_seqlens[b] + (a.q_positions_follow ? i : 0);
            const T *src = (const T *)c.q + b * c.q_batch_stride + i * c.q_row_stride +
                           h * c.q_head_stride;
            store((T *)a.q_out + row * d + e, rotated(a, src, e, pos));
        }
    }
}

}  // namespace

extern "C" int attention_kvcache_append_cuda(const kvcache_append_params *p, void *stream) {
    const attention_fwd_params &c = *p->cache;
    const int64_t kv_rows = p->k_new ? c.batch * c.seqlen_new * c.heads_kv : 0;
    const int64_t q_rows = p->q_out ? c.batch * c.seqlen_q * c.heads_q : 0;
    const int64_t total = (2 * kv_rows + q_rows) * c.head_dim;
    if (total == 0) return cudaSuccess;
    const int64_t want = (total + THREADS - 1) / THREADS;
    const int64_t cap = (int64_t)lf::current_device_info().sm_count * 8;
    const unsigned blocks = (unsigned)(want < cap ? want : cap);
    auto launch = [&](auto tag) {
        using T = decltype(tag);
        append_kernel<T><<<blocks, THREADS, 0, (cudaStream_t)stream>>>(*p, c);
        return cudaGetLastError();
    };
    switch (c.dtype) {
    case LF_SCALAR_F16: return launch(__half());
    case LF_SCALAR_BF16: return launch(__nv_bfloat16());
    case LF_SCALAR_F32: return launch(float());
    default: return cudaErrorNotSupported;
    }
}
