/* The C ABI of lutflash's CUDA code: every GPU entry point the extension calls.
 * Plain C; each function returns 0 or a cudaError_t value and never allocates. The stream is
 * the last argument (a cudaStream_t passed as void*). */
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

/* Workspace bytes lutgemm_cuda needs for these parameters (m, n, k, bits, ...). */
int64_t lutgemm_cuda_workspace_bytes(const lutgemm_params *p);
int lutgemm_cuda(const lutgemm_params *p, void *stream);

/* flash_attention on fp16/bf16 (cuda/attention_fwd.cu, attention_bwd.cu): head dims that are
 * multiples of 8 up to 256, every row and base 16-byte aligned; no workspace. The backward
 * writes delta, dq, dk and dv with a fixed summation order (bitwise deterministic). */
int attention_cuda_padded_head_dim(int64_t head_dim);
int attention_forward_cuda(const attention_fwd_params *p, void *stream);
int attention_backward_cuda(const attention_bwd_params *p, void *stream);

#ifdef __cplusplus
}
#endif

#endif
