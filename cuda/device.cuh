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

/* kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` blocks (1 x 1 x 1:
 * none), launched so that on compute capability 9.x it may start while the previous kernel of
 * the stream finishes (programmatic dependent launch, also inside a CUDA graph capture). The
 * kernel must call lf::wait_prior_grid() (ptx.cuh) before it reads anything an earlier kernel
 * may write or writes anything at all. */
template <typename... Params, typename... Args>
cudaError_t launch_overlapped_clusters(void (*kernel)(Params...), dim3 grid, dim3 block,
                                       size_t smem, cudaStream_t stream, dim3 cluster,
                                       Args &&...args) {
    cudaLaunchAttribute attr[2] = {};
    unsigned count = 0;
    if (current_device_info().major >= 9) {
        attr[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[count++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster.x * cluster.y * cluster.z > 1) {
        attr[count].id = cudaLaunchAttributeClusterDimension;
        attr[count].val.clusterDim.x = cluster.x, attr[count].val.clusterDim.y = cluster.y;
        attr[count++].val.clusterDim.z = cluster.z;
    }
    cudaLaunchConfig_t config = {};
    config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = count;
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}
template <typename... Params, typename... Args>
cudaError_t launch_overlapped(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                              cudaStream_t stream, Args &&...args) {
    return launch_overlapped_clusters(kernel, grid, block, smem, stream, dim3(1, 1, 1),
                                      std::forward<Args>(args)...);
}

/* How many clusters of `cluster_y` blocks (along y) of kKernel can be resident at once on the
 * current device (a GPC holds whole clusters only), in *clusters; cached per (kernel, device,
 * cluster_y ≤ 16). Call setup_kernel first (it raises the shared-memory limit). */
template <auto kKernel>
cudaError_t max_active_clusters(int threads, int smem_bytes, int cluster_y, int *clusters) {
    static int cache[kMaxDevices][17]; /* 0: not asked yet */
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if (device < 0 || device >= kMaxDevices || cluster_y < 1 || cluster_y > 16)
        return cudaErrorInvalidValue;
    if (cache[device][cluster_y] == 0) {
        cudaLaunchAttribute attr = {};
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = 1, attr.val.clusterDim.y = cluster_y, attr.val.clusterDim.z = 1;
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3(1, cluster_y, 1), config.blockDim = dim3(threads);
        config.dynamicSmemBytes = smem_bytes;
        config.attrs = &attr, config.numAttrs = 1;
        int n = 0;
        err = cudaOccupancyMaxActiveClusters(&n, kKernel, &config);
        if (err != cudaSuccess) return err;
        cache[device][cluster_y] = n > 0 ? n : -1; /* -1: none fits */
    }
    *clusters = cache[device][cluster_y] > 0 ? cache[device][cluster_y] : 0;
    return cudaSuccess;
}

}  // namespace lf
