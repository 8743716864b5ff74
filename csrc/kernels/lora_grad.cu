// segment_outer: the adapters' weight gradients as segmented reductions over each slot's
// tokens (dB = segment_outer(v, dy), dA = segment_outer(scale * dv, x)). Each thread owns one
// output column of kGradRowsPerBlock rank rows and walks its slot's tokens in plan order: a
// fixed order, so the sums are deterministic, with no atomics at all.
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"

namespace adaptfuse {
namespace {

constexpr int kGradThreads = 128;
constexpr int kGradRowsPerBlock = 8;

// Grid (slot, group of rank rows, block of output columns).
template <class BFormat>
__global__ void segment_outer_kernel(SegmentOuterArgs args) {
  const int64_t slot = blockIdx.x;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kGradRowsPerBlock;
  const int64_t column = static_cast<int64_t>(blockIdx.z) * kGradThreads + threadIdx.x;
  int64_t rank = args.ranks[slot];
  rank = rank < args.max_rank ? rank : args.max_rank;
  if (first_row >= rank || column >= args.h) return;
  const int64_t rows = rank - first_row < kGradRowsPerBlock ? rank - first_row : kGradRowsPerBlock;
  const auto* b = static_cast<const typename BFormat::Bits*>(args.b);
  float sums[kGradRowsPerBlock] = {};
  for (int64_t i = args.slot_offsets[slot]; i < args.slot_offsets[slot + 1]; ++i) {
    const int64_t t = args.token_order[i];
    const float bt = BFormat::to_float(b[t * args.b_row_stride + column]);
    const float* a = args.a + t * args.a_row_stride + first_row;
    AF_UNROLL
    for (int r = 0; r < kGradRowsPerBlock; ++r) {
      if (r < rows) sums[r] += a[r] * bt;
    }
  }
  float* out = args.out + (slot * args.max_rank + first_row) * args.h + column;
  for (int r = 0; r < rows; ++r) out[r * args.h] = sums[r];
}

}  // namespace

cudaError_t launch_segment_outer(const SegmentOuterArgs& args, cudaStream_t stream) {
  if (args.num_slots == 0 || args.max_rank == 0 || args.h == 0 || args.num_tokens == 0) {
    return cudaSuccess;
  }
  const dim3 grid(
      static_cast<unsigned>(args.num_slots),
      static_cast<unsigned>((args.max_rank + kGradRowsPerBlock - 1) / kGradRowsPerBlock),
      static_cast<unsigned>((args.h + kGradThreads - 1) / kGradThreads));
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
    status = AF_LAUNCH("segment_outer_kernel", segment_outer_kernel<BFormat>, grid,
                       dim3(kGradThreads), 0, stream, args);
  });
  return status;
}

}  // namespace adaptfuse
