/* Scalar conversions between float32 and the 16-bit float types, and typed element access. */
#ifndef LUTFLASH_SCALAR_CONVERT_H
#define LUTFLASH_SCALAR_CONVERT_H

#include <stdint.h>
#include <string.h>

#include "scalar_type.h"

static inline float lf_f16_to_f32(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, sizeof(h));
    return (float)h;
}

static inline uint16_t lf_f32_to_f16(float value) {
    _Float16 h = (_Float16)value; /* IEEE round to nearest even */
    uint16_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
}

static inline float lf_bf16_to_f32(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof(value));
    return value;
}

static inline uint16_t lf_f32_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof(bits));
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

static inline float lf_load(const void *base, int64_t index, lf_scalar type) {
    switch (type) {
    case LF_SCALAR_F16: return lf_f16_to_f32(((const uint16_t *)base)[index]);
    case LF_SCALAR_BF16: return lf_bf16_to_f32(((const uint16_t *)base)[index]);
    default: return ((const float *)base)[index];
    }
}

static inline void lf_store(void *base, int64_t index, lf_scalar type, float value) {
    switch (type) {
    case LF_SCALAR_F16: ((uint16_t *)base)[index] = lf_f32_to_f16(value); break;
    case LF_SCALAR_BF16: ((uint16_t *)base)[index] = lf_f32_to_bf16(value); break;
    default: ((float *)base)[index] = value; break;
    }
}

#endif
