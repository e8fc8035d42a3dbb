/* lutflash._C.attention_forward / attention_backward: argument validation and dispatch to
 * the CPU kernels (csrc/attention_cpu.c) or the CUDA kernels (cuda/attention_*.cu, fp16 and
 * bf16 only, through lf_cuda_call on the tensors' device and the caller's stream).
 * Python allocates out, lse, the gradients, delta and the workspace; this file checks every
 * one of them again, since nothing a caller passes may crash the process. */
#include "tensor_arg.h"

#include <string.h>

#include <math.h>
#include <stdio.h>

#include "attention_cpu.h"
#include "methods.h"
#include "philox.h"
#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif


static int parse_float(PyObject *obj, const char *name, double *value) {
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *value = PyFloat_AsDouble(obj);
    return *value == -1.0 && PyErr_Occurred() ? -1 : 0;
}

/* The scalar arguments shared by the forward and backward entry points. */
typedef struct {
    int64_t max_seqlen_q, max_seqlen_k, num_threads, variant;
    void *stream;
    int32_t *offsets[2]; /* private copies of CPU cu_seqlens (q, k), freed by the caller */
} call_options;

static int parse_scalars(PyObject *const *args, attention_fwd_params *p, call_options *o) {
    double scale, softcap, dropout;
    int64_t left, right;
    if (lf_parse_int(args[0], "max_seqlen_q", 0, INT32_MAX, &o->max_seqlen_q) < 0 ||
        lf_parse_int(args[1], "max_seqlen_k", 0, INT32_MAX, &o->max_seqlen_k) < 0 ||
        parse_float(args[2], "softmax_scale", &scale) < 0 ||
        parse_float(args[3], "softcap", &softcap) < 0 ||
        lf_parse_int(args[4], "window_left", -1, INT64_MAX, &left) < 0 ||
        lf_parse_int(args[5], "window_right", -1, INT64_MAX, &right) < 0 ||
        parse_float(args[6], "dropout_p", &dropout) < 0 ||
        lf_parse_int(args[7], "num_threads", 1, 4096, &o->num_threads) < 0 ||
        lf_parse_int(args[8], "variant", 0, ATTENTION_CPU_VARIANT_MAX, &o->variant) < 0 ||
        lf_parse_stream(args[9], &o->stream) < 0)
        return -1;
    /* PyErr_Format has no %g (Python >= 3.12 raises SystemError on it): format it first. */
    char got[32];
    /* The kernels compute in float32: the values must be valid after rounding to it. */
    if (!((float)scale > 0.0f && isfinite((float)scale))) {
        snprintf(got, sizeof(got), "%g", scale);
        PyErr_Format(PyExc_ValueError, "softmax_scale: expected a positive finite float, got %s",
                     got);
        return -1;
    }
    if (!(softcap >= 0.0 && isfinite((float)softcap))) {
        snprintf(got, sizeof(got), "%g", softcap);
        PyErr_Format(PyExc_ValueError, "softcap: expected a finite float >= 0, got %s", got);
        return -1;
    }
    if (!(dropout >= 0.0 && (float)dropout < 1.0f)) {
        snprintf(got, sizeof(got), "%g", dropout);
        PyErr_Format(PyExc_ValueError, "dropout_p: expected a float in [0, 1), got %s", got);
        return -1;
    }
    p->softmax_scale = (float)scale;
    p->softcap = (float)softcap;
    /* Sequences are shorter than 2^31, so a wider window is unbounded; clamping keeps the
     * band arithmetic of the kernels far from overflow. */
    p->window_left = left > INT32_MAX ? -1 : left;
    p->window_right = right > INT32_MAX ? -1 : right;
    p->dropout_p = (float)dropout;
    p->dropout_threshold = lf_dropout_threshold(dropout);
    p->num_threads = (int)o->num_threads;
    p->variant = (int)o->variant;
    return 0;
}

/* Strides must not be negative and the last dimension (the head dim) must be contiguous;
 * the other strides are free (slices and transposes of bigger buffers are fine to read). */
static int check_inner_contiguous(const lf_tensor *t) {
    if (lf_tensor_numel(t) == 0) return 0; /* no element is read or written */
    int ok = t->ndim >= 1 && (t->shape[t->ndim - 1] <= 1 || t->strides[t->ndim - 1] == 1);
    for (int i = 0; ok && i < t->ndim; ++i) ok = t->strides[i] >= 0;
    if (ok) return 0;
    PyErr_Format(PyExc_ValueError,
                 "%s: expected non-negative strides and a contiguous last dimension (the head "
                 "dim), got stride %lld there (call .contiguous())",
                 t->name, (long long)(t->ndim >= 1 ? t->strides[t->ndim - 1] : 0));
    return -1;
}

/* A tensor read as q, k, v, out or dout: `shape` (-1 = any), same device and dtype as q. */
static int check_like(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape) {
    if (lf_check_same_device(t, q) < 0 || lf_check_same_dtype(t, q) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 || check_inner_contiguous(t) < 0)
        return -1;
    return 0;
}

/* A tensor the call writes: like check_like, plus rows that do not overlap each other. */
static int check_output_like(const lf_tensor *t, const lf_tensor *q, lf_dtype dtype, int ndim,
                             const int64_t *shape) {
    if (lf_check_same_device(t, q) < 0 || lf_check_dtype(t, dtype) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 || lf_check_rows_dense(t) < 0 ||
        check_inner_contiguous(t) < 0 || lf_check_writable(t) < 0)
        return -1;
    return 0;
}

static int check_lse_like(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape,
                          int writable) {
    if (lf_check_same_device(t, q) < 0 || lf_check_dtype(t, LF_DTYPE_F32) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 ||
        (lf_tensor_numel(t) > 0 && lf_check_contiguous(t) < 0) ||
        (writable && lf_check_writable(t) < 0))
        return -1;
    return 0;
}

/* On the CPU the offsets are copied before they are checked, and the kernels read the copy:
 * another thread may write the tensor while the kernels run without the GIL. */
static int check_cu_seqlens(const lf_tensor *cu, const lf_tensor *q, int64_t total,
                            int64_t max_seqlen, const char *max_name, int32_t **copy) {
    if (lf_check_same_device(cu, q) < 0 || lf_check_dtype(cu, LF_DTYPE_I32) < 0 ||
        lf_check_ndim(cu, 1) < 0 || lf_check_contiguous(cu) < 0)
        return -1;
    if (cu->shape[0] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected batch + 1 >= 1 offsets, got none", cu->name);
        return -1;
    }
    if (cu->shape[0] - 1 > INT32_MAX) {
        PyErr_Format(PyExc_ValueError,
                     "%s: batches above 2^31 - 1 sequences are not supported, got %lld", cu->name,
                     (long long)(cu->shape[0] - 1));
        return -1;
    }
    if (cu->device_type != LF_DEVICE_CPU) return 0; /* values live on the GPU */
    int32_t *offsets = PyMem_Malloc(sizeof(int32_t) * (size_t)cu->shape[0]);
    if (offsets == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(offsets, cu->data, sizeof(int32_t) * (size_t)cu->shape[0]);
    *copy = offsets;
    if (offsets[0] < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected offsets >= 0, got %d first", cu->name,
                     offsets[0]);
        return -1;
    }
    for (int64_t b = 0; b + 1 < cu->shape[0]; ++b) {
        const int64_t length = (int64_t)offsets[b + 1] - offsets[b];
        if (length < 0) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected non-decreasing offsets, got %d then %d at index %lld",
                         cu->name, offsets[b], offsets[b + 1], (long long)b);
            return -1;
        }
        if (length > max_seqlen) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected every sequence length <= %s = %lld, got %lld at index "
                         "%lld", cu->name, max_name, (long long)max_seqlen, (long long)length,
                         (long long)b);
            return -1;
        }
    }
    if (offsets[cu->shape[0] - 1] > total) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the last offset %d is beyond the %lld rows of the packed tensor",
                     cu->name, offsets[cu->shape[0] - 1], (long long)total);
        return -1;
    }
    return 0;
}

enum { IN_Q, IN_K, IN_V, IN_CU_Q, IN_CU_K, IN_ALIBI, IN_RNG, IN_COUNT };

/* Validates q, k, v, cu_seqlens, alibi_slopes and rng_state and fills the shape, stride and
 * feature fields of p. lse_shape receives the expected shape of lse (and of delta, dlse). */
static int check_inputs(lf_tensor *t, call_options *o, attention_fwd_params *p,
                        int64_t lse_shape[3], int *lse_ndim) {
    lf_tensor *q = &t[IN_Q], *k = &t[IN_K], *v = &t[IN_V];
    lf_tensor *cu_q = &t[IN_CU_Q], *cu_k = &t[IN_CU_K];
    if (lf_check_supported_device(q) < 0 || lf_check_dtype(q, LF_DTYPES_FLOAT) < 0) return -1;
    const int varlen = lf_tensor_present(cu_q);
    if (varlen != lf_tensor_present(cu_k)) {
        PyErr_SetString(PyExc_ValueError,
                        "cu_seqlens_k: expected cu_seqlens_q and cu_seqlens_k both given or both "
                        "None");
        return -1;
    }
    const int ndim = varlen ? 3 : 4;
    if (lf_check_ndim(q, ndim) < 0 || check_inner_contiguous(q) < 0) return -1;
    const int64_t d = q->shape[ndim - 1], heads_q = q->shape[ndim - 2];
    if (d < 1 || d > ATTENTION_MAX_HEAD_DIM) {
        PyErr_Format(PyExc_ValueError, "q: expected a head dim in [1, %d], got %lld",
                     ATTENTION_MAX_HEAD_DIM, (long long)d);
        return -1;
    }
    if (lf_check_ndim(k, ndim) < 0) return -1;
    const int64_t heads_kv = k->shape[ndim - 2];
    if (heads_q < 1 || heads_kv < 1 || heads_q % heads_kv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "k: expected a number of kv heads that divides the %lld query heads, got "
                     "%lld", (long long)heads_q, (long long)heads_kv);
        return -1;
    }
    const int64_t batch = varlen ? cu_q->shape[0] - 1 : q->shape[0];
    int64_t k_shape[4] = {-1, -1, heads_kv, d};
    if (!varlen) k_shape[0] = batch;
    else k_shape[1] = heads_kv, k_shape[2] = d;
    if (check_like(k, q, ndim, k_shape) < 0) return -1;
    const int64_t v_shape[4] = {k->shape[0], k->shape[1], k->shape[2], varlen ? 0 : k->shape[3]};
    if (check_like(v, q, ndim, v_shape) < 0) return -1;

    p->q = q->data, p->k = k->data, p->v = v->data;
    p->dtype = lf_scalar_of(q->dtype);
    p->batch = batch;
    p->heads_q = heads_q;
    p->heads_kv = heads_kv;
    p->head_dim = d;
    const int row = varlen ? 0 : 1, head = row + 1;
    p->q_batch_stride = varlen ? 0 : q->strides[0];
    p->k_batch_stride = varlen ? 0 : k->strides[0];
    p->v_batch_stride = varlen ? 0 : v->strides[0];
    p->q_row_stride = q->strides[row], p->q_head_stride = q->strides[head];
    p->k_row_stride = k->strides[row], p->k_head_stride = k->strides[head];
    p->v_row_stride = v->strides[row], p->v_head_stride = v->strides[head];
    if (varlen) {
        if (check_cu_seqlens(cu_q, q, q->shape[0], o->max_seqlen_q, "max_seqlen_q",
                             &o->offsets[0]) < 0)
            return -1;
        const int64_t cu_shape[1] = {batch + 1};
        if (lf_check_shape(cu_k, 1, cu_shape) < 0 ||
            check_cu_seqlens(cu_k, q, k->shape[0], o->max_seqlen_k, "max_seqlen_k",
                             &o->offsets[1]) < 0)
            return -1;
        p->cu_seqlens_q = o->offsets[0] ? o->offsets[0] : (const int32_t *)cu_q->data;
        p->cu_seqlens_k = o->offsets[1] ? o->offsets[1] : (const int32_t *)cu_k->data;
        p->seqlen_q = o->max_seqlen_q;
        p->seqlen_k = o->max_seqlen_k;
        p->total_q = q->shape[0];
        p->total_k = k->shape[0];
        lse_shape[0] = heads_q, lse_shape[1] = q->shape[0];
        *lse_ndim = 2;
        p->lse_batch_stride = 0;
        p->lse_head_stride = q->shape[0];
    } else {
        p->seqlen_q = q->shape[1];
        p->seqlen_k = k->shape[1];
        if (p->seqlen_q > INT32_MAX || p->seqlen_k > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: sequence lengths above 2^31 - 1 are not supported",
                         p->seqlen_q > INT32_MAX ? q->name : k->name);
            return -1;
        }
        lse_shape[0] = batch, lse_shape[1] = heads_q, lse_shape[2] = p->seqlen_q;
        *lse_ndim = 3;
        p->lse_batch_stride = heads_q * p->seqlen_q;
        p->lse_head_stride = p->seqlen_q;
    }
    if (batch * heads_q > (int64_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "q: batch * heads above 2^32 is not supported");
        return -1;
    }

    lf_tensor *alibi = &t[IN_ALIBI];
    if (lf_tensor_present(alibi)) {
        if (lf_check_same_device(alibi, q) < 0 || lf_check_dtype(alibi, LF_DTYPE_F32) < 0 ||
            lf_check_contiguous(alibi) < 0)
            return -1;
        const int64_t per_head[1] = {heads_q}, per_batch[2] = {batch, heads_q};
        if (alibi->ndim == 2 ? lf_check_shape(alibi, 2, per_batch) < 0
                             : lf_check_shape(alibi, 1, per_head) < 0)
            return -1;
        if (alibi->device_type == LF_DEVICE_CPU) { /* on a GPU, reading would synchronize */
            const int64_t count = lf_tensor_numel(alibi);
            for (int64_t i = 0; i < count; ++i) {
                if (!isfinite(((const float *)alibi->data)[i])) {
                    PyErr_Format(PyExc_ValueError,
                                 "%s: expected finite values, got NaN or infinity at index "
                                 "%lld", alibi->name, (long long)i);
                    return -1;
                }
            }
        }
        p->alibi_slopes = (const float *)alibi->data;
        p->alibi_batch_stride = alibi->ndim == 2 ? heads_q : 0;
    }
    lf_tensor *rng = &t[IN_RNG];
    if (p->dropout_p > 0.0f && !lf_tensor_present(rng)) {
        PyErr_SetString(PyExc_ValueError, "rng_state: required when dropout_p > 0");
        return -1;
    }
    if (lf_tensor_present(rng)) {
        const int64_t rng_shape[1] = {2};
        /* The seed and offset are read here, so a CPU rng_state serves CUDA tensors too. */
        if ((rng->device_type != LF_DEVICE_CPU && lf_check_same_device(rng, q) < 0) ||
            lf_check_dtype(rng, LF_DTYPE_I64) < 0 ||
            lf_check_shape(rng, 1, rng_shape) < 0 || lf_check_contiguous(rng) < 0)
            return -1;
        if (rng->device_type != LF_DEVICE_CPU) {
            PyErr_SetString(PyExc_ValueError,
                            "rng_state: expected a CPU tensor (its values are read on the host)");
            return -1;
        }
        p->dropout_seed = (uint64_t)((const int64_t *)rng->data)[0];
        p->dropout_offset = (uint64_t)((const int64_t *)rng->data)[1];
    }
    return 0;
}

static int check_workspace(const lf_tensor *ws, const lf_tensor *q, int64_t need) {
    if (lf_check_same_device(ws, q) < 0 || lf_check_dtype(ws, LF_DTYPE_U8) < 0 ||
        lf_check_ndim(ws, 1) < 0 || lf_check_contiguous(ws) < 0 || lf_check_aligned(ws, 64) < 0 ||
        lf_check_writable(ws) < 0)
        return -1;
    if (ws->shape[0] < need) {
        PyErr_Format(PyExc_ValueError, "workspace: expected at least %lld bytes, got %lld",
                     (long long)need, (long long)ws->shape[0]);
        return -1;
    }
    return 0;
}

/* Outputs must not share memory with any other tensor of the call. */
static int check_disjoint(lf_tensor *t, int count, const int *outputs, int output_count) {
    for (int a = 0; a < output_count; ++a) {
        for (int b = 0; b < count; ++b) {
            if (b != outputs[a] && lf_check_no_overlap(&t[outputs[a]], &t[b]) < 0) return -1;
        }
    }
    return 0;
}

/* What the CUDA kernels need beyond the common checks: fp16/bf16, a head dim that is a
 * multiple of 8 and 16-byte aligned rows (every 16-byte chunk of a row is one cp.async).
 * python/lutflash/attention.py pads and copies inputs that miss these. */
static int check_cuda_layout(const lf_tensor *t, int count, const char *op) {
    if (lf_require_cuda(op) < 0) return -1;
    const lf_tensor *q = &t[0];
    if (q->dtype != LF_DTYPE_F16 && q->dtype != LF_DTYPE_BF16) {
        PyErr_Format(PyExc_NotImplementedError,
                     "%s: the CUDA kernels take float16 or bfloat16, got %s tensors", op,
                     lf_dtype_name(q->dtype));
        return -1;
    }
    if (q->shape[q->ndim - 1] % 8 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s: the CUDA kernels need a head dim that is a multiple of 8, got %lld", op,
                     (long long)q->shape[q->ndim - 1]);
        return -1;
    }
    for (int i = 0; i < count; ++i) {
        const lf_tensor *x = &t[i];
        if (!lf_tensor_present(x) || lf_tensor_numel(x) == 0) continue;
        int ok = (uintptr_t)x->data % 16 == 0;
        for (int a = 0; ok && a + 1 < x->ndim; ++a) ok = x->strides[a] % 8 == 0;
        if (!ok) {
            PyErr_Format(PyExc_ValueError,
                         "%s: the CUDA kernels need 16-byte aligned rows (strides that are "
                         "multiples of 8 elements, an aligned base); call .contiguous()",
                         x->name);
            return -1;
        }
    }
    return 0;
}

static int launch_attention_forward(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return attention_forward_cuda((const attention_fwd_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}

static int launch_attention_backward(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return attention_backward_cuda((const attention_bwd_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}

static int64_t cpu_workspace_bytes(int64_t d, int backward, int64_t threads, int64_t heads_q,
                                   int64_t batch, int64_t total_q) {
    if (!backward) return attention_cpu_forward_thread_bytes(d) * threads;
    return attention_cpu_backward_shared_bytes(d, heads_q, batch, total_q) +
           attention_cpu_backward_thread_bytes(d) * threads;
}

/* attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, heads_q, batch, total_q
 * [, heads_kv, seqlen_q, seqlen_k]): the CUDA forward's decode path (split-KV) needs the
 * three trailing shapes (seqlen_q and seqlen_k: dense Sq and Sk, or the varlen maxima);
 * without them the CUDA size is 0 and the forward never takes that path. The CUDA backward's
 * size is the fast path's float32 dQ accumulator (total_q = B * Sq rows for dense inputs);
 * the deterministic backward needs none. */
static PyObject *py_attention_workspace_bytes(PyObject *self, PyObject *const *args,
                                              Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7 && nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, "
                        "heads_q, batch, total_q[, heads_kv, seqlen_q, seqlen_k])");
        return NULL;
    }
    int64_t d, threads, heads_q, batch, total_q, heads_kv = 0, seqlen_q = 0, seqlen_k = 0;
    const int on_cuda = PyObject_IsTrue(args[0]), backward = PyObject_IsTrue(args[2]);
    if (on_cuda < 0 || backward < 0 ||
        lf_parse_int(args[1], "head_dim", 1, ATTENTION_MAX_HEAD_DIM, &d) < 0 ||
        lf_parse_int(args[3], "num_threads", 1, 4096, &threads) < 0 ||
        lf_parse_int(args[4], "heads_q", 0, INT32_MAX, &heads_q) < 0 ||
        lf_parse_int(args[5], "batch", 0, INT32_MAX, &batch) < 0 ||
        lf_parse_int(args[6], "total_q", 0, INT64_MAX / 1024, &total_q) < 0)
        return NULL;
    if (nargs == 10 &&
        (lf_parse_int(args[7], "heads_kv", 0, INT32_MAX, &heads_kv) < 0 ||
         lf_parse_int(args[8], "seqlen_q", 0, INT32_MAX, &seqlen_q) < 0 ||
         lf_parse_int(args[9], "seqlen_k", 0, INT32_MAX, &seqlen_k) < 0))
        return NULL;
    if (on_cuda) {
#ifdef LUTFLASH_WITH_CUDA
        if (backward)
            return PyLong_FromLongLong(attention_cuda_backward_workspace_bytes(heads_q, d, total_q));
        if (heads_kv > 0 && heads_q % heads_kv == 0)
            return PyLong_FromLongLong(attention_cuda_forward_workspace_bytes(
                batch, heads_q, heads_kv, seqlen_q, seqlen_k, d, total_q));
#endif
        return PyLong_FromLong(0);
    }
    return PyLong_FromLongLong(cpu_workspace_bytes(d, backward, threads, heads_q, batch, total_q));
}

enum { FWD_OUT = IN_COUNT, FWD_LSE, FWD_WORKSPACE, FWD_COUNT };

static PyObject *py_attention_forward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 20) {
        PyErr_Format(PyExc_TypeError,
                     "attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, "
                     "rng_state, out, lse, workspace, max_seqlen_q, max_seqlen_k, softmax_scale, "
                     "softcap, window_left, window_right, dropout_p, num_threads, variant, "
                     "stream) takes 20 arguments, got %zd", nargs);
        return NULL;
    }
    static const char *const names[FWD_COUNT] = {
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "rng_state",
        "out", "lse", "workspace"};
    lf_tensor t[FWD_COUNT];
    for (int i = 0; i < FWD_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    attention_fwd_params p = {0};
    call_options o = {0};
    int64_t lse_shape[3];
    int lse_ndim = 0;
    if (parse_scalars(args + FWD_COUNT, &p, &o) < 0) goto done;
    for (int i = 0; i < FWD_COUNT; ++i) {
        const int optional = i == IN_CU_Q || i == IN_CU_K || i == IN_ALIBI || i == IN_RNG;
        if ((optional ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                      : lf_tensor_borrow(args[i], names[i], &t[i])) < 0)
            goto done;
    }
    lf_tensor *q = &t[IN_Q], *out = &t[FWD_OUT], *lse = &t[FWD_LSE];
    if (check_inputs(t, &o, &p, lse_shape, &lse_ndim) < 0) goto done;
    if (check_output_like(out, q, q->dtype, q->ndim, q->shape) < 0 ||
        check_lse_like(lse, q, lse_ndim, lse_shape, 1) < 0)
        goto done;
    int64_t need = 0;
    if (q->device_type == LF_DEVICE_CPU)
        need = attention_cpu_forward_thread_bytes(p.head_dim);
#ifdef LUTFLASH_WITH_CUDA
    else /* the decode path's split records: the kernels trust this size */
        need = attention_cuda_forward_workspace_bytes(
            p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim,
            p.cu_seqlens_q ? p.total_q : p.batch * p.seqlen_q);
#endif
    const int outputs[3] = {FWD_OUT, FWD_LSE, FWD_WORKSPACE};
    if (check_workspace(&t[FWD_WORKSPACE], q, need) < 0 || check_disjoint(t, FWD_COUNT, outputs, 3) < 0)
        goto done;
    const int on_cuda = q->device_type == LF_DEVICE_CUDA;
    if (on_cuda) {
        const lf_tensor layout[4] = {t[IN_Q], t[IN_K], t[IN_V], t[FWD_OUT]};
        if (check_cuda_layout(layout, 4, "flash_attention") < 0) goto done;
    }
    const int row = q->ndim == 3 ? 0 : 1;
    p.out = out->data;
    p.lse = (float *)lse->data;
    p.out_batch_stride = q->ndim == 3 ? 0 : out->strides[0];
    p.out_row_stride = out->strides[row];
    p.out_head_stride = out->strides[row + 1];
    p.workspace = t[FWD_WORKSPACE].data;
    p.workspace_bytes = t[FWD_WORKSPACE].shape[0];
    if (on_cuda) {
        if (lf_cuda_call("flash_attention", q->device_id, launch_attention_forward, &p,
                         o.stream) < 0)
            goto done;
    } else {
        Py_BEGIN_ALLOW_THREADS
        attention_forward_cpu(&p, (int)o.variant);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(o.offsets[0]);
    PyMem_Free(o.offsets[1]);
    for (int i = 0; i < FWD_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

enum {
    BWD_DOUT = IN_COUNT, BWD_OUT, BWD_LSE, BWD_DLSE, BWD_DQ, BWD_DK, BWD_DV, BWD_DELTA,
    BWD_WORKSPACE, BWD_COUNT
};

static PyObject *py_attention_backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 27) {
        PyErr_Format(PyExc_TypeError,
                     "attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, "
                     "rng_state, dout, out, lse, dlse, dq, dk, dv, delta, workspace, "
                     "max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left, "
                     "window_right, dropout_p, num_threads, variant, stream, deterministic) "
                     "takes 27 arguments, got %zd", nargs);
        return NULL;
    }
    static const char *const names[BWD_COUNT] = {
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "rng_state", "dout",
        "out", "lse", "dlse", "dq", "dk", "dv", "delta", "workspace"};
    lf_tensor t[BWD_COUNT];
    for (int i = 0; i < BWD_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    attention_bwd_params bp = {0};
    attention_fwd_params *p = &bp.fwd;
    call_options o = {0};
    int64_t lse_shape[3], deterministic = 1;
    int lse_ndim = 0;
    if (parse_scalars(args + BWD_COUNT, p, &o) < 0 ||
        lf_parse_int(args[26], "deterministic", 0, 1, &deterministic) < 0)
        goto done;
    bp.deterministic = (int)deterministic;
    for (int i = 0; i < BWD_COUNT; ++i) {
        const int optional = i == IN_CU_Q || i == IN_CU_K || i == IN_ALIBI || i == IN_RNG ||
                             i == BWD_DLSE;
        if ((optional ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                      : lf_tensor_borrow(args[i], names[i], &t[i])) < 0)
            goto done;
    }
    lf_tensor *q = &t[IN_Q], *k = &t[IN_K], *v = &t[IN_V];
    if (check_inputs(t, &o, p, lse_shape, &lse_ndim) < 0) goto done;
    if (check_like(&t[BWD_DOUT], q, q->ndim, q->shape) < 0 ||
        check_like(&t[BWD_OUT], q, q->ndim, q->shape) < 0 ||
        check_lse_like(&t[BWD_LSE], q, lse_ndim, lse_shape, 0) < 0 ||
        (lf_tensor_present(&t[BWD_DLSE]) &&
         check_lse_like(&t[BWD_DLSE], q, lse_ndim, lse_shape, 0) < 0) ||
        check_output_like(&t[BWD_DQ], q, q->dtype, q->ndim, q->shape) < 0 ||
        check_output_like(&t[BWD_DK], q, q->dtype, k->ndim, k->shape) < 0 ||
        check_output_like(&t[BWD_DV], q, q->dtype, v->ndim, v->shape) < 0 ||
        check_lse_like(&t[BWD_DELTA], q, lse_ndim, lse_shape, 1) < 0)
        goto done;
    const int64_t total_q = q->ndim == 3 ? q->shape[0] : q->shape[0] * q->shape[1];
    int64_t need = 0;
    if (q->device_type == LF_DEVICE_CPU)
        need = cpu_workspace_bytes(p->head_dim, 1, 1, p->heads_q, p->batch, total_q);
#ifdef LUTFLASH_WITH_CUDA
    else if (!deterministic)
        need = attention_cuda_backward_workspace_bytes(p->heads_q, p->head_dim, total_q);
#endif
    const int outputs[5] = {BWD_DQ, BWD_DK, BWD_DV, BWD_DELTA, BWD_WORKSPACE};
    if (check_workspace(&t[BWD_WORKSPACE], q, need) < 0 ||
        check_disjoint(t, BWD_COUNT, outputs, 5) < 0)
        goto done;
    const int on_cuda = q->device_type == LF_DEVICE_CUDA;
    if (on_cuda) {
        const lf_tensor layout[8] = {t[IN_Q], t[IN_K], t[IN_V], t[BWD_DOUT],
                                     t[BWD_OUT], t[BWD_DQ], t[BWD_DK], t[BWD_DV]};
        if (check_cuda_layout(layout, 8, "flash_attention_backward") < 0) goto done;
    }
    const int varlen = q->ndim == 3, row = varlen ? 0 : 1, head = row + 1;
    const lf_tensor *dout = &t[BWD_DOUT], *out = &t[BWD_OUT];
    const lf_tensor *dq = &t[BWD_DQ], *dk = &t[BWD_DK], *dv = &t[BWD_DV];
    p->out = out->data;
    p->out_batch_stride = varlen ? 0 : out->strides[0];
    p->out_row_stride = out->strides[row], p->out_head_stride = out->strides[head];
    p->lse = (float *)t[BWD_LSE].data;
    p->workspace = t[BWD_WORKSPACE].data;
    p->workspace_bytes = t[BWD_WORKSPACE].shape[0];
    bp.dout = dout->data;
    bp.dout_batch_stride = varlen ? 0 : dout->strides[0];
    bp.dout_row_stride = dout->strides[row], bp.dout_head_stride = dout->strides[head];
    bp.dlse = (const float *)t[BWD_DLSE].data;
    bp.dq = dq->data, bp.dk = dk->data, bp.dv = dv->data;
    bp.dq_batch_stride = varlen ? 0 : dq->strides[0];
    bp.dq_row_stride = dq->strides[row], bp.dq_head_stride = dq->strides[head];
    bp.dk_batch_stride = varlen ? 0 : dk->strides[0];
    bp.dk_row_stride = dk->strides[row], bp.dk_head_stride = dk->strides[head];
    bp.dv_batch_stride = varlen ? 0 : dv->strides[0];
    bp.dv_row_stride = dv->strides[row], bp.dv_head_stride = dv->strides[head];
    bp.delta = (float *)t[BWD_DELTA].data;
    if (on_cuda) {
        if (lf_cuda_call("flash_attention_backward", q->device_id, launch_attention_backward,
                         &bp, o.stream) < 0)
            goto done;
    } else {
        Py_BEGIN_ALLOW_THREADS
        attention_backward_cpu(&bp, (int)o.variant);
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(o.offsets[0]);
    PyMem_Free(o.offsets[1]);
    for (int i = 0; i < BWD_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef attention_methods[] = {
    {"attention_forward", (PyCFunction)(void (*)(void))py_attention_forward, METH_FASTCALL,
     "attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, out, lse, "
     "workspace, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, window_left, window_right, "
     "dropout_p, num_threads, variant, stream): exact attention; writes out and lse."},
    {"attention_backward", (PyCFunction)(void (*)(void))py_attention_backward, METH_FASTCALL,
     "attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, rng_state, dout, "
     "out, lse, dlse, dq, dk, dv, delta, workspace, max_seqlen_q, max_seqlen_k, softmax_scale, "
     "softcap, window_left, window_right, dropout_p, num_threads, variant, stream, "
     "deterministic): writes dq, dk, dv (and delta = rowsum(dout * out) - dlse); CUDA with "
     "deterministic=0 sums dQ with float32 atomics in the workspace."},
    {"attention_workspace_bytes", (PyCFunction)(void (*)(void))py_attention_workspace_bytes,
     METH_FASTCALL,
     "attention_workspace_bytes(on_cuda, head_dim, backward, num_threads, heads_q, batch, "
     "total_q[, heads_kv, seqlen_q, seqlen_k]): bytes of the workspace tensor to pass."},
    {NULL, NULL, 0, NULL},
};
