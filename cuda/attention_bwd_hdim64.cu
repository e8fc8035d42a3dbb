/* The backward kernels of head dims up to 64 (cuda/attention_cuda.cuh), one file per head dim
 * so that nvcc runs them in parallel. */
#include "attention_cuda.cuh"

namespace attn {
template cudaError_t run_attn_bwd<64, __half>(const attention_bwd_params &, cudaStream_t);
template cudaError_t run_attn_bwd<64, __nv_bfloat16>(const attention_bwd_params &, cudaStream_t);
}  // namespace attn
