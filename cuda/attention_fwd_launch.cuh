/* The forward of one padded head dim and dtype: the decode path (attention_decode.cuh) for up
 * to 16 query rows with plain scores, else the tiled kernel (attention_fwd_kernel.cuh) with
 * the tile shape chosen here. Instantiated per head dim in attention_fwd_hdim*.cu. */
#pragma once

#include "attention_decode.cuh"
#include "attention_fwd_kernel.cuh"

namespace attn {

/* The tiled forward, with kFwdOptDefault except plain scores at kD = 32 (measured on the H100
 * in benchmarks/notes/attention_cuda.md: the mask-free loop for full key blocks is worth
 * 10-17% at kD = 64/128, 0-3% at kD = 96, nothing at kD = 256, and costs 3-5% at kD = 32).
 * Plain scores at kD = 64: FA2's 128 x 128 x 4 warps (32 rows a warp, ptxas spills a few
 * row-sum/pointer slots, 2 CTAs per SM); at kD = 128 FA2's 128 x 64 x 4 warps.
 * Softcap/ALiBi/dropout (and KV-cache addressing, sinks) add live state: 8 warps at one CTA
 * per SM at kD = 128, 128 x 64 x 4 warps at kD <= 64. `variant` (attention_fwd_params.variant,
 * the op's variant argument; nonzero also skips the decode path) picks the alternatives for plain scores at kD = 64 and
 * 128: 1 = 128 x 64 x 4 warps, 2 = 8 warps (128 x 128 at kD = 64, 128 x 64 at kD = 128, two
 * CTAs per SM), 3 = the third shape in the switch. */
template <int kD, typename T> cudaError_t run_attn_fwd_tiles(const attention_fwd_params &p,
                                                             cudaStream_t stream) {
    /* KV-cache calls (cache_seqlens, cache rows, pages) and sinks are extras too: only those
     * instances read them (the plain ones measured 10-20% slower at D = 128 with them) */
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f ||
                        p.cache_seqlens != nullptr || p.kv_batch_idx != nullptr ||
                        p.block_table != nullptr || p.sinks != nullptr;
    if constexpr (kD == 128) {
        if (extras) return launch_attn_fwd<kD, 128, 64, 8, T, true, 1>(p, stream);
        switch (p.variant) {
        case 2: return launch_attn_fwd<kD, 128, 64, 8, T, false, 2>(p, stream);
        case 3: return launch_attn_fwd<kD, 128, 32, 4, T, false, 1>(p, stream);
        default: return launch_attn_fwd<kD, 128, 64, 4, T, false, 1>(p, stream);
        }
    } else if constexpr (kD == 64) {
        if (extras) return launch_attn_fwd<kD, 128, 64, 4, T, true, 1>(p, stream);
        switch (p.variant) {
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
        return launch_attn_fwd<kD, 128, 64, kWarps, T, false, 1>(p, stream);
    }
}

/* The forward: the decode path for up to 16 query rows with plain scores and variant 0
 * (decode_splits > 0), else the tiled kernel. The workspace holds decode_max_splits records
 * per lse row (csrc/attention.c checks its size with attention_cuda_forward_workspace_bytes),
 * and decode_splits never exceeds that. */
template <int kD, typename T> cudaError_t run_attn_fwd(const attention_fwd_params &p,
                                                       cudaStream_t stream) {
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f;
    if (!extras && p.variant == 0 && p.seqlen_k > 0) {
        /* paged caches scatter a sequence's keys over the cache (a TLB miss or DRAM row
         * switch per page): two CTAs per SM (where two fit, kD <= 128) keep twice the bytes in
         * flight */
        const int64_t ctas_per_sm = kD <= 128 && p.block_table != nullptr ? 2 : 1;
        const int splits = decode_splits(p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k,
                                         ctas_per_sm * lf::current_device_info().sm_count);
        if (splits > 0) return run_attn_decode<kD, T>(p, splits, stream);
    }
    return run_attn_fwd_tiles<kD, T>(p, stream);
}

}  // namespace attn
