/* Properties of the GPU a launch runs on, read once per device, and the one-time set-up of a
 * kernel on each device (its dynamic shared-memory limit raised, its occupancy measured). Host
 * code only. */
#pragma once

#include <cuda_runtime.h>

namespace lf {

constexpr int kMaxDevices = 64;

struct DeviceInfo {
    int sm_count;       /* multiprocessors */
    int major, minor;   /* compute capability */
};

/* The current device's properties (cached per device; defaults for an H100 if the query fails,
 * which only happens when a launch would fail too). */
const DeviceInfo &current_device_info();

/* Raises kKernel's dynamic shared-memory limit to smem_bytes on the current device and gives
 * its resident blocks per SM at `threads` threads and that much shared memory in
 * *blocks_per_sm (when not null; at least 1). The runtime calls are made once per (kernel,
 * device, smem_bytes): the kernel is a template argument, so each kernel has a cache of its
 * own, and one launched with one size, as each of ours is, pays them once. */
template <auto kKernel>
cudaError_t setup_kernel(int threads, int smem_bytes, int *blocks_per_sm) {
    static int smem[kMaxDevices], resident[kMaxDevices]; /* resident 0: not set up yet */
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
    if (resident[device] == 0 || smem[device] != smem_bytes) {
        err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   smem_bytes);
        if (err != cudaSuccess) return err;
        int blocks = 0;
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, threads,
                                                            smem_bytes);
        if (err != cudaSuccess) return err;
        smem[device] = smem_bytes;
        resident[device] = blocks > 0 ? blocks : 1;
    }
    if (blocks_per_sm != nullptr) *blocks_per_sm = resident[device];
    return cudaSuccess;
}

}  // namespace lf
