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

/* sinks: the call's (attention_fwd_params.sinks), h the row's query head; m2: the row's
 * largest score in log2 units (-inf when the row saw no key); sum: the sum of exp2(score - m2)
 * over its keys. With a sink s (natural units, finite) the denominator of the row's softmax
 * is sum·2^m2 + e^s: computed relative to top = max(m2, s·log2 e), so that neither term
 * overflows. */
LF_HOST_DEVICE float attention_row_top(const float *sinks, int64_t h, float m2) {
    return sinks != NULL ? fmaxf(m2, sinks[h] * 1.4426950408889634f) : m2;
}
/* 2^(m2 - top): the scale of the keys' sum relative to top (0 for a row without keys). */
LF_HOST_DEVICE float attention_row_keep(float m2, float top) {
    return m2 == -INFINITY ? 0.0f : exp2f(m2 - top);
}
LF_HOST_DEVICE float attention_row_denominator(const float *sinks, int64_t h, float sum,
                                               float keep, float top) {
    return sinks != NULL ? sum * keep + exp2f(sinks[h] * 1.4426950408889634f - top) : sum;
}

/* The factor that turns the row's accumulator (the keys' exp2(score - m2)-weighted values)
 * into the output: 0 for a row without keys. */
LF_HOST_DEVICE float attention_row_factor(const float *sinks, int64_t h, float m2, float sum) {
    if (sinks == NULL) return sum > 0.0f ? 1.0f / sum : 0.0f;
    const float top = attention_row_top(sinks, h, m2), keep = attention_row_keep(m2, top);
    return keep / attention_row_denominator(sinks, h, sum, keep, top);
}

/* The row's logsumexp in log2 units: -inf for a row without keys and without a sink; with a
 * sink s, log2(Σ 2^score + 2^(s·log2 e)), so a row without keys gives s (natural units). */
LF_HOST_DEVICE float attention_row_lse2(const float *sinks, int64_t h, float m2, float sum) {
    const float top = attention_row_top(sinks, h, m2);
    const float denom =
        attention_row_denominator(sinks, h, sum, attention_row_keep(m2, top), top);
    return denom > 0.0f ? top + log2f(denom) : -INFINITY;
}

#endif
