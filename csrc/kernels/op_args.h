// Argument structs of the ops: raw pointers, sizes and strides. Free of torch and of the
// CUDA runtime, so the CPU ops, the CUDA launchers and the emulator share them; the torch
// side fills them in one place (csrc/arguments.cpp) after checking every tensor.
#pragma once

#include <stdint.h>

#include "kernels/activation.cuh"
#include "kernels/float_formats.cuh"

namespace adaptfuse {

// plan: tokens grouped by slot (stable), slot s owning token_order[slot_offsets[s] :
// slot_offsets[s + 1]]; tokens without a slot (-1 or out of range) follow, in order.
struct PlanArgs {
  const int32_t* token_slots;  // [T]
  int64_t num_tokens;
  int64_t num_slots;
  int32_t* token_order;   // [T]
  int32_t* slot_offsets;  // [S + 1]
};
// shrink: v[t, k] = scales[s] * act_s(dot(x[t], A[s, k]) + bias[s, k]) for k < ranks[s], else 0
// (s = slot of t; no bias and the identity for LoRA, a bottleneck adapter's down-projection
// otherwise).
struct ShrinkArgs {
  const void* x;  // [T, H_in], inner stride 1
  int64_t x_row_stride;
  DType x_dtype;
  const void* a;  // [S, R_max, H_in], inner stride 1
  int64_t a_slot_stride, a_rank_stride;
  DType a_dtype;
  int64_t num_slots, max_rank, h_in, num_tokens;
  const int32_t* ranks;         // [S]
  const float* scales;          // [S]
  const int32_t* token_slots;   // [T]
  const int32_t* token_order;   // [T], the plan: tokens grouped by slot
  const int32_t* slot_offsets;  // [S + 1]
  float* v;                     // [T, R_max], inner stride 1, zero-filled by the caller
  int64_t v_row_stride;
  float* workspace;   // shrink_workspace_floats(args) floats, or null when that is 0
  const float* bias;  // [S, R_max] fp32, inner stride 1, or null
  int64_t bias_slot_stride;
  const int32_t* activations;  // [S] Activation codes, or null (the identity for every slot)
  // Every split fixed by the layer's shapes and one kernel family for every token: a token's
  // bits never depend on the rest of the batch (patch(..., batch_invariant=True)).
  bool batch_invariant;
};
// expand: y[t, off_i + o] += sum_k v[t, col_i + k] * B_i[s, k, o], k < ranks[s], per slice i,
// plus bias[s, o] (one slice only) for tokens whose slot has a non-zero rank.
constexpr int kMaxExpandSlices = 8;
struct ExpandSlice {
  const void* b;  // [S, R_max_i, H_out_i], inner stride 1
  int64_t slot_stride, rank_stride;
  int64_t max_rank, h_out, out_offset, v_column;
};
struct ExpandArgs {
  void* y;  // [T, *], inner stride 1
  int64_t y_row_stride;
  DType y_dtype;
  DType b_dtype;
  const float* v;  // [T, sum_i R_max_i]
  int64_t v_row_stride;
  const int32_t* ranks;         // [S]
  const int32_t* token_slots;   // [T]
  const int32_t* token_order;   // [T], the plan: tokens grouped by slot
  const int32_t* slot_offsets;  // [S + 1]
  int64_t num_slots, num_tokens;
  int num_slices;
  bool batch_invariant;  // as in ShrinkArgs
  const float* bias;     // [S, H_out] fp32, inner stride 1, or null (one slice only)
  int64_t bias_slot_stride;
  ExpandSlice slices[kMaxExpandSlices];
};
// segment_outer: out[s, k, :] = sum over the tokens t of slot s, in token order, of
// a[t, k] * b[t, :], for k < ranks[s]; zero elsewhere. The weight gradients of the adapters:
// dB = segment_outer(v, dy), dA = segment_outer(scale * dv, x).
struct SegmentOuterArgs {
  const float* a;  // [T, R], inner stride 1
  int64_t a_row_stride;
  const void* b;  // [T, H], inner stride 1
  int64_t b_row_stride;
  DType b_dtype;
  int64_t num_slots, max_rank, h, num_tokens;
  const int32_t* ranks;         // [S]
  const int32_t* token_order;   // [T]
  const int32_t* slot_offsets;  // [S + 1]
  float* out;                   // [S, R, H], contiguous, zero-filled by the caller
};
}  // namespace adaptfuse
