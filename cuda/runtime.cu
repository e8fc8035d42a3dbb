/* The CUDA runtime behind lutflash_cuda.h (device count, error strings, current device) and
 * the per-device property cache of device.cuh. */
#include <cuda_runtime.h>

#include "device.cuh"
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

namespace lf {

const DeviceInfo &current_device_info() {
    static DeviceInfo cache[kMaxDevices]; /* sm_count 0: not read yet */
    static const DeviceInfo fallback = {132, 9, 0};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices)
        return fallback;
    DeviceInfo &info = cache[device];
    if (info.sm_count == 0) {
        int sms = 0, major = 0, minor = 0;
        if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) !=
                cudaSuccess ||
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) !=
                cudaSuccess || sms <= 0)
            return fallback;
        info.major = major, info.minor = minor;
        info.sm_count = sms; /* last: a concurrent reader sees 0 or the whole record */
    }
    return info;
}

}  // namespace lf
