/* What the extension was built with, and the helpers that route a call to the GPU. */
#ifndef LUTFLASH_RUNTIME_H
#define LUTFLASH_RUNTIME_H

#include "tensor_arg.h"

/* Raises RuntimeError when the extension has no CUDA code; 0 when it has. */
int lf_require_cuda(const char *op);
/* Reads a stream handle (an int, as torch.cuda.Stream.cuda_stream gives) into *stream. */
int lf_parse_stream(PyObject *obj, void **stream);
/* Runs launch(arg, stream) with `device` made current, then restores the previous device;
 * a CUDA error becomes a RuntimeError naming `op`. */
int lf_cuda_call(const char *op, int device, int (*launch)(const void *arg, void *stream),
                 const void *arg, void *stream);

#endif
