// The one home of everything that differs between the device and the host: inline PTX,
// vector loads and stores, warp collectives and exactly-rounded float arithmetic.
// Kernel sources use these helpers and never test __CUDA_ARCH__ themselves, so the same
// sources also compile as plain C++ (the CPU merge shares its arithmetic with the kernels,
// and csrc/emu supplies emulated twins of the warp-level primitives).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define AF_HOST_DEVICE __host__ __device__ __forceinline__
#define AF_DEVICE __device__ __forceinline__
#else
#define AF_HOST_DEVICE inline
#define AF_DEVICE inline
#endif

namespace adaptfuse {

AF_HOST_DEVICE float bits_as_float(uint32_t bits) {
  float value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

AF_HOST_DEVICE uint32_t float_as_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// Correctly rounded add and multiply that no compiler may contract into an FMA: merge and
// unmerge must compute bit-identical deltas on every backend. Host builds use
// -ffp-contract=off; on the device the _rn intrinsics are never contracted.
AF_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

AF_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

#if defined(__CUDACC__)

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane gets the total. The butterfly order is
// fixed, so the result is deterministic.
AF_DEVICE float warp_sum(float value) {
#pragma unroll
  for (int lane_offset = 16; lane_offset > 0; lane_offset >>= 1) {
    value += __shfl_xor_sync(kFullWarpMask, value, lane_offset);
  }
  return value;
}

AF_DEVICE int warp_sum(int value) {
#pragma unroll
  for (int lane_offset = 16; lane_offset > 0; lane_offset >>= 1) {
    value += __shfl_xor_sync(kFullWarpMask, value, lane_offset);
  }
  return value;
}

AF_DEVICE unsigned warp_ballot(bool predicate) { return __ballot_sync(kFullWarpMask, predicate); }

AF_DEVICE int popcount(unsigned bits) { return __popc(bits); }

#endif  // __CUDACC__

}  // namespace adaptfuse
