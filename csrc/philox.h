/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
 * counter-based generator, so any element's random bits are a pure function of (key, counter)
 * and kernels can draw them in any order, on any device. Plain C; the same header compiles
 * under nvcc for device code. */
#ifndef LUTFLASH_PHILOX_H
#define LUTFLASH_PHILOX_H

#include <stdint.h>

#ifdef __CUDACC__
#define LF_PHILOX_FN static __host__ __device__ __forceinline__
#else
#define LF_PHILOX_FN static inline
#endif

#define LF_PHILOX_M0 0xD2511F53u
#define LF_PHILOX_M1 0xCD9E8D57u
#define LF_PHILOX_W0 0x9E3779B9u /* golden ratio */
#define LF_PHILOX_W1 0xBB67AE85u /* sqrt(3) - 1 */
#define LF_PHILOX_ROUNDS 10

typedef struct {
    uint32_t v[4];
} lf_philox_block;

LF_PHILOX_FN lf_philox_block lf_philox4x32_10(lf_philox_block counter, uint32_t key0,
                                              uint32_t key1) {
    for (int round = 0; round < LF_PHILOX_ROUNDS; ++round) {
        const uint64_t product0 = (uint64_t)LF_PHILOX_M0 * counter.v[0];
        const uint64_t product1 = (uint64_t)LF_PHILOX_M1 * counter.v[2];
        const uint32_t hi0 = (uint32_t)(product0 >> 32), lo0 = (uint32_t)product0;
        const uint32_t hi1 = (uint32_t)(product1 >> 32), lo1 = (uint32_t)product1;
        lf_philox_block next = {{hi1 ^ counter.v[1] ^ key0, lo1, hi0 ^ counter.v[3] ^ key1, lo0}};
        counter = next;
        key0 += LF_PHILOX_W0;
        key1 += LF_PHILOX_W1;
    }
    return counter;
}

/* Dropout keep bits of attention element (batch, head, query row, keys 4g..4g+3), the
 * contract of DESIGN.md shared by every kernel:
 *   key = (seed mod 2^32, seed >> 32)
 *   counter = (g, row, batch * heads_q + head, offset mod 2^32)
 * and key 4g + t is kept iff word t >= threshold (attention_dropout_threshold), so the keep
 * rate is 1 - threshold / 2^32. Bit t of the result is set when key 4g + t is kept. */
LF_PHILOX_FN uint32_t lf_dropout_keep_bits(uint64_t seed, uint64_t offset, uint32_t batch_head,
                                           uint32_t row, uint32_t key_group,
                                           uint32_t threshold) {
    lf_philox_block counter = {{key_group, row, batch_head, (uint32_t)offset}};
    lf_philox_block bits = lf_philox4x32_10(counter, (uint32_t)seed, (uint32_t)(seed >> 32));
    return (uint32_t)(bits.v[0] >= threshold) | (uint32_t)(bits.v[1] >= threshold) << 1 |
           (uint32_t)(bits.v[2] >= threshold) << 2 | (uint32_t)(bits.v[3] >= threshold) << 3;
}

/* floor(p * 2^32) for p in [0, 1), computed in double exactly as the Python reference does. */
LF_PHILOX_FN uint32_t lf_dropout_threshold(double p) {
    const double scaled = p * 4294967296.0;
    return scaled >= 4294967295.0 ? 4294967295u : (uint32_t)scaled;
}

#endif
