/* The DLPack ABI (data structures only), declared from the DLPack specification
 * (https://dmlc.github.io/dlpack/latest/c_api.html), legacy unversioned capsule "dltensor"
 * and the versioned capsule "dltensor_versioned" of DLPack 1.x. Field order and widths are
 * the ABI; the names here are ours. */
#ifndef LUTFLASH_DLPACK_H
#define LUTFLASH_DLPACK_H

#include <stdint.h>

enum dl_device_type {
    DL_DEVICE_CPU = 1,
    DL_DEVICE_CUDA = 2,
    DL_DEVICE_CUDA_HOST = 3,
    DL_DEVICE_CUDA_MANAGED = 13,
};

enum dl_dtype_code {
    DL_DTYPE_INT = 0,
    DL_DTYPE_UINT = 1,
    DL_DTYPE_FLOAT = 2,
    DL_DTYPE_OPAQUE_HANDLE = 3,
    DL_DTYPE_BFLOAT = 4,
    DL_DTYPE_COMPLEX = 5,
    DL_DTYPE_BOOL = 6,
};

typedef struct {
    int32_t device_type; /* enum dl_device_type; a C enum is int-sized in the ABI */
    int32_t device_id;
} dl_device;

typedef struct {
    uint8_t code;  /* enum dl_dtype_code */
    uint8_t bits;
    uint16_t lanes;
} dl_data_type;

typedef struct {
    void *data;
    dl_device device;
    int32_t ndim;
    dl_data_type dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} dl_tensor;

typedef struct dl_managed_tensor {
    dl_tensor tensor;
    void *manager_ctx;
    void (*deleter)(struct dl_managed_tensor *self);
} dl_managed_tensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} dl_pack_version;

typedef struct dl_managed_tensor_versioned {
    dl_pack_version version;
    void *manager_ctx;
    void (*deleter)(struct dl_managed_tensor_versioned *self);
    uint64_t flags;
    dl_tensor tensor;
} dl_managed_tensor_versioned;

#define DL_FLAG_READ_ONLY (1ULL << 0)

#endif
