// Selection scores and order keys, one definition for host and device.
//
// Each score is computed in float32 exactly as gallop_kernels.reference.score
// computes it with torch ops (widened inputs, fabsf, eps rounded to float32, a
// correctly rounded divide; contraction is off in both builds), so the keys,
// and with them every tie, are the reference's bit for bit.
//
// The window-select primitives (count and emit over a table of sources) are
// declared here too: the plan that drives them lives in Python.
#pragma once

#include <cmath>

#include "gallop/dtypes.h"

namespace gallop {

// The criteria with a streaming score (random stays on the reference).
enum Criterion : int32_t { kGallop = 0, kSaft = 1, kMagnitude = 2, kPafi = 3 };

// |g| / (|theta| + eps): eps is the Python float rounded to float32, as ATen
// rounds a scalar added to a float32 tensor.
GALLOP_HD float gallop_score(float theta, float grad, float eps) { return fabsf(grad) / (fabsf(theta) + eps); }
GALLOP_HD float saft_score(float grad) { return fabsf(grad); }
GALLOP_HD float magnitude_score(float theta) { return fabsf(theta); }
// 0 - |theta| (torch's rsub), not -|theta|: -0.0 becomes +0.0, so equal
// magnitudes get equal keys. Written as a select because GCC 12 folds
// 0.0f - fabsf(x) into -fabsf(x) even at -O0, which turns 0 into -0.0.
GALLOP_HD float pafi_score(float theta) {
  float a = fabsf(theta);
  return a == 0.0f ? 0.0f : -a;
}

GALLOP_HD float select_score(int32_t criterion, float theta, float grad, float eps) {
  switch (criterion) {
    case kGallop:
      return gallop_score(theta, grad, eps);
    case kSaft:
      return saft_score(grad);
    case kMagnitude:
      return magnitude_score(theta);
    default:
      return pafi_score(theta);
  }
}

// reference._signed_key: the float's bits with the magnitude bits of negative
// floats flipped, so int32 order is float order (order key - 2^31).
GALLOP_HD int32_t signed_key(float s) {
  int32_t bits = static_cast<int32_t>(float_bits(s));
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

// Keys of +Inf and -Inf; NaNs lie beyond them.
constexpr int32_t kPosInfKey = 0x7F800000;
constexpr int32_t kNegInfKey = -0x7F800001;  // signed_key(-Inf) = 0xFF800000 ^ 0x7FFFFFFF

GALLOP_HD bool key_is_finite(int32_t key) { return key > kNegInfKey && key < kPosInfKey; }

// ---------------------------------------------------------------------------
// window select over a table of sources
// ---------------------------------------------------------------------------

// One tensor of a selection, flattened: element i is theta[i * theta_stride]
// (and grad[i * grad_stride]) and has global position base + i. Its blocks of
// `block` consecutive elements are the global blocks first_block,
// first_block + 1, ...: a block never straddles two sources.
struct SelectSource {
  const void* theta;  // read by gallop, magnitude, pafi
  const void* grad;   // read by gallop, saft
  int64_t theta_stride;
  int64_t grad_stride;
  int64_t numel;
  int64_t base;
  int64_t first_block;
  int32_t theta_dtype;  // DType
  int32_t grad_dtype;   // DType
};

struct SelectParams {
  const SelectSource* sources;  // num_sources rows, first_block increasing
  int32_t num_sources;
  int64_t num_blocks;  // blocks of all sources
  int64_t block;       // elements per block
  int32_t criterion;   // Criterion
  float eps;
  int32_t lo;  // the window of signed keys is [lo, hi]
  int32_t hi;
};

// Columns of the count pass, one row per block.
enum CountColumn : int32_t { kAbove = 0, kInside = 1, kEqual = 2, kNonFinite = 3, kCountColumns = 4 };

// Pass 1: for every block b, counts[b][kAbove] = #keys > hi, [kInside] = #keys
// in (lo, hi], [kEqual] = #keys == lo, [kNonFinite] = #NaN/Inf scores.
void select_count_host(const SelectParams& p, int32_t* counts, int num_threads);

// Pass 2. Block b writes, in ascending position order, the positions of its keys
// > hi and, when quota is not null, of its first quota[b] keys == lo, to
// out[out_dst[b]...]; when cand_key is not null, its keys in (lo, hi] and their
// positions to cand_key / cand_pos[cand_dst[b]...].
void select_emit_host(const SelectParams& p, const int64_t* out_dst, const int32_t* quota, int64_t* out,
                      int32_t* cand_key, int64_t* cand_pos, const int64_t* cand_dst, int num_threads);

}  // namespace gallop
