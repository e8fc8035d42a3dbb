/* The attention backward at padded head dim 128, one file per head dim so that nvcc compiles
 * them in parallel (declared extern in attention_bwd.cu). */
#include "attention_bwd_launch.cuh"
#include "dispatch.cuh"

namespace attn {
LF_ATTN_INSTANCES(, run_attn_bwd, attention_bwd_params, 128)
}  // namespace attn
