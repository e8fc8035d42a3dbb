/* Properties of the GPU a launch runs on, read once per device, and the one-time set-up of a
 * kernel on each device (its dynamic shared-memory limit raised, its occupancy measured). Host
 * code only. */
#pragma once

#include <cuda_runtime.h>

#include <utility>

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

/* kKernel<<<grid, block, smem, stream>>>(args...), launched so that on compute capability 9.x
 * it may start while the previous kernel of the stream finishes (programmatic dependent launch,
 * also inside a CUDA graph capture). The kernel must call lf::wait_prior_grid() (ptx.cuh)
 * before it reads anything an earlier kernel may write or writes anything at all. */
template <typename... Params, typename... Args>
cudaError_t launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t stream, Args &&...args) {
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config = {};
    config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = current_device_info().major >= 9 ? 1 : 0;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace lf
