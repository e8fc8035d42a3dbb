/* The C entry points of the CUDA attention forward: the padded head dim and dtype pick an
 * instance of run_attn_fwd (attention_fwd_launch.cuh), compiled in attention_fwd_hdim*.cu. */
#include "attention_fwd_launch.cuh"
#include "dispatch.cuh"
#include "lutflash_cuda.h"

namespace attn {
#define ATTN_FWD_EXTERN(D) LF_ATTN_INSTANCES(extern, run_attn_fwd, attention_fwd_params, D)
LF_ATTN_HEAD_DIMS(ATTN_FWD_EXTERN)
#undef ATTN_FWD_EXTERN
}  // namespace attn

extern "C" int attention_cuda_padded_head_dim(int64_t head_dim) {
    return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128
                                                                                              : 256;
}

/* One record of decode_record_floats(d) floats per (lse row, key split), for the most splits
 * any GPU may pick (decode_max_splits; the split count itself depends on the SM count). */
extern "C" int64_t attention_cuda_forward_workspace_bytes(int64_t batch, int64_t heads_q,
                                                          int64_t heads_kv, int64_t seqlen_q,
                                                          int64_t seqlen_k, int64_t head_dim,
                                                          int64_t total_q) {
    const int splits = attn::decode_max_splits(batch, heads_q, heads_kv, seqlen_q, seqlen_k);
    if (splits <= 1) return 0;
    return heads_q * total_q * splits * attn::decode_record_floats(head_dim) * 4;
}

extern "C" int attention_forward_cuda(const attention_fwd_params *p, void *stream) {
    if (p->batch == 0 || p->heads_q == 0 || p->seqlen_q == 0) return 0;
    if (p->batch > 65535 || p->heads_q > 65535) return (int)cudaErrorInvalidConfiguration;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    return (int)lf::dispatch_half_type(p->dtype, [&](auto t) {
        using T = decltype(t);
        return lf::dispatch_value<LF_ATTN_HEAD_DIM_LIST>(
            attention_cuda_padded_head_dim(p->head_dim),
            [&](auto kD) { return attn::run_attn_fwd<kD(), T>(*p, s); });
    });
}
