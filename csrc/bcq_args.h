/* Validation shared by the entry points that take a packed BCQ weight (bcq_format.c). */
#ifndef LUTFLASH_BCQ_ARGS_H
#define LUTFLASH_BCQ_ARGS_H

#include "bcq_format.h"
#include "tensor_arg.h"

/* Parses n, k, bits, group_size and mode, checking their ranges and that group_size is a
 * multiple of BCQ_WORD_K dividing k, or k itself. */
int bcq_parse_shape(PyObject *n_obj, PyObject *k_obj, PyObject *bits_obj, PyObject *group_obj,
                    PyObject *mode_obj, int64_t *n, int64_t *k, int *bits, int *group_size,
                    bcq_mode *mode);
/* Checks dtype, shape, contiguity and alignment of the packed planes and metadata. */
int bcq_check_packed(const lf_tensor *planes, const lf_tensor *meta, int64_t n, int64_t k,
                     int bits, int group_size, bcq_mode mode);

#endif
