// Bindings for csrc/sparse_adamw*: Python ints (data_ptr(), stream handles),
// lists of them and floats in, C types out. No math here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "gallop/sparse_adamw.h"

namespace py = pybind11;

namespace {

using Ptrs = std::vector<std::uintptr_t>;

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Layout ints per row, in this order (see SparseAdamWTensor).
enum Layout {
  kCount, kOffset, kParamDType, kGradKind, kStepSlot, kLrSlot, kAmsgrad, kMaximize, kHasMaster, kIndexBits, kLayoutInts
};
constexpr int kHyperFloats = 4;  // beta1, beta2, eps, weight_decay

// Writes rows 0..n-1 of a host table. params, grads, indices: one pointer per
// row; states: exp_avg, exp_avg_sq, [max_exp_avg_sq if amsgrad], [master if
// has_master] of each row in row order; steps: float32 array (row r uses
// steps[step_slot]); lrs: float64 array (row r uses lrs[lr_slot]).
void fill_table(std::uintptr_t table, const Ptrs& params, const Ptrs& grads, const Ptrs& indices, const Ptrs& states,
                std::uintptr_t steps, std::uintptr_t lrs, const std::vector<int64_t>& layout,
                const std::vector<double>& hyper) {
  size_t n = params.size();
  if (grads.size() != n || indices.size() != n || layout.size() != n * kLayoutInts || hyper.size() != n * kHyperFloats) {
    throw std::invalid_argument("sparse_adamw_fill_table: lists of different lengths");
  }
  auto* rows = ptr<gallop::SparseAdamWTensor>(table);
  size_t s = 0;
  for (size_t r = 0; r < n; ++r) {
    const int64_t* l = layout.data() + r * kLayoutInts;
    const double* h = hyper.data() + r * kHyperFloats;
    size_t need = 2 + (l[kAmsgrad] ? 1 : 0) + (l[kHasMaster] ? 1 : 0);
    if (s + need > states.size()) throw std::invalid_argument("sparse_adamw_fill_table: too few state pointers");
    if (l[kIndexBits] != 32 && l[kIndexBits] != 64) throw std::invalid_argument("sparse_adamw_fill_table: index bits not 32 or 64");
    gallop::SparseAdamWTensor& t = rows[r];
    t = gallop::SparseAdamWTensor{};
    t.param = ptr<void>(params[r]);
    t.grad = ptr<const void>(grads[r]);
    t.indices = ptr<const void>(indices[r]);
    t.exp_avg = ptr<float>(states[s++]);
    t.exp_avg_sq = ptr<float>(states[s++]);
    t.max_exp_avg_sq = l[kAmsgrad] ? ptr<float>(states[s++]) : nullptr;
    t.master = l[kHasMaster] ? ptr<float>(states[s++]) : nullptr;
    t.step = ptr<float>(steps) + l[kStepSlot];
    t.lr = ptr<const double>(lrs) + l[kLrSlot];
    t.count = l[kCount];
    t.offset = l[kOffset];
    t.param_dtype = static_cast<int32_t>(l[kParamDType]);
    t.grad_kind = static_cast<int32_t>(l[kGradKind]);
    t.index_bits = static_cast<int32_t>(l[kIndexBits]);
    t.h = gallop::AdamWHyper{h[0], h[1], h[2], h[3], l[kAmsgrad] ? 1 : 0, l[kMaximize] ? 1 : 0};
    t.s.amsgrad = t.h.amsgrad;  // read by the loads before the prepare pass has run on a fresh row
  }
  if (s != states.size()) throw std::invalid_argument("sparse_adamw_fill_table: too many state pointers");
}

gallop::SparseAdamWStep make_step(std::uintptr_t table, int32_t num_rows, std::uintptr_t segments,
                                  int32_t num_segments, std::uintptr_t grad_scale, std::uintptr_t found_inf) {
  return gallop::SparseAdamWStep{ptr<gallop::SparseAdamWTensor>(table), num_rows, ptr<const int64_t>(segments),
                                 num_segments, ptr<const float>(grad_scale), ptr<const float>(found_inf)};
}

}  // namespace

void init_sparse_adamw(py::module& m) {
  m.attr("SPARSE_ADAMW_ROW_BYTES") = sizeof(gallop::SparseAdamWTensor);
  m.attr("SPARSE_ADAMW_LAYOUT_INTS") = static_cast<int>(kLayoutInts);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(gallop::kFloat32);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(gallop::kBFloat16);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(gallop::kFloat16);
  m.attr("GRAD_COMPACT") = static_cast<int>(gallop::kCompactGrad);
  m.def("sparse_adamw_fill_table", &fill_table, py::arg("table"), py::arg("params"), py::arg("grads"),
        py::arg("indices"), py::arg("states"), py::arg("steps"), py::arg("lrs"), py::arg("layout"), py::arg("hyper"),
        "Write the rows of a host table of SPARSE_ADAMW_ROW_BYTES-byte rows (pointers as ints, 0 = null).");
  m.def(
      "sparse_adamw_step_host",
      [](std::uintptr_t table, int32_t num_rows, std::uintptr_t segments, int32_t num_segments,
         std::uintptr_t grad_scale, std::uintptr_t found_inf, int num_threads) {
        gallop::sparse_adamw_host(make_step(table, num_rows, segments, num_segments, grad_scale, found_inf),
                                  num_threads > 0 ? num_threads : 1);
      },
      py::arg("table"), py::arg("num_rows"), py::arg("segments"), py::arg("num_segments"), py::arg("grad_scale"),
      py::arg("found_inf"), py::arg("num_threads") = 1, py::call_guard<py::gil_scoped_release>(),
      "One sparse AdamW step over a host table (prepare pass, then one pass per segment); all host memory.");
#if defined(GALLOP_WITH_CUDA)
  m.def(
      "sparse_adamw_step_cuda",
      [](std::uintptr_t table, int32_t num_rows, std::uintptr_t segments, int32_t num_segments,
         std::uintptr_t grad_scale, std::uintptr_t found_inf, std::uintptr_t stream) {
        int err = gallop::sparse_adamw_cuda(make_step(table, num_rows, segments, num_segments, grad_scale, found_inf),
                                            reinterpret_cast<void*>(stream));
        if (err != 0) throw std::runtime_error("sparse_adamw_step_cuda: CUDA error " + std::to_string(err));
      },
      py::arg("table"), py::arg("num_rows"), py::arg("segments"), py::arg("num_segments"), py::arg("grad_scale"),
      py::arg("found_inf"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Enqueue one sparse AdamW step on stream: the table and every pointer in it are device memory, segments host "
      "memory.");
#endif
}
