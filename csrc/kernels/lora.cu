// shrink and expand: the foundation's simple kernels (one block per token), correct for any
// shape, rank and dtype; the baseline the BGMV/SGMV kernels are measured against.
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"

namespace adaptfuse {
namespace {

constexpr int kShrinkThreads = 128;
constexpr int kExpandThreads = 256;

__device__ __forceinline__ bool valid_slot(int32_t slot, int64_t num_slots) {
  return slot >= 0 && slot < num_slots;
}

// One block per token; each warp takes rank rows k, k + warps, ... and reduces a dot product.
template <class XFormat, class AFormat>
__global__ void shrink_kernel(ShrinkArgs args) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  const int32_t slot = args.token_slots[t];
  const bool has_slot = valid_slot(slot, args.num_slots);
  int64_t rank = has_slot ? args.ranks[slot] : 0;
  rank = rank < args.max_rank ? rank : args.max_rank;
  const float scale = has_slot ? args.scales[slot] : 0.0f;
  const auto* x = static_cast<const typename XFormat::Bits*>(args.x) + t * args.x_row_stride;
  float* v = args.v + t * args.v_row_stride;
  for (int64_t k = warp; k < args.max_rank; k += warps) {
    if (k >= rank) {
      if (lane == 0) v[k] = 0.0f;
      continue;
    }
    const auto* a = static_cast<const typename AFormat::Bits*>(args.a) + slot * args.a_slot_stride +
                    k * args.a_rank_stride;
    float partial = 0.0f;
    for (int64_t i = lane; i < args.h_in; i += 32) {
      partial += XFormat::to_float(x[i]) * AFormat::to_float(a[i]);
    }
    partial = warp_sum(partial);
    if (lane == 0) v[k] = scale * partial;
  }
}

// Grid (token, output chunk, slice): each thread owns one output element.
template <class YFormat, class BFormat>
__global__ void expand_kernel(ExpandArgs args) {
  const int64_t t = blockIdx.x;
  const ExpandSlice& slice = args.slices[blockIdx.z];
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= slice.h_out) return;
  const int32_t slot = args.token_slots[t];
  if (!valid_slot(slot, args.num_slots)) return;
  int64_t rank = args.ranks[slot];
  rank = rank < slice.max_rank ? rank : slice.max_rank;
  const float* v = args.v + t * args.v_row_stride + slice.v_column;
  const auto* b =
      static_cast<const typename BFormat::Bits*>(slice.b) + slot * slice.slot_stride + o;
  float sum = 0.0f;
  for (int64_t k = 0; k < rank; ++k) sum += v[k] * BFormat::to_float(b[k * slice.rank_stride]);
  auto* y =
      static_cast<typename YFormat::Bits*>(args.y) + t * args.y_row_stride + slice.out_offset + o;
  *y = YFormat::sum_rounded_once(YFormat::to_float(*y), sum);
}

}  // namespace

cudaError_t launch_shrink_simple(const ShrinkArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.max_rank == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.x_dtype, XFormat, AF_FORMAT_SWITCH(args.a_dtype, AFormat, {
                     status = AF_LAUNCH("shrink_kernel", shrink_kernel<XFormat, AFormat>,
                                        dim3(static_cast<unsigned>(args.num_tokens)),
                                        dim3(kShrinkThreads), 0, stream, args);
                   }));
  return status;
}

cudaError_t launch_expand_simple(const ExpandArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slices == 0) return cudaSuccess;
  int64_t widest = 0;
  for (int i = 0; i < args.num_slices; ++i) {
    widest = args.slices[i].h_out > widest ? args.slices[i].h_out : widest;
  }
  if (widest == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(args.num_tokens),
                  static_cast<unsigned>((widest + kExpandThreads - 1) / kExpandThreads),
                  static_cast<unsigned>(args.num_slices));
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(args.y_dtype, YFormat, AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
                     status = AF_LAUNCH("expand_kernel", expand_kernel<YFormat, BFormat>, grid,
                                        dim3(kExpandThreads), 0, stream, args);
                   }));
  return status;
}

}  // namespace adaptfuse
