/* Argument checks shared by the attention entry points (attention_args.h). */
#include "attention_args.h"

#include <math.h>
#include <stdio.h>

#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif

int attention_parse_float(PyObject *obj, const char *name, double *value) {
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *value = PyFloat_AsDouble(obj);
    return *value == -1.0 && PyErr_Occurred() ? -1 : 0;
}

int attention_parse_score_options(PyObject *softmax_scale, PyObject *softcap,
                                  PyObject *window_left, PyObject *window_right,
                                  attention_fwd_params *p) {
    double scale, cap;
    int64_t left, right;
    if (attention_parse_float(softmax_scale, "softmax_scale", &scale) < 0 ||
        attention_parse_float(softcap, "softcap", &cap) < 0 ||
        lf_parse_int(window_left, "window_left", -1, INT64_MAX, &left) < 0 ||
        lf_parse_int(window_right, "window_right", -1, INT64_MAX, &right) < 0)
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
    if (!(cap >= 0.0 && isfinite((float)cap))) {
        snprintf(got, sizeof(got), "%g", cap);
        PyErr_Format(PyExc_ValueError, "softcap: expected a finite float >= 0, got %s", got);
        return -1;
    }
    p->softmax_scale = (float)scale;
    p->softcap = (float)cap;
    /* Sequences are shorter than 2^31, so a wider window is unbounded; clamping keeps the
     * band arithmetic of the kernels far from overflow. */
    p->window_left = left > INT32_MAX ? -1 : left;
    p->window_right = right > INT32_MAX ? -1 : right;
    return 0;
}

/* Strides must not be negative and the last dimension (the head dim) must be contiguous;
 * the other strides are free (slices and transposes of bigger buffers are fine to read). */
int attention_check_inner_contiguous(const lf_tensor *t) {
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

int attention_check_like(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape) {
    if (lf_check_same_device(t, q) < 0 || lf_check_same_dtype(t, q) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 || attention_check_inner_contiguous(t) < 0)
        return -1;
    return 0;
}

int attention_check_output(const lf_tensor *t, const lf_tensor *q, lf_dtype dtype, int ndim,
                           const int64_t *shape) {
    if (lf_check_same_device(t, q) < 0 || lf_check_dtype(t, dtype) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 || lf_check_rows_dense(t) < 0 ||
        attention_check_inner_contiguous(t) < 0 || lf_check_writable(t) < 0)
        return -1;
    return 0;
}

int attention_check_lse(const lf_tensor *t, const lf_tensor *q, int ndim, const int64_t *shape,
                        int writable) {
    if (lf_check_same_device(t, q) < 0 || lf_check_dtype(t, LF_DTYPE_F32) < 0 ||
        lf_check_shape(t, ndim, shape) < 0 ||
        (lf_tensor_numel(t) > 0 && lf_check_contiguous(t) < 0) ||
        (writable && lf_check_writable(t) < 0))
        return -1;
    return 0;
}

/* A contiguous float32 tensor's values are finite, where they can be read: on the CPU (on a
 * GPU reading would synchronize; the kernels take what they get there). */
static int check_finite(const lf_tensor *t) {
    if (t->device_type != LF_DEVICE_CPU) return 0;
    const int64_t count = lf_tensor_numel(t);
    for (int64_t i = 0; i < count; ++i) {
        if (!isfinite(((const float *)t->data)[i])) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected finite values, got NaN or infinity at index %lld", t->name,
                         (long long)i);
            return -1;
        }
    }
    return 0;
}

int attention_check_alibi(const lf_tensor *alibi, const lf_tensor *q, int64_t batch,
                          int64_t heads_q, attention_fwd_params *p) {
    if (!lf_tensor_present(alibi)) return 0;
    if (lf_check_same_device(alibi, q) < 0 || lf_check_dtype(alibi, LF_DTYPE_F32) < 0 ||
        lf_check_contiguous(alibi) < 0)
        return -1;
    const int64_t per_head[1] = {heads_q}, per_batch[2] = {batch, heads_q};
    if (alibi->ndim == 2 ? lf_check_shape(alibi, 2, per_batch) < 0
                         : lf_check_shape(alibi, 1, per_head) < 0)
        return -1;
    if (check_finite(alibi) < 0) return -1;
    p->alibi_slopes = (const float *)alibi->data;
    p->alibi_batch_stride = alibi->ndim == 2 ? heads_q : 0;
    return 0;
}

int attention_check_sinks(const lf_tensor *sinks, const lf_tensor *q, int64_t heads_q,
                          attention_fwd_params *p) {
    if (!lf_tensor_present(sinks)) return 0;
    const int64_t shape[1] = {heads_q};
    if (lf_check_same_device(sinks, q) < 0 || lf_check_dtype(sinks, LF_DTYPE_F32) < 0 ||
        lf_check_shape(sinks, 1, shape) < 0 || lf_check_contiguous(sinks) < 0)
        return -1;
    if (check_finite(sinks) < 0) return -1;
    p->sinks = (const float *)sinks->data;
    return 0;
}

int attention_check_workspace(const lf_tensor *ws, const lf_tensor *q, int64_t need) {
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

int attention_check_disjoint_except(const lf_tensor *t, int count, const int *outputs,
                                    int output_count, int pair_a, int pair_b) {
    for (int a = 0; a < output_count; ++a) {
        const int o = outputs[a];
        for (int b = 0; b < count; ++b) {
            const int allowed = (o == pair_a && b == pair_b) || (o == pair_b && b == pair_a);
            if (b != o && !allowed && lf_check_no_overlap(&t[o], &t[b]) < 0) return -1;
        }
    }
    return 0;
}

int attention_check_disjoint(const lf_tensor *t, int count, const int *outputs,
                             int output_count) {
    return attention_check_disjoint_except(t, count, outputs, output_count, -1, -1);
}

/* Every 16-byte chunk of a row is one cp.async in the CUDA kernels. python/lutflash/attention.py
 * pads and copies inputs that miss these. */
int attention_check_cuda_layout(const lf_tensor *t, int count, const char *op) {
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

int attention_launch_forward(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return attention_forward_cuda((const attention_fwd_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}
