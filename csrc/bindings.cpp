// The one pybind11 binding file of semmim._C. Each op's sources define `bind_<op>(m)`, which
// registers its CPU entry points and its CUDA entry points (the latter raise a Python error when
// the module was built without CUDA or no GPU driver is present).
#include <pybind11/pybind11.h>

#include "common.h"
#include "topk_mask.h"

#ifdef SEMMIM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace semmim {
void bind_masked_gather(py::module_& m);
void bind_topk_mask(py::module_& m);
}

namespace {

py::dict build_info() {
  py::dict d;
#ifdef SEMMIM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(SEMMIM_CUDA_ARCHS_STR);
  d["cuda_compiler"] = std::string("nvcc ") + SEMMIM_CUDA_COMPILER_VERSION;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cuda_runtime"] = rt;
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
  d["cuda_compiler"] = std::string("");
  d["cuda_runtime"] = 0;
#endif
#ifdef SEMMIM_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cxx_compiler"] = std::string(SEMMIM_CXX_COMPILER);
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                  std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

// Size limits the kernels own; Python reads them from here (never duplicates them).
py::dict limits() {
  py::dict d;
  d["topk_mask_max_p"] = semmim::tm::kTopkMaskMaxP;      // cpu and cuda: a row's scores on chip
  d["topk_mask_max_d_cuda"] = semmim::tm::kTopkMaskMaxDCuda;  // cuda: text row in shared memory
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "semmim compiled kernels (C++ CPU with OpenMP, CUDA when built); no libtorch linkage";
  m.def("build_info", &build_info, "Build configuration: CUDA built or not, archs, compilers.");
  m.def("limits", &limits, "Size limits of the compiled kernels (e.g. topk_mask_max_p).");
  semmim::bind_masked_gather(m);
  semmim::bind_topk_mask(m);
}
