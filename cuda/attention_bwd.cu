/* The C entry points of the CUDA attention backward: delta = rowsum(dO * O) - dlse, then the
 * instance of run_attn_bwd (attention_bwd_launch.cuh) of the padded head dim and dtype,
 * compiled in attention_bwd_hdim*.cu. */
#include "attention_bwd_launch.cuh"
#include "dispatch.cuh"
#include "lutflash_cuda.h"

namespace attn {
#define ATTN_BWD_EXTERN(D) LF_ATTN_INSTANCES(extern, run_attn_bwd, attention_bwd_params, D)
LF_ATTN_HEAD_DIMS(ATTN_BWD_EXTERN)
#undef ATTN_BWD_EXTERN
}  // namespace attn

extern "C" int64_t attention_cuda_backward_workspace_bytes(int64_t heads_q, int64_t head_dim,
                                                           int64_t total_q) {
    if (attention_cuda_padded_head_dim(head_dim) > 128) return 0;
    return total_q * heads_q * head_dim * 4;
}

extern "C" int attention_backward_cuda(const attention_bwd_params *bp, void *stream) {
    const attention_fwd_params *p = &bp->fwd;
    if (p->batch == 0 || p->heads_q == 0) return 0;
    if (p->batch > 65535 || p->heads_q > 65535) return (int)cudaErrorInvalidConfiguration;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    return (int)lf::dispatch_half_type(p->dtype, [&](auto t) {
        using T = decltype(t);
        if (p->seqlen_q > 0) {
            const dim3 grid((unsigned)((p->seqlen_q + 3) / 4), (unsigned)p->batch,
                            (unsigned)p->heads_q);
            attn::attn_bwd_delta_kernel<T><<<grid, 128, 0, s>>>(*bp);
            const cudaError_t err = cudaGetLastError();
            if (err != cudaSuccess) return err;
        }
        return lf::dispatch_value<LF_ATTN_HEAD_DIM_LIST>(
            attention_cuda_padded_head_dim(p->head_dim),
            [&](auto kD) { return attn::run_attn_bwd<kD(), T>(*bp, s); });
    });
}
