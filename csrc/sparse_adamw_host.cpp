// Host build of the sparse AdamW step: the kernel's tables and per-entry
// function (gallop/sparse_adamw.h) in a loop, for CPU training and as the CPU
// check of the math the GPU runs.
#include <algorithm>
#include <thread>
#include <vector>

#include "gallop/sparse_adamw.h"

namespace gallop {
namespace {

// First row whose entries reach past global entry e (rows are in offset order).
int row_of(const SparseAdamWParams& p, int64_t e) {
  int lo = 0, hi = p.num_tensors - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (p.tensors[mid].offset <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

void run_range(const SparseAdamWParams& p, int64_t begin, int64_t end, float inv_scale) {
  if (begin >= end) return;
  for (int r = row_of(p, begin); r < p.num_tensors && p.tensors[r].offset < end; ++r) {
    const SparseAdamWTensor& t = p.tensors[r];
    int64_t lo = std::max<int64_t>(begin - t.offset, 0);
    int64_t hi = std::min<int64_t>(end - t.offset, t.count);
    for (int64_t i = lo; i < hi; ++i) sparse_adamw_entry(t, i, inv_scale);
  }
}

// Below this many entries per thread, starting threads costs more than it saves.
constexpr int64_t kMinEntriesPerThread = 1 << 16;

}  // namespace

void sparse_adamw_host(const SparseAdamWParams& p, int num_threads) {
  if (p.total <= 0 || p.num_tensors <= 0) return;
  if (p.found_inf && *p.found_inf != 0.0f) return;
  float inv_scale = p.inv_grad_scale ? *p.inv_grad_scale : 1.0f;
  int64_t n = std::max<int64_t>(1, std::min<int64_t>(num_threads, p.total / kMinEntriesPerThread));
  if (n == 1) {
    run_range(p, 0, p.total, inv_scale);
    return;
  }
  // Entries are disjoint (indices within a row are unique), so threads need no locks.
  std::vector<std::thread> pool;
  int64_t per = (p.total + n - 1) / n;
  for (int64_t k = 0; k < n; ++k) {
    int64_t b = k * per, e = std::min(p.total, b + per);
    pool.emplace_back([&p, b, e, inv_scale] { run_range(p, b, e, inv_scale); });
  }
  for (auto& th : pool) th.join();
}

}  // namespace gallop
