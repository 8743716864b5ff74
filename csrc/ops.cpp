// Every schema of the adaptfuse ops, in one place. Backends add TORCH_LIBRARY_IMPL blocks
// (csrc/cpu/, csrc/cuda/); fake impls for torch.compile live in adaptfuse/ops.py.
// Storage and semantics: ../DESIGN.md "The ops"; argument checks: arguments.cpp.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(adaptfuse, m) {
  // Tokens grouped by slot: token_order [T] int32, slot_offsets [S + 1] int32.
  m.def("plan(Tensor token_slots, int num_slots) -> (Tensor token_order, Tensor slot_offsets)");
  // v [T, R_max] fp32: v[t, :rank(s)] = scales[s] * x[t] @ A[s, :rank(s)]^T, zero elsewhere.
  m.def(
      "shrink(Tensor x, Tensor A, Tensor ranks, Tensor scales, Tensor token_slots, "
      "Tensor token_order, Tensor slot_offsets) -> Tensor");
  // y[t, off_i : off_i + H_out_i] += v[t, col_i : col_i + rank(s)] @ B_i[s, :rank(s)].
  m.def(
      "expand_(Tensor(a!) y, Tensor v, Tensor[] B, int[] out_offsets, Tensor ranks, "
      "Tensor token_slots, Tensor token_order, Tensor slot_offsets) -> ()");
  // W += sum_i coefficients[i] * B_i^T @ A_i; returns the exact-restore record.
  m.def(
      "merge_(Tensor(a!) W, Tensor[] A, Tensor[] B, float[] coefficients) -> "
      "(Tensor tile_counts, Tensor offsets, Tensor corrections, Tensor escape_bits)");
  m.def(
      "unmerge_(Tensor(a!) W, Tensor[] A, Tensor[] B, float[] coefficients, Tensor tile_counts, "
      "Tensor offsets, Tensor corrections, Tensor escape_bits) -> ()");
}

namespace {

PyObject* cuda_built(PyObject*, PyObject*) {
#ifdef ADAPTFUSE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef module_methods[] = {
    {"cuda_built", cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_definition = {PyModuleDef_HEAD_INIT, "_C",
                                 "adaptfuse's compiled ops; registered with torch.library on import.",
                                 -1, module_methods};

}  // namespace

// Importing adaptfuse._C loads the library and thereby runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_definition); }
