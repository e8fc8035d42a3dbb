/* The CUDA backward of flash_attention: delta = rowsum(dO * O) - dlse, then dK/dV and dQ
 * (cuda/attention_cuda.cuh, instantiated in attention_bwd_hdim*.cu). */
#include "attention_cuda.cuh"
#include "lutflash_cuda.h"

namespace attn {
#define ATTN_BWD_EXTERN(D)                                                                   \
    extern template cudaError_t run_attn_bwd<D, __half>(const attention_bwd_params &,         \
                                                         cudaStream_t);                       \
    extern template cudaError_t run_attn_bwd<D, __nv_bfloat16>(const attention_bwd_params &,  \
                                                                cudaStream_t);
ATTN_BWD_EXTERN(32)
ATTN_BWD_EXTERN(64)
ATTN_BWD_EXTERN(96)
ATTN_BWD_EXTERN(128)
ATTN_BWD_EXTERN(256)
#undef ATTN_BWD_EXTERN
}  // namespace attn

namespace {

template <typename T> cudaError_t backward_of(const attention_bwd_params &bp, cudaStream_t s) {
    const attention_fwd_params &p = bp.fwd;
    if (p.seqlen_q > 0) {
        const dim3 grid((unsigned)((p.seqlen_q + 3) / 4), (unsigned)p.batch, (unsigned)p.heads_q);
        attn::attn_bwd_delta_kernel<T><<<grid, 128, 0, s>>>(bp);
        const cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    switch (attention_cuda_padded_head_dim(p.head_dim)) {
    case 32: return attn::run_attn_bwd<32, T>(bp, s);
    case 64: return attn::run_attn_bwd<64, T>(bp, s);
    case 96: return attn::run_attn_bwd<96, T>(bp, s);
    case 128: return attn::run_attn_bwd<128, T>(bp, s);
    default: return attn::run_attn_bwd<256, T>(bp, s);
    }
}

}  // namespace

/* Bytes of the fast backward's float32 dQ accumulator ([total_q][heads_q][head_dim], total_q
 * = B * Sq for dense inputs); 0 where the backward always takes the deterministic passes. */
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
    switch (p->dtype) {
    case LF_SCALAR_F16: return (int)backward_of<__half>(*bp, s);
    case LF_SCALAR_BF16: return (int)backward_of<__nv_bfloat16>(*bp, s);
    default: return (int)cudaErrorNotSupported;
    }
}
