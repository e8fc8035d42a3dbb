/* lutflash._C.rms_norm, silu_mul, rotary: argument validation for the row-wise ops of a
 * decoder step (cuda/decode_ops.cu). CUDA only: on the CPU, lutflash/decode_ops.py runs the
 * torch composition the kernels stand for. */
#include "tensor_arg.h"

#include <math.h>

#include "lutflash_cuda.h" /* the params structs; the launchers exist only in CUDA builds */
#include "methods.h"
#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
static int rms_norm_launch(const void *arg, void *stream) {
    return rms_norm_cuda((const rms_norm_params *)arg, stream);
}
static int silu_mul_launch(const void *arg, void *stream) {
    return silu_mul_cuda((const silu_mul_params *)arg, stream);
}
static int rotary_launch(const void *arg, void *stream) {
    return rotary_cuda((const rotary_params *)arg, stream);
}
#else /* run() raises before a launcher would be called */
#define rms_norm_launch NULL
#define silu_mul_launch NULL
#define rotary_launch NULL
#endif

/* x: a CUDA tensor of float32/float16/bfloat16 with ndim dimensions, rows dense. */
static int check_rows(const lf_tensor *x, int ndim, const char *op) {
    if (lf_check_supported_device(x) < 0) return -1;
    if (x->device_type != LF_DEVICE_CUDA) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a CUDA tensor (on the CPU, lutflash runs torch's ops)", x->name);
        return -1;
    }
    if (lf_require_cuda(op) < 0) return -1;
    return lf_check_dtype(x, LF_DTYPES_FLOAT) < 0 || lf_check_ndim(x, ndim) < 0 ||
                   lf_check_rows_dense(x) < 0 || lf_check_element_aligned(x) < 0
               ? -1
               : 0;
}

/* t: like `ref` (device and dtype), of the given shape, dense; out: also writable and apart
 * from every input. */
static int check_like(const lf_tensor *t, const lf_tensor *ref, int ndim, const int64_t *shape) {
    return lf_check_same_device(t, ref) < 0 || lf_check_same_dtype(t, ref) < 0 ||
                   lf_check_shape(t, ndim, shape) < 0 || lf_check_contiguous(t) < 0 ||
                   lf_check_element_aligned(t) < 0
               ? -1
               : 0;
}
static int check_out(const lf_tensor *out, const lf_tensor *ref, int ndim, const int64_t *shape,
                     const lf_tensor *inputs, int count) {
    if (check_like(out, ref, ndim, shape) < 0 || lf_check_writable(out) < 0) return -1;
    for (int i = 0; i < count; ++i) {
        if (lf_tensor_present(&inputs[i]) && lf_check_no_overlap(out, &inputs[i]) < 0) return -1;
    }
    return 0;
}

static int run(const char *op, const lf_tensor *x, int (*launch)(const void *, void *),
               const void *params, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return lf_cuda_call(op, x->device_id, launch, params, stream);
#else
    (void)x, (void)launch, (void)params, (void)stream;
    return lf_require_cuda(op);
#endif
}

enum { N_X, N_RESIDUAL, N_WEIGHT, N_OUT, N_SUM, N_COUNT };

/* rms_norm(x, residual, weight, out, sum, eps, stream): x, residual (or None), out and sum (or
 * None, with residual) (rows, hidden); weight (hidden). */
static PyObject *py_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError,
                     "rms_norm(x, residual, weight, out, sum, eps, stream) takes 7 arguments, "
                     "got %zd", nargs);
        return NULL;
    }
    static const char *const names[N_COUNT] = {"x", "residual", "weight", "out", "sum"};
    lf_tensor t[N_COUNT];
    for (int i = 0; i < N_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    void *stream = NULL;
    for (int i = 0; i < N_COUNT; ++i) {
        const int optional = i == N_RESIDUAL || i == N_SUM;
        if ((optional ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                      : lf_tensor_borrow(args[i], names[i], &t[i])) < 0)
            goto done;
    }
    const double eps = PyFloat_AsDouble(args[5]);
    if (eps == -1.0 && PyErr_Occurred()) goto done;
    if (!(eps >= 0.0) || !isfinite(eps)) {
        PyErr_Format(PyExc_ValueError, "eps: expected a finite number >= 0, got %R", args[5]);
        goto done;
    }
    if (lf_parse_stream(args[6], &stream) < 0) goto done;
    lf_tensor *x = &t[N_X], *residual = &t[N_RESIDUAL];
    if (check_rows(x, 2, "rms_norm") < 0) goto done;
    const int64_t rows = x->shape[0], hidden = x->shape[1];
    const int64_t row_shape[2] = {rows, hidden}, weight_shape[1] = {hidden};
    if (rows > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "x: expected at most %d rows, got %lld", INT32_MAX,
                     (long long)rows);
        goto done;
    }
    if (lf_tensor_present(residual) &&
        (lf_check_same_device(residual, x) < 0 || lf_check_same_dtype(residual, x) < 0 ||
         lf_check_shape(residual, 2, row_shape) < 0 || lf_check_rows_dense(residual) < 0 ||
         lf_check_element_aligned(residual) < 0))
        goto done;
    if (lf_tensor_present(&t[N_SUM]) != lf_tensor_present(residual)) {
        PyErr_SetString(PyExc_ValueError,
                        "sum: expected a tensor exactly when residual is given");
        goto done;
    }
    if (check_like(&t[N_WEIGHT], x, 1, weight_shape) < 0 ||
        check_out(&t[N_OUT], x, 2, row_shape, t, N_OUT) < 0 ||
        (lf_tensor_present(&t[N_SUM]) &&
         (check_out(&t[N_SUM], x, 2, row_shape, t, N_SUM) < 0)))
        goto done;
    rms_norm_params p = {0};
    p.x = x->data, p.residual = residual->data, p.weight = t[N_WEIGHT].data;
    p.out = t[N_OUT].data, p.sum = t[N_SUM].data;
    p.rows = rows, p.hidden = hidden, p.ldx = x->strides[0];
    p.ldr = lf_tensor_present(residual) ? residual->strides[0] : 0;
    p.eps = (float)eps, p.x_type = lf_scalar_of(x->dtype);
    if (hidden > 0 && run("rms_norm", x, rms_norm_launch, &p, stream) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < N_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

/* silu_mul(x, out, stream): x (rows, 2·d), out (rows, d). */
static PyObject *py_silu_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "silu_mul(x, out, stream) takes 3 arguments, got %zd",
                     nargs);
        return NULL;
    }
    lf_tensor t[2];
    lf_tensor_borrow_optional(NULL, "x", &t[0]);
    lf_tensor_borrow_optional(NULL, "out", &t[1]);
    PyObject *result = NULL;
    void *stream = NULL;
    if (lf_tensor_borrow(args[0], "x", &t[0]) < 0 || lf_tensor_borrow(args[1], "out", &t[1]) < 0 ||
        lf_parse_stream(args[2], &stream) < 0 || check_rows(&t[0], 2, "silu_mul") < 0)
        goto done;
    if (t[0].shape[1] % 2 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "x: expected an even last dimension (gate and up halves), got %lld",
                     (long long)t[0].shape[1]);
        goto done;
    }
    const int64_t out_shape[2] = {t[0].shape[0], t[0].shape[1] / 2};
    if (check_out(&t[1], &t[0], 2, out_shape, &t[0], 1) < 0) goto done;
    silu_mul_params p = {0};
    p.x = t[0].data, p.out = t[1].data, p.rows = out_shape[0], p.d = out_shape[1];
    p.ldx = t[0].strides[0], p.x_type = lf_scalar_of(t[0].dtype);
    if (run("silu_mul", &t[0], silu_mul_launch, &p, stream) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    lf_tensor_release(&t[0]);
    lf_tensor_release(&t[1]);
    return result;
}

enum { R_X, R_COS, R_SIN, R_OUT, R_COUNT };

/* rotary(x, cos, sin, out, stream): x (outer, inner, head_dim) with its last stride 1, cos and
 * sin (outer or 1, head_dim) dense, out (outer, inner, head_dim) dense. */
static PyObject *py_rotary(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "rotary(x, cos, sin, out, stream) takes 5 arguments, got %zd",
                     nargs);
        return NULL;
    }
    static const char *const names[R_COUNT] = {"x", "cos", "sin", "out"};
    lf_tensor t[R_COUNT];
    for (int i = 0; i < R_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    void *stream = NULL;
    for (int i = 0; i < R_COUNT; ++i) {
        if (lf_tensor_borrow(args[i], names[i], &t[i]) < 0) goto done;
    }
    if (lf_parse_stream(args[4], &stream) < 0) goto done;
    lf_tensor *x = &t[R_X];
    if (check_rows(x, 3, "rotary") < 0) goto done;
    const int64_t outer = x->shape[0], inner = x->shape[1], head_dim = x->shape[2];
    if (head_dim % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "x: expected an even head dimension, got %lld",
                     (long long)head_dim);
        goto done;
    }
    const int64_t cs_rows = t[R_COS].ndim == 2 ? t[R_COS].shape[0] : -1;
    const int64_t cs_shape[2] = {cs_rows == 1 ? 1 : outer, head_dim};
    const int64_t out_shape[3] = {outer, inner, head_dim};
    if (check_like(&t[R_COS], x, 2, cs_shape) < 0 || check_like(&t[R_SIN], x, 2, cs_shape) < 0 ||
        check_out(&t[R_OUT], x, 3, out_shape, t, R_OUT) < 0)
        goto done;
    if (inner * (head_dim / 2) > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "x: expected at most 2^31 - 1 pairs per outer index, got "
                     "%lld", (long long)(inner * (head_dim / 2)));
        goto done;
    }
    rotary_params p = {0};
    p.x = x->data, p.cos = t[R_COS].data, p.sin = t[R_SIN].data, p.out = t[R_OUT].data;
    p.outer = outer, p.inner = inner, p.head_dim = head_dim;
    p.xs_outer = x->strides[0], p.xs_inner = x->strides[1];
    p.cs_outer = cs_rows == 1 ? 0 : head_dim;
    p.x_type = lf_scalar_of(x->dtype);
    if (head_dim > 0 && run("rotary", x, rotary_launch, &p, stream) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < R_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef decode_ops_methods[] = {
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL,
     "rms_norm(x, residual, weight, out, sum, eps, stream): CUDA rows; sum = x + residual "
     "(when given), out = RMSNorm(sum or x) * weight."},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL,
     "silu_mul(x, out, stream): CUDA rows; out = silu(x[:, :d]) * x[:, d:]."},
    {"rotary", (PyCFunction)(void (*)(void))py_rotary, METH_FASTCALL,
     "rotary(x, cos, sin, out, stream): CUDA; out = x * cos + rotate_half(x) * sin."},
    {NULL, NULL, 0, NULL},
};
