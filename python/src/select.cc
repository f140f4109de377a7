// Bindings for csrc/select_host.cpp: Python ints (data_ptr()) and scalars in, C
// types out, the GIL released. No math here.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "gallop/select.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// Writes row i of a host buffer of SELECT_SOURCE_ROW_BYTES-byte rows.
void fill_source(std::uintptr_t table, int64_t i, std::uintptr_t theta, std::uintptr_t grad, int64_t theta_stride,
                 int64_t grad_stride, int64_t numel, int64_t base, int64_t first_block, int32_t theta_dtype,
                 int32_t grad_dtype) {
  auto& s = ptr<gallop::SelectSource>(table)[i];
  s.theta = ptr<const void>(theta);
  s.grad = ptr<const void>(grad);
  s.theta_stride = theta_stride;
  s.grad_stride = grad_stride;
  s.numel = numel;
  s.base = base;
  s.first_block = first_block;
  s.theta_dtype = theta_dtype;
  s.grad_dtype = grad_dtype;
}

gallop::SelectParams make_params(std::uintptr_t table, int32_t num_sources, int64_t num_blocks, int64_t block,
                                 int32_t criterion, float eps, int32_t lo, int32_t hi) {
  return gallop::SelectParams{ptr<const gallop::SelectSource>(table), num_sources, num_blocks, block, criterion,
                              eps, lo, hi};
}

}  // namespace

void init_select(py::module& m) {
  m.attr("SELECT_SOURCE_ROW_BYTES") = sizeof(gallop::SelectSource);
  m.attr("SELECT_COUNT_COLUMNS") = static_cast<int>(gallop::kCountColumns);
  m.attr("CRITERION_GALLOP") = static_cast<int>(gallop::kGallop);
  m.attr("CRITERION_SAFT") = static_cast<int>(gallop::kSaft);
  m.attr("CRITERION_MAGNITUDE") = static_cast<int>(gallop::kMagnitude);
  m.attr("CRITERION_PAFI") = static_cast<int>(gallop::kPafi);
  m.def("select_fill_source", &fill_source, py::call_guard<py::gil_scoped_release>(),
        "Write row i of a host table of SELECT_SOURCE_ROW_BYTES-byte source rows (pointers as ints).");
  m.def(
      "select_count_host",
      [](std::uintptr_t table, int32_t num_sources, int64_t num_blocks, int64_t block, int32_t criterion, float eps,
         int32_t lo, int32_t hi, std::uintptr_t counts, int num_threads) {
        gallop::select_count_host(make_params(table, num_sources, num_blocks, block, criterion, eps, lo, hi),
                                  ptr<int32_t>(counts), num_threads > 0 ? num_threads : 1);
      },
      py::arg("table"), py::arg("num_sources"), py::arg("num_blocks"), py::arg("block"), py::arg("criterion"),
      py::arg("eps"), py::arg("lo"), py::arg("hi"), py::arg("counts"), py::arg("num_threads") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "Pass 1: per block, #keys > hi, in (lo, hi], == lo and non-finite into counts (num_blocks x "
      "SELECT_COUNT_COLUMNS int32).");
  m.def(
      "select_emit_host",
      [](std::uintptr_t table, int32_t num_sources, int64_t num_blocks, int64_t block, int32_t criterion, float eps,
         int32_t lo, int32_t hi, std::uintptr_t out_dst, std::uintptr_t quota, std::uintptr_t out,
         std::uintptr_t cand_key, std::uintptr_t cand_pos, std::uintptr_t cand_dst, int num_threads) {
        gallop::select_emit_host(make_params(table, num_sources, num_blocks, block, criterion, eps, lo, hi),
                                 ptr<const int64_t>(out_dst), ptr<const int32_t>(quota), ptr<int64_t>(out),
                                 ptr<int32_t>(cand_key), ptr<int64_t>(cand_pos), ptr<const int64_t>(cand_dst),
                                 num_threads > 0 ? num_threads : 1);
      },
      py::arg("table"), py::arg("num_sources"), py::arg("num_blocks"), py::arg("block"), py::arg("criterion"),
      py::arg("eps"), py::arg("lo"), py::arg("hi"), py::arg("out_dst"), py::arg("quota"), py::arg("out"),
      py::arg("cand_key"), py::arg("cand_pos"), py::arg("cand_dst"), py::arg("num_threads") = 1,
      py::call_guard<py::gil_scoped_release>(),
      "Pass 2: per block, selected positions (and the first quota ties, quota != 0) at out_dst, window "
      "candidates at cand_dst (cand_key != 0); every pointer is host memory, 0 is null.");
}
