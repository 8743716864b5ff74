// The schema of every adaptfuse op, once. TORCH_LIBRARY(adaptfuse) in ops.cpp defines them;
// the emulated CUDA kernels register the same schemas under adaptfuse_emu (csrc/emu/).
//   #define DEFINE(schema) m.def(schema);
//   ADAPTFUSE_OP_SCHEMAS(DEFINE)
#pragma once

#define ADAPTFUSE_OP_SCHEMAS(DEFINE)                                                              \
  /* Tokens grouped by slot: token_order [T] int32, slot_offsets [S + 1] int32. */                \
  DEFINE("plan(Tensor token_slots, int num_slots) -> (Tensor token_order, Tensor slot_offsets)")  \
  /* v [T, R_max] fp32: v[t, :rank(s)] = scales[s] * x[t] @ A[s, :rank(s)]^T, zero elsewhere.     \
     batch_invariant: CUDA splits fixed by shapes alone, one kernel family for every token.       \
     Bottleneck adapters: v = scales[s] * act_s(x[t] @ A[s]^T + bias[s]), bias fp32 [S, R_max],   \
     activations int32 [S], codes of kernels/activation.cuh (None: identity). */                  \
  DEFINE(                                                                                         \
      "shrink(Tensor x, Tensor A, Tensor ranks, Tensor scales, Tensor token_slots, "              \
      "Tensor token_order, Tensor slot_offsets, bool batch_invariant=False, Tensor? bias=None, "  \
      "Tensor? activations=None) -> Tensor")                                                      \
  /* y[t, off_i : off_i + H_out_i] += v[t, col_i : col_i + rank(s)] @ B_i[s, :rank(s)]            \
     (+ bias[s], fp32 [S, H_out], with one slice, for tokens whose slot has a non-zero rank). */  \
  DEFINE(                                                                                         \
      "expand_(Tensor(a!) y, Tensor v, Tensor[] B, int[] out_offsets, Tensor ranks, "             \
      "Tensor token_slots, Tensor token_order, Tensor slot_offsets, "                             \
      "bool batch_invariant=False, Tensor? bias=None) -> ()")                                     \
  /* Functional expand (training): fp32 [T, h_out], zero plus expand_ of every slice. */          \
  DEFINE(                                                                                         \
      "expand(Tensor v, Tensor[] B, int[] out_offsets, int h_out, Tensor ranks, "                 \
      "Tensor token_slots, Tensor token_order, Tensor slot_offsets, "                             \
      "bool batch_invariant=False, Tensor? bias=None) -> Tensor")                                 \
  /* fp32 [S, R, H]: out[s, k] = sum over slot s's tokens t of a[t, k] * b[t] (k < rank(s)). */   \
  DEFINE(                                                                                         \
      "segment_outer(Tensor a, Tensor b, Tensor ranks, Tensor token_slots, Tensor token_order, "  \
      "Tensor slot_offsets) -> Tensor")                                                           \
  /* W += delta + sum_i coefficients[i] * B_i^T @ A_i (delta: an optional fp32 [H_out, H_in]      \
     full delta, for TIES/DARE); returns the exact-restore record. */                             \
  DEFINE(                                                                                         \
      "merge_(Tensor(a!) W, Tensor[] A, Tensor[] B, float[] coefficients, Tensor? delta=None) "   \
      "-> (Tensor tile_counts, Tensor offsets, Tensor corrections, Tensor escape_bits)")          \
  DEFINE(                                                                                         \
      "unmerge_(Tensor(a!) W, Tensor[] A, Tensor[] B, float[] coefficients, Tensor tile_counts, " \
      "Tensor offsets, Tensor corrections, Tensor escape_bits, Tensor? delta=None) -> ()")
