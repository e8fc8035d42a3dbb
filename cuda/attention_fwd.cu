/* The CUDA forward of flash_attention: picks the padded head dim and dtype and runs the
 * kernel of cuda/attention_cuda.cuh (instantiated in attention_fwd_hdim*.cu). */
#include "attention_cuda.cuh"
#include "lutflash_cuda.h"

namespace attn {
#define ATTN_FWD_EXTERN(D)                                                                   \
    extern template cudaError_t run_attn_fwd<D, __half>(const attention_fwd_params &,         \
                                                         cudaStream_t);                       \
    extern template cudaError_t run_attn_fwd<D, __nv_bfloat16>(const attention_fwd_params &,  \
                                                                cudaStream_t);
ATTN_FWD_EXTERN(32)
ATTN_FWD_EXTERN(64)
ATTN_FWD_EXTERN(96)
ATTN_FWD_EXTERN(128)
ATTN_FWD_EXTERN(256)
#undef ATTN_FWD_EXTERN
}  // namespace attn

namespace {

template <typename T> cudaError_t forward_of(const attention_fwd_params &p, cudaStream_t s) {
    switch (attention_cuda_padded_head_dim(p.head_dim)) {
    case 32: return attn::run_attn_fwd<32, T>(p, s);
    case 64: return attn::run_attn_fwd<64, T>(p, s);
    case 96: return attn::run_attn_fwd<96, T>(p, s);
    case 128: return attn::run_attn_fwd<128, T>(p, s);
    default: return attn::run_attn_fwd<256, T>(p, s);
    }
}

}  // namespace

extern "C" int attention_cuda_padded_head_dim(int64_t head_dim) {
    return head_dim <= 32 ? 32 : head_dim <= 64 ? 64 : head_dim <= 96 ? 96 : head_dim <= 128 ? 128
                                                                                              : 256;
}

/* Bytes of the workspace the forward's decode path needs (0 where it does not apply or needs
 * none): one record of decode_record_floats(d) floats per (lse row, key split), for the most
 * splits any GPU may pick (decode_max_splits; the split count itself depends on the SM
 * count). total_q is B * Sq for dense inputs and the row count of varlen q. */
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
    switch (p->dtype) {
    case LF_SCALAR_F16: return (int)forward_of<__half>(*p, s);
    case LF_SCALAR_BF16: return (int)forward_of<__nv_bfloat16>(*p, s);
    default: return (int)cudaErrorNotSupported;
    }
}
