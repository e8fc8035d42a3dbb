/* The C ABI of lutflash's CUDA code: every GPU entry point the extension calls.
 * Plain C; the launchers return 0 or a cudaError_t value, never allocate and never synchronize
 * with the host. The stream is the last argument (a cudaStream_t passed as void*). */
#ifndef LUTFLASH_CUDA_H
#define LUTFLASH_CUDA_H

#include "attention_params.h"
#include "bcq_format.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible devices, or a negative cudaError_t when the runtime cannot start. */
int lf_cuda_device_count(void);
const char *lf_cuda_error_string(int error);
/* Makes `device` current and returns the previous current device in *previous. */
int lf_cuda_set_device(int device, int *previous);

/* LUT-GEMM (cuda/lutgemm_cuda.cu): out = x · Ŵᵀ (+ bias) for fp16/bf16/fp32 x. The
 * workspace must hold lutgemm_cuda_workspace_bytes(p) bytes. */
int64_t lutgemm_cuda_workspace_bytes(const lutgemm_params *p);
int lutgemm_cuda(const lutgemm_params *p, void *stream);

/* flash_attention on fp16/bf16 (cuda/attention_fwd.cu, attention_bwd.cu): head dims that are
 * multiples of 8 up to 256 (padded up to 32, 64, 96, 128 or 256 inside), every row and base
 * 16-byte aligned. */
int attention_cuda_padded_head_dim(int64_t head_dim);
/* The forward's workspace: the decode path's split records (0 where that path does not apply
 * or needs no split). seqlen_q and seqlen_k are the dense lengths or the varlen maxima;
 * total_q = batch * seqlen_q for dense inputs, the packed row count for varlen ones. */
int64_t attention_cuda_forward_workspace_bytes(int64_t batch, int64_t heads_q, int64_t heads_kv,
                                               int64_t seqlen_q, int64_t seqlen_k,
                                               int64_t head_dim, int64_t total_q);
int attention_forward_cuda(const attention_fwd_params *p, void *stream);
/* The backward's workspace: the float32 dQ accumulator of the fast backward (deterministic =
 * 0), which sums dQ with atomics (run-to-run differences in the last bits); 0 at head dims
 * over 128, which always take the deterministic passes. deterministic = 1 needs no workspace
 * and gives bitwise-repeatable gradients. */
int64_t attention_cuda_backward_workspace_bytes(int64_t heads_q, int64_t head_dim,
                                                int64_t total_q);
int attention_backward_cuda(const attention_bwd_params *p, void *stream);
/* A KV-cache call's append and rotary (kvcache_append_params); run before
 * attention_forward_cuda on the same cache params. */
int attention_kvcache_append_cuda(const kvcache_append_params *p, void *stream);

/* Row-wise ops of a decoder step (cuda/decode_ops.cu), on fp16/bf16/fp32 rows (x_type, an
 * lf_scalar); each rounds to x's dtype where the torch composition it replaces does (the
 * Python docstrings say where). */
typedef struct {
    const void *x, *residual, *weight; /* residual may be NULL */
    void *out, *sum;                   /* sum = x + residual, written when residual is given */
    int64_t rows, hidden, ldx, ldr;    /* out and sum are dense (rows, hidden) */
    float eps;
    int x_type;
} rms_norm_params;
/* out = (h · rsqrt(mean(h²) + eps)) · weight per row, h = x (+ residual). */
int rms_norm_cuda(const rms_norm_params *p, void *stream);

typedef struct {
    const void *x; /* (rows, 2·d), rows ldx apart: gate then up */
    void *out;     /* dense (rows, d) */
    int64_t rows, d, ldx;
    int x_type;
} silu_mul_params;
/* out = silu(gate) · up. */
int silu_mul_cuda(const silu_mul_params *p, void *stream);

typedef struct {
    const void *x;           /* (outer, inner, head_dim), strides (xs_outer, xs_inner, 1) */
    const void *cos, *sin;   /* (outer or 1, head_dim) dense; cs_outer 0 broadcasts one row */
    void *out;               /* dense (outer, inner, head_dim) */
    int64_t outer, inner, head_dim, xs_outer, xs_inner, cs_outer;
    int x_type;
} rotary_params;
/* out = x · cos + rotate_half(x) · sin (rotate_half(x) = (−x₂, x₁) for halves x₁, x₂). */
int rotary_cuda(const rotary_params *p, void *stream);

#ifdef __cplusplus
}
#endif

#endif
