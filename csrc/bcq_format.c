/* Validation of the arguments that describe a packed BCQ weight (csrc/bcq_args.h), shared by
 * the entry points that take one: lutgemm (lutgemm.c) and the quantizers (bcq_quantize.c). */
#include "tensor_arg.h" /* Python.h first */

#include "bcq_args.h"

/* Checks the scalar arguments that describe a BCQ weight (shared with the quantizers). */
int bcq_parse_shape(PyObject *n_obj, PyObject *k_obj, PyObject *bits_obj, PyObject *group_obj,
                    PyObject *mode_obj, int64_t *n, int64_t *k, int *bits, int *group_size,
                    bcq_mode *mode) {
    int64_t v_bits, v_group, v_mode;
    if (lf_parse_int(n_obj, "n", 1, INT32_MAX, n) < 0 ||
        lf_parse_int(k_obj, "k", 1, INT32_MAX, k) < 0 ||
        lf_parse_int(bits_obj, "bits", 1, BCQ_MAX_BITS, &v_bits) < 0 ||
        lf_parse_int(group_obj, "group_size", 1, INT32_MAX, &v_group) < 0 ||
        lf_parse_int(mode_obj, "mode", BCQ_MODE_GENERAL, BCQ_MODE_UNIFORM, &v_mode) < 0)
        return -1;
    if (v_group != *k && (v_group % BCQ_WORD_K != 0 || *k % v_group != 0)) {
        PyErr_Format(PyExc_ValueError,
                     "group_size: expected a multiple of %d that divides k = %lld, or k itself, "
                     "got %lld", BCQ_WORD_K, (long long)*k, (long long)v_group);
        return -1;
    }
    *bits = (int)v_bits;
    *group_size = (int)v_group;
    *mode = (bcq_mode)v_mode;
    return 0;
}

/* Validates the packed planes and metadata of a BCQ weight against (n, k, bits, group, mode). */
int bcq_check_packed(const lf_tensor *planes, const lf_tensor *meta, int64_t n, int64_t k,
                     int bits, int group_size, bcq_mode mode) {
    const int64_t planes_shape[3] = {bcq_words_per_row(k), bits, bcq_padded_rows(n)};
    const int64_t meta_shape[3] = {k / group_size, bcq_meta_per_group(bits, mode),
                                   bcq_padded_rows(n)};
    if (lf_check_supported_device(planes) < 0 || lf_check_dtype(planes, LF_DTYPE_I32) < 0 ||
        lf_check_shape(planes, 3, planes_shape) < 0 || lf_check_contiguous(planes) < 0 ||
        lf_check_aligned(planes, 16) < 0)
        return -1;
    if (lf_check_same_device(meta, planes) < 0 || lf_check_dtype(meta, LF_DTYPES_FLOAT) < 0 ||
        lf_check_shape(meta, 3, meta_shape) < 0 || lf_check_contiguous(meta) < 0 ||
        lf_check_aligned(meta, 16) < 0)
        return -1;
    return 0;
}
