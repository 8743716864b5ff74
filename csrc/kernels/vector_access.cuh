// Eight elements of any storage format at once, as fp32: one 16-byte access for the 16-bit
// formats, two for fp32. Every vector access goes through device.cuh's load/store_global_16,
// so the emulator checks the alignment of each one.
#pragma once

#include "kernels/device.cuh"
#include "kernels/float_formats.cuh"

namespace adaptfuse {

constexpr int kGroupElements = 8;

#if defined(AF_KERNEL_CODE)

template <class Format>
struct Group8 {
  using Bits = typename Format::Bits;
  static constexpr int kAccesses = static_cast<int>(kGroupElements * sizeof(Bits)) / 16;

  // The group's address must be 16-byte aligned.
  static AF_DEVICE void load(const Bits* address, float (&out)[kGroupElements]) {
    Bits bits[kGroupElements];
    AF_UNROLL
    for (int access = 0; access < kAccesses; ++access) {
      const uint4 raw = load_global_16(address + access * (16 / sizeof(Bits)));
      memcpy(bits + access * (16 / sizeof(Bits)), &raw, 16);
    }
    AF_UNROLL
    for (int j = 0; j < kGroupElements; ++j) out[j] = Format::to_float(bits[j]);
  }

  static AF_DEVICE void load_bits(const Bits* address, Bits (&bits)[kGroupElements]) {
    AF_UNROLL
    for (int access = 0; access < kAccesses; ++access) {
      const uint4 raw = load_global_16(address + access * (16 / sizeof(Bits)));
      memcpy(bits + access * (16 / sizeof(Bits)), &raw, 16);
    }
  }

  static AF_DEVICE void store_bits(Bits* address, const Bits (&bits)[kGroupElements]) {
    AF_UNROLL
    for (int access = 0; access < kAccesses; ++access) {
      uint4 raw;
      memcpy(&raw, bits + access * (16 / sizeof(Bits)), 16);
      store_global_16(address + access * (16 / sizeof(Bits)), raw);
    }
  }
};

// Whether a pointer and every row stride (in elements) keep 8-element groups 16-byte aligned.
template <class Format>
AF_HOST_DEVICE bool groups_aligned(const void* base, int64_t stride_a, int64_t stride_b = 0) {
  constexpr int64_t kPerVector = 16 / sizeof(typename Format::Bits);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride_a % kPerVector == 0 &&
         stride_b % kPerVector == 0;
}

#endif  // AF_KERNEL_CODE

}  // namespace adaptfuse
