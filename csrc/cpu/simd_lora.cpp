// Picks the vector kernels for the running CPU: AVX-512 where it has it, else AVX2 + FMA,
// else none (callers use portable loops). ADAPTFUSE_CPU_SIMD overrides the choice: "0" turns
// the vector kernels off, "avx2" caps them at AVX2 (so that an AVX-512 machine tests both).
#include "cpu/simd_lora.h"

#include <cstdlib>
#include <cstring>

#include "cpu/simd_lora_isa.h"
#include "kernels/dispatch.h"

namespace adaptfuse {
namespace {

SimdLevel detect_simd_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* flag = std::getenv("ADAPTFUSE_CPU_SIMD");
  if (flag != nullptr && std::strcmp(flag, "0") == 0) return SimdLevel::kNone;
  const bool capped_at_avx2 = flag != nullptr && std::strcmp(flag, "avx2") == 0;
  __builtin_cpu_init();
  if (!capped_at_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return SimdLevel::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return SimdLevel::kAvx2;
  }
#endif
  return SimdLevel::kNone;
}

bool supported_pair(DType activations, DType weights) {
  return weights == activations || weights == DType::kFloat32;
}

}  // namespace

SimdLevel simd_level() {
  static const SimdLevel level = detect_simd_level();
  return level;
}

const char* simd_level_name() {
  switch (simd_level()) {
    case SimdLevel::kAvx512:
      return "avx512";
    case SimdLevel::kAvx2:
      return "avx2";
    default:
      return "none";
  }
}

bool shrink_simd_available(DType x_dtype, DType a_dtype) {
  return simd_level() != SimdLevel::kNone && supported_pair(x_dtype, a_dtype);
}

bool expand_simd_available(DType y_dtype, DType b_dtype) {
  return simd_level() != SimdLevel::kNone && supported_pair(y_dtype, b_dtype);
}

bool shrink_rows_simd(DType x_dtype, DType a_dtype, const void* const* x_rows, int count,
                      const void* a_slot, int64_t a_rank_stride, int64_t rank, int64_t h_in,
                      float scale, float* const* v_rows) {
  if (count < 1 || count > kSimdShrinkChunk) return false;
  switch (simd_level()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case SimdLevel::kAvx512:
      return avx512::shrink_rows_any(x_dtype, a_dtype, x_rows, count, a_slot, a_rank_stride, rank,
                                     h_in, scale, v_rows);
    case SimdLevel::kAvx2:
      return avx2::shrink_rows_any(x_dtype, a_dtype, x_rows, count, a_slot, a_rank_stride, rank,
                                   h_in, scale, v_rows);
#endif
    default:
      return false;
  }
}

int64_t shrink_panel_floats(int64_t rank, int64_t h_in) {
  return (rank + kShrinkPanelRanks - 1) / kShrinkPanelRanks * kShrinkPanelRanks * h_in;
}

void pack_shrink_panels(DType a_dtype, const void* a_slot, int64_t a_rank_stride, int64_t rank,
                        int64_t h_in, float* panels) {
  AF_FORMAT_SWITCH(a_dtype, AFormat, {
    const auto* a = static_cast<const typename AFormat::Bits*>(a_slot);
    for (int64_t group = 0; group < rank; group += kShrinkPanelRanks) {
      float* panel = panels + group * h_in;
      for (int64_t j = 0; j < kShrinkPanelRanks; ++j) {
        const int64_t k = group + j;
        const auto* row = a + k * a_rank_stride;
        for (int64_t i = 0; i < h_in; ++i) {
          panel[i * kShrinkPanelRanks + j] = k < rank ? AFormat::to_float(row[i]) : 0.0f;
        }
      }
    }
  });
}

bool shrink_rows_panel(DType x_dtype, const void* const* x_rows, int count, const float* panels,
                       int64_t rank, int64_t h_in, float scale, float* const* v_rows) {
  if (count < 1 || count > kSimdPanelChunk) return false;
  switch (simd_level()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case SimdLevel::kAvx512:
      return avx512::shrink_panel_rows_any(x_dtype, x_rows, count, panels, rank, h_in, scale,
                                           v_rows);
    case SimdLevel::kAvx2:
      return avx2::shrink_panel_rows_any(x_dtype, x_rows, count, panels, rank, h_in, scale, v_rows);
#endif
    default:
      return false;
  }
}

int64_t expand_packed_stride(int64_t h_out) {
  // Whole 16-float vectors; a stride of a multiple of 4 KB would put every rank row of a
  // column block into the same L1 sets, so such strides get one more vector.
  const int64_t stride = (h_out + 15) / 16 * 16;
  return stride % 1024 == 0 ? stride + 16 : stride;
}

void pack_expand_rows(DType b_dtype, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                      int64_t h_out, float* packed, int64_t packed_stride) {
  AF_FORMAT_SWITCH(b_dtype, BFormat, {
    const auto* b = static_cast<const typename BFormat::Bits*>(b_slot);
    for (int64_t k = 0; k < rank; ++k) {
      const auto* row = b + k * b_rank_stride;
      float* out = packed + k * packed_stride;
      for (int64_t o = 0; o < h_out; ++o) out[o] = BFormat::to_float(row[o]);
      for (int64_t o = h_out; o < packed_stride; ++o) out[o] = 0.0f;
    }
  });
}

bool expand_packed_rows_simd(DType y_dtype, void* const* y_rows, const float* const* v_rows,
                             int count, const float* packed_first, int64_t packed_stride,
                             int64_t rank, int64_t o_begin, int64_t o_end, const float* bias) {
  if (count < 1) return false;
  switch (simd_level()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case SimdLevel::kAvx512:
      return avx512::expand_packed_rows_any(y_dtype, y_rows, v_rows, count, packed_first,
                                            packed_stride, rank, o_begin, o_end, bias);
    case SimdLevel::kAvx2:
      return avx2::expand_packed_rows_any(y_dtype, y_rows, v_rows, count, packed_first,
                                          packed_stride, rank, o_begin, o_end, bias);
#endif
    default:
      return false;
  }
}

bool expand_rows_simd(DType y_dtype, DType b_dtype, void* const* y_rows, const float* const* v_rows,
                      int count, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                      int64_t o_begin, int64_t o_end, const float* bias) {
  if (count < 1) return false;
  switch (simd_level()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case SimdLevel::kAvx512:
      return avx512::expand_rows_any(y_dtype, b_dtype, y_rows, v_rows, count, b_slot, b_rank_stride,
                                     rank, o_begin, o_end, bias);
    case SimdLevel::kAvx2:
      return avx2::expand_rows_any(y_dtype, b_dtype, y_rows, v_rows, count, b_slot, b_rank_stride,
                                   rank, o_begin, o_end, bias);
#endif
    default:
      return false;
  }
}

}  // namespace adaptfuse
