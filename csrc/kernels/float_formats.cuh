// Storage formats of weights and activations (fp32, fp16, bf16) as raw bit patterns, with
// conversions written on the bits so that the host (CPU ops) and the device (CUDA kernels)
// round identically, and a "sum rounded once" that adds an fp32 delta to a stored value
// with a single rounding into the storage format (no double rounding through fp32).
#pragma once

#include "kernels/device.cuh"

namespace adaptfuse {

// Storage dtypes understood by the torch-free kernels; the torch side maps ScalarType here.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

AF_HOST_DEVICE bool is_finite(float value) {
  return (float_as_bits(value) & 0x7f800000u) != 0x7f800000u;
}

// Exact error of an fp32 addition (Knuth's TwoSum): a + b == sum + error exactly.
AF_HOST_DEVICE float two_sum_error(float a, float b, float sum) {
  float b_virtual = add_rn(sum, -a);
  float a_virtual = add_rn(sum, -b_virtual);
  return add_rn(add_rn(a, -a_virtual), add_rn(b, -b_virtual));
}

struct Float32Format {
  using Bits = uint32_t;
  static constexpr DType kDType = DType::kFloat32;
  static AF_HOST_DEVICE float to_float(Bits bits) { return bits_as_float(bits); }
  static AF_HOST_DEVICE Bits from_float(float value) { return float_as_bits(value); }
  static AF_HOST_DEVICE Bits sum_rounded_once(float a, float b) {
    return float_as_bits(add_rn(a, b));
  }
};

// Shared by the two 16-bit formats: round a + b once, where a + b = sum + error exactly.
// Rounding `sum` alone is right unless `sum` sits exactly halfway between two neighbours in
// the 16-bit format; then the sign of `error` says on which side the exact sum lies.
template <class Format>
AF_HOST_DEVICE typename Format::Bits round_two_sum(float sum, float error) {
  using Bits = typename Format::Bits;
  Bits rounded = Format::from_float(sum);
  if (error == 0.0f) return rounded;
  float rounded_value = Format::to_float(rounded);
  if (rounded_value == sum || sum != sum) return rounded;
  const Bits magnitude_mask = static_cast<Bits>(Format::kSignBit - 1);
  const bool rounded_is_inf = (rounded & magnitude_mask) == Format::kInfBits;
  // The neighbour of `rounded` on the side of `sum` (same sign: rounding keeps the sign).
  const bool sum_has_larger_magnitude =
      (sum > 0.0f) ? (sum > rounded_value) : (sum < rounded_value);
  Bits neighbour =
      sum_has_larger_magnitude ? static_cast<Bits>(rounded + 1) : static_cast<Bits>(rounded - 1);
  float neighbour_value = Format::to_float(neighbour);
  float midpoint;
  if (rounded_is_inf) {
    // Overflow: the midpoint between the largest finite value and the next (virtual) step.
    float below = Format::to_float(static_cast<Bits>(neighbour - 1));
    midpoint = add_rn(neighbour_value, mul_rn(add_rn(neighbour_value, -below), 0.5f));
  } else {
    // Neighbours differ by one unit: the difference and its half are exact in fp32.
    midpoint = add_rn(rounded_value, mul_rn(add_rn(neighbour_value, -rounded_value), 0.5f));
  }
  if (sum != midpoint) return rounded;
  // A tie in fp32 that is no tie for the exact sum: pick the side `error` points to.
  const bool exact_above = error > 0.0f;
  const bool rounded_above = rounded_is_inf ? sum > 0.0f : rounded_value > neighbour_value;
  return exact_above == rounded_above ? rounded : neighbour;
}

// a + b rounded once into a 16-bit Format (shared by bf16 and fp16).
template <class Format>
struct SixteenBitSum {
  static AF_HOST_DEVICE uint16_t sum_rounded_once(float a, float b) {
    float sum = add_rn(a, b);
    return round_two_sum<Format>(sum, two_sum_error(a, b, sum));
  }
};

struct BFloat16Format : SixteenBitSum<BFloat16Format> {
  using Bits = uint16_t;
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr Bits kSignBit = 0x8000;
  static constexpr Bits kInfBits = 0x7f80;
  static AF_HOST_DEVICE float to_float(Bits bits) {
    return bits_as_float(static_cast<uint32_t>(bits) << 16);
  }
  // Round to nearest even; NaN stays NaN (quieted, sign and top payload kept).
  static AF_HOST_DEVICE Bits from_float(float value) {
    uint32_t bits = float_as_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<Bits>((bits >> 16) | 0x0040u);
    return static_cast<Bits>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
};

struct Float16Format : SixteenBitSum<Float16Format> {
  using Bits = uint16_t;
  static constexpr DType kDType = DType::kFloat16;
  static constexpr Bits kSignBit = 0x8000;
  static constexpr Bits kInfBits = 0x7c00;
  static AF_HOST_DEVICE float to_float(Bits bits) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t exponent = (bits >> 10) & 0x1fu;
    const uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0x1fu) return bits_as_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) {
      // Subnormal: mantissa * 2^-24, exact in fp32.
      float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
      return sign ? -magnitude : magnitude;
    }
    return bits_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  // Round to nearest even, with subnormals, overflow to inf, and NaN kept NaN.
  static AF_HOST_DEVICE Bits from_float(float value) {
    const uint32_t bits = float_as_bits(value);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) {
      const uint32_t nan_payload =
          magnitude > 0x7f800000u ? (0x200u | ((magnitude >> 13) & 0x3ffu)) : 0u;
      return static_cast<Bits>(sign | 0x7c00u | nan_payload);
    }
    if (magnitude >= 0x477ff000u) return static_cast<Bits>(sign | 0x7c00u);  // >= 65520
    if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal or zero in fp16
      const int exponent = static_cast<int>(magnitude >> 23);
      if (exponent < 102) return static_cast<Bits>(sign);  // below 2^-25 rounds to zero
      const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
      const int shift = 126 - exponent;  // 14..24
      uint32_t quotient = significand >> shift;
      const uint32_t remainder = significand & ((1u << shift) - 1u);
      const uint32_t half = 1u << (shift - 1);
      if (remainder > half || (remainder == half && (quotient & 1u))) ++quotient;
      return static_cast<Bits>(sign | quotient);
    }
    uint32_t rebased = (magnitude - 0x38000000u) >> 13;
    const uint32_t remainder = magnitude & 0x1fffu;
    if (remainder > 0x1000u || (remainder == 0x1000u && (rebased & 1u))) ++rebased;
    return static_cast<Bits>(sign | rebased);
  }
};

}  // namespace adaptfuse
