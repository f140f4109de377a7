// Bindings for csrc/sparse_adamw*: Python ints (data_ptr(), stream handles) and
// floats in, C types out. No math here.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>

#include "gallop/sparse_adamw.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

gallop::SparseAdamWParams make_params(std::uintptr_t table, int32_t num_tensors, int64_t total,
                                      std::uintptr_t inv_grad_scale, std::uintptr_t found_inf) {
  gallop::SparseAdamWParams p;
  p.tensors = ptr<const gallop::SparseAdamWTensor>(table);
  p.num_tensors = num_tensors;
  p.total = total;
  p.inv_grad_scale = ptr<const float>(inv_grad_scale);
  p.found_inf = ptr<const float>(found_inf);
  return p;
}

// Writes row i of a host buffer of rows (the caller copies it to the device for
// the CUDA launch). Pointers are ints; 0 means null.
void fill_row(std::uintptr_t table, int64_t i, std::uintptr_t param, std::uintptr_t grad, std::uintptr_t indices,
              std::uintptr_t exp_avg, std::uintptr_t exp_avg_sq, std::uintptr_t max_exp_avg_sq,
              std::uintptr_t master, int64_t count, int64_t offset, int32_t param_dtype, int32_t grad_dtype,
              bool grad_compact, float decay, float lerp_weight, float beta2, float one_minus_beta2,
              float bias_correction2_sqrt, float eps, float neg_step_size, bool amsgrad, bool maximize,
              bool weight_decay) {
  auto& t = ptr<gallop::SparseAdamWTensor>(table)[i];
  t.param = ptr<void>(param);
  t.grad = ptr<const void>(grad);
  t.indices = ptr<const int64_t>(indices);
  t.exp_avg = ptr<float>(exp_avg);
  t.exp_avg_sq = ptr<float>(exp_avg_sq);
  t.max_exp_avg_sq = ptr<float>(max_exp_avg_sq);
  t.master = ptr<float>(master);
  t.count = count;
  t.offset = offset;
  t.param_dtype = param_dtype;
  t.grad_dtype = grad_dtype;
  t.grad_compact = grad_compact ? 1 : 0;
  t.pad_ = 0;
  t.s = gallop::AdamWScalars{decay, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                             neg_step_size, amsgrad ? 1 : 0, maximize ? 1 : 0, weight_decay ? 1 : 0};
}

}  // namespace

void init_sparse_adamw(py::module& m) {
  m.attr("SPARSE_ADAMW_ROW_BYTES") = sizeof(gallop::SparseAdamWTensor);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(gallop::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(gallop::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(gallop::kFloat16);
  m.def("sparse_adamw_fill_row", &fill_row, py::call_guard<py::gil_scoped_release>(),
        "Write row i of a host table of SPARSE_ADAMW_ROW_BYTES-byte rows (pointers as ints, 0 = null).");
  m.def(
      "sparse_adamw_step_host",
      [](std::uintptr_t table, int32_t num_tensors, int64_t total, std::uintptr_t inv_grad_scale,
         std::uintptr_t found_inf, int num_threads) {
        gallop::sparse_adamw_host(make_params(table, num_tensors, total, inv_grad_scale, found_inf),
                                  num_threads > 0 ? num_threads : 1);
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("total"), py::arg("inv_grad_scale"), py::arg("found_inf"),
      py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>(),
      "One sparse AdamW step over a host table; every pointer is host memory.");
#if defined(GALLOP_WITH_CUDA)
  m.def(
      "sparse_adamw_step_cuda",
      [](std::uintptr_t table, int32_t num_tensors, int64_t total, std::uintptr_t inv_grad_scale,
         std::uintptr_t found_inf, std::uintptr_t stream) {
        int err = gallop::sparse_adamw_cuda(make_params(table, num_tensors, total, inv_grad_scale, found_inf),
                                            reinterpret_cast<void*>(stream));
        if (err != 0) throw std::runtime_error("sparse_adamw_step_cuda: CUDA error " + std::to_string(err));
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("total"), py::arg("inv_grad_scale"), py::arg("found_inf"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue one sparse AdamW step on stream; the table and every pointer are device memory.");
#endif
}
