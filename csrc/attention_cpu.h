/* Exact attention on the CPU: tiled online-softmax forward and recomputing backward. */
#ifndef LUTFLASH_ATTENTION_CPU_H
#define LUTFLASH_ATTENTION_CPU_H

#include <stdint.h>

#include "attention_params.h"

/* Scratch bytes one thread needs for a head dim; the workspace holds one slot per thread. */
int64_t attention_cpu_forward_thread_bytes(int64_t head_dim);
int64_t attention_cpu_backward_thread_bytes(int64_t head_dim);
/* The backward's workspace also holds, ahead of the thread slots, transposed copies of q and
 * dout (total_q = B·Sq, or the rows of a packed varlen q). */
int64_t attention_cpu_backward_shared_bytes(int64_t head_dim, int64_t heads_q, int64_t batch,
                                            int64_t total_q);

/* variant: 0 picks the best inner loops for this CPU, 1 forces portable C, 3 AVX-512 (falls
 * back to portable C where the CPU lacks it); tests use it to cover every path. */
#define ATTENTION_CPU_VARIANT_MAX 3
/* The instruction set of the inner loops that `variant` runs on this CPU: "portable" or
 * "avx512" (what the kernels dispatch to, so that tests can tell a silent fallback). */
const char *attention_cpu_variant_isa(int variant);

/* Writes out and lse. */
void attention_forward_cpu(const attention_fwd_params *p, int variant);
/* Writes delta, dq, dk and dv (dk, dv summed over the query heads of a group). */
void attention_backward_cpu(const attention_bwd_params *p, int variant);

#endif
