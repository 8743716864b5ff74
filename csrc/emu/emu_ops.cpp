// adaptfuse._emu: the CUDA kernels, run by the CPU emulator, as torch.ops.adaptfuse_emu.* on
// CPU tensors, with the same schemas as torch.ops.adaptfuse.* (op_schemas.h). Test-only: the
// suite checks the kernel sources against adaptfuse/reference.py on machines without a GPU.
#include <Python.h>
#include <torch/library.h>

#include "composite.h"
#include "kernel_family_python.h"
#include "kernel_glue.h"
#include "op_schemas.h"

namespace adaptfuse {
namespace {

struct EmuBackend {
  struct Guard {
    explicit Guard(const at::Tensor& on) {
      TORCH_CHECK_VALUE(on.is_cpu(), "adaptfuse_emu: the emulated kernels take CPU tensors, got ",
                        on.device());
    }
  };
  static cudaStream_t stream(const at::Tensor&) { return nullptr; }
};

PyObject* set_options(PyObject*, PyObject* args) {
  unsigned seed = 0;
  int os_threads = 1;
  if (!PyArg_ParseTuple(args, "Ii", &seed, &os_threads)) return nullptr;
  adaptfuse_emu::options().seed = seed;
  adaptfuse_emu::options().os_threads = os_threads;
  Py_RETURN_NONE;
}

PyObject* get_options(PyObject*, PyObject*) {
  return Py_BuildValue("(Ii)", adaptfuse_emu::options().seed, adaptfuse_emu::options().os_threads);
}

PyMethodDef module_methods[] = {
    ADAPTFUSE_KERNEL_FAMILY_METHOD,
    {"set_options", set_options, METH_VARARGS,
     "set_options(seed, os_threads): seed 0 runs threads in order, otherwise in a seeded random "
     "order between synchronisations; os_threads spreads blocks over OS threads."},
    {"get_options", get_options, METH_NOARGS, "(seed, os_threads) now in effect."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_emu",
                                 "The CUDA kernels under the CPU emulator (test-only).", -1,
                                 module_methods};

}  // namespace

TORCH_LIBRARY(adaptfuse_emu, m) {
#define ADAPTFUSE_DEFINE(schema) m.def(schema);
  ADAPTFUSE_OP_SCHEMAS(ADAPTFUSE_DEFINE)
#undef ADAPTFUSE_DEFINE
}

constexpr char kLibraryName[] = "adaptfuse_emu";

TORCH_LIBRARY_IMPL(adaptfuse_emu, CompositeExplicitAutograd, m) {
  m.impl("expand", &expand_functional<kLibraryName>);
}

TORCH_LIBRARY_IMPL(adaptfuse_emu, CPU, m) {
  m.impl("plan", &plan_op<EmuBackend>);
  m.impl("shrink", &shrink_op<EmuBackend>);
  m.impl("expand_", &expand_op<EmuBackend>);
  m.impl("segment_outer", &segment_outer_op<EmuBackend>);
  m.impl("merge_", &merge_op<EmuBackend>);
  m.impl("unmerge_", &unmerge_op<EmuBackend>);
}

}  // namespace adaptfuse

PyMODINIT_FUNC PyInit__emu(void) { return PyModule_Create(&adaptfuse::module_definition); }
