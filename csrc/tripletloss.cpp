// Op schemas (schemas.h) and the Python module stub. Kernels: cpu/triplet_kernel.cpp, cuda/triplet_kernel.cu;
// autograd and fake kernels: tripletloss_cuda/ops.py.
#include <Python.h>
#include <torch/headeronly/version.h>

#include "schemas.h"
#include "stable.h"

#define TL_STR_(x) #x
#define TL_STR(x) TL_STR_(x)

namespace tripletloss {
const char* cuda_arch_list();  // defined in cuda/triplet_kernel.cu, or below for CPU-only builds
#ifndef TRIPLETLOSS_WITH_CUDA
const char* cuda_arch_list() { return ""; }
#endif
}  // namespace tripletloss

STABLE_TORCH_LIBRARY(tripletloss_cuda, m) { TL_TRIPLET_SCHEMAS(m); }

// What this library was built for, also readable in the file itself when it cannot be loaded
// (tripletloss_cuda/_library.py looks for the marker): the torch whose headers it was compiled against, and
// the oldest torch whose stable ABI it targets (setup.py's TORCH_TARGET_VERSION).
#define TL_BUILT_WITH TL_STR(TORCH_VERSION_MAJOR) "." TL_STR(TORCH_VERSION_MINOR) "." TL_STR(TORCH_VERSION_PATCH)
#define TL_TARGET TL_STR(TL_TARGET_MAJOR) "." TL_STR(TL_TARGET_MINOR)
[[gnu::used]] static const char build_marker[] =
    "tripletloss_cuda build: torch=" TL_BUILT_WITH "; stable_abi=" TL_TARGET ";";

// `import tripletloss_cuda._C` loads this library, which runs the registrations above.
static PyObject* build_info(PyObject*, PyObject*) {
  (void)build_marker;
  return Py_BuildValue("{s:s,s:s,s:s}", "torch", TL_BUILT_WITH, "stable_abi", TL_TARGET, "cuda_archs",
                       tripletloss::cuda_arch_list());
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Versions and CUDA architectures this library was built for."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
