// Exhaustive and randomised checks of csrc/kernels/float_formats.cuh, the bit-level
// conversions and the "sum rounded once" that the CPU ops and the CUDA kernels share:
//  - every fp16 and bf16 bit pattern converts to float and back unchanged;
//  - float -> fp16 agrees with the compiler's own _Float16 conversion (round to nearest even)
//    on every pattern of a float grid, and float -> bf16 with an independent rounding;
//  - sum_rounded_once(a, b) equals the single rounding of the exact sum a + b, including exact
//    ties, wherever double holds a + b exactly (checked per case; where it does not, a
//    double-based reference would itself round twice).
#include "kernels/float_formats.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

using namespace adaptfuse;

static int failures = 0;
#define EXPECT(cond, ...)                              \
  do {                                                 \
    if (!(cond) && ++failures <= 20) {                 \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)

static uint16_t half_bits(_Float16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// Reference double -> bf16 rounding (nearest even), for values in bf16's normal range.
static uint16_t bf16_from_double(double value) {
  if (std::isnan(value)) return 0x7fc0;
  int exponent;
  const double mantissa = std::frexp(std::fabs(value), &exponent);  // [0.5, 1)
  const double scaled = std::ldexp(mantissa, 8);                    // 8 significant bits
  double rounded = std::nearbyint(scaled);                          // ties to even
  const double result = std::copysign(std::ldexp(rounded, exponent - 8), value);
  const float as_float = static_cast<float>(result);  // exact
  uint32_t bits;
  std::memcpy(&bits, &as_float, 4);
  return static_cast<uint16_t>(bits >> 16);
}

static bool is_nan_bits16(uint16_t b, uint16_t exponent_mask) {
  return (b & exponent_mask) == exponent_mask && (b & ~(exponent_mask | 0x8000) & 0xffff) != 0;
}

int main() {
  // Every 16-bit pattern round-trips through float.
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const uint16_t half_back = Float16Format::from_float(Float16Format::to_float(bits));
    if (is_nan_bits16(bits, 0x7c00)) {
      EXPECT(is_nan_bits16(half_back, 0x7c00), "fp16 NaN %04x lost", bits);
    } else {
      EXPECT(half_back == bits, "fp16 %04x -> %04x", bits, half_back);
      _Float16 h;
      std::memcpy(&h, &bits, 2);
      EXPECT(Float16Format::to_float(bits) == static_cast<float>(h) ||
                 (std::isnan(static_cast<float>(h))),
             "fp16 %04x to_float", bits);
    }
    const uint16_t bf_back = BFloat16Format::from_float(BFloat16Format::to_float(bits));
    if (is_nan_bits16(bits, 0x7f80)) {
      EXPECT(is_nan_bits16(bf_back, 0x7f80), "bf16 NaN %04x lost", bits);
    } else {
      EXPECT(bf_back == bits, "bf16 %04x -> %04x", bits, bf_back);
    }
  }
  // float -> fp16 and bf16 on a dense grid of float patterns (every 61st pattern).
  for (uint64_t b = 0; b <= 0xffffffffull; b += 61) {
    const float value = bits_as_float(static_cast<uint32_t>(b));
    if (std::isnan(value)) continue;
    EXPECT(Float16Format::from_float(value) == half_bits(static_cast<_Float16>(value)),
           "fp16 from_float(%a) = %04x, compiler %04x", value, Float16Format::from_float(value),
           half_bits(static_cast<_Float16>(value)));
    if (std::fabs(value) >= 1.1754944e-38f && std::fabs(value) < 3.38e38f) {
      EXPECT(BFloat16Format::from_float(value) == bf16_from_double(value),
             "bf16 from_float(%a) = %04x, reference %04x", value, BFloat16Format::from_float(value),
             bf16_from_double(value));
    }
  }
  // A tie in fp32 that the exact sum breaks: delta sits exactly between two bf16 values and a
  // tiny w tips it (double cannot hold this sum; the answer is known by construction).
  {
    const float tie = bits_as_float(0xb68d8000u);  // halfway between bf16 b68d and b68e
    EXPECT(BFloat16Format::sum_rounded_once(0x1p-94f, tie) == 0xb68d, "tie broken toward zero");
    EXPECT(BFloat16Format::sum_rounded_once(-0x1p-94f, tie) == 0xb68e, "tie broken away from zero");
    EXPECT(BFloat16Format::sum_rounded_once(0.0f, tie) == 0xb68e, "a true tie goes to even");
  }
  // sum_rounded_once against the single rounding of the exact sum.
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> half_pattern(0, 0xffff);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> shift(-30, 10);
  int ties = 0;
  for (int i = 0; i < 4000000; ++i) {
    const uint16_t w = static_cast<uint16_t>(half_pattern(rng));
    const float w16 = Float16Format::to_float(w);
    const float wbf = BFloat16Format::to_float(w);
    float delta = std::ldexp(normal(rng), shift(rng));
    if (i % 4 == 0) {  // exact ties: half an ulp of w, in either direction
      int e;
      std::frexp(w16, &e);
      delta = std::ldexp(1.0f, e - 12) * ((i % 8 == 0) ? 1.0f : -1.0f);
      ++ties;
    }
    if (std::isfinite(w16)) {
      const double exact = static_cast<double>(w16) + static_cast<double>(delta);
      if (exact - w16 != delta || exact - delta != w16) continue;  // not exact in double
      const uint16_t expected = half_bits(static_cast<_Float16>(exact));
      const uint16_t actual = Float16Format::sum_rounded_once(w16, delta);
      // -0.0 vs +0.0 when the exact sum is zero: float addition gives +0.0 too.
      EXPECT(actual == expected || (exact == 0.0 && (actual & 0x7fff) == 0),
             "fp16 %a + %a: %04x, expected %04x", w16, delta, actual, expected);
    }
    if (std::isfinite(wbf) && std::fabs(wbf) < 1e30f) {
      const double exact = static_cast<double>(wbf) + static_cast<double>(delta);
      if (std::fabs(exact) > 1.1754944e-38 && exact - wbf == delta && exact - delta == wbf) {
        const uint16_t expected = bf16_from_double(exact);
        const uint16_t actual = BFloat16Format::sum_rounded_once(wbf, delta);
        EXPECT(actual == expected, "bf16 %a + %a: %04x, expected %04x", wbf, delta, actual,
               expected);
      }
    }
  }
  std::printf("float_formats: %s (%d failures, %d tie cases)\n", failures ? "FAILED" : "ok",
              failures, ties);
  return failures ? 1 : 0;
}
