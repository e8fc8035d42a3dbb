#include "tensor_arg.h"

#include <stdio.h>
#include <string.h>

#include "dlpack.h"

static const char CAPSULE_LEGACY[] = "dltensor";
static const char CAPSULE_VERSIONED[] = "dltensor_versioned";

const char *lf_dtype_name(lf_dtype dtype) {
    switch (dtype) {
    case LF_DTYPE_F32: return "float32";
    case LF_DTYPE_F16: return "float16";
    case LF_DTYPE_BF16: return "bfloat16";
    case LF_DTYPE_F64: return "float64";
    case LF_DTYPE_I32: return "int32";
    case LF_DTYPE_I64: return "int64";
    case LF_DTYPE_U8: return "uint8";
    case LF_DTYPE_I8: return "int8";
    case LF_DTYPE_BOOL: return "bool";
    default: return "an unsupported dtype";
    }
}

lf_scalar lf_scalar_of(lf_dtype dtype) {
    return dtype == LF_DTYPE_F16 ? LF_SCALAR_F16 : dtype == LF_DTYPE_BF16 ? LF_SCALAR_BF16
                                                                         : LF_SCALAR_F32;
}

static lf_dtype dtype_from_dlpack(dl_data_type dt) {
    if (dt.lanes != 1) return LF_DTYPE_OTHER;
    switch (dt.code) {
    case DL_DTYPE_FLOAT:
        return dt.bits == 32 ? LF_DTYPE_F32 : dt.bits == 16 ? LF_DTYPE_F16
             : dt.bits == 64 ? LF_DTYPE_F64 : LF_DTYPE_OTHER;
    case DL_DTYPE_BFLOAT: return dt.bits == 16 ? LF_DTYPE_BF16 : LF_DTYPE_OTHER;
    case DL_DTYPE_INT:
        return dt.bits == 32 ? LF_DTYPE_I32 : dt.bits == 64 ? LF_DTYPE_I64
             : dt.bits == 8 ? LF_DTYPE_I8 : LF_DTYPE_OTHER;
    case DL_DTYPE_UINT: return dt.bits == 8 ? LF_DTYPE_U8 : LF_DTYPE_OTHER;
    case DL_DTYPE_BOOL: return dt.bits == 8 ? LF_DTYPE_BOOL : LF_DTYPE_OTHER;
    default: return LF_DTYPE_OTHER;
    }
}

static void format_shape(const int64_t *dims, int ndim, char *buf, size_t size) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; ++i) {
        if (dims[i] < 0) {
            used += (size_t)snprintf(buf + used, size - used, "%s*", i ? ", " : "");
        } else {
            used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
                                     (long long)dims[i]);
        }
    }
    if (used < size) snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

static void format_device(const lf_tensor *t, char *buf, size_t size) {
    if (t->device_type == LF_DEVICE_CPU) snprintf(buf, size, "cpu");
    else if (t->device_type == LF_DEVICE_CUDA) snprintf(buf, size, "cuda:%d", t->device_id);
    else snprintf(buf, size, "DLPack device type %d", t->device_type);
}

static void empty_tensor(lf_tensor *t, const char *name) {
    memset(t, 0, sizeof(*t));
    t->name = name;
    t->ndim = -1;
}

/* Replaces the producer's exception with a TypeError that names the argument. */
static int borrow_failed(const char *name) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyErr_Format(PyExc_TypeError, "%s: could not be borrowed through DLPack: %S", name,
                 value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
}

static int read_device(PyObject *obj, const char *name, int *type, int *id) {
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (dev == NULL) return borrow_failed(name);
    int ok = PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2;
    if (ok) {
        *type = (int)PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
        *id = (int)PyLong_AsLong(PyTuple_GET_ITEM(dev, 1));
        ok = !PyErr_Occurred();
    }
    Py_DECREF(dev);
    if (!ok) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() did not return (device_type, id)",
                     name);
        return -1;
    }
    return 0;
}

/* Fills t from a DLPack capsule, taking over the reference to it. */
static int read_capsule(PyObject *capsule, const char *name, lf_tensor *t) {
    const dl_tensor *dl;
    if (PyCapsule_IsValid(capsule, CAPSULE_LEGACY)) {
        dl = &((dl_managed_tensor *)PyCapsule_GetPointer(capsule, CAPSULE_LEGACY))->tensor;
    } else if (PyCapsule_IsValid(capsule, CAPSULE_VERSIONED)) {
        dl_managed_tensor_versioned *m = PyCapsule_GetPointer(capsule, CAPSULE_VERSIONED);
        if (m->version.major != 1) {
            Py_DECREF(capsule);
            PyErr_Format(PyExc_TypeError, "%s: DLPack major version %u is not supported", name,
                         m->version.major);
            return -1;
        }
        t->read_only = (m->flags & DL_FLAG_READ_ONLY) != 0;
        dl = &m->tensor;
    } else {
        Py_DECREF(capsule);
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__() did not return a DLPack capsule", name);
        return -1;
    }
    t->capsule = capsule;
    if (dl->ndim < 0 || dl->ndim > LF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: tensors of up to %d dimensions are supported, got %d",
                     name, LF_MAX_DIMS, (int)dl->ndim);
        lf_tensor_release(t);
        return -1;
    }
    t->ndim = dl->ndim;
    t->dtype = dtype_from_dlpack(dl->dtype);
    t->element_size = (dl->dtype.bits * dl->dtype.lanes + 7) / 8;
    t->device_type = dl->device.device_type;
    t->device_id = dl->device.device_id;
    t->data = dl->data ? (char *)dl->data + dl->byte_offset : NULL;
    int64_t stride = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
        t->shape[i] = dl->shape[i];
        t->strides[i] = dl->strides ? dl->strides[i] : stride;
        stride *= dl->shape[i];
    }
    return 0;
}

/* torch.Tensor and torch._C._to_dlpack, once torch has been imported by someone. The
 * generic protocol (__dlpack_device__, then __dlpack__) runs two Python-level methods per
 * tensor, about 10 us together; the C function exports a torch tensor in under 1 us, without
 * the stream synchronization we would switch off anyway (the work goes on the caller's
 * current stream). */
static PyObject *torch_tensor_type;
static PyObject *torch_to_dlpack;

static int torch_fast_path(PyObject *obj) {
    if (torch_to_dlpack == NULL) {
        PyObject *name = PyUnicode_InternFromString("torch");
        PyObject *torch = name ? PyImport_GetModule(name) : NULL; /* only if already imported */
        Py_XDECREF(name);
        if (torch != NULL) {
            PyObject *tensor = PyObject_GetAttrString(torch, "Tensor");
            PyObject *c_module = PyObject_GetAttrString(torch, "_C");
            PyObject *to_dlpack = c_module ? PyObject_GetAttrString(c_module, "_to_dlpack") : NULL;
            if (tensor && PyType_Check(tensor) && to_dlpack && PyCallable_Check(to_dlpack)) {
                torch_tensor_type = Py_NewRef(tensor);
                torch_to_dlpack = Py_NewRef(to_dlpack);
            }
            Py_XDECREF(tensor);
            Py_XDECREF(c_module);
            Py_XDECREF(to_dlpack);
            Py_DECREF(torch);
        }
        PyErr_Clear();
    }
    return torch_to_dlpack != NULL && PyObject_TypeCheck(obj, (PyTypeObject *)torch_tensor_type);
}

int lf_tensor_borrow(PyObject *obj, const char *name, lf_tensor *t) {
    empty_tensor(t, name);
    PyObject *capsule;
    if (torch_fast_path(obj)) {
        /* A negative view's memory holds -x; DLPack has no flag for it, so refuse it rather
         * than compute with the wrong sign. */
        PyObject *is_neg = PyObject_CallMethod(obj, "is_neg", NULL);
        const int negative = is_neg ? PyObject_IsTrue(is_neg) : -1;
        Py_XDECREF(is_neg);
        if (negative != 0) {
            if (negative > 0)
                PyErr_Format(PyExc_ValueError,
                             "%s: negative-bit views are not supported (call .resolve_neg())",
                             name);
            return -1;
        }
        capsule = PyObject_CallOneArg(torch_to_dlpack, obj);
        if (capsule == NULL) return borrow_failed(name);
        return read_capsule(capsule, name, t);
    }
    if (!PyObject_HasAttrString(obj, "__dlpack__") ||
        !PyObject_HasAttrString(obj, "__dlpack_device__")) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a tensor (torch.Tensor, numpy.ndarray or another DLPack "
                     "producer), got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int device_type = 0, device_id = 0;
    if (read_device(obj, name, &device_type, &device_id) < 0) return -1;

    /* On CUDA the work goes on the caller's current stream, which is where the producer's
     * data is ready; stream=-1 tells the producer not to synchronize anything. Asking for a
     * versioned capsule lets the producer mark read-only memory; producers that predate
     * DLPack 1.0 refuse max_version with a TypeError and get the legacy call. */
    PyObject *method = PyObject_GetAttrString(obj, "__dlpack__");
    PyObject *empty = PyTuple_New(0);
    PyObject *kwargs = Py_BuildValue("{s:(ii)}", "max_version", 1, 0);
    if (kwargs && device_type == DL_DEVICE_CUDA) {
        PyObject *stream = PyLong_FromLong(-1);
        if (stream == NULL || PyDict_SetItemString(kwargs, "stream", stream) < 0) Py_CLEAR(kwargs);
        Py_XDECREF(stream);
    }
    capsule = (method && empty && kwargs) ? PyObject_Call(method, empty, kwargs) : NULL;
    if (capsule == NULL && method && empty && kwargs && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyDict_DelItemString(kwargs, "max_version");
        capsule = PyObject_Call(method, empty, kwargs);
    }
    Py_XDECREF(method);
    Py_XDECREF(empty);
    Py_XDECREF(kwargs);
    if (capsule == NULL) return borrow_failed(name);
    return read_capsule(capsule, name, t);
}

int lf_tensor_borrow_optional(PyObject *obj, const char *name, lf_tensor *t) {
    if (obj == NULL || obj == Py_None) {
        empty_tensor(t, name);
        return 0;
    }
    return lf_tensor_borrow(obj, name, t);
}

void lf_tensor_release(lf_tensor *t) {
    Py_CLEAR(t->capsule); /* the producer's capsule destructor calls the deleter */
    t->data = NULL;
}

int64_t lf_tensor_numel(const lf_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
    return n;
}

int lf_check_dtype(const lf_tensor *t, unsigned allowed) {
    if (t->dtype & allowed) return 0;
    char expected[160] = "";
    size_t used = 0;
    int count = 0, total = 0;
    for (unsigned bit = 1; bit < LF_DTYPE_OTHER; bit <<= 1) total += (allowed & bit) != 0;
    for (unsigned bit = 1; bit < LF_DTYPE_OTHER; bit <<= 1) {
        if (!(allowed & bit)) continue;
        ++count;
        const char *sep = count == 1 ? "" : count == total ? " or " : ", ";
        used += (size_t)snprintf(expected + used, sizeof(expected) - used, "%s%s", sep,
                                 lf_dtype_name((lf_dtype)bit));
        if (used >= sizeof(expected)) break;
    }
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", t->name, expected,
                 lf_dtype_name(t->dtype));
    return -1;
}

int lf_check_same_dtype(const lf_tensor *t, const lf_tensor *ref) {
    if (t->dtype == ref->dtype) return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s (the dtype of %s), got %s", t->name,
                 lf_dtype_name(ref->dtype), ref->name, lf_dtype_name(t->dtype));
    return -1;
}

int lf_check_supported_device(const lf_tensor *t) {
    if (t->device_type == LF_DEVICE_CPU || t->device_type == LF_DEVICE_CUDA) return 0;
    char dev[64];
    format_device(t, dev, sizeof(dev));
    PyErr_Format(PyExc_ValueError, "%s: expected a CPU or CUDA tensor, got one on %s", t->name,
                 dev);
    return -1;
}

int lf_check_same_device(const lf_tensor *t, const lf_tensor *ref) {
    if (t->device_type == ref->device_type &&
        (t->device_type == LF_DEVICE_CPU || t->device_id == ref->device_id))
        return 0;
    char got[64], want[64];
    format_device(t, got, sizeof(got));
    format_device(ref, want, sizeof(want));
    PyErr_Format(PyExc_ValueError, "%s: expected a tensor on %s (the device of %s), got %s",
                 t->name, want, ref->name, got);
    return -1;
}

int lf_check_cpu(const lf_tensor *t, const char *why) {
    if (t->device_type == LF_DEVICE_CPU) return 0;
    char got[64];
    format_device(t, got, sizeof(got));
    PyErr_Format(PyExc_ValueError, "%s: expected a CPU tensor (%s), got one on %s", t->name, why,
                 got);
    return -1;
}

int lf_check_ndim(const lf_tensor *t, int ndim) {
    if (t->ndim == ndim) return 0;
    char got[256];
    format_shape(t->shape, t->ndim, got, sizeof(got));
    PyErr_Format(PyExc_ValueError, "%s: expected a %d-D tensor, got %d-D with shape %s", t->name,
                 ndim, t->ndim, got);
    return -1;
}

int lf_check_shape(const lf_tensor *t, int ndim, const int64_t *shape) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; ++i) ok = shape[i] < 0 || shape[i] == t->shape[i];
    if (ok) return 0;
    char got[256], want[256];
    format_shape(t->shape, t->ndim, got, sizeof(got));
    format_shape(shape, ndim, want, sizeof(want));
    PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", t->name, want, got);
    return -1;
}

int lf_check_contiguous(const lf_tensor *t) {
    int64_t expected = 1;
    for (int i = t->ndim - 1; i >= 0; --i) {
        if (t->shape[i] != 1 && t->strides[i] != expected) {
            char got[256];
            format_shape(t->strides, t->ndim, got, sizeof(got));
            PyErr_Format(PyExc_ValueError,
                         "%s: expected a contiguous tensor, got strides %s (call .contiguous())",
                         t->name, got);
            return -1;
        }
        expected *= t->shape[i];
    }
    return 0;
}

int lf_check_rows_dense(const lf_tensor *t) {
    /* Contiguous last dimension; the leading dimensions may be strided and in any order (a
     * slice or a transpose of a larger buffer) as long as no two rows overlap: taken by
     * increasing stride, each steps past everything the ones before it span. */
    int ok = t->ndim >= 1 && (t->shape[t->ndim - 1] <= 1 || t->strides[t->ndim - 1] == 1);
    int order[LF_MAX_DIMS], count = 0;
    for (int i = 0; ok && i + 1 < t->ndim; ++i) {
        if (t->shape[i] <= 1) continue;
        int at = count++;
        for (; at > 0 && t->strides[order[at - 1]] > t->strides[i]; --at) order[at] = order[at - 1];
        order[at] = i;
    }
    int64_t span = t->ndim >= 1 ? t->shape[t->ndim - 1] : 1; /* elements the inner dims cover */
    for (int n = 0; ok && n < count; ++n) {
        const int i = order[n];
        ok = span == 0 || t->strides[i] >= span;
        span = (t->shape[i] - 1) * t->strides[i] + span;
    }
    if (ok) return 0;
    char got[256];
    format_shape(t->strides, t->ndim, got, sizeof(got));
    PyErr_Format(PyExc_ValueError,
                 "%s: expected a contiguous last dimension and non-overlapping rows, got "
                 "strides %s (call .contiguous())", t->name, got);
    return -1;
}

int lf_check_aligned(const lf_tensor *t, uintptr_t bytes) {
    if (t->data == NULL || ((uintptr_t)t->data % bytes) == 0) return 0;
    PyErr_Format(PyExc_ValueError,
                 "%s: expected data aligned to %u bytes, got address %p (call .clone())",
                 t->name, (unsigned)bytes, t->data);
    return -1;
}

int lf_check_element_aligned(const lf_tensor *t) {
    return lf_check_aligned(t, (uintptr_t)(t->element_size > 0 ? t->element_size : 1));
}

int lf_check_writable(const lf_tensor *t) {
    if (!t->read_only) return 0;
    PyErr_Format(PyExc_ValueError, "%s: expected a writable tensor, got a read-only one",
                 t->name);
    return -1;
}

static void byte_extent(const lf_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    intptr_t low = 0, high = 0;
    for (int i = 0; i < t->ndim; ++i) {
        if (t->shape[i] == 0) {
            *lo = *hi = (uintptr_t)t->data;
            return;
        }
        intptr_t span = (intptr_t)(t->shape[i] - 1) * (intptr_t)t->strides[i] * t->element_size;
        if (span < 0) low += span;
        else high += span;
    }
    *lo = (uintptr_t)t->data + (uintptr_t)low;
    *hi = (uintptr_t)t->data + (uintptr_t)high + (uintptr_t)t->element_size;
}

int lf_check_no_overlap(const lf_tensor *out, const lf_tensor *in) {
    if (!lf_tensor_present(in) || out->data == NULL || in->data == NULL) return 0;
    if (out->device_type != in->device_type || out->device_id != in->device_id) return 0;
    uintptr_t a0, a1, b0, b1;
    byte_extent(out, &a0, &a1);
    byte_extent(in, &b0, &b1);
    if (a0 == a1 || b0 == b1 || a1 <= b0 || b1 <= a0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: must not share memory with %s", out->name, in->name);
    return -1;
}

int lf_parse_int(PyObject *obj, const char *name, int64_t lo, int64_t hi, int64_t *value) {
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s: expected an int in [%lld, %lld], got %S", name,
                     (long long)lo, (long long)hi, obj);
        return -1;
    }
    *value = v;
    return 0;
}
