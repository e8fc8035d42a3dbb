/* The backward of one padded head dim and dtype (after attn_bwd_delta_kernel): the fast fused
 * pass (attention_bwd_fused.cuh) or the deterministic passes (attention_bwd_deterministic.cuh).
 * Instantiated per head dim in attention_bwd_hdim*.cu. */
#pragma once

#include "attention_bwd_deterministic.cuh"
#include "attention_bwd_fused.cuh"
#include "device.cuh"

namespace attn {

/* Rows of the float32 dQ accumulator (fwd.workspace, [rows][heads_q][head_dim]): query row
 * i of sequence b is row b * Sq + i (dense) or q_start + i (varlen). csrc/attention.c checks
 * the workspace against attention_cuda_backward_workspace_bytes, the same size. */
inline int64_t bwd_dq_accum_rows(const attention_fwd_params &p) {
    return p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q;
}
inline int64_t bwd_dq_accum_bytes(const attention_fwd_params &p) {
    return bwd_dq_accum_rows(p) * p.heads_q * p.head_dim * 4;
}

template <auto kKernel>
cudaError_t launch_with_smem(dim3 grid, int threads, int smem_bytes, cudaStream_t stream,
                             const attention_bwd_params &bp) {
    if (grid.x == 0) return cudaSuccess;
    const cudaError_t err = lf::setup_kernel<kKernel>(threads, smem_bytes, nullptr);
    if (err != cudaSuccess) return err;
    kKernel<<<grid, threads, smem_bytes, stream>>>(bp);
    return cudaGetLastError();
}

/* The fast backward: zero the accumulator, one fused pass, convert dQ. */
template <int kD, int kBM, typename T>
cudaError_t run_attn_bwd_fused(const attention_bwd_params &bp, cudaStream_t stream) {
    const attention_fwd_params &p = bp.fwd;
    constexpr int kBN = 128;
    using Cfg = BwdFusedConfig<kD, kBN, kBM>;
    const int64_t rows = bwd_dq_accum_rows(p);
    cudaError_t err = cudaMemsetAsync(p.workspace, 0, (size_t)bwd_dq_accum_bytes(p), stream);
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)((p.seqlen_k + kBN - 1) / kBN), (unsigned)p.batch,
                    (unsigned)p.heads_kv);
    const bool extras = p.softcap > 0.0f || p.alibi_slopes != nullptr || p.dropout_p > 0.0f;
    err = extras ? launch_with_smem<attn_bwd_fused_kernel<kD, kBN, kBM, T, true>>(
                       grid, Cfg::kThreads, Cfg::kSmemBytes, stream, bp)
                 : launch_with_smem<attn_bwd_fused_kernel<kD, kBN, kBM, T, false>>(
                       grid, Cfg::kThreads, Cfg::kSmemBytes, stream, bp);
    if (err != cudaSuccess) return err;
    const int64_t threads = rows * p.heads_q * (p.head_dim / 8);
    if (threads == 0) return cudaSuccess;
    attn_bwd_dq_convert_kernel<T>
        <<<(unsigned)((threads + 255) / 256), 256, 0, stream>>>(bp, rows);
    return cudaGetLastError();
}

/* The fast pass unless the caller asked for determinism; head dim 256 always takes the
 * deterministic passes (the fused kernel's accumulators would not fit in registers), and so
 * does a call without query rows (no accumulator). */
template <int kD, typename T> cudaError_t run_attn_bwd(const attention_bwd_params &bp,
                                                       cudaStream_t stream) {
    const attention_fwd_params &p = bp.fwd;
    if constexpr (kD <= 128) {
        if (!bp.deterministic && bwd_dq_accum_bytes(p) > 0) {
            /* Query block of the fused pass: 32 rows at head dim 64 (two CTAs per SM), else 64
             * (H100, benchmarks/notes/attention_cuda.md). */
            return run_attn_bwd_fused<kD, kD == 64 ? 32 : 64, T>(bp, stream);
        }
    }
    constexpr int kBN = 64, kBL = kD <= 128 ? 64 : 32, kSplit = kD <= 128 ? 1 : 2;
    using KV = BwdKVConfig<kD, kBN, kBL, kSplit>;
    const dim3 kv_grid((unsigned)((p.seqlen_k + kBN - 1) / kBN * kSplit), (unsigned)p.batch,
                       (unsigned)p.heads_kv);
    cudaError_t err = launch_with_smem<attn_bwd_dkdv_kernel<kD, kBN, kBL, kSplit, T>>(
        kv_grid, KV::kThreads, KV::kSmemBytes, stream, bp);
    if (err != cudaSuccess) return err;
    constexpr int kBM = 64, kBK = kD <= 128 ? 64 : 32;
    using Q = BwdQConfig<kD, kBM, kBK>;
    const dim3 q_grid((unsigned)((p.seqlen_q + kBM - 1) / kBM), (unsigned)p.batch,
                      (unsigned)p.heads_q);
    return launch_with_smem<attn_bwd_dq_kernel<kD, kBM, kBK, T>>(q_grid, Q::kThreads,
                                                                Q::kSmemBytes, stream, bp);
}

}  // namespace attn
