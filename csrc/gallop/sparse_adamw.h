// Sparse AdamW over index lists: one table row per parameter, one pass (or one
// CUDA launch) over all selected entries of all parameters of a step.
#pragma once

#include "gallop/adamw_math.h"
#include "gallop/dtypes.h"

namespace gallop {

// One parameter's selected entries. Every pointer addresses memory on the
// device that runs the update (host memory for the host build).
//
// Hyper-parameters live in each row rather than in one launch per group: one
// launch then covers every group (per-group lr, betas, eps, weight decay), and
// each tensor's own step count gives its own bias corrections (a parameter
// that had no gradient on some step is behind the others, as in torch).
struct SparseAdamWTensor {
  void* param;                // dense weights, dtype param_dtype
  const void* grad;           // dense gradient (grad[idx[i]]) or compact fp32 (grad[i])
  const int64_t* indices;     // count sorted flat indices into param / grad
  float* exp_avg;             // count entries
  float* exp_avg_sq;          // count entries
  float* max_exp_avg_sq;      // count entries when amsgrad, else unused
  float* master;              // count fp32 master weights, or null
  int64_t count;              // selected entries of this tensor
  int64_t offset;             // entries of all earlier rows (prefix sum of count)
  int32_t param_dtype;        // DType
  int32_t grad_dtype;         // DType (kFloat32 when grad_compact)
  int32_t grad_compact;       // 1: grad holds the gathered entries
  int32_t pad_;
  AdamWScalars s;
};

struct SparseAdamWParams {
  const SparseAdamWTensor* tensors;  // num_tensors rows, offsets increasing
  int32_t num_tensors;
  int64_t total;                     // sum of counts
  const float* inv_grad_scale;       // one float, or null: gradients multiplied by it
  const float* found_inf;            // one float, or null: nonzero skips the whole step
};

// Update one entry i (0 <= i < row.count) of a row: the one place that reads
// and writes memory for an entry, shared by both builds.
GALLOP_HD void sparse_adamw_entry(const SparseAdamWTensor& t, int64_t i, float inv_scale) {
  int64_t j = t.indices[i];
  float g = t.grad_compact ? static_cast<const float*>(t.grad)[i] : load_as_float(t.grad, j, t.grad_dtype);
  g = g * inv_scale;
  float theta = t.master ? t.master[i] : load_as_float(t.param, j, t.param_dtype);
  float m = t.exp_avg[i], v = t.exp_avg_sq[i];
  float vmax = t.s.amsgrad ? t.max_exp_avg_sq[i] : 0.0f;
  adamw_update(theta, g, m, v, vmax, t.s);
  t.exp_avg[i] = m;
  t.exp_avg_sq[i] = v;
  if (t.s.amsgrad) t.max_exp_avg_sq[i] = vmax;
  if (t.master) t.master[i] = theta;
  store_from_float(t.param, j, t.param_dtype, theta);
}

// Host build: the same entries, the same function, on the calling thread(s).
// p.tensors and every pointer in it are host memory.
void sparse_adamw_host(const SparseAdamWParams& p, int num_threads);

#if defined(GALLOP_WITH_CUDA)
// CUDA build: p.tensors and every pointer in it are device memory; enqueues
// one kernel on stream and returns a cudaError_t as int (0 on success).
int sparse_adamw_cuda(const SparseAdamWParams& p, void* stream);
#endif

}  // namespace gallop
