#include "runtime.h"

#include "methods.h"

#ifdef LUTFLASH_WITH_CUDA
#include "lutflash_cuda.h"
#endif

int lf_require_cuda(const char *op) {
#ifdef LUTFLASH_WITH_CUDA
    (void)op;
    return 0;
#else
    PyErr_Format(PyExc_RuntimeError,
                 "%s: got CUDA tensors, but this lutflash was built without CUDA (nvcc was not "
                 "found at build time or LUTFLASH_CUDA=0); reinstall with nvcc on PATH", op);
    return -1;
#endif
}

int lf_parse_stream(PyObject *obj, void **stream) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "stream: expected an int (a cudaStream_t), got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *stream = PyLong_AsVoidPtr(obj);
    return PyErr_Occurred() ? -1 : 0;
}

int lf_cuda_call(const char *op, int device, int (*launch)(const void *arg, void *stream),
                 const void *arg, void *stream) {
#ifdef LUTFLASH_WITH_CUDA
    int previous = -1;
    int err = lf_cuda_set_device(device, &previous);
    if (err == 0) err = launch(arg, stream);
    if (previous >= 0 && previous != device) {
        int dummy;
        lf_cuda_set_device(previous, &dummy);
    }
    if (err != 0) {
        PyErr_Format(PyExc_RuntimeError, "%s: CUDA error %d on cuda:%d: %s", op, err, device,
                     lf_cuda_error_string(err));
        return -1;
    }
    return 0;
#else
    (void)device, (void)launch, (void)arg, (void)stream;
    return lf_require_cuda(op);
#endif
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef LUTFLASH_WITH_CUDA
    int count = lf_cuda_device_count();
    return PyLong_FromLong(count < 0 ? 0 : count);
#else
    return PyLong_FromLong(0);
#endif
}

static PyObject *py_built_with_cuda(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef LUTFLASH_WITH_CUDA
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *py_cpu_features(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return Py_BuildValue("{s:O,s:O,s:O}", "avx2",
                         __builtin_cpu_supports("avx2") ? Py_True : Py_False, "fma",
                         __builtin_cpu_supports("fma") ? Py_True : Py_False, "avx512f",
                         __builtin_cpu_supports("avx512f") ? Py_True : Py_False);
#else
    return PyDict_New();
#endif
}

PyMethodDef runtime_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "Number of CUDA devices the extension's runtime sees (0 without CUDA)."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS,
     "Whether the extension was compiled with its CUDA kernels."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "The instruction sets the CPU kernels can dispatch to on this machine."},
    {NULL, NULL, 0, NULL},
};
