/* The attention forward at padded head dim 256, one file per head dim so that nvcc compiles
 * them in parallel (declared extern in attention_fwd.cu). */
#include "attention_fwd_launch.cuh"

namespace attn {
template cudaError_t run_attn_fwd<256, __half>(const attention_fwd_params &, cudaStream_t);
template cudaError_t run_attn_fwd<256, __nv_bfloat16>(const attention_fwd_params &, cudaStream_t);
}  // namespace attn
