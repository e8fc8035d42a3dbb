#include "runtime.h"

#include <string.h>

#include "attention_cpu.h"
#include "lutgemm_cpu.h"
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

/* cpu_kernel_isa(op, variant): the instruction set ("portable", "avx2", "avx512") of the CPU
 * inner loops that `op` ("lutgemm" or "attention") runs for `variant` (0 = best on this CPU;
 * lutgemm: 1 portable, 2 AVX2, 3 AVX-512; attention: 1 portable, 3 AVX-512) on this machine.
 * Tests use it to check that the kernel they ask for is the one that runs, not a fallback. */
static PyObject *py_cpu_kernel_isa(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "cpu_kernel_isa(op, variant)");
        return NULL;
    }
    const char *op = PyUnicode_Check(args[0]) ? PyUnicode_AsUTF8(args[0]) : NULL;
    if (op == NULL || (strcmp(op, "lutgemm") != 0 && strcmp(op, "attention") != 0)) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "op: expected 'lutgemm' or 'attention', got %R", args[0]);
        return NULL;
    }
    if (!PyLong_Check(args[1])) {
        PyErr_Format(PyExc_TypeError, "variant: expected an int, got %.100s",
                     Py_TYPE(args[1])->tp_name);
        return NULL;
    }
    const long variant = PyLong_AsLong(args[1]);
    if (variant == -1 && PyErr_Occurred()) return NULL;
    if (variant < 0 || variant > 3) {
        PyErr_Format(PyExc_ValueError, "variant: expected 0..3, got %ld", variant);
        return NULL;
    }
    return PyUnicode_FromString(strcmp(op, "lutgemm") == 0
                                    ? lutgemm_cpu_variant_isa((int)variant)
                                    : attention_cpu_variant_isa((int)variant));
}

PyMethodDef runtime_methods[] = {
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "Number of CUDA devices the extension's runtime sees (0 without CUDA)."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS,
     "Whether the extension was compiled with its CUDA kernels."},
    {"cpu_features", py_cpu_features, METH_NOARGS,
     "The instruction sets the CPU kernels can dispatch to on this machine."},
    {"cpu_kernel_isa", (PyCFunction)(void (*)(void))py_cpu_kernel_isa, METH_FASTCALL,
     "cpu_kernel_isa(op, variant): the instruction set ('portable', 'avx2', 'avx512') of the "
     "CPU inner loops op ('lutgemm' or 'attention') runs for variant (0 = best) on this CPU."},
    {NULL, NULL, 0, NULL},
};
