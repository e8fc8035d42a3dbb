/* Attention geometry shared by the forward, decode and backward kernels: which keys each
 * query sees (DESIGN.md "Attention semantics": bottom-right aligned causal masks, windows,
 * varlen sequences), the score transforms (softcap, ALiBi) and quad reductions over the four
 * threads that hold one accumulator row. */
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "attention_params.h"

namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

/* One sequence of the batch: where its rows start in q/k (varlen) and its lengths, with the
 * visible band of keys around the bottom-right aligned diagonal i + sk - sq. 32-bit fields
 * (lengths < 2^31, windows clamped by csrc/attention.c); sums are formed in 64 bits and the
 * results clamped to [-1, sk] or [-1, sq]. */
struct Sequence {
    int q_start, k_start, sq, sk, wl, wr;

    /* kv_cache: whether the kernel honours a KV cache's cache_seqlens (the forward kernels
     * that take cache calls; the backward and the plain tiled forward never see one). */
    __device__ __forceinline__ Sequence(const attention_fwd_params &p, int b,
                                        bool kv_cache = false) {
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
        if (kv_cache && p.cache_seqlens != nullptr) {
            /* A KV cache: the valid keys are the first cache_seqlens[b] + seqlen_new (GPU
             * values were never checked on the host: clamped into [0, seqlen_k]). */
            const int64_t used = (int64_t)p.cache_seqlens[b] + p.seqlen_new;
            sk = (int)max((int64_t)0, min(used, (int64_t)sk));
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

/* Where the forward reads the K or V rows of one (sequence b, kv head): rows of the tensor
 * (key j at base + j·stride; the batch row is b, or with kCacheRows cache_batch_idx[b]), or,
 * in kernels compiled with kPaged, the pages of a paged KV cache when the call has a block
 * table (key j is row j % page_size of page block_table[b, j / page_size]). Both are template
 * options so that kernels that never see a KV cache keep their plain code. Indices read on
 * the GPU were never checked on the host: clamped into the tensor, so a bad one gives wrong
 * rows, never an access outside it. */
template <typename T, bool kCacheRows, bool kPaged, bool kValues> struct KvRows {
    static constexpr bool kMayPage = kPaged;
    /* Only the base (and, paged, the block-table row) is kept: strides are read from the
     * params where used, so that a kernel's main loop holds no more live registers than with
     * a plain pointer. */
    const T *base;
    const int32_t *pages; /* this sequence's block-table row, or nullptr */

    __device__ __forceinline__ KvRows(const attention_fwd_params &p, int b, int kv_head,
                                      int k_start) {
        const T *data = static_cast<const T *>(kValues ? p.v : p.k);
        const int64_t head_stride = kValues ? p.v_head_stride : p.k_head_stride;
        pages = nullptr;
        if (kPaged && p.block_table != nullptr) {
            base = data + kv_head * head_stride;
            pages = p.block_table + b * p.block_table_stride;
            return;
        }
        int row = b;
        if (kCacheRows && p.kv_batch_idx != nullptr)
            row = (int)min(max((int64_t)p.kv_batch_idx[b], (int64_t)0), p.kv_batch - 1);
        base = data + row * batch_stride(p) + k_start * stride(p) + kv_head * head_stride;
    }
    static __device__ __forceinline__ int64_t stride(const attention_fwd_params &p) {
        return kValues ? p.v_row_stride : p.k_row_stride;
    }
    /* the batch stride, which steps pages in a paged cache */
    static __device__ __forceinline__ int64_t batch_stride(const attention_fwd_params &p) {
        return kValues ? p.v_batch_stride : p.k_batch_stride;
    }
    __device__ __forceinline__ bool paged() const { return kPaged && pages != nullptr; }
    /* Paged: key j's (page, row in the page), the page clamped; what a loader that stages
     * page numbers ahead of its copies keeps (load_paged_tile). */
    __device__ __forceinline__ int2 page_of(const attention_fwd_params &p, int j) const {
        const int ps = (int)p.page_size;
        return make_int2(min(max(pages[j / ps], 0), (int)(p.num_pages - 1)), j % ps);
    }
    /* The row at (page, row in the page). */
    __device__ __forceinline__ const T *row_at(const attention_fwd_params &p, int2 at) const {
        return base + at.x * batch_stride(p) + (int64_t)at.y * stride(p);
    }
    /* Key j's row; page geometry from the call's params (read where used, not kept). */
    __device__ __forceinline__ const T *row(const attention_fwd_params &p, int j) const {
        if (!paged()) return base + (int64_t)j * stride(p);
        return row_at(p, page_of(p, j));
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

}  // namespace attn
