// The one per-entry AdamW update, shared by the CUDA kernel and the host build.
//
// It follows torch.optim.AdamW's single-tensor path (torch/optim/adam.py,
// _single_tensor_adam, decoupled weight decay) operation by operation:
//   param.mul_(1 - lr*wd); exp_avg.lerp_(g, 1 - beta1);
//   exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2);
//   [amsgrad] max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
//   denom = (sqrt(v) / sqrt(bias_correction2)).add_(eps);
//   param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1).
// Each op is rounded to float32 as ATen's CPU kernels round it (checked op by
// op against torch 2.13 on AVX2): lerp and addcmul are fused multiply-adds
// there (lerp: fma(w, end - self, self); addcmul: fma(value * t1, t2, self)),
// so they are fmaf here; everything else is a separately rounded op, and both
// compilers run with contraction off (nvcc --fmad=false, host
// -ffp-contract=off), so host and device produce the same bits.
//
// Numerical contract against torch.optim.AdamW(foreach=False) on the CPU, run
// on the gathered float32 weights (tests/test_sparse_adamw_ext.py,
// test_ulp_budget_against_torch_adamw): exp_avg, exp_avg_sq and
// max_exp_avg_sq are bit-equal after every step; the weights are not, by at
// most the budget stated there. The one op that differs is sqrt: this code
// rounds it correctly (as CUDA's sqrtf and torch's own scalar CPU loop do),
// while ATen's AVX2 vector loop returns a result up to 1 ulp away for about
// 16% of inputs, so denom, and with it the update, can differ by a few ulps.
// Started from equal states, a step's weights then differ from torch's by at
// most ulp(theta) + 4 ulp(update), update = lr * m / denom: 1 ulp from sqrt and
// up to one more from each separately rounded op after it (/ bias correction,
// + eps, the addcdiv division); measured worst 4 (tests/helpers.py,
// assert_adamw_step, asserts exactly that). Over many steps the difference
// compounds through the weights as any rounding difference does.
#pragma once

#include <cmath>

#include "gallop/macros.h"

namespace gallop {

// Per-parameter hyper-parameters: Python floats (double), as a param group holds them.
struct AdamWHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  int32_t amsgrad;   // 0 / 1
  int32_t maximize;  // 0 / 1
};

// Per-tensor step constants, float32 as ATen rounds a Python scalar for a
// float32 tensor op.
struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float lerp_weight;    // 1 - beta1
  float beta2;          // beta2
  float one_minus_beta2;
  float bias_correction2_sqrt;  // (1 - beta2**step) ** 0.5
  float eps;
  float neg_step_size;  // -(lr / (1 - beta1**step))
  int32_t amsgrad;      // 0 / 1
  int32_t maximize;     // 0 / 1
  int32_t weight_decay; // 0: torch skips the multiply (x * 1.0f is x anyway)
};

// The step constants of step number `step` (1 for the first), in double as
// torch's Python code computes them from Python floats, then rounded to float32.
// The host build calls glibc's pow, which Python's float ** calls too; the CUDA
// build calls CUDA's double pow (documented error <= 2 ulp in double), which
// changes a float32 constant only when the double lands within 2 ulp of a
// float32 rounding boundary (about 1 in 2^28).
GALLOP_HD AdamWScalars adamw_scalars(const AdamWHyper& h, double lr, float step) {
  double bias_correction1 = 1.0 - pow(h.beta1, static_cast<double>(step));
  double bias_correction2 = 1.0 - pow(h.beta2, static_cast<double>(step));
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * h.weight_decay);
  s.lerp_weight = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));  // == bias_correction2 ** 0.5
  s.eps = static_cast<float>(h.eps);
  s.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  s.amsgrad = h.amsgrad;
  s.maximize = h.maximize;
  s.weight_decay = h.weight_decay != 0.0 ? 1 : 0;
  return s;
}

// Update one entry. theta: the weight in float32 (the master copy or the upcast
// param); g: the gradient in float32 times the inverse grad scale; m, v, vmax:
// the entry's states (vmax unused unless amsgrad).
GALLOP_HD void adamw_update(float& theta, float g, float& m, float& v, float& vmax, const AdamWScalars& s) {
  if (s.maximize) g = -g;
  if (s.weight_decay) theta = theta * s.decay;
  // ATen lerp: weight < 0.5 ? self + w*(end-self) : end - (end-self)*(1-w), as an fmadd
  float diff = g - m;
  m = (fabsf(s.lerp_weight) < 0.5f) ? fmaf(s.lerp_weight, diff, m) : fmaf(s.lerp_weight - 1.0f, diff, g);
  // addcmul: self + value * t1 * t2, the last multiply-add fused (ATen's vector loop)
  v = v * s.beta2;
  v = fmaf(s.one_minus_beta2 * g, g, v);
  float vv = v;
  if (s.amsgrad) {
    // torch.maximum propagates NaN from either side
    vmax = (v > vmax || v != v) ? v : vmax;
    vv = vmax;
  }
  float denom = sqrtf(vv) / s.bias_correction2_sqrt + s.eps;
  // addcdiv: self + value * t1 / t2
  theta = theta + s.neg_step_size * m / denom;
}

}  // namespace gallop
