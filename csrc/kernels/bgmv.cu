// BGMV: the decode-path shrink and expand. One token per request and often one adapter per
// token, so each token's work is a matrix-vector product against its own adapter: pure memory
// traffic. The kernels read every byte of the used rank rows once, with 16-byte loads where
// the rows are aligned (scalar loads otherwise, and for the tails), and split the work so that
// one token alone already spreads over many blocks.
//
// Determinism and batch invariance: every sum has one fixed order that depends on the
// layer's shapes only (H_in splits of kBgmvChunk elements, lanes, a fixed butterfly, the
// splits added in index order by a second kernel); no float atomics. A token's bits never
// depend on which other tokens share the launch.
//
// Bottleneck adapters run here too: shrink adds the slot's bias and applies the activation
// where it scales the finished dot product, expand starts its sums from the slot's bias.
#include "kernels/activation.cuh"
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"
#include "kernels/vector_access.cuh"

namespace adaptfuse {
namespace {

constexpr int kBgmvShrinkWarps = 4;
constexpr int kBgmvRowsPerWarp = 2;  // rank rows that share one read of x
constexpr int kBgmvRowsPerBlock = kBgmvShrinkWarps * kBgmvRowsPerWarp;
// H_in elements per split: a fixed length, so the split count depends on H_in alone.
constexpr int64_t kBgmvChunk = 1024;
constexpr int kBgmvExpandThreads = 128;
constexpr int kBgmvExpandPartials = 4;
constexpr int64_t kBgmvExpandBlockOutputs = kBgmvExpandThreads * kGroupElements;
constexpr int kBgmvStagedRanks = 512;  // v entries staged in shared memory at a time

__device__ __forceinline__ int64_t token_rank(const int32_t* token_slots, const int32_t* ranks,
                                              int64_t num_slots, int64_t max_rank, int64_t t,
                                              int32_t* slot_out) {
  const int32_t slot = token_slots[t];
  *slot_out = slot;
  if (slot < 0 || slot >= num_slots) return 0;
  const int64_t rank = ranks[slot];
  return rank < max_rank ? rank : max_rank;
}

// v[t, k] from the finished dot product of x[t] and A[slot, k]: scale * act(dot + bias[slot, k])
// (a bottleneck's down-projection; plain scale * dot for LoRA).
__device__ __forceinline__ float finish_shrink(const ShrinkArgs& args, int32_t slot, int64_t k,
                                               float dot) {
  if (args.bias != nullptr) dot += args.bias[slot * args.bias_slot_stride + k];
  if (args.activations != nullptr) {
    dot = apply_activation(static_cast<Activation>(args.activations[slot]), dot);
  }
  return args.scales[slot] * dot;
}

int64_t bgmv_shrink_splits(int64_t h_in) {
  return h_in <= kBgmvChunk ? 1 : (h_in + kBgmvChunk - 1) / kBgmvChunk;
}

// Grid (token, H_in split, group of kBgmvRowsPerBlock rank rows). Each warp owns
// kBgmvRowsPerWarp rank rows of one split; lanes stride over 8-element groups of the split.
// With one split the scaled result goes straight to v; otherwise the raw partial goes to
// workspace[split, t, k] and bgmv_shrink_combine adds the splits in order.
template <class XFormat, class AFormat, bool kAligned>
__global__ void bgmv_shrink_kernel(ShrinkArgs args, int64_t splits) {
  const int64_t t = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int32_t slot;
  const int64_t rank =
      token_rank(args.token_slots, args.ranks, args.num_slots, args.max_rank, t, &slot);
  const int64_t first_row = static_cast<int64_t>(blockIdx.z) * kBgmvRowsPerBlock +
                            static_cast<int64_t>(warp) * kBgmvRowsPerWarp;
  if (first_row >= rank) return;  // no barrier below: whole warps may leave
  const int64_t begin = split * kBgmvChunk;
  const int64_t end = begin + kBgmvChunk < args.h_in ? begin + kBgmvChunk : args.h_in;

  using XBits = typename XFormat::Bits;
  using ABits = typename AFormat::Bits;
  const XBits* x = static_cast<const XBits*>(args.x) + t * args.x_row_stride;
  const ABits* a_rows[kBgmvRowsPerWarp];
  bool row_used[kBgmvRowsPerWarp];
  AF_UNROLL
  for (int r = 0; r < kBgmvRowsPerWarp; ++r) {
    row_used[r] = first_row + r < rank;
    a_rows[r] = static_cast<const ABits*>(args.a) + slot * args.a_slot_stride +
                (first_row + r) * args.a_rank_stride;
  }
  float sums[kBgmvRowsPerWarp] = {};
  int64_t scalar_begin = begin;
  if constexpr (kAligned) {
    const int64_t full_groups_end = begin + (end - begin) / kGroupElements * kGroupElements;
    for (int64_t i = begin + lane * kGroupElements; i < full_groups_end; i += 32 * kGroupElements) {
      float xs[kGroupElements];
      Group8<XFormat>::load(x + i, xs);
      AF_UNROLL
      for (int r = 0; r < kBgmvRowsPerWarp; ++r) {
        if (!row_used[r]) continue;  // warp-uniform
        float as[kGroupElements];
        Group8<AFormat>::load(a_rows[r] + i, as);
        AF_UNROLL
        for (int j = 0; j < kGroupElements; ++j) sums[r] += xs[j] * as[j];
      }
    }
    scalar_begin = full_groups_end;
  }
  for (int64_t i = scalar_begin + lane; i < end; i += 32) {
    const float xi = XFormat::to_float(x[i]);
    AF_UNROLL
    for (int r = 0; r < kBgmvRowsPerWarp; ++r) {
      if (row_used[r]) sums[r] += xi * AFormat::to_float(a_rows[r][i]);
    }
  }
  AF_UNROLL
  for (int r = 0; r < kBgmvRowsPerWarp; ++r) sums[r] = warp_sum(sums[r]);
  if (lane != 0) return;
  AF_UNROLL
  for (int r = 0; r < kBgmvRowsPerWarp; ++r) {
    if (!row_used[r]) continue;
    if (splits == 1) {
      args.v[t * args.v_row_stride + first_row + r] =
          finish_shrink(args, slot, first_row + r, sums[r]);
    } else {
      args.workspace[(split * args.num_tokens + t) * args.max_rank + first_row + r] = sums[r];
    }
  }
}

// v[t, k] = finish_shrink(sum of the splits' partials in split order), zero beyond the rank.
__global__ void shrink_combine_kernel(ShrinkArgs args, int64_t splits) {
  const int64_t t = blockIdx.x;
  int32_t slot;
  const int64_t rank =
      token_rank(args.token_slots, args.ranks, args.num_slots, args.max_rank, t, &slot);
  for (int64_t k = threadIdx.x; k < args.max_rank; k += blockDim.x) {
    float value = 0.0f;
    if (k < rank) {
      float sum = 0.0f;
      for (int64_t split = 0; split < splits; ++split) {
        sum += args.workspace[(split * args.num_tokens + t) * args.max_rank + k];
      }
      value = finish_shrink(args, slot, k, sum);
    }
    args.v[t * args.v_row_stride + k] = value;
  }
}

// Grid (token, block of kBgmvExpandBlockOutputs outputs, slice). Each thread owns 8 outputs:
// consecutive ones (one or two 16-byte accesses per rank row) when aligned, otherwise 8
// outputs blockDim apart (coalesced scalar accesses). Both sum over k in ascending order,
// so the two paths give identical bits.
template <class YFormat, class BFormat, bool kAligned>
__global__ void bgmv_expand_kernel(ExpandArgs args) {
  const int64_t t = blockIdx.x;
  const ExpandSlice& slice = args.slices[blockIdx.z];
  const int64_t block_begin = static_cast<int64_t>(blockIdx.y) * kBgmvExpandBlockOutputs;
  int32_t slot;
  const int64_t rank =
      token_rank(args.token_slots, args.ranks, args.num_slots, slice.max_rank, t, &slot);
  // Block-uniform exits, before any barrier.
  if (rank == 0 || block_begin >= slice.h_out) return;

  using BBits = typename BFormat::Bits;
  using YBits = typename YFormat::Bits;
  AF_SHARED_ARRAY(float, v_staged, kBgmvStagedRanks);
  const float* v = args.v + t * args.v_row_stride + slice.v_column;
  const BBits* b = static_cast<const BBits*>(slice.b) + slot * slice.slot_stride;
  YBits* y = static_cast<YBits*>(args.y) + t * args.y_row_stride + slice.out_offset;

  int64_t outputs[kGroupElements];
  AF_UNROLL
  for (int j = 0; j < kGroupElements; ++j) {
    outputs[j] = kAligned
                     ? block_begin + threadIdx.x * kGroupElements + j
                     : block_begin + static_cast<int64_t>(j) * kBgmvExpandThreads + threadIdx.x;
  }
  // A thread at the aligned tail takes its outputs one by one.
  const bool whole_group = kAligned && outputs[kGroupElements - 1] < slice.h_out;
  // kBgmvExpandPartials interleaved partial sums per output (rank row k feeds partial
  // k % kBgmvExpandPartials within its stage), added pairwise at the end: a serial chain of
  // rank 512 rounded ~2x worse than cuBLAS on an H200 (fp32, 2026-12-04); a quarter of the
  // chain rounds like a blocked GEMM. The order is fixed by the rank alone (deterministic).
  // A bottleneck's up-projection bias (one slice) starts partial 0: no extra rounding of y.
  float partial[kBgmvExpandPartials][kGroupElements] = {};
  if (args.bias != nullptr) {
    const float* bias = args.bias + slot * args.bias_slot_stride;
    AF_UNROLL
    for (int j = 0; j < kGroupElements; ++j) {
      if (outputs[j] < slice.h_out) partial[0][j] = bias[outputs[j]];
    }
  }
  for (int64_t staged = 0; staged < rank; staged += kBgmvStagedRanks) {
    const int64_t count = rank - staged < kBgmvStagedRanks ? rank - staged : kBgmvStagedRanks;
    __syncthreads();  // the previous stage is consumed
    for (int64_t k = threadIdx.x; k < count; k += blockDim.x) v_staged[k] = v[staged + k];
    __syncthreads();
    auto accumulate = [&](float (&sums)[kGroupElements], int64_t k) {
      const float vk = v_staged[k];
      const BBits* row = b + (staged + k) * slice.rank_stride;
      if (whole_group) {
        float bs[kGroupElements];
        Group8<BFormat>::load(row + outputs[0], bs);
        AF_UNROLL
        for (int j = 0; j < kGroupElements; ++j) sums[j] += vk * bs[j];
      } else {
        AF_UNROLL
        for (int j = 0; j < kGroupElements; ++j) {
          if (outputs[j] < slice.h_out) sums[j] += vk * BFormat::to_float(row[outputs[j]]);
        }
      }
    };
    int64_t k = 0;
    for (; k + kBgmvExpandPartials <= count; k += kBgmvExpandPartials) {
      AF_UNROLL
      for (int p = 0; p < kBgmvExpandPartials; ++p) accumulate(partial[p], k + p);
    }
    for (; k < count; ++k) {  // compile-time indices only: the partials stay in registers
      AF_UNROLL
      for (int p = 0; p < kBgmvExpandPartials; ++p) {
        if (k % kBgmvExpandPartials == p) accumulate(partial[p], k);
      }
    }
  }
  static_assert(kBgmvExpandPartials == 4, "the final sum below adds four partials pairwise");
  float sums[kGroupElements];
  AF_UNROLL
  for (int j = 0; j < kGroupElements; ++j) {
    sums[j] = (partial[0][j] + partial[1][j]) + (partial[2][j] + partial[3][j]);
  }
  if (whole_group) {
    YBits bits[kGroupElements];
    Group8<YFormat>::load_bits(y + outputs[0], bits);
    AF_UNROLL
    for (int j = 0; j < kGroupElements; ++j) {
      bits[j] = YFormat::sum_rounded_once(YFormat::to_float(bits[j]), sums[j]);
    }
    Group8<YFormat>::store_bits(y + outputs[0], bits);
  } else {
    AF_UNROLL
    for (int j = 0; j < kGroupElements; ++j) {
      if (outputs[j] >= slice.h_out) continue;
      YBits* out = y + outputs[j];
      *out = YFormat::sum_rounded_once(YFormat::to_float(*out), sums[j]);
    }
  }
}

}  // namespace

int64_t bgmv_shrink_workspace_floats(const ShrinkArgs& args) {
  const int64_t splits = bgmv_shrink_splits(args.h_in);
  return splits == 1 ? 0 : splits * args.num_tokens * args.max_rank;
}

cudaError_t launch_shrink_bgmv(const ShrinkArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.max_rank == 0) return cudaSuccess;
  const int64_t splits = bgmv_shrink_splits(args.h_in);
  const dim3 grid(
      static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(splits),
      static_cast<unsigned>((args.max_rank + kBgmvRowsPerBlock - 1) / kBgmvRowsPerBlock));
  const dim3 block(32 * kBgmvShrinkWarps);
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(
      args.x_dtype, XFormat, AF_FORMAT_SWITCH(args.a_dtype, AFormat, {
        const bool aligned =
            groups_aligned<XFormat>(args.x, args.x_row_stride) &&
            groups_aligned<AFormat>(args.a, args.a_slot_stride, args.a_rank_stride);
        status = aligned
                     ? AF_LAUNCH("bgmv_shrink_kernel", bgmv_shrink_kernel<XFormat, AFormat, true>,
                                 grid, block, 0, stream, args, splits)
                     : AF_LAUNCH("bgmv_shrink_kernel", bgmv_shrink_kernel<XFormat, AFormat, false>,
                                 grid, block, 0, stream, args, splits);
      }));
  if (status != cudaSuccess || splits == 1) return status;
  return launch_shrink_combine(args, splits, stream);
}

cudaError_t launch_shrink_combine(const ShrinkArgs& args, int64_t splits, cudaStream_t stream) {
  return AF_LAUNCH("shrink_combine_kernel", shrink_combine_kernel,
                   dim3(static_cast<unsigned>(args.num_tokens)), dim3(128), 0, stream, args,
                   splits);
}

cudaError_t launch_expand_bgmv(const ExpandArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slices == 0) return cudaSuccess;
  int64_t widest = 0;
  bool aligned_b = true, aligned_y = true;
  for (int i = 0; i < args.num_slices; ++i) {
    const ExpandSlice& slice = args.slices[i];
    widest = slice.h_out > widest ? slice.h_out : widest;
    AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
      aligned_b =
          aligned_b && groups_aligned<BFormat>(slice.b, slice.slot_stride, slice.rank_stride);
    });
    AF_FORMAT_SWITCH(args.y_dtype, YFormat, {
      aligned_y = aligned_y &&
                  groups_aligned<YFormat>(static_cast<const char*>(args.y) +
                                              slice.out_offset * sizeof(typename YFormat::Bits),
                                          args.y_row_stride);
    });
  }
  if (widest == 0) return cudaSuccess;
  const dim3 grid(
      static_cast<unsigned>(args.num_tokens),
      static_cast<unsigned>((widest + kBgmvExpandBlockOutputs - 1) / kBgmvExpandBlockOutputs),
      static_cast<unsigned>(args.num_slices));
  cudaError_t status = cudaSuccess;
  AF_FORMAT_SWITCH(
      args.y_dtype, YFormat, AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
        status = aligned_b && aligned_y
                     ? AF_LAUNCH("bgmv_expand_kernel", bgmv_expand_kernel<YFormat, BFormat, true>,
                                 grid, dim3(kBgmvExpandThreads), 0, stream, args)
                     : AF_LAUNCH("bgmv_expand_kernel", bgmv_expand_kernel<YFormat, BFormat, false>,
                                 grid, dim3(kBgmvExpandThreads), 0, stream, args);
      }));
  return status;
}

}  // namespace adaptfuse
