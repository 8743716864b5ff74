// AVX-512 kernels for shrink and expand. Register tiles of 4 token rows x 4 vectors (16
// accumulators of 16 lanes); the adapter rows a tile reads are first packed, widened to fp32,
// into a small contiguous buffer: bank rows lie a power of two apart (H * 4 bytes), and
// read in place they would fall into the same L1 sets and evict each other. Compiled with
// target attributes and entered only when the CPU has AVX-512.
#include "cpu/simd_lora.h"

#include <cstdlib>
#include <vector>

#include "kernels/dispatch.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AF_HAVE_X86_SIMD 1
#endif

namespace adaptfuse {

#ifdef AF_HAVE_X86_SIMD
namespace {

bool simd_disabled_by_environment() {
  const char* flag = std::getenv("ADAPTFUSE_CPU_SIMD");
  return flag != nullptr && flag[0] == '0';
}

#define AF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

constexpr int kSuperRanks = 16;
constexpr int64_t kBlockElements = 256;

template <DType kDType>
AF_AVX512 __m512 load16(const void* base, int64_t index) {
  if constexpr (kDType == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + index);
  } else {
    const __m256i raw = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + index));
    if constexpr (kDType == DType::kFloat16) return _mm512_cvtph_ps(raw);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

template <DType kDType>
AF_AVX512 __m512 load16_masked(const void* base, int64_t index, __mmask16 mask) {
  if constexpr (kDType == DType::kFloat32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + index);
  } else {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + index);
    if constexpr (kDType == DType::kFloat16) return _mm512_cvtph_ps(raw);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

// Copies rows [0, rows) of columns [begin, end) of a bank (row stride row_bytes) into dst as
// fp32, each row padded with zeros to dst_stride floats (a multiple of 16).
template <DType kDType>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void pack_rows(const char* first_row,
                                                                    int64_t row_bytes, int64_t rows,
                                                                    int64_t begin, int64_t end,
                                                                    float* dst,
                                                                    int64_t dst_stride) {
  for (int64_t k = 0; k < rows; ++k) {
    const char* row = first_row + k * row_bytes;
    for (int64_t i = begin; i < end; i += 16) {
      const int64_t left = end - i;
      const __mmask16 mask =
          left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_storeu_ps(dst + k * dst_stride + (i - begin), load16_masked<kDType>(row, i, mask));
    }
  }
}

// Accumulates x_rows[r][i0:i1] * A[k][i0:i1] into partial[r][k] (16 lanes each); A[k]
// starts at a_first + k * a_row_bytes.
template <DType kX, DType kA, int kRows, int kRanks>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void shrink_tile(
    const void* const* x_rows, const char* a_first, int64_t a_row_bytes, int64_t i0, int64_t i1,
    __m512 (*partial)[kSuperRanks]) {
  __m512 acc[kRows][kRanks];
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < kRanks; ++k) acc[r][k] = partial[r][k];
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    __m512 a[kRanks];
    for (int k = 0; k < kRanks; ++k) a[k] = load16<kA>(a_first + k * a_row_bytes, i);
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = load16<kX>(x_rows[r], i);
      for (int k = 0; k < kRanks; ++k) acc[r][k] = _mm512_fmadd_ps(x, a[k], acc[r][k]);
    }
  }
  if (i < i1) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (i1 - i)) - 1u);
    __m512 a[kRanks];
    for (int k = 0; k < kRanks; ++k) a[k] = load16_masked<kA>(a_first + k * a_row_bytes, i, mask);
    for (int r = 0; r < kRows; ++r) {
      const __m512 x = load16_masked<kX>(x_rows[r], i, mask);
      for (int k = 0; k < kRanks; ++k) acc[r][k] = _mm512_fmadd_ps(x, a[k], acc[r][k]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int k = 0; k < kRanks; ++k) partial[r][k] = acc[r][k];
}

template <DType kX, DType kA, int kRows>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void shrink_tile_any_ranks(
    const void* const* x_rows, const char* a_first, int64_t a_row_bytes, int64_t i0, int64_t i1,
    int64_t ranks, __m512 (*partial)[kSuperRanks]) {
  switch (ranks) {
    case 4:
      return shrink_tile<kX, kA, kRows, 4>(x_rows, a_first, a_row_bytes, i0, i1, partial);
    case 3:
      return shrink_tile<kX, kA, kRows, 3>(x_rows, a_first, a_row_bytes, i0, i1, partial);
    case 2:
      return shrink_tile<kX, kA, kRows, 2>(x_rows, a_first, a_row_bytes, i0, i1, partial);
    default:
      return shrink_tile<kX, kA, kRows, 1>(x_rows, a_first, a_row_bytes, i0, i1, partial);
  }
}

// Rank rows go in groups of kSuperRanks and H_in in blocks of kBlockElements: the group's
// block of adapter rows and the chunk's token rows stay close (L1/L2) while every 4x4 tile
// of the chunk uses them. Each lane sums along H_in in order, then the 16 lanes reduce in a fixed
// order: deterministic.
template <DType kX, DType kA>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void shrink_rows(
    const void* const* x_rows, int count, const void* a_slot, int64_t a_rank_stride, int64_t rank,
    int64_t h_in, float scale, float* const* v_rows) {
  const int64_t a_row_bytes = a_rank_stride * (kA == DType::kFloat32 ? 4 : 2);
  const char* a_bytes = static_cast<const char*>(a_slot);
  __m512 partial[kSimdShrinkChunk][kSuperRanks];
  for (int64_t group = 0; group < rank; group += kSuperRanks) {
    const int64_t group_ranks = rank - group < kSuperRanks ? rank - group : kSuperRanks;
    for (int r = 0; r < count; ++r)
      for (int k = 0; k < kSuperRanks; ++k) partial[r][k] = _mm512_setzero_ps();
    for (int64_t i0 = 0; i0 < h_in; i0 += kBlockElements) {
      const int64_t i1 = i0 + kBlockElements < h_in ? i0 + kBlockElements : h_in;
      for (int t = 0; t < count; t += 4) {
        const int rows = count - t < 4 ? count - t : 4;
        for (int64_t k = 0; k < group_ranks; k += 4) {
          const char* a_first = a_bytes + (group + k) * a_row_bytes;
          const int64_t ranks = group_ranks - k < 4 ? group_ranks - k : 4;
          auto* tile_partial = reinterpret_cast<__m512(*)[kSuperRanks]>(&partial[t][k]);
          switch (rows) {
            case 4:
              shrink_tile_any_ranks<kX, kA, 4>(x_rows + t, a_first, a_row_bytes, i0, i1, ranks,
                                               tile_partial);
              break;
            case 3:
              shrink_tile_any_ranks<kX, kA, 3>(x_rows + t, a_first, a_row_bytes, i0, i1, ranks,
                                               tile_partial);
              break;
            case 2:
              shrink_tile_any_ranks<kX, kA, 2>(x_rows + t, a_first, a_row_bytes, i0, i1, ranks,
                                               tile_partial);
              break;
            default:
              shrink_tile_any_ranks<kX, kA, 1>(x_rows + t, a_first, a_row_bytes, i0, i1, ranks,
                                               tile_partial);
              break;
          }
        }
      }
    }
    for (int r = 0; r < count; ++r)
      for (int64_t k = 0; k < group_ranks; ++k)
        v_rows[r][group + k] = scale * _mm512_reduce_add_ps(partial[r][k]);
  }
}

template <class Format>
using FormatBits = typename Format::Bits;

// One block of up to 64 outputs of kRows token rows: acc[r][j] covers outputs o + 16j, and
// starts from the slot's bias (a bottleneck adapter's) when there is one.
template <class YFormat, int kRows>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void expand_block(
    void* const* y_rows, const float* const* v_rows, const float* packed, int64_t packed_stride,
    int64_t rank, int64_t o, int64_t width, const float* bias) {
  constexpr int kVectors = 4;
  __mmask16 masks[kVectors];
  for (int j = 0; j < kVectors; ++j) {
    const int64_t left = width - 16 * j;
    masks[j] = left >= 16 ? static_cast<__mmask16>(0xffff)
                          : static_cast<__mmask16>(left > 0 ? (1u << left) - 1u : 0u);
  }
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kVectors; ++j) {
      acc[r][j] = bias ? _mm512_maskz_loadu_ps(masks[j], bias + o + 16 * j) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < rank; ++k) {
    __m512 b[kVectors];
    for (int j = 0; j < kVectors; ++j) {
      b[j] = masks[j] ? _mm512_loadu_ps(packed + k * packed_stride + 16 * j) : _mm512_setzero_ps();
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 vk = _mm512_set1_ps(v_rows[r][k]);
      for (int j = 0; j < kVectors; ++j) acc[r][j] = _mm512_fmadd_ps(vk, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    if constexpr (YFormat::kDType == DType::kFloat32) {
      float* y = static_cast<float*>(y_rows[r]) + o;
      for (int j = 0; j < kVectors; ++j) {
        const __m512 current = _mm512_maskz_loadu_ps(masks[j], y + 16 * j);
        _mm512_mask_storeu_ps(y + 16 * j, masks[j], _mm512_add_ps(current, acc[r][j]));
      }
    } else {
      // 16-bit y: round y + sum once, with the scalar routine the kernels share.
      alignas(64) float sums[16 * kVectors];
      for (int j = 0; j < kVectors; ++j) _mm512_store_ps(sums + 16 * j, acc[r][j]);
      auto* y = static_cast<FormatBits<YFormat>*>(y_rows[r]) + o;
      for (int64_t i = 0; i < width; ++i)
        y[i] = YFormat::sum_rounded_once(YFormat::to_float(y[i]), sums[i]);
    }
  }
}

// The item's rows of B ([rank, o_end - o_begin]) are packed once, widened to fp32, for
// every token of the chunk; then output blocks of 64 outer, token tiles of 4 inner.
template <class YFormat, DType kB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void expand_rows(
    void* const* y_rows, const float* const* v_rows, int count, const void* b_slot,
    int64_t b_rank_stride, int64_t rank, int64_t o_begin, int64_t o_end, const float* bias) {
  const int64_t b_row_bytes = b_rank_stride * (kB == DType::kFloat32 ? 4 : 2);
  const int64_t packed_stride = (o_end - o_begin + 15) / 16 * 16;
  thread_local std::vector<float> packed;
  packed.resize(static_cast<size_t>(rank * packed_stride));
  pack_rows<kB>(static_cast<const char*>(b_slot), b_row_bytes, rank, o_begin, o_end, packed.data(),
                packed_stride);
  for (int64_t o = o_begin; o < o_end; o += 64) {
    const int64_t width = o_end - o < 64 ? o_end - o : 64;
    const float* block = packed.data() + (o - o_begin);
    for (int t = 0; t < count; t += 4) {
      switch (count - t < 4 ? count - t : 4) {
        case 4:
          expand_block<YFormat, 4>(y_rows + t, v_rows + t, block, packed_stride, rank, o, width,
                                   bias);
          break;
        case 3:
          expand_block<YFormat, 3>(y_rows + t, v_rows + t, block, packed_stride, rank, o, width,
                                   bias);
          break;
        case 2:
          expand_block<YFormat, 2>(y_rows + t, v_rows + t, block, packed_stride, rank, o, width,
                                   bias);
          break;
        default:
          expand_block<YFormat, 1>(y_rows + t, v_rows + t, block, packed_stride, rank, o, width,
                                   bias);
          break;
      }
    }
  }
}

// ADAPTFUSE_CPU_SIMD=0 turns the vector kernels off (the tests run the portable path so).
bool cpu_has_avx512() {
  static const bool supported =
      !simd_disabled_by_environment() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return supported;
}

#define AF_SHRINK_CASE(X, A)                                                            \
  if (x_dtype == X && a_dtype == A) {                                                   \
    shrink_rows<X, A>(x_rows, count, a_slot, a_rank_stride, rank, h_in, scale, v_rows); \
    return true;                                                                        \
  }

}  // namespace
#endif  // AF_HAVE_X86_SIMD

bool expand_simd_available(DType y_dtype, DType b_dtype) {
#ifdef AF_HAVE_X86_SIMD
  return cpu_has_avx512() && (b_dtype == y_dtype || b_dtype == DType::kFloat32);
#else
  (void)y_dtype;
  (void)b_dtype;
  return false;
#endif
}

bool expand_rows_simd(DType y_dtype, DType b_dtype, void* const* y_rows, const float* const* v_rows,
                      int count, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                      int64_t o_begin, int64_t o_end, const float* bias) {
#ifdef AF_HAVE_X86_SIMD
  if (!expand_simd_available(y_dtype, b_dtype) || count < 1) return false;
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
#else
  return false;
#endif
}

bool shrink_simd_available(DType x_dtype, DType a_dtype) {
#ifdef AF_HAVE_X86_SIMD
  return cpu_has_avx512() && (a_dtype == x_dtype || a_dtype == DType::kFloat32);
#else
  (void)x_dtype;
  (void)a_dtype;
  return false;
#endif
}

bool shrink_rows_simd(DType x_dtype, DType a_dtype, const void* const* x_rows, int count,
                      const void* a_slot, int64_t a_rank_stride, int64_t rank, int64_t h_in,
                      float scale, float* const* v_rows) {
#ifdef AF_HAVE_X86_SIMD
  if (!cpu_has_avx512() || count < 1 || count > kSimdShrinkChunk) return false;
  constexpr DType F32 = DType::kFloat32, F16 = DType::kFloat16, BF16 = DType::kBFloat16;
  AF_SHRINK_CASE(F32, F32)
  AF_SHRINK_CASE(BF16, BF16)
  AF_SHRINK_CASE(F16, F16)
  AF_SHRINK_CASE(BF16, F32)
  AF_SHRINK_CASE(F16, F32)
#endif
  return false;
}

}  // namespace adaptfuse
