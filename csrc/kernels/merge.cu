// merge_/unmerge_: the foundation's simple kernels. One block per record tile; each thread
// owns a contiguous run of the tile, so entries come out in ascending offset order, exactly
// as the CPU op writes them. The delta comes from merge_delta (merge_math.cuh), the same
// fixed-order fp32 loop as on the CPU. The fast single-pass kernels are later work.
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"
#include "kernels/merge_math.cuh"

namespace adaptfuse {
namespace {

constexpr int kMergeThreads = 256;
constexpr int64_t kElementsPerThread = kMergeTileElements / kMergeThreads;

struct ThreadRun {
  int64_t begin, end;  // flat element indices
};

__device__ __forceinline__ ThreadRun thread_run(const MergeArgs& args) {
  const int64_t numel = args.h_out * args.h_in;
  int64_t begin = static_cast<int64_t>(blockIdx.x) * kMergeTileElements +
                  static_cast<int64_t>(threadIdx.x) * kElementsPerThread;
  int64_t end = begin + kElementsPerThread;
  begin = begin < numel ? begin : numel;
  end = end < numel ? end : numel;
  return {begin, end};
}

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

// Exclusive scan of one int per thread, in thread order (deterministic).
__device__ int block_exclusive_scan(int value, int* scratch, int* total) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    int running = 0;
    for (int i = 0; i < kMergeThreads; ++i) {
      const int here = scratch[i];
      scratch[i] = running;
      running += here;
    }
    *total = running;
  }
  __syncthreads();
  const int result = scratch[threadIdx.x];
  __syncthreads();
  return result;
}

struct ElementCounts {
  int entries = 0, escapes = 0, nonfinite = 0;
};

template <class WFormat, class AdapterFormat>
__device__ ElementCounts count_run(const MergeArgs& args, ThreadRun run) {
  ElementCounts counts;
  for (int64_t flat = run.begin; flat < run.end; ++flat) {
    const float delta = delta_at<AdapterFormat>(args, flat);
    const auto original = *element<WFormat>(args, flat);
    const auto merged = WFormat::sum_rounded_once(WFormat::to_float(original), delta);
    const auto restored = WFormat::sum_rounded_once(WFormat::to_float(merged), -delta);
    if (restored != original) {
      ++counts.entries;
      if (!fits_correction(bits_difference<WFormat>(original, restored))) ++counts.escapes;
    }
    if (!is_finite(WFormat::to_float(merged)) && is_finite(WFormat::to_float(original))) {
      ++counts.nonfinite;
    }
  }
  return counts;
}

template <class WFormat, class AdapterFormat>
__global__ void merge_count_kernel(MergeArgs args, int32_t* tile_stats) {
  AF_SHARED_ARRAY(int, scratch, kMergeThreads);
  AF_SHARED(int, total);
  const ElementCounts counts = count_run<WFormat, AdapterFormat>(args, thread_run(args));
  block_exclusive_scan(counts.entries, scratch, &total);
  if (threadIdx.x == 0) tile_stats[blockIdx.x * 3 + 0] = total;
  block_exclusive_scan(counts.escapes, scratch, &total);
  if (threadIdx.x == 0) tile_stats[blockIdx.x * 3 + 1] = total;
  block_exclusive_scan(counts.nonfinite, scratch, &total);
  if (threadIdx.x == 0) tile_stats[blockIdx.x * 3 + 2] = total;
}

template <class WFormat, class AdapterFormat>
__global__ void merge_apply_kernel(MergeArgs args, const int64_t* entry_starts,
                                   const int64_t* escape_starts, int16_t* offsets,
                                   int8_t* corrections, int32_t* escape_bits) {
  AF_SHARED_ARRAY(int, scratch, kMergeThreads);
  AF_SHARED(int, total);
  const ThreadRun run = thread_run(args);
  const ElementCounts counts = count_run<WFormat, AdapterFormat>(args, run);
  int64_t entry = entry_starts[blockIdx.x] + block_exclusive_scan(counts.entries, scratch, &total);
  int64_t escape =
      escape_starts[blockIdx.x] + block_exclusive_scan(counts.escapes, scratch, &total);
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kMergeTileElements;
  for (int64_t flat = run.begin; flat < run.end; ++flat) {
    const float delta = delta_at<AdapterFormat>(args, flat);
    auto* w = element<WFormat>(args, flat);
    const auto original = *w;
    const auto merged = WFormat::sum_rounded_once(WFormat::to_float(original), delta);
    const auto restored = WFormat::sum_rounded_once(WFormat::to_float(merged), -delta);
    *w = merged;
    if (restored == original) continue;
    const int64_t difference = bits_difference<WFormat>(original, restored);
    offsets[entry] = static_cast<int16_t>(static_cast<uint16_t>(flat - tile_start));
    if (fits_correction(difference)) {
      corrections[entry] = static_cast<int8_t>(difference);
    } else {
      corrections[entry] = static_cast<int8_t>(kEscapeCorrection);
      escape_bits[escape++] = static_cast<int32_t>(static_cast<uint32_t>(original));
    }
    ++entry;
  }
}

template <class WFormat, class AdapterFormat>
__global__ void unmerge_kernel(MergeArgs args, const int32_t* tile_counts,
                               const int64_t* entry_starts, const int64_t* escape_starts,
                               const int16_t* offsets, const int8_t* corrections,
                               const int32_t* escape_bits) {
  const ThreadRun run = thread_run(args);
  for (int64_t flat = run.begin; flat < run.end; ++flat) {
    auto* w = element<WFormat>(args, flat);
    *w = WFormat::sum_rounded_once(WFormat::to_float(*w), -delta_at<AdapterFormat>(args, flat));
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // Restoring is sequential per tile here: entries are few and this is the baseline kernel.
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kMergeTileElements;
  const int64_t entries = tile_counts[blockIdx.x * 2];
  int64_t escape = escape_starts[blockIdx.x];
  for (int64_t n = entry_starts[blockIdx.x], last = n + entries; n < last; ++n) {
    auto* w = element<WFormat>(args, tile_start + static_cast<uint16_t>(offsets[n]));
    const int correction = corrections[n];
    if (correction == kEscapeCorrection) {
      *w = static_cast<typename WFormat::Bits>(static_cast<uint32_t>(escape_bits[escape++]));
    } else {
      *w = static_cast<typename WFormat::Bits>(*w + correction);
    }
  }
}

unsigned num_tiles(const MergeArgs& args) {
  return static_cast<unsigned>((args.h_out * args.h_in + kMergeTileElements - 1) /
                               kMergeTileElements);
}

}  // namespace

cudaError_t launch_merge_count(const MergeArgs& args, int32_t* tile_stats, cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     status = AF_LAUNCH(
                         "merge_count_kernel", merge_count_kernel<WFormat, AdapterFormat>,
                         dim3(num_tiles(args)), dim3(kMergeThreads), 0, stream, args, tile_stats);
                   }));
  return status;
}

cudaError_t launch_merge_apply(const MergeArgs& args, const int64_t* entry_starts,
                               const int64_t* escape_starts, int16_t* offsets, int8_t* corrections,
                               int32_t* escape_bits, cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     status =
                         AF_LAUNCH("merge_apply_kernel", merge_apply_kernel<WFormat, AdapterFormat>,
                                   dim3(num_tiles(args)), dim3(kMergeThreads), 0, stream, args,
                                   entry_starts, escape_starts, offsets, corrections, escape_bits);
                   }));
  return status;
}

cudaError_t launch_unmerge(const MergeArgs& args, const int32_t* tile_counts,
                           const int64_t* entry_starts, const int64_t* escape_starts,
                           const int16_t* offsets, const int8_t* corrections,
                           const int32_t* escape_bits, cudaStream_t stream) {
  if (num_tiles(args) == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     status = AF_LAUNCH("unmerge_kernel", unmerge_kernel<WFormat, AdapterFormat>,
                                        dim3(num_tiles(args)), dim3(kMergeThreads), 0, stream, args,
                                        tile_counts, entry_starts, escape_starts, offsets,
                                        corrections, escape_bits);
                   }));
  return status;
}

}  // namespace adaptfuse
