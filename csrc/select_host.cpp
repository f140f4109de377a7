// Host build of the window-select primitives (gallop/select.h): one fused loop
// per pass (load, score, key, compare, count or write), no score or key array
// (the emit pass keeps a 4 KiB tile of keys on the stack), threaded over blocks.
// Every block writes only its own row or its own output ranges, so threads share
// nothing and the result does not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <thread>
#include <type_traits>
#include <vector>

#include "gallop/select.h"

namespace gallop {
namespace {

template <int D>
inline float load(const void* base, int64_t i) {
  if constexpr (D == kBFloat16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  if constexpr (D == kFloat16) return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
  if constexpr (D == kFloat32) return static_cast<const float*>(base)[i];
}

template <int C>
constexpr bool reads_theta = C != kSaft;
template <int C>
constexpr bool reads_grad = C == kGallop || C == kSaft;

// The signed order key of element i of source s, for a criterion, dtypes and
// unit strides (UNIT: the loops vectorize) known at compile time.
template <int C, int TD, int GD, bool UNIT>
inline int32_t key_at(const SelectSource& s, int64_t i, float eps) {
  float theta = reads_theta<C> ? load<TD>(s.theta, UNIT ? i : i * s.theta_stride) : 0.0f;
  float grad = reads_grad<C> ? load<GD>(s.grad, UNIT ? i : i * s.grad_stride) : 0.0f;
  return signed_key(select_score(C, theta, grad, eps));
}

// Calls fn(integral_constant C, TD, GD, UNIT) for the source's criterion, dtypes
// and strides. A dtype the criterion does not read is fixed to float32: fewer
// instantiations.
template <typename Fn>
void dispatch(int32_t criterion, const SelectSource& s, Fn&& fn) {
  auto with_unit = [&](auto c, auto td, auto gd) {
    constexpr int C = decltype(c)::value;
    bool unit = (!reads_theta<C> || s.theta_stride == 1) && (!reads_grad<C> || s.grad_stride == 1);
    if (unit) {
      fn(c, td, gd, std::true_type{});
    } else {
      fn(c, td, gd, std::false_type{});
    }
  };
  auto with_dtype = [](int32_t dtype, auto&& next) {
    switch (dtype) {
      case kBFloat16:
        return next(std::integral_constant<int, kBFloat16>{});
      case kFloat16:
        return next(std::integral_constant<int, kFloat16>{});
      default:
        return next(std::integral_constant<int, kFloat32>{});
    }
  };
  using F32 = std::integral_constant<int, kFloat32>;
  switch (criterion) {
    case kGallop:
      return with_dtype(s.theta_dtype, [&](auto td) {
        with_dtype(s.grad_dtype, [&](auto gd) { with_unit(std::integral_constant<int, kGallop>{}, td, gd); });
      });
    case kSaft:
      return with_dtype(s.grad_dtype, [&](auto gd) { with_unit(std::integral_constant<int, kSaft>{}, F32{}, gd); });
    case kMagnitude:
      return with_dtype(s.theta_dtype, [&](auto td) { with_unit(std::integral_constant<int, kMagnitude>{}, td, F32{}); });
    default:
      return with_dtype(s.theta_dtype, [&](auto td) { with_unit(std::integral_constant<int, kPafi>{}, td, F32{}); });
  }
}

// Last source whose first block is <= b (sources are in first_block order).
int source_of(const SelectParams& p, int64_t b) {
  int lo = 0, hi = p.num_sources - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (p.sources[mid].first_block <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Calls visit(source, global block, first element, end element) for blocks
// [begin, end), each in one call, source by source.
template <typename Visit>
void for_blocks(const SelectParams& p, int64_t begin, int64_t end, Visit&& visit) {
  if (begin >= end) return;
  for (int r = source_of(p, begin); r < p.num_sources && p.sources[r].first_block < end; ++r) {
    const SelectSource& s = p.sources[r];
    int64_t blocks = (s.numel + p.block - 1) / p.block;
    int64_t b0 = std::max(begin, s.first_block), b1 = std::min(end, s.first_block + blocks);
    for (int64_t b = b0; b < b1; ++b) {
      int64_t i0 = (b - s.first_block) * p.block;
      visit(s, b, i0, std::min(s.numel, i0 + p.block));
    }
  }
}

// Below this many elements per thread, starting a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 18;
// Threads claim this many blocks at a time from a shared counter: a thread that
// the OS deschedules (a shared machine) holds up at most one claim, not a
// fixed share of the pass.
constexpr int64_t kBlocksPerClaim = 4;

// Runs work(first block, end block) over all blocks on up to num_threads threads.
template <typename Work>
void parallel_blocks(const SelectParams& p, int64_t elements, int num_threads, Work&& work) {
  int64_t n = std::max<int64_t>(1, std::min<int64_t>({num_threads, elements / kMinElementsPerThread, p.num_blocks}));
  if (n == 1) {
    work(int64_t{0}, p.num_blocks);
    return;
  }
  std::atomic<int64_t> next{0};
  auto claim = [&] {
    for (int64_t b; (b = next.fetch_add(kBlocksPerClaim, std::memory_order_relaxed)) < p.num_blocks;) {
      work(b, std::min(p.num_blocks, b + kBlocksPerClaim));
    }
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < n; ++t) pool.emplace_back(claim);
  claim();
  for (auto& th : pool) th.join();
}

int64_t total_elements(const SelectParams& p) {
  int64_t n = 0;
  for (int r = 0; r < p.num_sources; ++r) n += p.sources[r].numel;
  return n;
}

template <int C, int TD, int GD, bool UNIT>
void count_block(const SelectSource& s, int64_t i0, int64_t i1, const SelectParams& p, int32_t* row) {
  // int32 lanes: a block is far below 2^31 elements, and the loop vectorizes.
  int32_t above = 0, inside = 0, equal = 0, nonfinite = 0;
  const int32_t lo = p.lo, hi = p.hi;
  for (int64_t i = i0; i < i1; ++i) {
    int32_t key = key_at<C, TD, GD, UNIT>(s, i, p.eps);
    above += key > hi;
    inside += (key > lo) & (key <= hi);
    equal += key == lo;
    nonfinite += !key_is_finite(key);
  }
  row[kAbove] = above;
  row[kInside] = inside;
  row[kEqual] = equal;
  row[kNonFinite] = nonfinite;
}

// Keys per tile of the emit pass: computed in a vectorized loop into a buffer
// that stays in L1, then scanned (the writes are rare and branchy).
constexpr int64_t kTile = 1024;
// The scan skips a group of this many keys when none is >= lo (most keys lie
// below the window), with one vectorized test instead of a branch per key.
constexpr int64_t kGroup = 16;

template <bool TIES, int C, int TD, int GD, bool UNIT>
void emit_block(const SelectSource& s, int64_t i0, int64_t i1, const SelectParams& p, int32_t quota, int64_t* out,
                int32_t* cand_key, int64_t* cand_pos) {
  const int32_t lo = p.lo, hi = p.hi;
  int32_t keys[kTile];
  for (int64_t t0 = i0; t0 < i1; t0 += kTile) {
    const int64_t n = std::min(kTile, i1 - t0);
    for (int64_t j = 0; j < n; ++j) keys[j] = key_at<C, TD, GD, UNIT>(s, t0 + j, p.eps);
    const int64_t base = s.base + t0;
    for (int64_t g = 0; g < n; g += kGroup) {
      const int64_t end = std::min(n, g + kGroup);
      if (end - g == kGroup) {
        int32_t hit = 0;
        for (int64_t j = g; j < g + kGroup; ++j) hit |= keys[j] >= lo;
        if (!hit) continue;
      }
      for (int64_t j = g; j < end; ++j) {
        const int32_t key = keys[j];
        if (key > hi) {
          *out++ = base + j;
        } else if (TIES && key == lo && quota > 0) {
          *out++ = base + j;
          --quota;
        } else if (cand_key && key > lo) {
          *cand_key++ = key;
          *cand_pos++ = base + j;
        }
      }
    }
  }
}

}  // namespace

void select_count_host(const SelectParams& p, int32_t* counts, int num_threads) {
  if (p.num_blocks <= 0) return;
  parallel_blocks(p, total_elements(p), num_threads, [&](int64_t begin, int64_t end) {
    for_blocks(p, begin, end, [&](const SelectSource& s, int64_t b, int64_t i0, int64_t i1) {
      dispatch(p.criterion, s, [&](auto c, auto td, auto gd, auto unit) {
        constexpr int C = decltype(c)::value, TD = decltype(td)::value, GD = decltype(gd)::value;
        count_block<C, TD, GD, decltype(unit)::value>(s, i0, i1, p, counts + b * kCountColumns);
      });
    });
  });
}

void select_emit_host(const SelectParams& p, const int64_t* out_dst, const int32_t* quota, int64_t* out,
                      int32_t* cand_key, int64_t* cand_pos, const int64_t* cand_dst, int num_threads) {
  if (p.num_blocks <= 0) return;
  parallel_blocks(p, total_elements(p), num_threads, [&](int64_t begin, int64_t end) {
    for_blocks(p, begin, end, [&](const SelectSource& s, int64_t b, int64_t i0, int64_t i1) {
      dispatch(p.criterion, s, [&](auto c, auto td, auto gd, auto unit) {
        constexpr int C = decltype(c)::value, TD = decltype(td)::value, GD = decltype(gd)::value;
        constexpr bool UNIT = decltype(unit)::value;
        int64_t* block_out = out + out_dst[b];
        int32_t* keys = cand_key ? cand_key + cand_dst[b] : nullptr;
        int64_t* pos = cand_key ? cand_pos + cand_dst[b] : nullptr;
        if (quota) {
          emit_block<true, C, TD, GD, UNIT>(s, i0, i1, p, quota[b], block_out, keys, pos);
        } else {
          emit_block<false, C, TD, GD, UNIT>(s, i0, i1, p, 0, block_out, keys, pos);
        }
      });
    });
  });
}

}  // namespace gallop
