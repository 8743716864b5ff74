// The torch side of the kernels in csrc/kernels/, written once for every backend that runs
// them: the CUDA build (csrc/cuda/ops_cuda.cpp) and the CPU emulator (csrc/emu/emu_ops.cpp).
// A Backend supplies a device guard type and the stream to launch on. Checks come from
// arguments.cpp; outputs are allocated on the inputs' device; launch failures raise.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "arguments.h"
#include "kernels/launchers.h"

namespace adaptfuse {

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "adaptfuse.", op,
              ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> plan_op(const at::Tensor& token_slots, int64_t num_slots) {
  PlanArgs args = plan_arguments(token_slots, num_slots);
  const typename Backend::Guard guard(token_slots);
  at::Tensor token_order = at::empty({args.num_tokens}, token_slots.options());
  at::Tensor slot_offsets = at::empty({num_slots + 1}, token_slots.options());
  args.token_order = token_order.data_ptr<int32_t>();
  args.slot_offsets = slot_offsets.data_ptr<int32_t>();
  check_launch(launch_plan(args, Backend::stream(token_slots)), "plan");
  return {token_order, slot_offsets};
}

template <class Backend>
at::Tensor shrink_op(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ranks,
                     const at::Tensor& scales, const at::Tensor& token_slots,
                     const at::Tensor& token_order, const at::Tensor& slot_offsets,
                     bool batch_invariant, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& activations) {
  ShrinkArgs args = shrink_arguments(x, a, ranks, scales, token_slots, token_order, slot_offsets,
                                     bias, activations);
  args.batch_invariant = batch_invariant;
  const typename Backend::Guard guard(x);
  // Zero-filled: the kernel writes every row of a token, but T may be 0 or R_max 0.
  at::Tensor v = at::zeros({args.num_tokens, args.max_rank}, x.options().dtype(at::kFloat));
  args.v = v.data_ptr<float>();
  args.v_row_stride = v.stride(0);
  // From the caching allocator: graph-safe (a captured graph keeps its own pool).
  const int64_t workspace_floats = shrink_workspace_floats(args);
  at::Tensor workspace;
  if (workspace_floats > 0) {
    workspace = at::empty({workspace_floats}, x.options().dtype(at::kFloat));
    args.workspace = workspace.data_ptr<float>();
  }
  check_launch(launch_shrink(args, Backend::stream(x)), "shrink");
  return v;
}

template <class Backend>
void expand_op(const at::Tensor& y, const at::Tensor& v, at::TensorList b,
               c10::IntArrayRef out_offsets, const at::Tensor& ranks, const at::Tensor& token_slots,
               const at::Tensor& token_order, const at::Tensor& slot_offsets, bool batch_invariant,
               const std::optional<at::Tensor>& bias) {
  ExpandArgs args =
      expand_arguments(y, v, b, out_offsets, ranks, token_slots, token_order, slot_offsets, bias);
  args.batch_invariant = batch_invariant;
  const typename Backend::Guard guard(y);
  check_launch(launch_expand(args, Backend::stream(y)), "expand_");
}

template <class Backend>
at::Tensor segment_outer_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ranks,
                            const at::Tensor& token_slots, const at::Tensor& token_order,
                            const at::Tensor& slot_offsets) {
  SegmentOuterArgs args =
      segment_outer_arguments(a, b, ranks, token_slots, token_order, slot_offsets);
  const typename Backend::Guard guard(a);
  at::Tensor out = at::zeros({args.num_slots, args.max_rank, args.h}, a.options());
  args.out = out.data_ptr<float>();
  check_launch(launch_segment_outer(args, Backend::stream(a)), "segment_outer");
  return out;
}

// Per-tile starts (exclusive prefix sums) of entries and escapes, on W's device.
inline std::pair<at::Tensor, at::Tensor> tile_starts(const at::Tensor& host_counts, int64_t columns,
                                                     const at::Tensor& device_like) {
  const int64_t num_tiles = host_counts.size(0);
  at::Tensor starts = at::empty({2, num_tiles}, host_counts.options().dtype(at::kLong));
  const int32_t* counts = host_counts.data_ptr<int32_t>();
  int64_t* entry = starts.data_ptr<int64_t>();
  int64_t* escape = entry + num_tiles;
  int64_t entries = 0, escapes = 0;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    entry[tile] = entries;
    escape[tile] = escapes;
    entries += counts[columns * tile];
    escapes += counts[columns * tile + 1];
  }
  at::Tensor on_device = starts.to(device_like.device());
  return {on_device[0], on_device[1]};
}

// Staging for launch_merge: a quarter of each tile for entries and a sixteenth for escapes
// (the measured records hold 1-17% entries, nearly all 1-ulp corrections), or whole tiles
// when a merge that outgrew that is redone.
struct StagingTensors {
  at::Tensor offsets, corrections, escape_bits;
  MergeStaging view;
  StagingTensors(int64_t num_tiles, int64_t entry_capacity, int64_t escape_capacity,
                 const at::TensorOptions& options)
      : offsets(at::empty({num_tiles * entry_capacity}, options.dtype(at::kShort))),
        corrections(at::empty({num_tiles * entry_capacity}, options.dtype(at::kChar))),
        escape_bits(at::empty({num_tiles * escape_capacity}, options.dtype(at::kInt))),
        view{offsets.data_ptr<int16_t>(), corrections.data_ptr<int8_t>(),
             escape_bits.data_ptr<int32_t>(), static_cast<int32_t>(entry_capacity),
             static_cast<int32_t>(escape_capacity)} {}
};

// merge_: one pass over W (launch_merge), one host sync for the record's size, a compaction
// of the staged entries. Merge is not meant for graph capture.
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_op(
    const at::Tensor& w, at::TensorList a, at::TensorList b, c10::ArrayRef<double> coefficients,
    const std::optional<at::Tensor>& delta) {
  const MergeArgs args = merge_arguments("merge_", w, a, b, coefficients, delta);
  const typename Backend::Guard guard(w);
  const cudaStream_t stream = Backend::stream(w);
  const int64_t num_tiles = merge_num_tiles(args);
  const auto options = w.options();
  for (const bool whole_tiles : {false, true}) {
    const StagingTensors staging(
        num_tiles, whole_tiles ? kMergeTileElements : kMergeTileElements / 4,
        whole_tiles ? kMergeTileElements : kMergeTileElements / 16, options);
    at::Tensor tile_stats = at::empty({num_tiles, kMergeStatsColumns}, options.dtype(at::kInt));
    check_launch(launch_merge(args, staging.view, tile_stats.data_ptr<int32_t>(), stream),
                 "merge_");
    const at::Tensor host_stats = tile_stats.cpu();
    const int32_t* stats = host_stats.data_ptr<int32_t>();
    int64_t entries = 0, escapes = 0, nonfinite = 0;
    bool stopped = false;
    for (int64_t tile = 0; tile < num_tiles; ++tile) {
      const int32_t* row = stats + kMergeStatsColumns * tile;
      entries += row[0];
      escapes += row[1];
      nonfinite += row[2];
      stopped |=
          row[3] < std::min<int64_t>(kMergeTileElements, w.numel() - tile * kMergeTileElements);
    }
    const auto [entry_starts, escape_starts] = tile_starts(host_stats, kMergeStatsColumns, w);
    at::Tensor offsets = at::empty({entries}, options.dtype(at::kShort));
    at::Tensor corrections = at::empty({entries}, options.dtype(at::kChar));
    at::Tensor escape_bits = at::empty({escapes}, options.dtype(at::kInt));
    check_launch(
        launch_merge_compact(args, staging.view, tile_stats.data_ptr<int32_t>(),
                             entry_starts.data_ptr<int64_t>(), escape_starts.data_ptr<int64_t>(),
                             offsets.data_ptr<int16_t>(), corrections.data_ptr<int8_t>(),
                             escape_bits.data_ptr<int32_t>(), stream),
        "merge_");
    if (nonfinite == 0 && !stopped) {
      at::Tensor tile_counts = host_stats.narrow(1, 0, 2).contiguous().to(w.device());
      return {tile_counts, offsets, corrections, escape_bits};
    }
    // Undo what was merged, exactly, through the record it left.
    check_launch(launch_unmerge(args, tile_stats.data_ptr<int32_t>(), kMergeStatsColumns,
                                entry_starts.data_ptr<int64_t>(), escape_starts.data_ptr<int64_t>(),
                                offsets.data_ptr<int16_t>(), corrections.data_ptr<int8_t>(),
                                escape_bits.data_ptr<int32_t>(), tile_stats.data_ptr<int32_t>() + 3,
                                kMergeStatsColumns, stream),
                 "merge_");
    TORCH_CHECK_VALUE(nonfinite == 0, "adaptfuse.merge_: the merge would make ", nonfinite,
                      " element(s) of W non-finite; W was restored bit for bit and nothing "
                      "merged");
  }
  TORCH_CHECK(false, "adaptfuse.merge_: whole-tile staging cannot overflow");
}

template <class Backend>
void unmerge_op(const at::Tensor& w, at::TensorList a, at::TensorList b,
                c10::ArrayRef<double> coefficients, const at::Tensor& tile_counts,
                const at::Tensor& offsets, const at::Tensor& corrections,
                const at::Tensor& escape_bits, const std::optional<at::Tensor>& delta) {
  const MergeArgs args = merge_arguments("unmerge_", w, a, b, coefficients, delta);
  check_merge_record(w, tile_counts, offsets, corrections, escape_bits);
  const typename Backend::Guard guard(w);
  const auto [entry_starts, escape_starts] = tile_starts(tile_counts.cpu(), 2, w);
  check_launch(launch_unmerge(args, tile_counts.data_ptr<int32_t>(), 2,
                              entry_starts.data_ptr<int64_t>(), escape_starts.data_ptr<int64_t>(),
                              offsets.data_ptr<int16_t>(), corrections.data_ptr<int8_t>(),
                              escape_bits.data_ptr<int32_t>(), nullptr, 0, Backend::stream(w)),
               "unmerge_");
}

}  // namespace adaptfuse
