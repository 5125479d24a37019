// tripletloss_cuda._C_emu (tests only, never installed): the ops of csrc/cuda/*.cu run on the CUDA emulator
// (emu.h), registered as tripletloss_cuda_emu::* on the CPU key, and the Python functions that control the
// emulator's fake device. Built by `make build-emu` (setup.py with TRIPLETLOSS_EMULATED=1).
#include <Python.h>

#include "../schemas.h"
#include "../stable.h"
#include "emu.h"

namespace tl_emu {
long selftest(const std::string& name);  // selftest.cpp
}

STABLE_TORCH_LIBRARY(tripletloss_cuda_emu, m) {
  TL_TRIPLET_SCHEMAS(m);
  TL_MINING_SCHEMAS(m);
  TL_INDEXED_SCHEMAS(m);
  TL_EPILOGUE_SCHEMAS(m);
}

namespace {

// Runs f, turning a C++ exception into a Python RuntimeError.
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* set_seed(PyObject*, PyObject* arg) {
  const unsigned long long seed = PyLong_AsUnsignedLongLongMask(arg);
  if (PyErr_Occurred()) return nullptr;
  tl_emu::set_seed(seed);
  Py_RETURN_NONE;
}

// set_device(sms, occupancy): the SM count, and {kernel name substring: resident blocks per SM} for the
// kernels whose occupancy is not 2048 / threads (the whole table is replaced).
PyObject* set_device(PyObject*, PyObject* args) {
  int sms = 0;
  PyObject* occupancy = nullptr;
  if (!PyArg_ParseTuple(args, "i|O!", &sms, &PyDict_Type, &occupancy)) return nullptr;
  return guarded([&]() -> PyObject* {
    tl_emu::set_device(sms);
    tl_emu::clear_occupancy();
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (occupancy && PyDict_Next(occupancy, &pos, &key, &value)) {
      const char* name = PyUnicode_AsUTF8(key);
      const long n = PyLong_AsLong(value);
      if (!name || PyErr_Occurred()) return nullptr;
      tl_emu::set_occupancy(name, int(n));
    }
    Py_RETURN_NONE;
  });
}

// launches(): [{kernel, grid, block, barriers, masks}] of the launches since clear_launches(), oldest first.
PyObject* launches(PyObject*, PyObject*) {
  const auto log = tl_emu::launches();
  PyObject* list = PyList_New(Py_ssize_t(log.size()));
  for (size_t i = 0; i < log.size(); ++i) {
    const auto& r = log[i];
    PyObject* masks = PyList_New(r.n_masks);
    for (int k = 0; k < r.n_masks; ++k) PyList_SET_ITEM(masks, k, PyLong_FromUnsignedLong(r.masks[k]));
    PyList_SET_ITEM(list, Py_ssize_t(i),
                    Py_BuildValue("{s:s,s:I,s:I,s:K,s:N}", "kernel", r.kernel.c_str(), "grid", r.grid, "block", r.block,
                                  "barriers", r.barriers, "masks", masks));
  }
  return list;
}

PyObject* selftest(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  return guarded([&] { return PyLong_FromLong(tl_emu::selftest(name)); });
}

PyObject* clear_launches(PyObject*, PyObject*) {
  tl_emu::clear_launches();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_seed", set_seed, METH_O, "Seed of the block and warp orders of the following launches."},
    {"set_device", set_device, METH_VARARGS, "set_device(sms, occupancy={}): the fake device."},
    {"launches", launches, METH_NOARGS, "The launches since clear_launches(), oldest first."},
    {"clear_launches", clear_launches, METH_NOARGS, "Empties the launch log."},
    {"selftest", selftest, METH_O, "Runs a kernel of csrc/emu/selftest.cpp (most break a rule on purpose)."},
    {nullptr, nullptr, 0, nullptr}};

#ifndef TL_EMU_MODULE
#define TL_EMU_MODULE _C_emu
#endif
#define TL_STR_(x) #x
#define TL_STR(x) TL_STR_(x)
#define TL_CAT_(a, b) a##b
#define TL_CAT(a, b) TL_CAT_(a, b)

PyModuleDef module = {PyModuleDef_HEAD_INIT, TL_STR(TL_EMU_MODULE), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC TL_CAT(PyInit_, TL_EMU_MODULE)(void) { return PyModule_Create(&module); }
