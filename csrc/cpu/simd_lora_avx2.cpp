// AVX2 + FMA instantiation of the vector kernels (simd_lora_kernels.h), for x86 CPUs without
// AVX-512 (AMD before Zen 4, many Intel client parts): 8 lanes and 16 registers, so smaller
// register tiles than AVX-512's (accumulators + adapter vectors + one token vector <= 16).
// fp16 needs F16C, which every AVX2 CPU has.
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
namespace avx2 {

#define AF_SIMD_TARGET __attribute__((target("avx2,fma,f16c")))
#define AF_SIMD_INLINE AF_SIMD_TARGET __attribute__((always_inline)) static inline

struct Isa {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kShrinkRows = 2, kShrinkRanks = 4;    // 8 accumulators + 4 A vectors
  static constexpr int kExpandRows = 4, kExpandVectors = 2;  // 8 accumulators + 2 B vectors
  static constexpr int kShrinkPanelRows = 6;  // 12 accumulators + 2 panel vectors + 1 token

  AF_SIMD_INLINE V zero() { return _mm256_setzero_ps(); }
  AF_SIMD_INLINE V broadcast(float value) { return _mm256_set1_ps(value); }
  AF_SIMD_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  AF_SIMD_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  AF_SIMD_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  AF_SIMD_INLINE void store(float* out, V value) { _mm256_storeu_ps(out, value); }
  // Lanes (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1: a fixed order.
  AF_SIMD_INLINE float reduce(V value) {
    const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(value), _mm256_extractf128_ps(value, 1));
    const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
  }
  template <DType kDType>
  AF_SIMD_INLINE V widen16(__m128i raw) {
    if constexpr (kDType == DType::kFloat16) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  template <DType kDType>
  AF_SIMD_INLINE V load(const void* base, int64_t index) {
    if constexpr (kDType == DType::kFloat32) {
      return _mm256_loadu_ps(static_cast<const float*>(base) + index);
    } else {
      return widen16<kDType>(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + index)));
    }
  }
  AF_SIMD_INLINE __m256i first(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  AF_SIMD_INLINE V load_partial_fp32(const float* data, int count) {
    return _mm256_maskload_ps(data, first(count));
  }
  AF_SIMD_INLINE void store_partial_fp32(float* data, V value, int count) {
    _mm256_maskstore_ps(data, first(count), value);
  }
  template <DType kDType>
  AF_SIMD_INLINE V load_partial(const void* base, int64_t index, int count) {
    if constexpr (kDType == DType::kFloat32) {
      return load_partial_fp32(static_cast<const float*>(base) + index, count);
    } else {
      // No 16-bit masked load before AVX-512: copy the tail into a zeroed vector's worth.
      uint16_t tail[8] = {};
      std::memcpy(tail, static_cast<const uint16_t*>(base) + index, count * sizeof(uint16_t));
      return widen16<kDType>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tail)));
    }
  }
};

#include "cpu/simd_lora_kernels.h"

}  // namespace avx2
}  // namespace adaptfuse
#endif  // x86-64
