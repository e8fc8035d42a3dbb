/* The attention backward at padded head dim 256, one file per head dim so that nvcc compiles
 * them in parallel (declared extern in attention_bwd.cu). */
#include "attention_bwd_launch.cuh"

namespace attn {
template cudaError_t run_attn_bwd<256, __half>(const attention_bwd_params &, cudaStream_t);
template cudaError_t run_attn_bwd<256, __nv_bfloat16>(const attention_bwd_params &, cudaStream_t);
}  // namespace attn
