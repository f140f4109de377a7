// Shared by the host build and the CUDA build: no torch, no pybind11.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GALLOP_HD __host__ __device__ __forceinline__
#else
#define GALLOP_HD inline
#endif

namespace gallop {

// Bit casts that compile the same way on both sides (no intrinsics that exist
// on one side only), so host and device round the same bits.
GALLOP_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

GALLOP_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

}  // namespace gallop
