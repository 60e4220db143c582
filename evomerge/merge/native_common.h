/* What the C kernels share: bit casts, the draws' hash, and bfloat16 / float32 loads and stores
 * that round exactly as torch does. */
#ifndef EVOMERGE_NATIVE_COMMON_H
#define EVOMERGE_NATIVE_COMMON_H

#include <stdint.h>
#include <string.h>

static inline float as_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t as_u32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* draws.pair_hash: lowbias32 on int32 with wrap-around (logical shifts) */
static inline uint32_t pair_hash(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* float32 to bfloat16 as torch rounds (to nearest even); a NaN becomes 0x7FC0 (kernels._to_bf16_bits) */
static inline uint16_t to_bf16(float f) {
    uint32_t u = as_u32(f);
    uint32_t r = ((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16) & 0xFFFFu;
    return f != f ? (uint16_t)0x7FC0u : (uint16_t)r;
}

static inline float load_bf16(const uint16_t *p, int64_t i) { return as_f32((uint32_t)p[i] << 16); }
static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline uint16_t store_bf16(float f) { return to_bf16(f); }
static inline float store_f32(float f) { return f; }

#endif
