// The adaptfuse op library: schemas from op_schemas.h; backends add TORCH_LIBRARY_IMPL
// blocks (csrc/cpu/, csrc/cuda/); fake impls for torch.compile live in adaptfuse/ops.py.
// Storage and semantics: ../DESIGN.md "The ops"; argument checks: arguments.cpp.
#include <Python.h>
#include <torch/library.h>

#include "composite.h"
#include "cpu/simd_lora.h"
#include "op_schemas.h"
#ifdef ADAPTFUSE_WITH_CUDA
#include "kernel_family_python.h"
#endif

TORCH_LIBRARY(adaptfuse, m) {
#define ADAPTFUSE_DEFINE(schema) m.def(schema);
  ADAPTFUSE_OP_SCHEMAS(ADAPTFUSE_DEFINE)
#undef ADAPTFUSE_DEFINE
}

namespace adaptfuse {
constexpr char kLibraryName[] = "adaptfuse";
}  // namespace adaptfuse

TORCH_LIBRARY_IMPL(adaptfuse, CompositeExplicitAutograd, m) {
  m.impl("expand", &adaptfuse::expand_functional<adaptfuse::kLibraryName>);
}

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef ADAPTFUSE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_kernels(PyObject*, PyObject*) {
  return PyUnicode_FromString(adaptfuse::simd_level_name());
}

PyMethodDef module_methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_kernels", cpu_kernels, METH_NOARGS, "The CPU vector kernels in use."},
#ifdef ADAPTFUSE_WITH_CUDA
    ADAPTFUSE_KERNEL_FAMILY_METHOD,
#endif
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_C",
    "adaptfuse's compiled ops; registered with torch.library on import.", -1, module_methods};

}  // namespace

// Importing adaptfuse._C loads the library and thereby runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_definition); }
