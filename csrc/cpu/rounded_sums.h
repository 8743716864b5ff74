// a + b rounded once into a storage format, for whole rows: a vectorisable pass that is exact
// in the common case and flags the rest for Format::sum_rounded_once (shared by merge_ and the
// vector expand's 16-bit outputs).
#pragma once

#include <stdint.h>

#include "kernels/float_formats.cuh"

namespace adaptfuse {

// Whether the sum's conversion needs more than common_from_float: fp16 below its normals or
// from its largest finite value up (overflow, inf, NaN); bf16 NaN.
template <class Format>
inline bool may_leave_common_range(float sum) {
  const uint32_t magnitude = float_as_bits(sum) & 0x7fffffffu;
  if constexpr (Format::kDType == DType::kFloat16) {
    return (magnitude < 0x38800000u) | (magnitude >= 0x477fe000u);
  } else {
    return magnitude > 0x7f800000u;
  }
}

// Whether a 16-bit rounding of the fp32 sum may be a tie that the exact sum does not share
// (then only the full round_two_sum is right): a superset of the exact condition, cheap and
// branch-free. bf16 keeps the top 16 bits; fp16 normals keep 13 fewer mantissa bits, and its
// subnormal and overflow ranges are always sent to the exact function.
template <class Format>
inline bool may_be_false_tie(float sum) {
  const uint32_t magnitude = float_as_bits(sum) & 0x7fffffffu;
  if constexpr (Format::kDType == DType::kBFloat16) {
    return (magnitude & 0xffffu) == 0x8000u;
  } else {
    return (magnitude & 0x1fffu) == 0x1000u || magnitude < 0x38800000u || magnitude >= 0x477fe000u;
  }
}

// The common case of the 16-bit conversions without branches (so the loop vectorises), and
// whether a value is outside it: fp16 normals only; bf16 shares fp32's range and converts
// without branches except for NaN, which the caller's flags send to the exact path.
template <class Format>
inline float common_to_float(typename Format::Bits bits) {
  if constexpr (Format::kDType == DType::kFloat16) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    return bits_as_float(sign | (((bits & 0x7fffu) + 0x1c000u) << 13));  // exponent + 112
  } else {
    return Format::to_float(bits);
  }
}
template <class Format>
inline bool outside_common_range(typename Format::Bits bits) {
  if constexpr (Format::kDType == DType::kFloat16) {
    const uint32_t exponent = (bits >> 10) & 0x1fu;
    return exponent == 0 || exponent == 0x1fu;
  } else {
    return (bits & 0x7fffu) > 0x7f80u;  // NaN
  }
}
template <class Format>
inline typename Format::Bits common_from_float(float value) {
  if constexpr (Format::kDType == DType::kFloat16) {
    const uint32_t bits = float_as_bits(value);
    const uint32_t magnitude = bits & 0x7fffffffu;
    uint32_t rebased = (magnitude - 0x38000000u) >> 13;
    const uint32_t remainder = magnitude & 0x1fffu;
    rebased += (remainder > 0x1000u) | ((remainder == 0x1000u) & rebased);
    return static_cast<typename Format::Bits>(((bits >> 16) & 0x8000u) | (rebased & 0x7fffu));
  } else {
    return Format::from_float(value);
  }
}

// out[j] = in[j] + sign * delta[j] rounded once into Format: the same bits as
// Format::sum_rounded_once. For 16-bit formats a vectorisable pass handles the common case
// and flags the rest (possible false ties, values outside the branch-free conversions), which
// a second pass recomputes with the exact function. flags: scratch of `length` bytes; out
// must not overlap in (the second pass reads in again).
template <class Format>
void rounded_sums(const typename Format::Bits* in, int64_t in_stride, const float* delta,
                  float sign, int64_t length, typename Format::Bits* out, uint8_t* flags) {
  if constexpr (sizeof(typename Format::Bits) == 4) {
    for (int64_t j = 0; j < length; ++j) {
      out[j] = Format::sum_rounded_once(Format::to_float(in[j * in_stride]), sign * delta[j]);
    }
  } else {
    for (int64_t j = 0; j < length; ++j) {
      const typename Format::Bits bits = in[j * in_stride];
      const float a = common_to_float<Format>(bits);
      const float b = sign * delta[j];
      const float sum = add_rn(a, b);
      out[j] = common_from_float<Format>(sum);
      flags[j] = outside_common_range<Format>(bits) | (b != b) |
                 ((two_sum_error(a, b, sum) != 0.0f) & may_be_false_tie<Format>(sum)) |
                 may_leave_common_range<Format>(sum);
    }
    for (int64_t j = 0; j < length; ++j) {
      if (flags[j]) {
        out[j] = Format::sum_rounded_once(Format::to_float(in[j * in_stride]), sign * delta[j]);
      }
    }
  }
}

}  // namespace adaptfuse
