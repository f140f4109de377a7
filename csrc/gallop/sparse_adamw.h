// Sparse AdamW over index lists: one table row per parameter, one pass (one
// CUDA launch per (param dtype, grad kind) pair) over all selected entries of
// all parameters of a step.
//
// A step is two passes over the same table:
//   1. prepare (one thread per row): unless found_inf is set, advance the row's
//      step counter (torch's state["step"], a float32 in device memory) and
//      compute the row's step constants from it and the group's lr;
//   2. update: every selected entry, reading the constants pass 1 wrote.
// So neither the step counter nor the bias corrections nor found_inf needs the
// host: a step makes no host sync and can be captured in a CUDA graph.
#pragma once

#include "gallop/adamw_math.h"
#include "gallop/dtypes.h"

namespace gallop {

// Grad kinds: the DType of a dense gradient, or kCompactGrad for the float32
// gathered entries (grad[i] instead of grad[indices[i]]).
constexpr int32_t kCompactGrad = 3;

// One parameter's selected entries. Every pointer addresses memory on the
// device that runs the update (host memory for the host build).
//
// Hyper-parameters live in each row rather than in one launch per group: one
// launch then covers every group, and each tensor's own step count gives its
// own bias corrections (a parameter that had no gradient on some step is behind
// the others, as in torch).
struct SparseAdamWTensor {
  void* param;                // dense weights, dtype param_dtype
  const void* grad;           // dense gradient (grad[idx[i]]) or compact fp32 (grad[i])
  const void* indices;        // count sorted flat indices into param / grad: int32 or int64 (index_bits)
  float* exp_avg;             // count entries
  float* exp_avg_sq;          // count entries
  float* max_exp_avg_sq;      // count entries when amsgrad, else null
  float* master;              // count fp32 master weights, or null
  float* step;                // this parameter's step count (advanced by the prepare pass)
  const double* lr;           // the group's learning rate
  int64_t count;              // selected entries of this tensor
  int64_t offset;             // entries of the earlier rows of its segment (prefix sum of count)
  int32_t param_dtype;        // DType
  int32_t grad_kind;          // DType of a dense gradient, or kCompactGrad
  int32_t index_bits;         // 32 (a tensor of fewer than 2^31 weights) or 64
  AdamWHyper h;
  AdamWScalars s;             // written by the prepare pass
};

// The rows of one launch: all have the same (param_dtype, grad_kind).
struct SparseAdamWParams {
  SparseAdamWTensor* tensors;  // num_tensors rows, offsets increasing from 0
  int32_t num_tensors;
  int64_t total;               // sum of counts
  const float* grad_scale;     // one float, or null: gradients multiplied by float(1 / double(scale))
  const float* found_inf;      // one float, or null: nonzero skips the whole step
};

// The last of n rows (in offset order) whose offset is <= e: the row holding entry e.
GALLOP_HD int row_of(const SparseAdamWTensor* rows, int n, int64_t e) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (rows[mid].offset <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// A gradient entry times the inverse grad scale, rounded as torch.amp.GradScaler.unscale_
// rounds it: 1 / scale in double, then float32.
GALLOP_HD float inverse_scale(const float* grad_scale) {
  return grad_scale ? static_cast<float>(1.0 / static_cast<double>(*grad_scale)) : 1.0f;
}

GALLOP_HD bool skip_step(const float* found_inf) { return found_inf && *found_inf != 0.0f; }

// Pass 1 for one row.
GALLOP_HD void sparse_adamw_prepare(SparseAdamWTensor& t) {
  float step = *t.step + 1.0f;  // torch: step_t += 1 on a float32 tensor
  *t.step = step;
  t.s = adamw_scalars(t.h, *t.lr, step);
}

// One entry's inputs, loaded before anything is stored.
struct SparseAdamWEntry {
  int64_t j;  // flat index into param / grad
  float g, theta, m, v, vmax;
};

template <int32_t P, int32_t G>
GALLOP_HD SparseAdamWEntry sparse_adamw_load(const SparseAdamWTensor& t, int64_t i, float inv_scale) {
  SparseAdamWEntry x;
  // One branch per row, the same for every entry of it: int32 indices halve the
  // index memory of a tensor of fewer than 2^31 weights.
  x.j = t.index_bits == 32 ? static_cast<int64_t>(static_cast<const int32_t*>(t.indices)[i])
                           : static_cast<const int64_t*>(t.indices)[i];
  float g;
  if constexpr (G == kCompactGrad) {
    g = static_cast<const float*>(t.grad)[i];
  } else {
    g = load_as_float<G>(t.grad, x.j);
  }
  x.g = g * inv_scale;
  x.theta = t.master ? t.master[i] : load_as_float<P>(t.param, x.j);
  x.m = t.exp_avg[i];
  x.v = t.exp_avg_sq[i];
  x.vmax = t.s.amsgrad ? t.max_exp_avg_sq[i] : 0.0f;
  return x;
}

template <int32_t P>
GALLOP_HD void sparse_adamw_store(const SparseAdamWTensor& t, int64_t i, const SparseAdamWEntry& x) {
  t.exp_avg[i] = x.m;
  t.exp_avg_sq[i] = x.v;
  if (t.s.amsgrad) t.max_exp_avg_sq[i] = x.vmax;
  if (t.master) t.master[i] = x.theta;
  store_from_float<P>(t.param, x.j, x.theta);
}

// Pass 2 for one entry i (0 <= i < row.count): load, update, store. The CUDA
// kernel runs the same three functions, with the loads of several entries
// issued before their stores.
template <int32_t P, int32_t G>
GALLOP_HD void sparse_adamw_entry(const SparseAdamWTensor& t, int64_t i, float inv_scale) {
  SparseAdamWEntry x = sparse_adamw_load<P, G>(t, i, inv_scale);
  adamw_update(x.theta, x.g, x.m, x.v, x.vmax, t.s);
  sparse_adamw_store<P>(t, i, x);
}

// Calls f.template operator()<P, G>() for the (param dtype, grad kind) pair at
// run time: the one switch, once per launch.
template <typename F>
auto dispatch_dtypes(int32_t param_dtype, int32_t grad_kind, F&& f) {
#define GALLOP_GRAD_CASES(P)                                    \
  switch (grad_kind) {                                          \
    case kBFloat16: return f.template operator()<P, kBFloat16>(); \
    case kFloat16: return f.template operator()<P, kFloat16>();   \
    case kCompactGrad: return f.template operator()<P, kCompactGrad>(); \
    default: return f.template operator()<P, kFloat32>();         \
  }
  switch (param_dtype) {
    case kBFloat16: GALLOP_GRAD_CASES(kBFloat16)
    case kFloat16: GALLOP_GRAD_CASES(kFloat16)
    default: GALLOP_GRAD_CASES(kFloat32)
  }
#undef GALLOP_GRAD_CASES
}

// A step over segments: segments[5*s .. 5*s+4] = (first row, rows, entries,
// param_dtype, grad_kind) of segment s; rows of a segment are consecutive in
// the table and their offsets start at 0.
struct SparseAdamWStep {
  SparseAdamWTensor* table;   // all rows of the step
  int32_t num_rows;
  const int64_t* segments;    // host memory
  int32_t num_segments;
  const float* grad_scale;    // device memory (host for the host build), or null
  const float* found_inf;     // idem
};

// Host build: the same passes, the same functions, on the calling thread(s).
void sparse_adamw_host(const SparseAdamWStep& step, int num_threads);

#if defined(GALLOP_WITH_CUDA)
// CUDA build: the table and every pointer in it are device memory; enqueues the
// prepare kernel and one update kernel per segment on stream and returns a
// cudaError_t as int (0 on success).
int sparse_adamw_cuda(const SparseAdamWStep& step, void* stream);
#endif

}  // namespace gallop
