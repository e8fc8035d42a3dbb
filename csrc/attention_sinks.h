/* The end of a query row's softmax, shared by the CPU (csrc/attention_cpu.c) and CUDA
 * (cuda/attention_*.cuh) forwards: the normalization of the row's accumulator and its
 * logsumexp, with the head's attention sink when the call has one (attention_fwd_params.sinks:
 * one logit per query head that joins the softmax denominator and carries no value, as
 * gpt-oss's s_aux). Plain C, compiled as host and device code. */
#ifndef LUTFLASH_ATTENTION_SINKS_H
#define LUTFLASH_ATTENTION_SINKS_H

#include <math.h>

#include <stdint.h>

#ifdef __CUDACC__
#define LF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LF_HOST_DEVICE static inline
#endif

/* sinks: the call's (attention_fwd_params.sinks), h the row's query head. m2: the row's largest score in log2 units (-inf when the row saw no key); sum: the sum of
 * exp2(score - m2) over its keys. Returns the factor that turns the row's accumulator (the
 * keys' exp2(score - m2)-weighted values) into the output, 0 for a row without keys, and sets
 * *lse2 to the logsumexp in log2 units: -inf for a row without keys and without a sink; with
 * a sink s (natural units, finite) lse = log(Σ exp(score) + exp(s)) and a row without keys
 * gives output 0 and lse = s. */
LF_HOST_DEVICE float attention_row_factor(const float *sinks, int64_t h, float m2, float sum,
                                          float *lse2) {
    float top = m2, denom = sum, keep = 1.0f;
    if (sinks != NULL) {
        const float s2 = sinks[h] * 1.4426950408889634f;
        top = fmaxf(m2, s2);
        keep = m2 == -INFINITY ? 0.0f : exp2f(m2 - top);
        denom = sum * keep + exp2f(s2 - top);
    }
    const int empty = !(denom > 0.0f);
    *lse2 = empty ? -INFINITY : top + log2f(denom);
    return empty ? 0.0f : keep / denom;
}

#endif
