// merge_/unmerge_ on the GPU: one pass over W. One block per record tile; in each step the
// block's 256 threads take 256 consecutive elements (coalesced), compute their deltas with
// merge_delta (merge_math.cuh: the same fixed-order fp32 loop as the CPU op, so no tensor
// cores: their accumulation order is not ours to fix), write the merged bits, and decide the
// exact-restore entries by comparing bit patterns in the same step. A block-wide ballot scan
// numbers the entries in ascending offset order, exactly as the CPU op writes them, into a
// per-tile staging area; a small compaction kernel then moves them to their final places,
// reading only the record. A tile whose entries would outgrow its staging stops before the
// overflowing step (the glue undoes the partial merge exactly and redoes it with full-tile
// staging), so no entry is ever dropped.
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"
#include "kernels/merge_math.cuh"

namespace adaptfuse {
namespace {

constexpr int kMergeThreads = 256;
constexpr int kMergeWarps = kMergeThreads / 32;

template <class WFormat>
__device__ __forceinline__ typename WFormat::Bits* element(const MergeArgs& args, int64_t flat) {
  const int64_t o = flat / args.h_in;
  const int64_t i = flat - o * args.h_in;
  return static_cast<typename WFormat::Bits*>(args.w) + o * args.w_stride_out +
         i * args.w_stride_in;
}

template <class AdapterFormat>
__device__ __forceinline__ float delta_at(const MergeArgs& args, int64_t flat) {
  const int64_t o = flat / args.h_in;
  return merge_delta<AdapterFormat>(args, o, flat - o * args.h_in);
}

__device__ __forceinline__ int64_t tile_size(const MergeArgs& args, int64_t tile) {
  const int64_t rest = args.h_out * args.h_in - tile * kMergeTileElements;
  return rest < kMergeTileElements ? rest : kMergeTileElements;
}

// Block-wide exclusive scan of two flags, in thread order (deterministic): how many threads
// below this one raised each flag, and how many raised it in all. Every thread must call it.
struct FlagScan {
  int first_before, second_before, first_total, second_total;
};
__device__ FlagScan scan_flags(bool first, bool second, int* warp_first, int* warp_second) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const unsigned first_bits = warp_ballot(first);
  const unsigned second_bits = warp_ballot(second);
  if (lane == 0) {
    warp_first[warp] = popcount(first_bits);
    warp_second[warp] = popcount(second_bits);
  }
  __syncthreads();
  const unsigned lanes_below = (1u << lane) - 1u;
  FlagScan scan{popcount(first_bits & lanes_below), popcount(second_bits & lanes_below), 0, 0};
  for (int w = 0; w < kMergeWarps; ++w) {
    if (w < warp) {
      scan.first_before += warp_first[w];
      scan.second_before += warp_second[w];
    }
    scan.first_total += warp_first[w];
    scan.second_total += warp_second[w];
  }
  __syncthreads();  // the next call overwrites the per-warp counts
  return scan;
}

template <class WFormat, class AdapterFormat>
__global__ void merge_kernel(MergeArgs args, MergeStaging staging, int32_t* tile_stats) {
  AF_SHARED_ARRAY(int, warp_entries, kMergeWarps);
  AF_SHARED_ARRAY(int, warp_escapes, kMergeWarps);
  const int64_t tile = blockIdx.x;
  const int64_t tile_start = tile * kMergeTileElements;
  const int64_t size = tile_size(args, tile);
  int16_t* offsets = staging.offsets + tile * staging.entry_capacity;
  int8_t* corrections = staging.corrections + tile * staging.entry_capacity;
  int32_t* escape_bits = staging.escape_bits + tile * staging.escape_capacity;
  int entries = 0, escapes = 0, nonfinite = 0;  // entries/escapes: block totals so far
  int64_t merged_elements = 0;
  for (int64_t step = 0; step < size; step += kMergeThreads) {
    const int64_t local = step + threadIdx.x;
    const bool active = local < size;
    typename WFormat::Bits* w = nullptr;
    typename WFormat::Bits original{}, merged{};
    int64_t difference = 0;
    if (active) {
      const float delta = delta_at<AdapterFormat>(args, tile_start + local);
      w = element<WFormat>(args, tile_start + local);
      original = *w;
      merged = WFormat::sum_rounded_once(WFormat::to_float(original), delta);
      difference = bits_difference<WFormat>(
          original, WFormat::sum_rounded_once(WFormat::to_float(merged), -delta));
    }
    const bool entry = difference != 0;
    const bool escape = entry && !fits_correction(difference);
    const FlagScan scan = scan_flags(entry, escape, warp_entries, warp_escapes);
    // Block-uniform: every thread sees the same totals and stops together.
    if (entries + scan.first_total > staging.entry_capacity ||
        escapes + scan.second_total > staging.escape_capacity) {
      break;
    }
    if (active) {
      *w = merged;
      if (!is_finite(WFormat::to_float(merged)) && is_finite(WFormat::to_float(original))) {
        ++nonfinite;
      }
      if (entry) {
        const int n = entries + scan.first_before;
        offsets[n] = static_cast<int16_t>(static_cast<uint16_t>(local));
        if (escape) {
          corrections[n] = static_cast<int8_t>(kEscapeCorrection);
          escape_bits[escapes + scan.second_before] =
              static_cast<int32_t>(static_cast<uint32_t>(original));
        } else {
          corrections[n] = static_cast<int8_t>(difference);
        }
      }
    }
    entries += scan.first_total;
    escapes += scan.second_total;
    merged_elements = step + kMergeThreads < size ? step + kMergeThreads : size;
  }
  // Non-finite counts: per-thread, summed in a fixed order.
  const int warp_nonfinite = warp_sum(nonfinite);
  if ((threadIdx.x & 31) == 0) warp_entries[threadIdx.x >> 5] = warp_nonfinite;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total_nonfinite = 0;
    for (int w = 0; w < kMergeWarps; ++w) total_nonfinite += warp_entries[w];
    int32_t* stats = tile_stats + tile * kMergeStatsColumns;
    stats[0] = entries;
    stats[1] = escapes;
    stats[2] = total_nonfinite;
    stats[3] = static_cast<int32_t>(merged_elements);
  }
}

__global__ void merge_compact_kernel(MergeStaging staging, const int32_t* tile_stats,
                                     const int64_t* entry_starts, const int64_t* escape_starts,
                                     int16_t* offsets, int8_t* corrections, int32_t* escape_bits) {
  const int64_t tile = blockIdx.x;
  const int entries = tile_stats[tile * kMergeStatsColumns];
  const int escapes = tile_stats[tile * kMergeStatsColumns + 1];
  const int64_t staged_entry = tile * staging.entry_capacity;
  const int64_t staged_escape = tile * staging.escape_capacity;
  for (int n = threadIdx.x; n < entries; n += kMergeThreads) {
    offsets[entry_starts[tile] + n] = staging.offsets[staged_entry + n];
    corrections[entry_starts[tile] + n] = staging.corrections[staged_entry + n];
  }
  for (int n = threadIdx.x; n < escapes; n += kMergeThreads) {
    escape_bits[escape_starts[tile] + n] = staging.escape_bits[staged_escape + n];
  }
}

template <class WFormat, class AdapterFormat>
__global__ void unmerge_kernel(MergeArgs args, const int32_t* tile_counts, int count_columns,
                               const int64_t* entry_starts, const int64_t* escape_starts,
                               const int16_t* offsets, const int8_t* corrections,
                               const int32_t* escape_bits, const int32_t* merged_elements,
                               int merged_stride) {
  AF_SHARED_ARRAY(int, warp_escapes, kMergeWarps);
  AF_SHARED_ARRAY(int, warp_unused, kMergeWarps);
  const int64_t tile = blockIdx.x;
  const int64_t tile_start = tile * kMergeTileElements;
  const int64_t size =
      merged_elements == nullptr ? tile_size(args, tile) : merged_elements[tile * merged_stride];
  for (int64_t local = threadIdx.x; local < size; local += kMergeThreads) {
    auto* w = element<WFormat>(args, tile_start + local);
    *w = WFormat::sum_rounded_once(WFormat::to_float(*w),
                                   -delta_at<AdapterFormat>(args, tile_start + local));
  }
  __syncthreads();  // entries overwrite elements other threads just computed
  const int entries = tile_counts[tile * count_columns];
  const int64_t first_entry = entry_starts[tile];
  int escapes_so_far = 0;
  for (int step = 0; step < entries; step += kMergeThreads) {
    const int n = step + static_cast<int>(threadIdx.x);
    const bool active = n < entries;
    const int correction = active ? corrections[first_entry + n] : 0;
    const bool escape = active && correction == kEscapeCorrection;
    const FlagScan scan = scan_flags(escape, false, warp_escapes, warp_unused);
    if (active) {
      auto* w =
          element<WFormat>(args, tile_start + static_cast<uint16_t>(offsets[first_entry + n]));
      if (escape) {
        *w = static_cast<typename WFormat::Bits>(static_cast<uint32_t>(
            escape_bits[escape_starts[tile] + escapes_so_far + scan.first_before]));
      } else {
        *w = static_cast<typename WFormat::Bits>(*w + correction);
      }
    }
    escapes_so_far += scan.first_total;
  }
}

unsigned num_tiles(const MergeArgs& args) {
  return static_cast<unsigned>((args.h_out * args.h_in + kMergeTileElements - 1) /
                               kMergeTileElements);
}

}  // namespace

cudaError_t launch_merge(const MergeArgs& args, const MergeStaging& staging, int32_t* tile_stats,
                         cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     status = AF_LAUNCH("merge_kernel", merge_kernel<WFormat, AdapterFormat>,
                                        dim3(num_tiles(args)), dim3(kMergeThreads), 0, stream, args,
                                        staging, tile_stats);
                   }));
  return status;
}

cudaError_t launch_merge_compact(const MergeArgs& args, const MergeStaging& staging,
                                 const int32_t* tile_stats, const int64_t* entry_starts,
                                 const int64_t* escape_starts, int16_t* offsets,
                                 int8_t* corrections, int32_t* escape_bits, cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  return AF_LAUNCH("merge_compact_kernel", merge_compact_kernel, dim3(num_tiles(args)),
                   dim3(kMergeThreads), 0, stream, staging, tile_stats, entry_starts, escape_starts,
                   offsets, corrections, escape_bits);
}

cudaError_t launch_unmerge(const MergeArgs& args, const int32_t* tile_counts, int count_columns,
                           const int64_t* entry_starts, const int64_t* escape_starts,
                           const int16_t* offsets, const int8_t* corrections,
                           const int32_t* escape_bits, const int32_t* merged_elements,
                           int merged_stride, cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     status =
                         AF_LAUNCH("unmerge_kernel", unmerge_kernel<WFormat, AdapterFormat>,
                                   dim3(num_tiles(args)), dim3(kMergeThreads), 0, stream, args,
                                   tile_counts, count_columns, entry_starts, escape_starts, offsets,
                                   corrections, escape_bits, merged_elements, merged_stride);
                   }));
  return status;
}

}  // namespace adaptfuse
