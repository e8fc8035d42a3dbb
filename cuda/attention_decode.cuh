/* The decode path of the forward (flash-decoding): few query rows, long keys.
 *
 * One CTA per (row group, key split, batch, kv head). Its 16 rows are (query head of the GQA
 * group, query) pairs, row = head_in_group * sq + i, so the heads that share a kv head read
 * each K/V byte once. The CTA's 4 warps split every 64-key block (16 keys each) and keep
 * their own online softmax; K/V blocks stream through a kStages-deep cp.async ring. At the
 * end the warps merge through shared memory; with one split the CTA writes out and lse,
 * otherwise a record (o normalized in fp32, lse in log2 units) per (row, split) goes to the
 * workspace and attn_decode_combine_kernel merges the splits by lse. Plain scores only
 * (no softcap, ALiBi or dropout); masks and varlen as in the forward.
 *
 * Splits (decode_splits) come from the SM count, queried once per device: about one CTA per
 * SM, at least 4 key blocks each (B = 1 with 32 kv heads on an H100 used to run 288 CTAs on
 * 264 slots, a 9% second wave). On sm_90 the combine is launched with programmatic dependent
 * launch: its CTAs start while the decode kernel's last CTAs run and wait in
 * griddepcontrol.wait for its results, which hides the second launch's latency. */
#pragma once

#include "attention_mask.cuh"
#include "attention_sinks.h"
#include "attention_tile.cuh"
#include "device.cuh"

namespace attn {

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
    /* paged instance: (page, row in the page) of every key of kStages blocks, past the rest */
    static constexpr int kPageBytes = kStages * kDecodeBN * 8;
    template <bool kPaged> static constexpr int smem_bytes() {
        return kSmemBytes + (kPaged ? kPageBytes : 0);
    }
};

/* Floats of one workspace record: o (d, padded to 4) and lse (log2 units), 16-byte aligned. */
__host__ __device__ __forceinline__ int64_t decode_record_floats(int64_t d) {
    return (d + 3) / 4 * 4 + 4;
}

template <int kD, typename T, bool kPaged>
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
    const Sequence seq(p, b, true);
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

    const KvRows<T, true, kPaged, false> k(p, b, kv_head, seq.k_start);
    const KvRows<T, true, kPaged, true> v(p, b, kv_head, seq.k_start);
    /* Paged: the (page, row in the page) of block n's keys sit in slot n % kStages, written
     * kStages blocks ahead of the copies that read them (the prologue fills the first
     * kStages; then each iteration reads the table entries of a block while it computes and
     * stores them at its end), so no copy waits on a block-table read. */
    int2 *const page_slots = reinterpret_cast<int2 *>(smem + Cfg::kSmemBytes);
    const bool paged = kPaged && k.paged();
    auto block_pages = [&](int n) { /* the page of this thread's key of block n */
        const int j = (nb_begin + n) * kDecodeBN + (int)threadIdx.x;
        return j < seq.sk ? k.page_of(p, j) : make_int2(0, 0);
    };
    auto load_stage = [&](int it) {
        const int j0 = (nb_begin + it) * kDecodeBN, keys = min(kDecodeBN, seq.sk - j0);
        const uint32_t kt = kv_tiles + (it % kStages) * 2 * Cfg::kTileKV;
        if constexpr (kPaged) {
            if (paged) {
                const int2 *at = page_slots + (it % kStages) * kDecodeBN;
                load_paged_tile<kDecodeBN, kD, kThreads>(kt, k, p, at, keys, d);
                load_paged_tile<kDecodeBN, kD, kThreads>(kt + Cfg::kTileKV, v, p, at, keys, d);
                return;
            }
        }
        load_kv_tile<kDecodeBN, kD, kThreads>(kt, k, p, j0, keys, d);
        load_kv_tile<kDecodeBN, kD, kThreads>(kt + Cfg::kTileKV, v, p, j0, keys, d);
    };
    if constexpr (kPaged) {
        if (paged) {
            if (threadIdx.x < kDecodeBN)
#pragma unroll
                for (int n = 0; n < kStages; ++n)
                    if (n < blocks) page_slots[n * kDecodeBN + threadIdx.x] = block_pages(n);
            __syncthreads();
        }
    }
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
        /* paged: block it + kStages's table entries, read now, stored after the compute into
         * the slot of block it (whose copies were issued iterations ago) */
        const bool stage_pages = paged && threadIdx.x < kDecodeBN && it + kStages < blocks;
        int2 pages_ahead = make_int2(0, 0);
        if (stage_pages) pages_ahead = block_pages(it + kStages);

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
        if (stage_pages) page_slots[(it % kStages) * kDecodeBN + threadIdx.x] = pages_ahead;
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
        const int ridx = r0 + r, h = kv_head * group + ridx / seq.sq, i = ridx % seq.sq;
        /* one split: the row is done (with the head's sink); else a record without the sink,
         * which the combine adds */
        const float *sinks = num_splits == 1 ? p.sinks : nullptr;
        const float inv = attention_row_factor(sinks, h, m, total);
        const float lse2 = attention_row_lse2(sinks, h, m, total);
        const int64_t lse_index =
            b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i;
        /* columns c..c+3 of row r: the warps' accumulators merged by their weights, normalized */
        auto merged = [&](int c) {
            float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int w = 0; w < kDecodeWarps; ++w) {
                const float4 a = *reinterpret_cast<const float4 *>(
                    red + (w * kDecodeRows + r) * Cfg::kRedPitch + c);
                o[0] += wgt[w] * a.x, o[1] += wgt[w] * a.y;
                o[2] += wgt[w] * a.z, o[3] += wgt[w] * a.w;
            }
            return make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
        };
        if (num_splits == 1) {
            T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
                     ((int64_t)seq.q_start + i) * p.out_row_stride + h * p.out_head_stride;
            for (int c = (threadIdx.x % 8) * 4; c < d; c += 32) {
                const float4 o = merged(c);
                *reinterpret_cast<uint32_t *>(out + c) = Pair<T>::pack(o.x, o.y);
                *reinterpret_cast<uint32_t *>(out + c + 2) = Pair<T>::pack(o.z, o.w);
            }
            if (threadIdx.x % 8 == 0) p.lse[lse_index] = lse2 * kLn2;
        } else {
            float *dst = ws + (lse_index * num_splits + split) * rec;
            for (int c = (threadIdx.x % 8) * 4; c < d; c += 32)
                *reinterpret_cast<float4 *>(dst + c) = merged(c);
            if (threadIdx.x % 8 == 0) dst[rec - 4] = lse2;
        }
    }
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
    const Sequence seq(p, b, true);
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
    const float inv = attention_row_factor(p.sinks, h, m, total);
    T *out = static_cast<T *>(p.out) + b * p.out_batch_stride +
             ((int64_t)seq.q_start + i) * p.out_row_stride + h * p.out_head_stride;
    for (int c = threadIdx.x * 2; c < d; c += 2 * 128) {
        float o0 = 0.0f, o1 = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) o0 += part[w][c], o1 += part[w][c + 1];
        *reinterpret_cast<uint32_t *>(out + c) = Pair<T>::pack(o0 * inv, o1 * inv);
    }
    if (threadIdx.x == 0) p.lse[lse_index] = attention_row_lse2(p.sinks, h, m, total) * kLn2;
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

/* Key splits on a GPU of `sms` SMs: one CTA per SM (rounded down, or up where rounding down
 * would leave over a quarter of the SMs idle), each split at least kDecodeMinSplitBlocks key
 * blocks. Measured on an H100 (benchmarks/notes/attention_cuda.md,
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

/* The decode kernel with `splits` key splits, then (splits > 1) the combine; on sm_90 the
 * combine is launched with programmatic dependent launch. */
template <int kD, typename T, bool kPaged>
cudaError_t launch_attn_decode(const attention_fwd_params &p, int splits, cudaStream_t stream) {
    using Cfg = DecodeConfig<kD>;
    constexpr auto kernel = attn_decode_kernel<kD, T, kPaged>;
    constexpr int kSmem = Cfg::template smem_bytes<kPaged>();
    const cudaError_t err = lf::setup_kernel<kernel>(Cfg::kThreads, kSmem, nullptr);
    if (err != cudaSuccess) return err;
    const int64_t rows = p.heads_q / p.heads_kv * p.seqlen_q;
    const dim3 grid((unsigned)((rows + kDecodeRows - 1) / kDecodeRows * splits),
                    (unsigned)p.batch, (unsigned)p.heads_kv);
    kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p, splits);
    return cudaGetLastError();
}

/* The decode kernel (its paged instance for a call with a block table), then the combine. */
template <int kD, typename T> cudaError_t run_attn_decode(const attention_fwd_params &p,
                                                          int splits, cudaStream_t stream) {
    cudaError_t err = p.block_table != nullptr
                          ? launch_attn_decode<kD, T, true>(p, splits, stream)
                          : launch_attn_decode<kD, T, false>(p, splits, stream);
    if (err != cudaSuccess || splits == 1) return err;
    /* one CTA per (head, query row) of a batch */
    const dim3 cgrid((unsigned)(p.heads_q * p.seqlen_q), (unsigned)p.batch, 1);
    if (lf::current_device_info().major >= 9) {
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

}  // namespace attn
