/* Element types of the tensors the ops take (activations, outputs, BCQ metadata), shared by
 * both ops' C and CUDA code. */
#ifndef LUTFLASH_SCALAR_TYPE_H
#define LUTFLASH_SCALAR_TYPE_H

typedef enum {
    LF_SCALAR_F32 = 0,
    LF_SCALAR_F16 = 1,
    LF_SCALAR_BF16 = 2,
} lf_scalar;

#endif
