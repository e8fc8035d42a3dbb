/* Argument checks shared by the attention entry points (attention.c, attention_kvcache.c).
 * Each returns 0, or raises a Python exception naming the argument and returns -1. */
#ifndef LUTFLASH_ATTENTION_ARGS_H
#define LUTFLASH_ATTENTION_ARGS_H

#include "tensor_arg.h" /* first: Python.h must precede the system headers */

#include "attention_params.h"

/* softmax_scale, softcap, window_left and window_right into p: the floats must stay valid
 * after rounding to float32, windows wider than 2^31 - 1 become unbounded (-1). */
int attention_parse_score_options(PyObject *softmax_scale, PyObject *softcap,
                                  PyObject *window_left, PyObject *window_right,
                                  attention_fwd_params *p);
int attention_parse_float(PyObject *obj, const char *name, double *value);

/* Non-negative strides and a contiguous last dimension (the head dim). */
int attention_check_inner_contiguous(const lf_tensor *t);
/* A tensor read like q: `shape` (-1 = any), q's device and dtype. */
int attention_check_like(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape);
/* A tensor the call writes: like attention_check_like (of `dtype`), rows that do not overlap,
 * writable. */
int attention_check_output(const lf_tensor *t, const lf_tensor *q, lf_dtype dtype, int ndim,
                           const int64_t *shape);
/* lse, dlse or delta: float32, contiguous, `shape`. */
int attention_check_lse(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape,
                        int writable);
/* alibi_slopes (Hq,) or (B, Hq) float32, finite where its values can be read (the CPU);
 * fills p->alibi_slopes and p->alibi_batch_stride. An absent tensor is fine. */
int attention_check_alibi(const lf_tensor *alibi, const lf_tensor *q, int64_t batch,
                          int64_t heads_q, attention_fwd_params *p);
/* sinks (Hq,) float32, finite where its values can be read (the CPU); fills p->sinks. An
 * absent tensor is fine. */
int attention_check_sinks(const lf_tensor *sinks, const lf_tensor *q, int64_t heads_q,
                          attention_fwd_params *p);
/* A uint8 scratch buffer of at least `need` bytes, 64-byte aligned. */
int attention_check_workspace(const lf_tensor *ws, const lf_tensor *q, int64_t need);
/* The outputs t[outputs[i]] share no memory with any other tensor of t[0 .. count). */
int attention_check_disjoint(const lf_tensor *t, int count, const int *outputs,
                             int output_count);
/* The same, except that t[pair_a] and t[pair_b] may overlap each other (-1: no such pair). */
int attention_check_disjoint_except(const lf_tensor *t, int count, const int *outputs,
                                    int output_count, int pair_a, int pair_b);
/* What the CUDA kernels need beyond the common checks: t[0] (q) float16 or bfloat16 with a
 * head dim that is a multiple of 8, and every present tensor of t with 16-byte aligned rows.
 * `op` names the call in the messages. */
int attention_check_cuda_layout(const lf_tensor *t, int count, const char *op);

/* attention_forward_cuda(arg, stream) for lf_cuda_call; -1 in a build without CUDA. */
int attention_launch_forward(const void *arg, void *stream);

#endif
