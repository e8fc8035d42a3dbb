/* The attention forward at padded head dim 256, one file per head dim so that nvcc compiles
 * them in parallel (declared extern in attention_fwd.cu). */
#include "attention_fwd_launch.cuh"
#include "dispatch.cuh"

namespace attn {
LF_ATTN_INSTANCES(, run_attn_fwd, attention_fwd_params, 256)
}  // namespace attn
