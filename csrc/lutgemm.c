/* lutflash._C.lutgemm: argument validation and dispatch to the CPU or CUDA kernel. */
#include "tensor_arg.h"

#include <string.h>

#include "bcq_args.h"
#include "lutgemm_cpu.h"
#include "methods.h"
#include "runtime.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif

static int lutgemm_cuda_launch(const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    return lutgemm_cuda((const lutgemm_params *)arg, stream);
#else
    (void)arg, (void)stream;
    return -1;
#endif
}

static int64_t workspace_bytes(const lutgemm_params *p, int on_cuda) {
#ifdef LUTFLASH_WITH_CUDA
    if (on_cuda) return lutgemm_cuda_workspace_bytes(p);
#else
    (void)on_cuda;
#endif
    return lutgemm_cpu_workspace_bytes(p);
}

static PyObject *py_lutgemm_workspace_bytes(PyObject *self, PyObject *const *args,
                                            Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "lutgemm_workspace_bytes(on_cuda, m, n, k, bits, group_size, mode)");
        return NULL;
    }
    lutgemm_params p = {0};
    int64_t m;
    if (lf_parse_int(args[1], "m", 0, INT32_MAX, &m) < 0 ||
        bcq_parse_shape(args[2], args[3], args[4], args[5], args[6], &p.n, &p.k, &p.bits,
                        &p.group_size, &p.mode) < 0)
        return NULL;
    p.m = m;
    int on_cuda = PyObject_IsTrue(args[0]);
    if (on_cuda < 0) return NULL;
    if (on_cuda && lf_require_cuda("lutgemm") < 0) return NULL;
    return PyLong_FromLongLong(workspace_bytes(&p, on_cuda));
}

/* Which CPU inner loop lutgemm uses: 0 = the best this CPU supports; tests force the others. */
static int cpu_variant = 0;

static PyObject *py_lutgemm_cpu_variant(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const char *const names[] = {"best", "portable", "avx2", "avx512"};
    const int count = (int)(sizeof(names) / sizeof(names[0]));
    const int best = lutgemm_cpu_best_variant();
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "lutgemm_cpu_variant(name=None)");
        return NULL;
    }
    PyObject *previous = PyUnicode_FromString(names[cpu_variant ? cpu_variant : best]);
    if (nargs == 1 && args[0] != Py_None) {
        const char *name = PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8(args[0]) : NULL;
        int chosen = -1;
        for (int i = 0; name && i < count; ++i) {
            if (strcmp(name, names[i]) == 0) chosen = i;
        }
        if (chosen < 0 || chosen > best) {
            Py_XDECREF(previous);
            PyErr_Format(PyExc_ValueError,
                         "name: expected 'best', 'portable' or a variant this CPU supports (up "
                         "to '%s'), got %R", names[best], args[0]);
            return NULL;
        }
        cpu_variant = chosen;
    }
    return previous;
}

/* Which tables the CPU kernel looks up (LUTGEMM_TABLES_*): "auto" = float32 for float32 x,
 * int16 for float16/bfloat16 x; "float" and "int16" force one kind for every dtype (int16 for
 * float32 x is the opt-in approximate kernel, README "Usage"). */
static int cpu_tables = LUTGEMM_TABLES_AUTO;

static PyObject *py_lutgemm_cpu_tables(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    static const char *const names[] = {"auto", "float", "int16"};
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "lutgemm_cpu_tables(name=None)");
        return NULL;
    }
    PyObject *previous = PyUnicode_FromString(names[cpu_tables]);
    if (nargs == 1 && args[0] != Py_None) {
        const char *name = PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8(args[0]) : NULL;
        int chosen = -1;
        for (int i = 0; name && i < (int)(sizeof(names) / sizeof(names[0])); ++i) {
            if (strcmp(name, names[i]) == 0) chosen = i;
        }
        if (chosen < 0) {
            Py_XDECREF(previous);
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "name: expected 'auto', 'float' or 'int16', got %R",
                         args[0]);
            return NULL;
        }
        cpu_tables = chosen;
    }
    return previous;
}

enum { ARG_X, ARG_PLANES, ARG_META, ARG_BIAS, ARG_OUT, ARG_WORKSPACE, ARG_CLEAN, ARG_COUNT };

static PyObject *py_lutgemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 12 || nargs > 14) {
        PyErr_Format(PyExc_TypeError,
                     "lutgemm(x, planes, meta, bias, out, workspace, n, k, bits, group_size, "
                     "mode, stream[, clean_workspace[, path]]) takes 12 arguments (13 with "
                     "clean_workspace, 14 with path), got %zd", nargs);
        return NULL;
    }
    static const char *const names[ARG_COUNT] = {"x", "planes", "meta", "bias", "out",
                                                 "workspace", "clean_workspace"};
    lf_tensor t[ARG_COUNT];
    for (int i = 0; i < ARG_COUNT; ++i) lf_tensor_borrow_optional(NULL, names[i], &t[i]);
    PyObject *result = NULL;
    lutgemm_params p = {0};
    void *stream = NULL;

    if (bcq_parse_shape(args[6], args[7], args[8], args[9], args[10], &p.n, &p.k, &p.bits,
                        &p.group_size, &p.mode) < 0 ||
        lf_parse_stream(args[11], &stream) < 0)
        goto done;
    for (int i = 0; i < ARG_CLEAN; ++i) {
        int rc = i == ARG_BIAS ? lf_tensor_borrow_optional(args[i], names[i], &t[i])
                               : lf_tensor_borrow(args[i], names[i], &t[i]);
        if (rc < 0) goto done;
    }
    if (nargs >= 13 && lf_tensor_borrow_optional(args[12], names[ARG_CLEAN], &t[ARG_CLEAN]) < 0)
        goto done;
    int64_t path = LF_PATH_AUTO;
    if (nargs == 14 &&
        lf_parse_int(args[13], "path", LF_PATH_AUTO, LF_PATH_TENSOR_CORES, &path) < 0)
        goto done;
    lf_tensor *x = &t[ARG_X], *out = &t[ARG_OUT], *bias = &t[ARG_BIAS], *ws = &t[ARG_WORKSPACE];
    if (lf_check_supported_device(x) < 0 || lf_check_dtype(x, LF_DTYPES_FLOAT) < 0 ||
        lf_check_ndim(x, 2) < 0)
        goto done;
    const int64_t m = x->shape[0];
    const int64_t x_shape[2] = {m, p.k};
    if (lf_check_shape(x, 2, x_shape) < 0 || lf_check_rows_dense(x) < 0 ||
        lf_check_element_aligned(x) < 0)
        goto done;
    if (lf_check_same_device(&t[ARG_PLANES], x) < 0 ||
        bcq_check_packed(&t[ARG_PLANES], &t[ARG_META], p.n, p.k, p.bits, p.group_size, p.mode) < 0)
        goto done;
    if (lf_tensor_present(bias)) {
        const int64_t bias_shape[1] = {p.n};
        if (lf_check_same_device(bias, x) < 0 || lf_check_same_dtype(bias, x) < 0 ||
            lf_check_shape(bias, 1, bias_shape) < 0 || lf_check_contiguous(bias) < 0 ||
            lf_check_element_aligned(bias) < 0)
            goto done;
    }
    const int64_t out_shape[2] = {m, p.n};
    if (lf_check_same_device(out, x) < 0 || lf_check_same_dtype(out, x) < 0 ||
        lf_check_shape(out, 2, out_shape) < 0 || lf_check_rows_dense(out) < 0 ||
        lf_check_element_aligned(out) < 0 || lf_check_writable(out) < 0)
        goto done;
    for (int i = 0; i < ARG_COUNT; ++i) {
        if (i != ARG_OUT && lf_tensor_present(&t[i]) && lf_check_no_overlap(out, &t[i]) < 0)
            goto done;
    }
    p.m = m;
    p.x = x->data;
    p.ldx = m > 1 ? x->strides[0] : p.k;
    p.planes = (const uint32_t *)t[ARG_PLANES].data;
    p.meta = t[ARG_META].data;
    p.bias = bias->data;
    p.out = out->data;
    p.ldo = m > 1 ? out->strides[0] : p.n;
    p.x_type = lf_scalar_of(x->dtype);
    p.meta_type = lf_scalar_of(t[ARG_META].dtype);
    const int on_cuda = x->device_type == LF_DEVICE_CUDA;
    if (on_cuda && lf_require_cuda("lutgemm") < 0) goto done;
    if (path != LF_PATH_AUTO && !on_cuda) {
        PyErr_Format(PyExc_ValueError, "path: expected 0 (automatic) for CPU tensors, got %lld",
                     (long long)path);
        goto done;
    }
    if (path == LF_PATH_TENSOR_CORES && p.x_type == LF_SCALAR_F32) {
        PyErr_SetString(PyExc_ValueError,
                        "path: the tensor-core path (2) takes float16 or bfloat16 x, got float32");
        goto done;
    }
    p.path = (lutgemm_path)path;
    const int64_t need = workspace_bytes(&p, on_cuda);
    if (lf_check_same_device(ws, x) < 0 || lf_check_dtype(ws, LF_DTYPE_U8) < 0 ||
        lf_check_ndim(ws, 1) < 0 || lf_check_contiguous(ws) < 0 || lf_check_aligned(ws, 64) < 0 ||
        lf_check_writable(ws) < 0)
        goto done;
    for (int i = 0; i < ARG_COUNT; ++i) {
        if (i != ARG_WORKSPACE && lf_tensor_present(&t[i]) && lf_check_no_overlap(ws, &t[i]) < 0)
            goto done;
    }
    lf_tensor *clean = &t[ARG_CLEAN];
    if (lf_tensor_present(clean)) {
        if (lf_check_same_device(clean, x) < 0 || lf_check_dtype(clean, LF_DTYPE_U8) < 0 ||
            lf_check_ndim(clean, 1) < 0 || lf_check_contiguous(clean) < 0 ||
            lf_check_aligned(clean, 64) < 0 || lf_check_writable(clean) < 0)
            goto done;
        for (int i = 0; i < ARG_COUNT; ++i) {
            if (i != ARG_CLEAN && lf_tensor_present(&t[i]) &&
                lf_check_no_overlap(clean, &t[i]) < 0)
                goto done;
        }
        if (clean->shape[0] < need) {
            PyErr_Format(PyExc_ValueError,
                         "clean_workspace: expected at least %lld bytes, got %lld",
                         (long long)need, (long long)clean->shape[0]);
            goto done;
        }
        p.clean_workspace = clean->data;
        p.clean_workspace_bytes = clean->shape[0];
    }
    if (ws->shape[0] < need) {
        PyErr_Format(PyExc_ValueError, "workspace: expected at least %lld bytes, got %lld",
                     (long long)need, (long long)ws->shape[0]);
        goto done;
    }
    p.workspace = ws->data;
    p.workspace_bytes = ws->shape[0];
    if (m > 0) {
        if (on_cuda) {
            if (lf_cuda_call("lutgemm", x->device_id, lutgemm_cuda_launch, &p, stream) < 0)
                goto done;
        } else {
            Py_BEGIN_ALLOW_THREADS
            lutgemm_cpu(&p, cpu_variant, cpu_tables);
            Py_END_ALLOW_THREADS
        }
    }
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < ARG_COUNT; ++i) lf_tensor_release(&t[i]);
    return result;
}

PyMethodDef lutgemm_methods[] = {
    {"lutgemm", (PyCFunction)(void (*)(void))py_lutgemm, METH_FASTCALL,
     "lutgemm(x, planes, meta, bias, out, workspace, n, k, bits, group_size, mode, stream"
     "[, clean_workspace[, path]]): out = x @ W^T (+ bias) for a packed BCQ weight W; path "
     "(CUDA): 0 automatic, 1 tables, 2 tensor cores."},
    {"lutgemm_workspace_bytes", (PyCFunction)(void (*)(void))py_lutgemm_workspace_bytes,
     METH_FASTCALL, "lutgemm_workspace_bytes(on_cuda, m, n, k, bits, group_size, mode)"},
    {"lutgemm_cpu_variant", (PyCFunction)(void (*)(void))py_lutgemm_cpu_variant, METH_FASTCALL,
     "lutgemm_cpu_variant(name=None): the CPU inner loop in use ('portable', 'avx2', "
     "'avx512'); with a name, selects it ('best' restores the default) and returns the old one."},
    {"lutgemm_cpu_tables", (PyCFunction)(void (*)(void))py_lutgemm_cpu_tables, METH_FASTCALL,
     "lutgemm_cpu_tables(name=None): the CPU kernel's tables ('auto': float32 for float32 x, "
     "int16 for float16/bfloat16 x; 'float'; 'int16'); with a name, selects them for every "
     "later call and returns the old setting."},
    {NULL, NULL, 0, NULL},
};
