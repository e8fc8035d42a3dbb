/* Run-time values to template instances: a dtype, a small integer (head dim, bits, tile) or a
 * flag picks the instance that a generic lambda receives as a type or an integral_constant,
 * instead of hand-written switch ladders. Host code only. */
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "scalar_type.h"

/* The padded head dims of the attention kernels (one instantiation file per head dim), as an
 * X-macro for declarations and as a list for dispatch_value. */
#define LF_ATTN_HEAD_DIMS(X) X(32) X(64) X(96) X(128) X(256)
#define LF_ATTN_HEAD_DIM_LIST 32, 64, 96, 128, 256

/* The two 16-bit instances FN<D, __half> and FN<D, __nv_bfloat16> of an attention launcher
 * cudaError_t FN(const PARAMS &, cudaStream_t): PREFIX empty instantiates them (in the
 * attention_*_hdim<D>.cu files), PREFIX extern declares them. */
#define LF_ATTN_INSTANCES(PREFIX, FN, PARAMS, D)                                              \
    PREFIX template cudaError_t FN<D, __half>(const PARAMS &, cudaStream_t);                  \
    PREFIX template cudaError_t FN<D, __nv_bfloat16>(const PARAMS &, cudaStream_t);

namespace lf {

/* f(T()) with T = __half or __nv_bfloat16 for LF_SCALAR_F16 / LF_SCALAR_BF16; any other dtype
 * gives cudaErrorNotSupported. */
template <typename F> cudaError_t dispatch_half_type(int dtype, F &&f) {
    switch (dtype) {
    case LF_SCALAR_F16: return f(__half());
    case LF_SCALAR_BF16: return f(__nv_bfloat16());
    default: return cudaErrorNotSupported;
    }
}

/* f(std::integral_constant<int, v>()) for the one of kValues equal to v; cudaErrorNotSupported
 * when none is. */
template <int... kValues, typename F> cudaError_t dispatch_value(int v, F &&f) {
    cudaError_t err = cudaErrorNotSupported;
    (void)((v == kValues ? (err = f(std::integral_constant<int, kValues>()), true) : false) ||
           ...);
    return err;
}

/* f(std::true_type()) or f(std::false_type()). */
template <typename F> cudaError_t dispatch_bool(bool b, F &&f) {
    return b ? f(std::true_type()) : f(std::false_type());
}

}  // namespace lf
