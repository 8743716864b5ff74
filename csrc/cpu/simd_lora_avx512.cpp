// AVX-512 instantiation of the vector kernels (simd_lora_kernels.h): 16 lanes, 32 registers,
// so 4x4 register tiles (16 accumulators) for both shrink and expand.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/rounded_sums.h"
#include "cpu/simd_lora.h"
#include "cpu/simd_lora_isa.h"
#include "kernels/dispatch.h"

namespace adaptfuse {
namespace avx512 {

#define AF_SIMD_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))
#define AF_SIMD_INLINE AF_SIMD_TARGET __attribute__((always_inline)) static inline

struct Isa {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kShrinkRows = 4, kShrinkRanks = 4;
  static constexpr int kExpandRows = 4, kExpandVectors = 4;
  static constexpr int kShrinkPanelRows = 12;  // 12 accumulators + 1 panel vector + 1 token

  static __mmask16 first(int count) {
    return count >= 16 ? static_cast<__mmask16>(0xffff)
                       : static_cast<__mmask16>((1u << count) - 1u);
  }
  AF_SIMD_INLINE V zero() { return _mm512_setzero_ps(); }
  AF_SIMD_INLINE V broadcast(float value) { return _mm512_set1_ps(value); }
  AF_SIMD_INLINE V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  AF_SIMD_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  AF_SIMD_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  AF_SIMD_INLINE void store(float* out, V value) { _mm512_storeu_ps(out, value); }
  AF_SIMD_INLINE float reduce(V value) { return _mm512_reduce_add_ps(value); }
  AF_SIMD_INLINE V widen16(__m256i raw, DType dtype) {
    if (dtype == DType::kFloat16) return _mm512_cvtph_ps(raw);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  template <DType kDType>
  AF_SIMD_INLINE V load(const void* base, int64_t index) {
    if constexpr (kDType == DType::kFloat32) {
      return _mm512_loadu_ps(static_cast<const float*>(base) + index);
    } else {
      return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                         static_cast<const uint16_t*>(base) + index)),
                     kDType);
    }
  }
  template <DType kDType>
  AF_SIMD_INLINE V load_partial(const void* base, int64_t index, int count) {
    const __mmask16 mask = first(count);
    if constexpr (kDType == DType::kFloat32) {
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + index);
    } else {
      return widen16(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + index),
                     kDType);
    }
  }
  AF_SIMD_INLINE V load_partial_fp32(const float* data, int count) {
    return _mm512_maskz_loadu_ps(first(count), data);
  }
  AF_SIMD_INLINE void store_partial_fp32(float* data, V value, int count) {
    _mm512_mask_storeu_ps(data, first(count), value);
  }
};

#include "cpu/simd_lora_kernels.h"

}  // namespace avx512
}  // namespace adaptfuse
#endif  // x86-64
