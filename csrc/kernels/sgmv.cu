// SGMV: the prefill-path shrink and expand. A prefill batch carries many tokens per adapter,
// so the work is one small matrix product per segment (the plan's tokens of one slot): the
// kernels tile each segment's tokens against the adapter's rank rows and reuse every loaded
// weight tile across up to 64 tokens.
//
// - fp16/bf16 (x and A, or B, in one 16-bit format): mma.sync m16n8k16 with fp32
//   accumulation; tiles staged in shared memory by cp.async, two stages deep, fed to the
//   tensor cores by ldmatrix. Rows whose 8-element groups are not 16-byte aligned (odd H,
//   odd strides) and the tails of rows take a scalar load path into the same tiles.
// - fp32 and mixed formats: the same tiling on the CUDA cores.
//
// Segments are numbered tile by tile (slot s owns ceil(len_s / tile tokens) tiles) and every
// block finds its own segment in the plan's slot_offsets: the grid is sized by upper bounds
// from T and S alone, so no host synchronisation is needed and surplus blocks simply exit.
// Rank tiles and rank steps beyond a slot's rank are skipped; slot -1 tokens are never read.
//
// Determinism: every output element is summed in one fixed order (H_in or rank in ascending
// steps; H_in splits added in split order by launch_shrink_combine). No atomics. An element's
// order never depends on the other tokens of its tile, so the bits of a token depend on the
// batch only through the split count, which batch-invariant launches fix by H_in alone.
#include "kernels/device.cuh"
#include "kernels/dispatch.h"
#include "kernels/launchers.h"
#include "kernels/vector_access.cuh"

namespace adaptfuse {
namespace {

constexpr int kSgmvThreads = 128;
constexpr int kSgmvWarps = kSgmvThreads / 32;

// Tensor-core shrink: kShrinkDepth H_in elements per stage; rows padded by 16 bytes so that the
// 8 row addresses of an ldmatrix fall in 8 different bank groups.
constexpr int kShrinkDepth = 64;
constexpr int kShrinkPitch = kShrinkDepth + 8;
// Tensor-core expand: 64 tokens x 64 outputs per block, kExpandDepth ranks per stage.
constexpr int kExpandTokens = 64;
constexpr int kExpandOutputs = 64;
constexpr int kExpandDepth = 32;
constexpr int kExpandVPitch = kExpandDepth + 8;
constexpr int kExpandBPitch = kExpandOutputs + 8;
// CUDA-core paths: 32 tokens x 32 columns per block, 32-deep stages, fp32 tiles padded by one
// word (conflict-free column reads).
constexpr int kCoreTile = 32;
constexpr int kCorePitch = kCoreTile + 1;

struct SegmentTile {
  int32_t slot;
  int64_t first;  // position in token_order of the tile's first token
  int rows;       // tokens in the tile, 1..tile_tokens
};

// Which tile of which segment block `tile` works on; false when the tile is past the last one.
// Every thread walks the same S offsets (broadcast loads), so the outcome is block-uniform.
__device__ __forceinline__ bool find_segment_tile(const int32_t* slot_offsets, int64_t num_slots,
                                                  int64_t tile, int tile_tokens, SegmentTile* out) {
  int64_t first_tile = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t begin = slot_offsets[s], end = slot_offsets[s + 1];
    const int64_t tiles = (end - begin + tile_tokens - 1) / tile_tokens;
    if (tile < first_tile + tiles) {
      out->slot = static_cast<int32_t>(s);
      out->first = begin + (tile - first_tile) * tile_tokens;
      const int64_t rows = end - out->first;
      out->rows = rows < tile_tokens ? static_cast<int>(rows) : tile_tokens;
      return true;
    }
    first_tile += tiles;
  }
  return false;
}

__device__ __forceinline__ int64_t clamped_rank(const int32_t* ranks, int32_t slot,
                                                int64_t capacity) {
  const int64_t rank = ranks[slot];
  return rank < capacity ? rank : capacity;
}

// Eight consecutive 16-bit elements of a row into shared memory: one cp.async when the group
// is whole and aligned, else element by element with zeros past `end` (any alignment).
template <bool kAligned>
__device__ __forceinline__ void stage_group(uint16_t* shared, const uint16_t* row, int64_t column,
                                            int64_t end) {
  if (kAligned && column + 8 <= end) {
    cp_async_16(shared, row + column);
    return;
  }
  uint16_t values[8];
  AF_UNROLL
  for (int j = 0; j < 8; ++j) values[j] = column + j < end ? row[column + j] : uint16_t{0};
  memcpy(shared, values, sizeof(values));
}

__device__ __forceinline__ void zero_group(uint16_t* shared) {
  const uint4 zero = {0u, 0u, 0u, 0u};
  memcpy(shared, &zero, sizeof(zero));
}

// ---- Tensor-core shrink -------------------------------------------------------------------
// Block: kTokens tokens of one segment x kRanks rank columns x one H_in split. Warps are laid
// out kWarpsM x kWarpsN; each warp owns kTokens / kWarpsM tokens and 16 rank columns.
template <int kTokens, int kRanks>
struct ShrinkShape {
  static constexpr int kWarpsN = kRanks / 16;
  static constexpr int kWarpsM = kSgmvWarps / kWarpsN;
  static constexpr int kMmaRows = kTokens / kWarpsM / 16;  // m16 tiles per warp
  static_assert(kWarpsN >= 1 && kWarpsN <= kSgmvWarps && kWarpsM * kWarpsN == kSgmvWarps,
                "rank tile of 16, 32 or 64 columns");
  static_assert(kMmaRows >= 1 && kMmaRows * 16 * kWarpsM == kTokens, "token tile");
  // Each thread stages the same rows in every stage: kXGroups row groups of x, kAGroups of A.
  static constexpr int kGroupsPerRow = kShrinkDepth / 8;
  static constexpr int kXGroups = kTokens * kGroupsPerRow / kSgmvThreads;
  static constexpr int kAGroups = (kRanks * kGroupsPerRow + kSgmvThreads - 1) / kSgmvThreads;
  struct Tiles {
    uint16_t x[2][kTokens][kShrinkPitch];
    uint16_t a[2][kRanks][kShrinkPitch];
  };
};

template <class Format, int kTokens, int kRanks, bool kAligned>
__global__ void sgmv_shrink_mma_kernel(ShrinkArgs args, int64_t split_length) {
  using Shape = ShrinkShape<kTokens, kRanks>;
  using Bits = typename Format::Bits;
  SegmentTile tile;
  if (!find_segment_tile(args.slot_offsets, args.num_slots, blockIdx.x, kTokens, &tile)) return;
  const int64_t rank = clamped_rank(args.ranks, tile.slot, args.max_rank);
  const int64_t rank_begin = static_cast<int64_t>(blockIdx.y) * kRanks;
  if (rank_begin >= rank) return;  // block-uniform, before any barrier
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * split_length;
  const int64_t k_end = k_begin + split_length < args.h_in ? k_begin + split_length : args.h_in;

  AF_SHARED_ALIGNED(typename Shape::Tiles, tiles, 16);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  // The rows this thread stages (null: past the segment or the rank; never read).
  const Bits* x_rows[Shape::kXGroups];
  int x_group[Shape::kXGroups];
  AF_UNROLL
  for (int i = 0; i < Shape::kXGroups; ++i) {
    const int g = threadIdx.x + i * kSgmvThreads;
    const int row = g / Shape::kGroupsPerRow;
    x_group[i] = g;
    x_rows[i] = row < tile.rows ? static_cast<const Bits*>(args.x) +
                                      args.token_order[tile.first + row] * args.x_row_stride
                                : nullptr;
  }
  const Bits* a_rows[Shape::kAGroups];
  int a_group[Shape::kAGroups];
  AF_UNROLL
  for (int i = 0; i < Shape::kAGroups; ++i) {
    const int g = threadIdx.x + i * kSgmvThreads;
    const int64_t row = g / Shape::kGroupsPerRow;
    a_group[i] = g;
    a_rows[i] = g < kRanks * Shape::kGroupsPerRow && rank_begin + row < rank
                    ? static_cast<const Bits*>(args.a) + tile.slot * args.a_slot_stride +
                          (rank_begin + row) * args.a_rank_stride
                    : nullptr;
  }
  auto stage = [&](int buffer, int64_t k0) {
    AF_UNROLL
    for (int i = 0; i < Shape::kXGroups; ++i) {
      if (x_rows[i] == nullptr) continue;
      const int row = x_group[i] / Shape::kGroupsPerRow,
                col = x_group[i] % Shape::kGroupsPerRow * 8;
      stage_group<kAligned>(&tiles.x[buffer][row][col], x_rows[i], k0 + col, k_end);
    }
    AF_UNROLL
    for (int i = 0; i < Shape::kAGroups; ++i) {
      if (a_rows[i] == nullptr) continue;
      const int row = a_group[i] / Shape::kGroupsPerRow,
                col = a_group[i] % Shape::kGroupsPerRow * 8;
      stage_group<kAligned>(&tiles.a[buffer][row][col], a_rows[i], k0 + col, k_end);
    }
  };

  const int warp_m = warp / Shape::kWarpsN, warp_n = warp % Shape::kWarpsN;
  const int64_t warp_rank_begin = rank_begin + warp_n * 16;
  const bool warp_has_work = warp_rank_begin < rank;  // warp-uniform
  const bool second_n8_used = warp_rank_begin + 8 < rank;
  float acc[Shape::kMmaRows][2][4] = {};

  const int64_t steps = (k_end - k_begin + kShrinkDepth - 1) / kShrinkDepth;
  stage(0, k_begin);
  cp_async_commit();
  for (int64_t step = 0; step < steps; ++step) {
    const int buffer = static_cast<int>(step & 1);
    if (step + 1 < steps) stage(buffer ^ 1, k_begin + (step + 1) * kShrinkDepth);
    cp_async_commit();  // (an empty group on the last step keeps the wait count uniform)
    cp_async_wait<1>();
    __syncthreads();
    if (warp_has_work) {
      AF_UNROLL
      for (int kk = 0; kk < kShrinkDepth; kk += 16) {
        // B operand (A's rank rows are the mma's columns): matrices (n 0-7, k 0-7),
        // (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
        uint32_t b[4];
        ldmatrix<4, false>(
            b, &tiles.a[buffer][warp_n * 16 + (lane / 16) * 8 + lane % 8][kk + (lane / 8) % 2 * 8]);
        const uint32_t b_low[2] = {b[0], b[1]}, b_high[2] = {b[2], b[3]};
        AF_UNROLL
        for (int mi = 0; mi < Shape::kMmaRows; ++mi) {
          uint32_t a[4];
          const int row = (warp_m * Shape::kMmaRows + mi) * 16 + lane % 16;
          ldmatrix<4, false>(a, &tiles.x[buffer][row][kk + (lane / 16) * 8]);
          mma_m16n8k16<Format>(acc[mi][0], a, b_low, acc[mi][0]);
          if (second_n8_used) mma_m16n8k16<Format>(acc[mi][1], a, b_high, acc[mi][1]);
        }
      }
    }
    __syncthreads();  // the next step overwrites the buffer just read
  }
  if (!warp_has_work) return;

  const float scale = args.scales[tile.slot];
  const int group = lane / 4, t4 = lane % 4;
  AF_UNROLL
  for (int mi = 0; mi < Shape::kMmaRows; ++mi) {
    AF_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int row = (warp_m * Shape::kMmaRows + mi) * 16 + group + 8 * (i / 2);
      if (row >= tile.rows) continue;
      const int64_t token = args.token_order[tile.first + row];
      AF_UNROLL
      for (int ni = 0; ni < 2; ++ni) {
        const int64_t k = warp_rank_begin + ni * 8 + 2 * t4 + i % 2;
        if (k >= rank) continue;
        if (gridDim.z == 1) {
          args.v[token * args.v_row_stride + k] = scale * acc[mi][ni][i];
        } else {
          args.workspace[(split * args.num_tokens + token) * args.max_rank + k] = acc[mi][ni][i];
        }
      }
    }
  }
}

// ---- Tensor-core expand -------------------------------------------------------------------
// Block: 64 tokens of one segment x 64 outputs of one slice; warps 2 x 2, each 32 x 32. v is
// fp32, so each v element enters the mma as two 16-bit terms, hi = round(v) and
// lo = round(v - hi): the products keep about 16 significant bits of v instead of 8 or 11.
struct ExpandTiles {
  uint16_t v_hi[2][kExpandTokens][kExpandVPitch];
  uint16_t v_lo[2][kExpandTokens][kExpandVPitch];
  uint16_t b[2][kExpandDepth][kExpandBPitch];
};
// Each thread stages half a v row (16 ranks) of one token, and kExpandBGroups groups of B.
constexpr int kExpandVPerThread = kExpandTokens * kExpandDepth / kSgmvThreads;
constexpr int kExpandBGroups = kExpandDepth * (kExpandOutputs / 8) / kSgmvThreads;

template <class YFormat, class BFormat, bool kAligned>
__global__ void sgmv_expand_mma_kernel(ExpandArgs args) {
  using BBits = typename BFormat::Bits;
  using YBits = typename YFormat::Bits;
  const ExpandSlice& slice = args.slices[blockIdx.z];
  SegmentTile tile;
  if (!find_segment_tile(args.slot_offsets, args.num_slots, blockIdx.x, kExpandTokens, &tile)) {
    return;
  }
  const int64_t rank = clamped_rank(args.ranks, tile.slot, slice.max_rank);
  const int64_t out_begin = static_cast<int64_t>(blockIdx.y) * kExpandOutputs;
  if (rank == 0 || out_begin >= slice.h_out) return;  // block-uniform, before any barrier

  AF_SHARED_ALIGNED(ExpandTiles, tiles, 16);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int v_row = threadIdx.x / 2, v_col = threadIdx.x % 2 * kExpandVPerThread;
  const float* v_source =
      v_row < tile.rows
          ? args.v + args.token_order[tile.first + v_row] * args.v_row_stride + slice.v_column
          : nullptr;
  const BBits* b_slot = static_cast<const BBits*>(slice.b) + tile.slot * slice.slot_stride;
  const int64_t b_end = slice.h_out - out_begin;  // valid columns of this output tile

  float v_next[kExpandVPerThread];
  auto load_v = [&](int64_t k0) {  // into registers, so the loads overlap the mma steps
    AF_UNROLL
    for (int j = 0; j < kExpandVPerThread; ++j) {
      const int64_t k = k0 + v_col + j;
      v_next[j] = v_source != nullptr && k < rank ? v_source[k] : 0.0f;
    }
  };
  auto store_v = [&](int buffer) {
    uint16_t hi[kExpandVPerThread], lo[kExpandVPerThread];
    AF_UNROLL
    for (int j = 0; j < kExpandVPerThread; ++j) {
      hi[j] = BFormat::from_float(v_next[j]);
      lo[j] = BFormat::from_float(v_next[j] - BFormat::to_float(hi[j]));
    }
    memcpy(&tiles.v_hi[buffer][v_row][v_col], hi, sizeof(hi));
    memcpy(&tiles.v_lo[buffer][v_row][v_col], lo, sizeof(lo));
  };
  auto stage_b = [&](int buffer, int64_t k0) {
    AF_UNROLL
    for (int i = 0; i < kExpandBGroups; ++i) {
      const int g = threadIdx.x + i * kSgmvThreads;
      const int row = g / (kExpandOutputs / 8), col = g % (kExpandOutputs / 8) * 8;
      uint16_t* shared = &tiles.b[buffer][row][col];
      // Rank rows past the rank must be zeros: the last 16-deep step reads them.
      if (k0 + row >= rank) {
        zero_group(shared);
        continue;
      }
      const BBits* source = b_slot + (k0 + row) * slice.rank_stride + out_begin;
      stage_group<kAligned>(shared, source, col, b_end);
    }
  };

  const int warp_m = warp / 2, warp_n = warp % 2;
  const bool warp_has_work = out_begin + warp_n * 32 < slice.h_out;  // warp-uniform
  float acc[2][4][4] = {};
  const int64_t steps = (rank + kExpandDepth - 1) / kExpandDepth;
  load_v(0);
  stage_b(0, 0);
  cp_async_commit();
  store_v(0);
  for (int64_t step = 0; step < steps; ++step) {
    const int buffer = static_cast<int>(step & 1);
    const bool more = step + 1 < steps;
    if (more) {
      stage_b(buffer ^ 1, (step + 1) * kExpandDepth);
      load_v((step + 1) * kExpandDepth);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (warp_has_work) {
      AF_UNROLL
      for (int kk = 0; kk < kExpandDepth; kk += 16) {
        if (step * kExpandDepth + kk >= rank) break;  // no work on unused rank rows
        uint32_t a_hi[2][4], a_lo[2][4];
        AF_UNROLL
        for (int mi = 0; mi < 2; ++mi) {
          const int row = warp_m * 32 + mi * 16 + lane % 16, col = kk + (lane / 16) * 8;
          ldmatrix<4, false>(a_hi[mi], &tiles.v_hi[buffer][row][col]);
          ldmatrix<4, false>(a_lo[mi], &tiles.v_lo[buffer][row][col]);
        }
        AF_UNROLL
        for (int pair = 0; pair < 2; ++pair) {
          // B is stored k-major (outputs contiguous): transposed loads give the col operand.
          // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
          uint32_t b[4];
          ldmatrix<4, true>(b, &tiles.b[buffer][kk + (lane / 8) % 2 * 8 + lane % 8]
                                       [warp_n * 32 + pair * 16 + (lane / 16) * 8]);
          const uint32_t b_first[2] = {b[0], b[1]}, b_second[2] = {b[2], b[3]};
          AF_UNROLL
          for (int mi = 0; mi < 2; ++mi) {
            float (&first)[4] = acc[mi][2 * pair];
            float (&second)[4] = acc[mi][2 * pair + 1];
            mma_m16n8k16<BFormat>(first, a_hi[mi], b_first, first);
            mma_m16n8k16<BFormat>(first, a_lo[mi], b_first, first);
            mma_m16n8k16<BFormat>(second, a_hi[mi], b_second, second);
            mma_m16n8k16<BFormat>(second, a_lo[mi], b_second, second);
          }
        }
      }
    }
    if (more) store_v(buffer ^ 1);  // that buffer was last read before the previous barrier
    __syncthreads();
  }
  if (!warp_has_work) return;

  const int group = lane / 4, t4 = lane % 4;
  YBits* y = static_cast<YBits*>(args.y) + slice.out_offset + out_begin;
  AF_UNROLL
  for (int mi = 0; mi < 2; ++mi) {
    AF_UNROLL
    for (int half = 0; half < 2; ++half) {
      const int row = warp_m * 32 + mi * 16 + group + 8 * half;
      if (row >= tile.rows) continue;
      YBits* y_row = y + args.token_order[tile.first + row] * args.y_row_stride;
      AF_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        AF_UNROLL
        for (int j = 0; j < 2; ++j) {
          const int64_t o = warp_n * 32 + ni * 8 + 2 * t4 + j;
          if (o >= b_end) continue;
          y_row[o] =
              YFormat::sum_rounded_once(YFormat::to_float(y_row[o]), acc[mi][ni][2 * half + j]);
        }
      }
    }
  }
}

// ---- CUDA-core paths (fp32, mixed formats) ------------------------------------------------
// Block: 32 tokens x 32 columns; thread (column tid % 32, tokens tid / 32 + 4 i), fp32 tiles
// converted on load, sums over k in ascending order.
using CoreTile = float[kCoreTile][kCorePitch];
constexpr int kCoreTokensPerThread = kCoreTile * kCoreTile / kSgmvThreads;

template <class XFormat, class AFormat>
__global__ void sgmv_shrink_core_kernel(ShrinkArgs args, int64_t split_length) {
  SegmentTile tile;
  if (!find_segment_tile(args.slot_offsets, args.num_slots, blockIdx.x, kCoreTile, &tile)) return;
  const int64_t rank = clamped_rank(args.ranks, tile.slot, args.max_rank);
  const int64_t rank_begin = static_cast<int64_t>(blockIdx.y) * kCoreTile;
  if (rank_begin >= rank) return;
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * split_length;
  const int64_t k_end = k_begin + split_length < args.h_in ? k_begin + split_length : args.h_in;

  AF_SHARED(CoreTile, x_tile);
  AF_SHARED(CoreTile, a_tile);
  const auto* x = static_cast<const typename XFormat::Bits*>(args.x);
  const auto* a = static_cast<const typename AFormat::Bits*>(args.a) +
                  tile.slot * args.a_slot_stride + rank_begin * args.a_rank_stride;
  const int column = threadIdx.x % kCoreTile, first_row = threadIdx.x / kCoreTile;
  float acc[kCoreTokensPerThread] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kCoreTile) {
    const int64_t k = k0 + column;
    AF_UNROLL
    for (int i = 0; i < kCoreTokensPerThread; ++i) {
      const int row = first_row + i * (kSgmvThreads / kCoreTile);
      float xv = 0.0f, av = 0.0f;
      if (row < tile.rows && k < k_end) {
        xv = XFormat::to_float(x[args.token_order[tile.first + row] * args.x_row_stride + k]);
      }
      if (rank_begin + row < rank && k < k_end) {
        av = AFormat::to_float(a[row * args.a_rank_stride + k]);
      }
      x_tile[row][column] = xv;
      a_tile[row][column] = av;
    }
    __syncthreads();
    AF_UNROLL
    for (int kk = 0; kk < kCoreTile; ++kk) {
      const float av = a_tile[column][kk];
      AF_UNROLL
      for (int i = 0; i < kCoreTokensPerThread; ++i) {
        acc[i] += x_tile[first_row + i * (kSgmvThreads / kCoreTile)][kk] * av;
      }
    }
    __syncthreads();
  }
  const int64_t k = rank_begin + column;
  if (k >= rank) return;
  const float scale = args.scales[tile.slot];
  AF_UNROLL
  for (int i = 0; i < kCoreTokensPerThread; ++i) {
    const int row = first_row + i * (kSgmvThreads / kCoreTile);
    if (row >= tile.rows) continue;
    const int64_t token = args.token_order[tile.first + row];
    if (gridDim.z == 1) {
      args.v[token * args.v_row_stride + k] = scale * acc[i];
    } else {
      args.workspace[(split * args.num_tokens + token) * args.max_rank + k] = acc[i];
    }
  }
}

template <class YFormat, class BFormat>
__global__ void sgmv_expand_core_kernel(ExpandArgs args) {
  const ExpandSlice& slice = args.slices[blockIdx.z];
  SegmentTile tile;
  if (!find_segment_tile(args.slot_offsets, args.num_slots, blockIdx.x, kCoreTile, &tile)) return;
  const int64_t rank = clamped_rank(args.ranks, tile.slot, slice.max_rank);
  const int64_t out_begin = static_cast<int64_t>(blockIdx.y) * kCoreTile;
  if (rank == 0 || out_begin >= slice.h_out) return;

  AF_SHARED(CoreTile, v_tile);
  AF_SHARED(CoreTile, b_tile);
  const auto* b = static_cast<const typename BFormat::Bits*>(slice.b) +
                  tile.slot * slice.slot_stride + out_begin;
  const int column = threadIdx.x % kCoreTile, first_row = threadIdx.x / kCoreTile;
  const bool column_used = out_begin + column < slice.h_out;
  float acc[kCoreTokensPerThread] = {};
  for (int64_t k0 = 0; k0 < rank; k0 += kCoreTile) {
    AF_UNROLL
    for (int i = 0; i < kCoreTokensPerThread; ++i) {
      const int row = first_row + i * (kSgmvThreads / kCoreTile);
      const int64_t k = k0 + column;  // v tile: [token][k]; B tile: [k][output]
      v_tile[row][column] =
          row < tile.rows && k < rank
              ? args.v[args.token_order[tile.first + row] * args.v_row_stride + slice.v_column + k]
              : 0.0f;
      b_tile[row][column] = k0 + row < rank && column_used
                                ? BFormat::to_float(b[(k0 + row) * slice.rank_stride + column])
                                : 0.0f;
    }
    __syncthreads();
    const int64_t depth = rank - k0 < kCoreTile ? rank - k0 : kCoreTile;
    for (int kk = 0; kk < depth; ++kk) {
      const float bv = b_tile[kk][column];
      AF_UNROLL
      for (int i = 0; i < kCoreTokensPerThread; ++i) {
        acc[i] += v_tile[first_row + i * (kSgmvThreads / kCoreTile)][kk] * bv;
      }
    }
    __syncthreads();
  }
  if (!column_used) return;
  using YBits = typename YFormat::Bits;
  AF_UNROLL
  for (int i = 0; i < kCoreTokensPerThread; ++i) {
    const int row = first_row + i * (kSgmvThreads / kCoreTile);
    if (row >= tile.rows) continue;
    YBits* out = static_cast<YBits*>(args.y) +
                 args.token_order[tile.first + row] * args.y_row_stride + slice.out_offset +
                 out_begin + column;
    *out = YFormat::sum_rounded_once(YFormat::to_float(*out), acc[i]);
  }
}

// ---- Launch parameters --------------------------------------------------------------------

template <class Format>
constexpr bool kTensorCoreFormat = Format::kDType != DType::kFloat32;

// Tokens per tile of the tensor-core shrink: 64, or 16 when segments are short on average
// (T / S bounds the mean length of the used segments from below: at most S are used).
int shrink_tile_tokens(const ShrinkArgs& args) {
  return args.num_tokens >= 64 * (args.num_slots < 1 ? 1 : args.num_slots) ? 64 : 16;
}

// Rank columns per block: 16 when the capacity is 16 or less (no idle warps at small ranks).
int shrink_tile_ranks(const ShrinkArgs& args) { return args.max_rank <= 16 ? 16 : 64; }

bool shrink_on_tensor_cores(const ShrinkArgs& args) {
  return args.x_dtype == args.a_dtype && args.x_dtype != DType::kFloat32;
}

// Upper bound of the tiles of all segments: sum_s ceil(len_s / tokens) <= T / tokens + min(S, T).
int64_t segment_tile_bound(int64_t num_tokens, int64_t num_slots, int tile_tokens) {
  return (num_tokens + tile_tokens - 1) / tile_tokens +
         (num_slots < num_tokens ? num_slots : num_tokens);
}

// H_in split length (a multiple of every stage depth). Batch-invariant launches split by H_in
// alone, in fixed chunks; otherwise splits are added until the blocks that certainly have work
// (the T / tile_tokens full tiles times the rank tiles) fill about kSgmvTargetBlocks, with no
// split shorter than kSgmvMinSplit. Both depend on shapes only, never on device data.
constexpr int64_t kSgmvInvariantSplit = 2048;
constexpr int64_t kSgmvMinSplit = 512;
constexpr int64_t kSgmvTargetBlocks = 264;  // two blocks per SM of an H100 (132 SMs)

int64_t sgmv_split_length(const ShrinkArgs& args) {
  if (args.batch_invariant) return kSgmvInvariantSplit;
  const bool tensor_cores = shrink_on_tensor_cores(args);
  const int tile_tokens = tensor_cores ? shrink_tile_tokens(args) : kCoreTile;
  const int tile_ranks = tensor_cores ? shrink_tile_ranks(args) : kCoreTile;
  const int64_t full_tiles = args.num_tokens / tile_tokens;
  const int64_t rank_tiles = (args.max_rank + tile_ranks - 1) / tile_ranks;
  const int64_t busy_blocks = (full_tiles > 0 ? full_tiles : 1) * rank_tiles;
  int64_t splits = (kSgmvTargetBlocks + busy_blocks - 1) / busy_blocks;
  const int64_t most_splits = (args.h_in + kSgmvMinSplit - 1) / kSgmvMinSplit;
  splits = splits < most_splits ? splits : most_splits;
  splits = splits < 1 ? 1 : splits;
  const int64_t length = (args.h_in + splits - 1) / splits;
  return (length + kShrinkDepth - 1) / kShrinkDepth * kShrinkDepth;
}

int64_t sgmv_shrink_splits(const ShrinkArgs& args) {
  const int64_t length = sgmv_split_length(args);
  return args.h_in <= length ? 1 : (args.h_in + length - 1) / length;
}

// The tensor-core launches exist for the 16-bit formats only; the templates are never
// instantiated for fp32 (the callers' switches reach them only for fp16/bf16).
template <class Format, int kTokens, int kRanks>
cudaError_t launch_shrink_mma(const ShrinkArgs& args, int64_t splits, int64_t length,
                              cudaStream_t stream) {
  if constexpr (!kTensorCoreFormat<Format>) {
    return cudaErrorInvalidValue;
  } else {
    const dim3 grid(
        static_cast<unsigned>(segment_tile_bound(args.num_tokens, args.num_slots, kTokens)),
        static_cast<unsigned>((args.max_rank + kRanks - 1) / kRanks),
        static_cast<unsigned>(splits));
    const bool aligned = groups_aligned<Format>(args.x, args.x_row_stride) &&
                         groups_aligned<Format>(args.a, args.a_slot_stride, args.a_rank_stride);
    return aligned ? AF_LAUNCH("sgmv_shrink_mma_kernel",
                               sgmv_shrink_mma_kernel<Format, kTokens, kRanks, true>, grid,
                               dim3(kSgmvThreads), 0, stream, args, length)
                   : AF_LAUNCH("sgmv_shrink_mma_kernel",
                               sgmv_shrink_mma_kernel<Format, kTokens, kRanks, false>, grid,
                               dim3(kSgmvThreads), 0, stream, args, length);
  }
}

template <class Format>
cudaError_t launch_shrink_mma_tiles(const ShrinkArgs& args, int64_t splits, int64_t length,
                                    cudaStream_t stream) {
  if (shrink_tile_ranks(args) == 16) {
    return launch_shrink_mma<Format, 64, 16>(args, splits, length, stream);
  }
  return shrink_tile_tokens(args) == 64
             ? launch_shrink_mma<Format, 64, 64>(args, splits, length, stream)
             : launch_shrink_mma<Format, 16, 64>(args, splits, length, stream);
}

template <class YFormat, class BFormat>
cudaError_t launch_expand_mma(const ExpandArgs& args, dim3 grid, bool aligned,
                              cudaStream_t stream) {
  if constexpr (!kTensorCoreFormat<BFormat>) {
    return cudaErrorInvalidValue;
  } else {
    return aligned
               ? AF_LAUNCH("sgmv_expand_mma_kernel", sgmv_expand_mma_kernel<YFormat, BFormat, true>,
                           grid, dim3(kSgmvThreads), 0, stream, args)
               : AF_LAUNCH("sgmv_expand_mma_kernel",
                           sgmv_expand_mma_kernel<YFormat, BFormat, false>, grid,
                           dim3(kSgmvThreads), 0, stream, args);
  }
}

}  // namespace

int64_t sgmv_shrink_workspace_floats(const ShrinkArgs& args) {
  const int64_t splits = sgmv_shrink_splits(args);
  return splits == 1 ? 0 : splits * args.num_tokens * args.max_rank;
}

// v must arrive zero-filled: the kernels write only the rows of tokens with a slot, and only
// below their rank (the combine, when there are splits, writes every row).
cudaError_t launch_shrink_sgmv(const ShrinkArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.max_rank == 0 || args.num_slots == 0) return cudaSuccess;
  const int64_t splits = sgmv_shrink_splits(args);
  const int64_t length = sgmv_split_length(args);
  cudaError_t status = cudaSuccess;
  if (shrink_on_tensor_cores(args)) {
    AF_FORMAT_SWITCH(args.x_dtype, Format,
                     { status = launch_shrink_mma_tiles<Format>(args, splits, length, stream); });
  } else {
    const dim3 grid(
        static_cast<unsigned>(segment_tile_bound(args.num_tokens, args.num_slots, kCoreTile)),
        static_cast<unsigned>((args.max_rank + kCoreTile - 1) / kCoreTile),
        static_cast<unsigned>(splits));
    AF_FORMAT_SWITCH(args.x_dtype, XFormat, AF_FORMAT_SWITCH(args.a_dtype, AFormat, {
                       status = AF_LAUNCH("sgmv_shrink_core_kernel",
                                          sgmv_shrink_core_kernel<XFormat, AFormat>, grid,
                                          dim3(kSgmvThreads), 0, stream, args, length);
                     }));
  }
  if (status != cudaSuccess || splits == 1) return status;
  return launch_shrink_combine(args, splits, stream);
}

cudaError_t launch_expand_sgmv(const ExpandArgs& args, cudaStream_t stream) {
  if (args.num_tokens == 0 || args.num_slices == 0 || args.num_slots == 0) return cudaSuccess;
  int64_t widest = 0;
  bool aligned = true;
  for (int i = 0; i < args.num_slices; ++i) {
    const ExpandSlice& slice = args.slices[i];
    widest = slice.h_out > widest ? slice.h_out : widest;
    AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
      aligned = aligned && groups_aligned<BFormat>(slice.b, slice.slot_stride, slice.rank_stride);
    });
  }
  if (widest == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  if (args.b_dtype != DType::kFloat32) {
    const dim3 grid(
        static_cast<unsigned>(segment_tile_bound(args.num_tokens, args.num_slots, kExpandTokens)),
        static_cast<unsigned>((widest + kExpandOutputs - 1) / kExpandOutputs),
        static_cast<unsigned>(args.num_slices));
    AF_FORMAT_SWITCH(args.y_dtype, YFormat, AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
                       status = launch_expand_mma<YFormat, BFormat>(args, grid, aligned, stream);
                     }));
  } else {
    const dim3 grid(
        static_cast<unsigned>(segment_tile_bound(args.num_tokens, args.num_slots, kCoreTile)),
        static_cast<unsigned>((widest + kCoreTile - 1) / kCoreTile),
        static_cast<unsigned>(args.num_slices));
    AF_FORMAT_SWITCH(args.y_dtype, YFormat, AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
                       status = AF_LAUNCH("sgmv_expand_core_kernel",
                                          sgmv_expand_core_kernel<YFormat, BFormat>, grid,
                                          dim3(kSgmvThreads), 0, stream, args);
                     }));
  }
  return status;
}

}  // namespace adaptfuse
