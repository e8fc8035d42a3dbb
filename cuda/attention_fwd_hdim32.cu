/* The forward kernels of head dims up to 32 (cuda/attention_cuda.cuh), one file per head dim
 * so that nvcc runs them in parallel. */
#include "attention_cuda.cuh"

namespace attn {
template cudaError_t run_attn_fwd<32, __half>(const attention_fwd_params &, cudaStream_t);
template cudaError_t run_attn_fwd<32, __nv_bfloat16>(const attention_fwd_params &, cudaStream_t);
}  // namespace attn
