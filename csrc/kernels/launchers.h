// Host launchers of the CUDA kernels: raw pointers, sizes, strides and a stream in, a
// cudaError_t out. No torch headers: csrc/cuda/ holds the torch-side glue.
#pragma once

#if defined(ADAPTFUSE_EMU)
#include "emu/emu.h"
#else
#include <cuda_runtime_api.h>
#endif
#include <stdint.h>

#include "kernels/float_formats.cuh"
#include "kernels/merge_math.cuh"
#include "kernels/op_args.h"

namespace adaptfuse {

cudaError_t launch_plan(const PlanArgs& args, cudaStream_t stream);

// shrink and expand through the dispatcher (lora_dispatch.cu), which picks the kernels.
// The caller allocates shrink's fp32 workspace of shrink_workspace_floats(args) elements.
cudaError_t launch_shrink(const ShrinkArgs& args, cudaStream_t stream);
int64_t shrink_workspace_floats(const ShrinkArgs& args);
cudaError_t launch_expand(const ExpandArgs& args, cudaStream_t stream);

// Which kernels the dispatcher uses: kAuto in production; the others for benchmarks and
// tests that measure or check one family on its own.
enum class KernelFamily : int { kAuto = 0, kSimple = 1, kBgmv = 2, kSgmv = 3 };
void set_kernel_family(KernelFamily family);
KernelFamily kernel_family();
const char* kernel_family_name(KernelFamily family);  // "auto", "simple", "bgmv", "sgmv"
bool set_kernel_family_by_name(const char* name);     // false for an unknown name
// The family kAuto picks for a launch (from shapes alone; see lora_dispatch.cu).
KernelFamily auto_kernel_family(int64_t num_tokens, int64_t num_slots, bool batch_invariant);

// The families themselves.
cudaError_t launch_shrink_simple(const ShrinkArgs& args, cudaStream_t stream);
cudaError_t launch_expand_simple(const ExpandArgs& args, cudaStream_t stream);
cudaError_t launch_shrink_bgmv(const ShrinkArgs& args, cudaStream_t stream);
int64_t bgmv_shrink_workspace_floats(const ShrinkArgs& args);
cudaError_t launch_expand_bgmv(const ExpandArgs& args, cudaStream_t stream);
cudaError_t launch_shrink_sgmv(const ShrinkArgs& args, cudaStream_t stream);
int64_t sgmv_shrink_workspace_floats(const ShrinkArgs& args);
cudaError_t launch_expand_sgmv(const ExpandArgs& args, cudaStream_t stream);
// The ordered combine of H_in splits shared by BGMV and SGMV: v[t, k] = scale * (the sum of
// workspace[split, t, k] over the splits, in split order), zero beyond the rank.
cudaError_t launch_shrink_combine(const ShrinkArgs& args, int64_t splits, cudaStream_t stream);

// Weight gradients: out (zero-filled by the caller) gets each slot's sum of outer products.
cudaError_t launch_segment_outer(const SegmentOuterArgs& args, cudaStream_t stream);

// Where merge_ writes record entries before their final places are known: per tile, room for
// entry_capacity entries and escape_capacity escapes (at tile * capacity).
struct MergeStaging {
  int16_t* offsets;
  int8_t* corrections;
  int32_t* escape_bits;
  int32_t entry_capacity, escape_capacity;
};
constexpr int kMergeStatsColumns = 4;  // entries, escapes, turned non-finite, elements merged
// One pass over W: merges every tile and stages its record entries. A tile whose entries would
// outgrow the staging stops before the step that would overflow; the rest of it is untouched
// and its "elements merged" column says where it stopped. tile_stats: int32 [num_tiles, 4].
cudaError_t launch_merge(const MergeArgs& args, const MergeStaging& staging, int32_t* tile_stats,
                         cudaStream_t stream);
// Copies the staged entries into the exact-size record; entry_starts/escape_starts: int64
// [num_tiles], each tile's first entry and escape in the record.
cudaError_t launch_merge_compact(const MergeArgs& args, const MergeStaging& staging,
                                 const int32_t* tile_stats, const int64_t* entry_starts,
                                 const int64_t* escape_starts, int16_t* offsets,
                                 int8_t* corrections, int32_t* escape_bits, cudaStream_t stream);
// Subtracts the same delta and restores the recorded elements. tile_counts: int32 [num_tiles,
// count_columns] (entries, escapes first). merged_elements: int32 [num_tiles] with column
// stride merged_stride, how far a stopped merge got in each tile; null for whole tiles.
cudaError_t launch_unmerge(const MergeArgs& args, const int32_t* tile_counts, int count_columns,
                           const int64_t* entry_starts, const int64_t* escape_starts,
                           const int16_t* offsets, const int8_t* corrections,
                           const int32_t* escape_bits, const int32_t* merged_elements,
                           int merged_stride, cudaStream_t stream);

}  // namespace adaptfuse
