// kernel_family([name]) for the Python modules adaptfuse._C (CUDA builds) and adaptfuse._emu:
// each module sets the dispatcher of its own copy of the kernels (csrc/kernels/lora_dispatch.cu).
#pragma once

#include <Python.h>

#include "kernels/launchers.h"

namespace adaptfuse {

inline PyObject* kernel_family_python(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "|s", &name)) return nullptr;
  const char* previous = kernel_family_name(kernel_family());
  if (name != nullptr && !set_kernel_family_by_name(name)) {
    PyErr_Format(PyExc_ValueError,
                 "unknown kernel family '%s'; expected 'auto', 'simple', 'bgmv' or 'sgmv'", name);
    return nullptr;
  }
  return PyUnicode_FromString(previous);
}

}  // namespace adaptfuse

#define ADAPTFUSE_KERNEL_FAMILY_METHOD                                                         \
  {"kernel_family", ::adaptfuse::kernel_family_python, METH_VARARGS,                           \
   "kernel_family([name]) -> the previous family: which shrink/expand kernels the dispatcher " \
   "uses ('auto', or 'simple'/'bgmv'/'sgmv' for benchmarks and tests)."}
