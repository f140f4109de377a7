// gallop_kernels._C: converts Python values to C types and calls csrc/.
// One init_<topic>(m) per binding file, gathered here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void init_select(py::module& m);
void init_sparse_adamw(py::module& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "gallop_kernels native kernels (host build always, CUDA when built with nvcc)";
#ifdef GALLOP_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
  init_select(m);
  init_sparse_adamw(m);
}
