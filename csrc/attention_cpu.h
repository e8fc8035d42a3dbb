/* Exact attention on the CPU: tiled online-softmax forward and recomputing backward. */
#ifndef LUTFLASH_ATTENTION_CPU_H
#define LUTFLASH_ATTENTION_CPU_H

#include <stddef.h>
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

/* The element offset of key row j of sequence b, kv head h, in k (or in v, given v's
 * strides), as attention_params.h defines it: through the page table when paged, else in
 * k/v batch row kv_batch_idx[b] (or b), after the sequence's first row when varlen. Every read
 * and write of a key row by the CPU kernels goes through it. */
static inline int64_t attention_key_offset(const attention_fwd_params *p, int64_t batch_stride,
                                           int64_t row_stride, int64_t head_stride, int64_t b,
                                           int64_t j, int64_t h) {
    int64_t batch_row = b;
    if (p->block_table != NULL) {
        batch_row = p->block_table[b * p->block_table_stride + j / p->page_size];
        j %= p->page_size;
    } else if (p->kv_batch_idx != NULL) {
        batch_row = p->kv_batch_idx[b];
    } else if (p->cu_seqlens_k != NULL) {
        j += p->cu_seqlens_k[b];
    }
    return batch_row * batch_stride + j * row_stride + h * head_stride;
}

/* Writes out and lse. Honours every field of attention_fwd_params, the KV-cache ones too. */
void attention_forward_cpu(const attention_fwd_params *p, int variant);
/* Writes delta, dq, dk and dv (dk, dv summed over the query heads of a group). Dense and
 * varlen inputs only: the KV-cache fields must be unset (flash_attention_with_kvcache is an
 * inference entry point). */
void attention_backward_cpu(const attention_bwd_params *p, int variant);
/* A KV-cache call's append and rotary (kvcache_append_params, csrc/attention_kvcache_cpu.c):
 * run before attention_forward_cpu on the same cache params. */
void attention_kvcache_append_cpu(const kvcache_append_params *a);

#endif
