/* The CUDA runtime behind lutflash_cuda.h: device count, error strings, current device. */
#include <cuda_runtime.h>

#include "lutflash_cuda.h"

extern "C" int lf_cuda_device_count(void) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();  // no driver or no device: not sticky, keep the runtime usable
        return -(int)err;
    }
    return count;
}

extern "C" const char *lf_cuda_error_string(int error) {
    return cudaGetErrorString((cudaError_t)(error < 0 ? -error : error));
}

extern "C" int lf_cuda_set_device(int device, int *previous) {
    int current = -1;
    cudaError_t err = cudaGetDevice(&current);
    if (err != cudaSuccess) return (int)err;
    *previous = current;
    if (current != device) err = cudaSetDevice(device);
    return (int)err;
}
