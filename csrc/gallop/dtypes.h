// bf16 / fp16 <-> fp32 in integer arithmetic, one definition for host and device.
// Rounding is to nearest even, as torch's .to(bfloat16/float16) does; writing it
// out (instead of __float2bfloat16_rn on the device and c10 on the host) makes
// the host build and the kernel agree bit for bit by construction.
#pragma once

#include "gallop/macros.h"

namespace gallop {

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

GALLOP_HD float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

GALLOP_HD uint16_t float_to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // NaN: torch's canonical quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

GALLOP_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_float(sign | 0x7F800000u | (man << 13));  // Inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_float(sign);
  // subnormal: man * 2^-24, exact in float32
  int e = 113;  // exponent of 2^-14, biased for float32
  while (!(man & 0x400u)) {
    man <<= 1;
    --e;
  }
  return bits_float(sign | (static_cast<uint32_t>(e) << 23) | ((man & 0x3FFu) << 13));
}

GALLOP_HD uint16_t float_to_fp16(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to Inf
  if (ax >= 0x38800000u) {  // normal half: rebias, round the 13 dropped bits to nearest even
    uint32_t h = (ax - 0x38000000u) >> 13;
    uint32_t rest = ax & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // below 2^-25: rounds to zero
  // subnormal half: units of 2^-24 (a carry into 0x400 gives the smallest normal, as it should)
  uint32_t e = ax >> 23;  // 102..112
  uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14..24
  uint32_t h = m >> shift;
  uint32_t rest = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// Element i of a tensor of dtype D, in float32. D is a template argument: a
// kernel instantiated for one dtype pair has no per-entry dtype switch.
template <int32_t D>
GALLOP_HD float load_as_float(const void* base, int64_t i) {
  if constexpr (D == kBFloat16) {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else if constexpr (D == kFloat16) {
    return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

template <int32_t D>
GALLOP_HD void store_from_float(void* base, int64_t i, float v) {
  if constexpr (D == kBFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16(v);
  } else if constexpr (D == kFloat16) {
    static_cast<uint16_t*>(base)[i] = float_to_fp16(v);
  } else {
    static_cast<float*>(base)[i] = v;
  }
}

}  // namespace gallop
