// The vector shrink and expand kernels, written once over an instruction-set description
// `Isa` and compiled once per instruction set (simd_lora_avx512.cpp, simd_lora_avx2.cpp).
// The including file defines AF_SIMD_TARGET (the target attribute every function here
// carries, so that the build itself can target plain x86-64) and an Isa providing:
//   V, kLanes                         a vector of kLanes fp32 values
//   kShrinkRows x kShrinkRanks        shrink's register tile (token rows x adapter rows)
//   kExpandRows x kExpandVectors      expand's register tile (token rows x output vectors)
//   kShrinkPanelRows                  token rows per tile of the long-segment shrink
//   zero, broadcast, fmadd, add, mul, store, reduce (a fixed order: deterministic)
//   load<DType>(base, i)              kLanes elements from base[i], widened to fp32
//   load_partial<DType>(base, i, n)   the first n of them, zeros after
//   load_partial_fp32 / store_partial_fp32 (float* with a count)
//
// Register tiles: the adapter rows a tile reads are packed (expand) or blocked (shrink) so
// that they stay in L1 while every token tile of the chunk uses them: bank rows lie a power
// of two apart (H * 4 bytes) and, read in place, would fall into the same L1 sets.
// Include inside a namespace of its own; needs simd_lora.h, rounded_sums.h, dispatch.h and
// <cstring> first.

#ifndef AF_SIMD_TARGET
#error "define AF_SIMD_TARGET and an Isa before including simd_lora_kernels.h"
#endif

constexpr int kSuperRanks = 16;          // adapter rows whose partial sums stay in registers/L1
constexpr int64_t kBlockElements = 256;  // H_in elements per shrink block

// Calls fn(std::integral_constant<int, n>) for the runtime n in [1, kMax].
template <int kMax, class Fn>
AF_SIMD_TARGET __attribute__((always_inline)) inline void with_count(int n, Fn&& fn) {
  if constexpr (kMax > 1) {
    if (n < kMax) return with_count<kMax - 1>(n, fn);
  }
  fn(std::integral_constant<int, kMax>{});
}

// Copies rows [0, rows) of columns [begin, end) of a bank (row stride row_bytes) into dst as
// fp32, each row padded with zeros to dst_stride floats (a multiple of kLanes).
template <DType kDType>
AF_SIMD_TARGET void pack_rows(const char* first_row, int64_t row_bytes, int64_t rows, int64_t begin,
                              int64_t end, float* dst, int64_t dst_stride) {
  constexpr int kLanes = Isa::kLanes;
  for (int64_t k = 0; k < rows; ++k) {
    const char* row = first_row + k * row_bytes;
    float* out = dst + k * dst_stride;
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
      Isa::store(out + (i - begin), Isa::template load<kDType>(row, i));
    if (i < end) {
      Isa::store(out + (i - begin),
                 Isa::template load_partial<kDType>(row, i, static_cast<int>(end - i)));
    }
  }
}

// Accumulates x_rows[r][i0:i1] * A[k][i0:i1] into partial[r][k] (kLanes lanes each); A[k]
// starts at a_first + k * a_row_bytes.
template <DType kX, DType kA, int kRows, int kRanks>
AF_SIMD_TARGET void shrink_tile(const void* const* x_rows, const char* a_first, int64_t a_row_bytes,
                                int64_t i0, int64_t i1, typename Isa::V (*partial)[kSuperRanks]) {
  using V = typename Isa::V;
  constexpr int kLanes = Isa::kLanes;
  V acc[kRows][kRanks];
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < kRanks; ++k) acc[r][k] = partial[r][k];
  int64_t i = i0;
  for (; i + kLanes <= i1; i += kLanes) {
    V a[kRanks];
    for (int k = 0; k < kRanks; ++k) a[k] = Isa::template load<kA>(a_first + k * a_row_bytes, i);
    for (int r = 0; r < kRows; ++r) {
      const V x = Isa::template load<kX>(x_rows[r], i);
      for (int k = 0; k < kRanks; ++k) acc[r][k] = Isa::fmadd(x, a[k], acc[r][k]);
    }
  }
  if (i < i1) {
    const int left = static_cast<int>(i1 - i);
    V a[kRanks];
    for (int k = 0; k < kRanks; ++k) {
      a[k] = Isa::template load_partial<kA>(a_first + k * a_row_bytes, i, left);
    }
    for (int r = 0; r < kRows; ++r) {
      const V x = Isa::template load_partial<kX>(x_rows[r], i, left);
      for (int k = 0; k < kRanks; ++k) acc[r][k] = Isa::fmadd(x, a[k], acc[r][k]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < kRanks; ++k) partial[r][k] = acc[r][k];
}

// Rank rows go in groups of kSuperRanks and H_in in blocks of kBlockElements: the group's
// block of adapter rows and the chunk's token rows stay close (L1/L2) while every tile of the
// chunk uses them. Each lane sums along H_in in order, then the lanes reduce in a fixed order:
// deterministic.
template <DType kX, DType kA>
AF_SIMD_TARGET void shrink_rows(const void* const* x_rows, int count, const void* a_slot,
                                int64_t a_rank_stride, int64_t rank, int64_t h_in, float scale,
                                float* const* v_rows) {
  using V = typename Isa::V;
  constexpr int kTileRows = Isa::kShrinkRows;
  constexpr int kTileRanks = Isa::kShrinkRanks;
  const int64_t a_row_bytes = a_rank_stride * element_bytes(kA);
  const char* a_bytes = static_cast<const char*>(a_slot);
  V partial[kSimdShrinkChunk][kSuperRanks];
  for (int64_t group = 0; group < rank; group += kSuperRanks) {
    const int64_t group_ranks = rank - group < kSuperRanks ? rank - group : kSuperRanks;
    for (int r = 0; r < count; ++r)
      for (int k = 0; k < kSuperRanks; ++k) partial[r][k] = Isa::zero();
    for (int64_t i0 = 0; i0 < h_in; i0 += kBlockElements) {
      const int64_t i1 = i0 + kBlockElements < h_in ? i0 + kBlockElements : h_in;
      for (int t = 0; t < count; t += kTileRows) {
        const int rows = count - t < kTileRows ? count - t : kTileRows;
        for (int64_t k = 0; k < group_ranks; k += kTileRanks) {
          const char* a_first = a_bytes + (group + k) * a_row_bytes;
          const int ranks =
              static_cast<int>(group_ranks - k < kTileRanks ? group_ranks - k : kTileRanks);
          auto* tile_partial = reinterpret_cast<V(*)[kSuperRanks]>(&partial[t][k]);
          with_count<kTileRows>(rows, [&](auto tile_rows) AF_SIMD_TARGET {
            with_count<kTileRanks>(ranks, [&](auto tile_ranks) AF_SIMD_TARGET {
              shrink_tile<kX, kA, decltype(tile_rows)::value, decltype(tile_ranks)::value>(
                  x_rows + t, a_first, a_row_bytes, i0, i1, tile_partial);
            });
          });
        }
      }
    }
    for (int r = 0; r < count; ++r)
      for (int64_t k = 0; k < group_ranks; ++k)
        v_rows[r][group + k] = scale * Isa::reduce(partial[r][k]);
  }
}

// Long segments: one tile of kRows token rows against one panel of A (kShrinkPanelRanks ranks,
// packed [h_in][kShrinkPanelRanks], see pack_shrink_panels): each step of k broadcasts
// x[t][k] and multiplies the panel's row k. Each output sums blocks of kShrinkPanelBlock
// elements of H_in in order, then adds the block sums in order: deterministic, independent of
// which tokens share the tile, and without the rounding error of one chain over all of H_in
// (which lost to the BLAS by 2-3x in the training gradient tests).
constexpr int64_t kShrinkPanelBlock = 64;
template <class XFormat, int kRows>
AF_SIMD_TARGET void shrink_panel_tile(const void* const* x_rows, const float* panel, int64_t h_in,
                                      int ranks, float scale, float* const* v_rows) {
  using V = typename Isa::V;
  constexpr int kLanes = Isa::kLanes;
  constexpr int kVectors = kShrinkPanelRanks / kLanes;
  static_assert(kVectors * kLanes == kShrinkPanelRanks, "a panel is whole vectors");
  const typename XFormat::Bits* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = static_cast<const typename XFormat::Bits*>(x_rows[r]);
  V total[kRows][kVectors];
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < kVectors; ++j) total[r][j] = Isa::zero();
  for (int64_t k0 = 0; k0 < h_in; k0 += kShrinkPanelBlock) {
    const int64_t k1 = k0 + kShrinkPanelBlock < h_in ? k0 + kShrinkPanelBlock : h_in;
    V acc[kRows][kVectors];
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kVectors; ++j) acc[r][j] = Isa::zero();
    for (int64_t k = k0; k < k1; ++k) {
      V a[kVectors];
      for (int j = 0; j < kVectors; ++j) {
        a[j] = Isa::template load<DType::kFloat32>(panel, k * kShrinkPanelRanks + j * kLanes);
      }
      for (int r = 0; r < kRows; ++r) {
        const V x = Isa::broadcast(XFormat::to_float(rows[r][k]));
        for (int j = 0; j < kVectors; ++j) acc[r][j] = Isa::fmadd(x, a[j], acc[r][j]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < kVectors; ++j) total[r][j] = Isa::add(total[r][j], acc[r][j]);
  }
  const V scales = Isa::broadcast(scale);
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVectors; ++j) {
      const int lanes = ranks - j * kLanes;
      if (lanes <= 0) break;
      const V scaled = Isa::mul(scales, total[r][j]);
      if (lanes >= kLanes) {
        Isa::store(v_rows[r] + j * kLanes, scaled);
      } else {
        Isa::store_partial_fp32(v_rows[r] + j * kLanes, scaled, lanes);
      }
    }
  }
}

template <class XFormat>
AF_SIMD_TARGET void shrink_panel_rows(const void* const* x_rows, int count, const float* panels,
                                      int64_t rank, int64_t h_in, float scale,
                                      float* const* v_rows) {
  constexpr int kTileRows = Isa::kShrinkPanelRows;
  float* tile_v[kTileRows];
  for (int64_t group = 0; group < rank; group += kShrinkPanelRanks) {
    const int ranks =
        static_cast<int>(rank - group < kShrinkPanelRanks ? rank - group : kShrinkPanelRanks);
    const float* panel = panels + group * h_in;
    for (int t = 0; t < count; t += kTileRows) {
      const int rows = count - t < kTileRows ? count - t : kTileRows;
      for (int r = 0; r < rows; ++r) tile_v[r] = v_rows[t + r] + group;
      with_count<kTileRows>(rows, [&](auto tile_rows) AF_SIMD_TARGET {
        shrink_panel_tile<XFormat, decltype(tile_rows)::value>(x_rows + t, panel, h_in, ranks,
                                                               scale, tile_v);
      });
    }
  }
}

// One block of up to kExpandVectors * kLanes outputs of kRows token rows: acc[r][j] covers
// outputs o + kLanes * j, and starts from the slot's bias (a bottleneck adapter's) when
// there is one.
template <class YFormat, int kRows>
AF_SIMD_TARGET void expand_block(void* const* y_rows, const float* const* v_rows,
                                 const float* packed, int64_t packed_stride, int64_t rank,
                                 int64_t o, int64_t width, const float* bias) {
  using V = typename Isa::V;
  constexpr int kLanes = Isa::kLanes;
  constexpr int kVectors = Isa::kExpandVectors;
  int lanes[kVectors];  // outputs of vector j inside the block (0: past the end)
  for (int j = 0; j < kVectors; ++j) {
    const int64_t left = width - kLanes * j;
    lanes[j] = left >= kLanes ? kLanes : (left > 0 ? static_cast<int>(left) : 0);
  }
  V acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVectors; ++j) {
      acc[r][j] = bias ? Isa::load_partial_fp32(bias + o + kLanes * j, lanes[j]) : Isa::zero();
    }
  }
  for (int64_t k = 0; k < rank; ++k) {
    V b[kVectors];
    // packed rows are padded with zeros to whole vectors: full loads stay inside them.
    for (int j = 0; j < kVectors; ++j) {
      b[j] = lanes[j] ? Isa::template load<DType::kFloat32>(packed + k * packed_stride, kLanes * j)
                      : Isa::zero();
    }
    for (int r = 0; r < kRows; ++r) {
      const V vk = Isa::broadcast(v_rows[r][k]);
      for (int j = 0; j < kVectors; ++j) acc[r][j] = Isa::fmadd(vk, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if constexpr (YFormat::kDType == DType::kFloat32) {
      float* y = static_cast<float*>(y_rows[r]) + o;
      for (int j = 0; j < kVectors; ++j) {
        if (lanes[j] == kLanes) {
          Isa::store(y + kLanes * j,
                     Isa::add(Isa::template load<DType::kFloat32>(y, kLanes * j), acc[r][j]));
        } else if (lanes[j] > 0) {
          const V current = Isa::load_partial_fp32(y + kLanes * j, lanes[j]);
          Isa::store_partial_fp32(y + kLanes * j, Isa::add(current, acc[r][j]), lanes[j]);
        }
      }
    } else {
      // 16-bit y: round y + sum once (rounded_sums: the same bits as sum_rounded_once).
      alignas(64) float sums[kLanes * kVectors];
      for (int j = 0; j < kVectors; ++j) Isa::store(sums + kLanes * j, acc[r][j]);
      auto* y = static_cast<typename YFormat::Bits*>(y_rows[r]) + o;
      typename YFormat::Bits before[kLanes * kVectors];
      uint8_t flags[kLanes * kVectors];
      std::memcpy(before, y, width * sizeof(before[0]));
      rounded_sums<YFormat>(before, 1, sums, 1.0f, width, y, flags);
    }
  }
}

// Outputs [o_begin, o_end) of count token rows from B rows already packed as fp32: column o
// of rank row k at packed_first[k * packed_stride + (o - o_begin)], each row zero-padded to
// whole vectors. Token tiles outer, each sweeping its outputs (a few row streams for the
// prefetcher; the packed rows stay in L1/L2).
template <class YFormat>
AF_SIMD_TARGET void expand_packed_rows(void* const* y_rows, const float* const* v_rows, int count,
                                       const float* packed_first, int64_t packed_stride,
                                       int64_t rank, int64_t o_begin, int64_t o_end,
                                       const float* bias) {
  constexpr int kBlock = Isa::kLanes * Isa::kExpandVectors;
  constexpr int kTileRows = Isa::kExpandRows;
  for (int t = 0; t < count; t += kTileRows) {
    with_count<kTileRows>(
        count - t < kTileRows ? count - t : kTileRows, [&](auto rows) AF_SIMD_TARGET {
          for (int64_t o = o_begin; o < o_end; o += kBlock) {
            const int64_t width = o_end - o < kBlock ? o_end - o : kBlock;
            expand_block<YFormat, decltype(rows)::value>(y_rows + t, v_rows + t,
                                                         packed_first + (o - o_begin),
                                                         packed_stride, rank, o, width, bias);
          }
        });
  }
}

// Short segments: the item's rows of B ([rank, o_end - o_begin]) are packed here, widened to
// fp32, for every token of the chunk.
template <class YFormat, DType kB>
AF_SIMD_TARGET void expand_rows(void* const* y_rows, const float* const* v_rows, int count,
                                const void* b_slot, int64_t b_rank_stride, int64_t rank,
                                int64_t o_begin, int64_t o_end, const float* bias) {
  constexpr int kLanes = Isa::kLanes;
  const int64_t b_row_bytes = b_rank_stride * element_bytes(kB);
  const int64_t packed_stride = (o_end - o_begin + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<float> packed;
  packed.resize(static_cast<size_t>(rank * packed_stride));
  pack_rows<kB>(static_cast<const char*>(b_slot), b_row_bytes, rank, o_begin, o_end, packed.data(),
                packed_stride);
  expand_packed_rows<YFormat>(y_rows, v_rows, count, packed.data(), packed_stride, rank, o_begin,
                              o_end, bias);
}

// The entry points simd_lora.cpp dispatches to, for the dtype pairs simd_lora.h lists.
bool shrink_rows_any(DType x_dtype, DType a_dtype, const void* const* x_rows, int count,
                     const void* a_slot, int64_t a_rank_stride, int64_t rank, int64_t h_in,
                     float scale, float* const* v_rows) {
  constexpr DType F32 = DType::kFloat32, F16 = DType::kFloat16, BF16 = DType::kBFloat16;
#define AF_SHRINK_CASE(X, A)                                                            \
  if (x_dtype == X && a_dtype == A) {                                                   \
    shrink_rows<X, A>(x_rows, count, a_slot, a_rank_stride, rank, h_in, scale, v_rows); \
    return true;                                                                        \
  }
  AF_SHRINK_CASE(F32, F32)
  AF_SHRINK_CASE(BF16, BF16)
  AF_SHRINK_CASE(F16, F16)
  AF_SHRINK_CASE(BF16, F32)
  AF_SHRINK_CASE(F16, F32)
#undef AF_SHRINK_CASE
  return false;
}

bool shrink_panel_rows_any(DType x_dtype, const void* const* x_rows, int count, const float* panels,
                           int64_t rank, int64_t h_in, float scale, float* const* v_rows) {
  AF_FORMAT_SWITCH(x_dtype, XFormat, {
    shrink_panel_rows<XFormat>(x_rows, count, panels, rank, h_in, scale, v_rows);
  });
  return true;
}

bool expand_packed_rows_any(DType y_dtype, void* const* y_rows, const float* const* v_rows,
                            int count, const float* packed_first, int64_t packed_stride,
                            int64_t rank, int64_t o_begin, int64_t o_end, const float* bias) {
  AF_FORMAT_SWITCH(y_dtype, YFormat, {
    expand_packed_rows<YFormat>(y_rows, v_rows, count, packed_first, packed_stride, rank, o_begin,
                                o_end, bias);
  });
  return true;
}

bool expand_rows_any(DType y_dtype, DType b_dtype, void* const* y_rows, const float* const* v_rows,
                     int count, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                     int64_t o_begin, int64_t o_end, const float* bias) {
  if (b_dtype != y_dtype && b_dtype != DType::kFloat32) return false;
  AF_FORMAT_SWITCH(y_dtype, YFormat, {
    if (b_dtype == DType::kFloat32) {
      expand_rows<YFormat, DType::kFloat32>(y_rows, v_rows, count, b_slot, b_rank_stride, rank,
                                            o_begin, o_end, bias);
    } else if (b_dtype == DType::kFloat16) {
      expand_rows<YFormat, DType::kFloat16>(y_rows, v_rows, count, b_slot, b_rank_stride, rank,
                                            o_begin, o_end, bias);
    } else {
      expand_rows<YFormat, DType::kBFloat16>(y_rows, v_rows, count, b_slot, b_rank_stride, rank,
                                             o_begin, o_end, bias);
    }
  });
  return true;
}
