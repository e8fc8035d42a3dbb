/* Borrowing tensors through DLPack and validating them. Every check raises a Python
 * exception naming the argument and what was expected, and returns -1; 0 means it passed. */
#ifndef LUTFLASH_TENSOR_ARG_H
#define LUTFLASH_TENSOR_ARG_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "scalar_type.h"

#define LF_MAX_DIMS 8

/* One bit per dtype so that sets of allowed dtypes are masks. */
typedef enum {
    LF_DTYPE_F32 = 1 << 0,
    LF_DTYPE_F16 = 1 << 1,
    LF_DTYPE_BF16 = 1 << 2,
    LF_DTYPE_F64 = 1 << 3,
    LF_DTYPE_I32 = 1 << 4,
    LF_DTYPE_I64 = 1 << 5,
    LF_DTYPE_U8 = 1 << 6,
    LF_DTYPE_I8 = 1 << 7,
    LF_DTYPE_BOOL = 1 << 8,
    LF_DTYPE_OTHER = 1 << 9,
} lf_dtype;

#define LF_DTYPES_FLOAT (LF_DTYPE_F32 | LF_DTYPE_F16 | LF_DTYPE_BF16)

typedef enum {
    LF_DEVICE_CPU = 1,
    LF_DEVICE_CUDA = 2,
} lf_device_type;

typedef struct {
    const char *name;
    PyObject *capsule; /* keeps the producer's memory alive until lf_tensor_release */
    void *data;        /* byte_offset already applied */
    lf_dtype dtype;
    int element_size;
    int device_type; /* lf_device_type, or the raw DLPack code for other devices */
    int device_id;
    int ndim;
    int read_only;
    int64_t shape[LF_MAX_DIMS];
    int64_t strides[LF_MAX_DIMS]; /* in elements */
} lf_tensor;

/* Borrows obj (anything with __dlpack__/__dlpack_device__) for the duration of a call.
 * On failure t is left releasable. */
int lf_tensor_borrow(PyObject *obj, const char *name, lf_tensor *t);
/* Like lf_tensor_borrow, but None gives an empty lf_tensor with data == NULL and ndim == -1. */
int lf_tensor_borrow_optional(PyObject *obj, const char *name, lf_tensor *t);
void lf_tensor_release(lf_tensor *t);
static inline int lf_tensor_present(const lf_tensor *t) { return t->ndim >= 0; }

int64_t lf_tensor_numel(const lf_tensor *t);
const char *lf_dtype_name(lf_dtype dtype);
/* The kernels' element type of a float32/float16/bfloat16 tensor. */
lf_scalar lf_scalar_of(lf_dtype dtype);

int lf_check_dtype(const lf_tensor *t, unsigned allowed);
int lf_check_same_dtype(const lf_tensor *t, const lf_tensor *ref);
/* Devices: CPU or CUDA only, and every tensor of a call on the reference's device. */
int lf_check_supported_device(const lf_tensor *t);
int lf_check_same_device(const lf_tensor *t, const lf_tensor *ref);
/* A CPU tensor; `why` completes "expected a CPU tensor (...)". */
int lf_check_cpu(const lf_tensor *t, const char *why);
int lf_check_ndim(const lf_tensor *t, int ndim);
/* shape entries of -1 match any extent. */
int lf_check_shape(const lf_tensor *t, int ndim, const int64_t *shape);
/* Row-major contiguous (strides of size-1 dimensions are ignored). */
int lf_check_contiguous(const lf_tensor *t);
/* The last dimension has stride 1 and the rows (leading dimensions, in any order of strides)
 * do not overlap. */
int lf_check_rows_dense(const lf_tensor *t);
int lf_check_aligned(const lf_tensor *t, uintptr_t bytes);
/* Aligned to its element size, as C requires of every typed pointer. */
int lf_check_element_aligned(const lf_tensor *t);
int lf_check_writable(const lf_tensor *t);
/* out must not share memory with in (inputs may alias each other). */
int lf_check_no_overlap(const lf_tensor *out, const lf_tensor *in);

/* Parses a Python int into a C value in [lo, hi]; raises naming `name` otherwise. */
int lf_parse_int(PyObject *obj, const char *name, int64_t lo, int64_t hi, int64_t *value);

#endif
