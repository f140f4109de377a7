// Host build of the sparse AdamW step: the kernel's tables and per-entry
// functions (gallop/sparse_adamw.h) in a loop, for CPU training and as the CPU
// check of the math the GPU runs.
#include <algorithm>
#include <thread>
#include <vector>

#include "gallop/sparse_adamw.h"

namespace gallop {
namespace {

// Last row of the segment whose offset is <= e (rows are in offset order).
int row_of(const SparseAdamWParams& p, int64_t e) {
  int lo = 0, hi = p.num_tensors - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (p.tensors[mid].offset <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct RunRange {
  const SparseAdamWParams& p;
  int64_t begin, end;
  float inv_scale;

  template <int32_t P, int32_t G>
  void operator()() const {
    for (int r = row_of(p, begin); r < p.num_tensors && p.tensors[r].offset < end; ++r) {
      const SparseAdamWTensor& t = p.tensors[r];
      int64_t lo = std::max<int64_t>(begin - t.offset, 0);
      int64_t hi = std::min<int64_t>(end - t.offset, t.count);
      for (int64_t i = lo; i < hi; ++i) sparse_adamw_entry<P, G>(t, i, inv_scale);
    }
  }
};

// Below this many entries per thread, starting threads costs more than it saves.
constexpr int64_t kMinEntriesPerThread = 1 << 16;

void update_segment(const SparseAdamWParams& p, int32_t param_dtype, int32_t grad_kind, int num_threads) {
  if (p.total <= 0 || p.num_tensors <= 0) return;
  float inv_scale = inverse_scale(p.grad_scale);
  int64_t n = std::max<int64_t>(1, std::min<int64_t>(num_threads, p.total / kMinEntriesPerThread));
  if (n == 1) {
    dispatch_dtypes(param_dtype, grad_kind, RunRange{p, 0, p.total, inv_scale});
    return;
  }
  // Entries are disjoint (indices within a row are unique), so threads need no locks.
  std::vector<std::thread> pool;
  int64_t per = (p.total + n - 1) / n;
  for (int64_t k = 0; k < n; ++k) {
    int64_t b = k * per, e = std::min(p.total, b + per);
    pool.emplace_back([&p, b, e, inv_scale, param_dtype, grad_kind] {
      dispatch_dtypes(param_dtype, grad_kind, RunRange{p, b, e, inv_scale});
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace

void sparse_adamw_host(const SparseAdamWStep& step, int num_threads) {
  if (skip_step(step.found_inf)) return;
  for (int32_t r = 0; r < step.num_rows; ++r) sparse_adamw_prepare(step.table[r]);
  for (int32_t s = 0; s < step.num_segments; ++s) {
    const int64_t* seg = step.segments + 5 * s;
    SparseAdamWParams p{step.table + seg[0], static_cast<int32_t>(seg[1]), seg[2], step.grad_scale, step.found_inf};
    update_segment(p, static_cast<int32_t>(seg[3]), static_cast<int32_t>(seg[4]), num_threads);
  }
}

}  // namespace gallop
