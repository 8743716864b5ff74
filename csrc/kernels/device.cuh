// The one home of everything that differs between the device and the host: inline PTX,
// vector loads and stores, warp collectives and exactly-rounded float arithmetic.
// Kernel sources use these helpers and never test __CUDA_ARCH__ themselves, so the same
// sources also compile as plain C++ (the CPU merge shares its arithmetic with the kernels,
// and csrc/emu supplies emulated twins of the warp-level primitives).
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(ADAPTFUSE_EMU)
#include "emu/emu.h"  // the emulator supplies the CUDA vocabulary on the host
#define AF_HOST_DEVICE inline
#define AF_DEVICE inline
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#define AF_HOST_DEVICE __host__ __device__ __forceinline__
#define AF_DEVICE __device__ __forceinline__
#else
#define AF_HOST_DEVICE inline
#define AF_DEVICE inline
#endif

#if defined(__CUDACC__) || defined(ADAPTFUSE_EMU)
#define AF_KERNEL_CODE 1  // kernels and warp-level primitives are available
#endif

#if defined(__CUDACC__)
#define AF_UNROLL _Pragma("unroll")
#else
#define AF_UNROLL
#endif

// Launches go through AF_LAUNCH ("<<<>>>" does not compile under g++):
//   AF_LAUNCH("name", kernel, grid, block, dynamic_shared_bytes, stream, args...)
// returns cudaError_t. Static shared memory goes through AF_SHARED (arrays through a type
// alias or AF_SHARED_ARRAY), dynamic shared memory through AF_DYNAMIC_SHARED, so that the
// emulator gives each block its own poisoned storage.
#if defined(ADAPTFUSE_EMU)
#define AF_LAUNCH(...) ::adaptfuse::launch_kernel(__FILE__, __LINE__, __VA_ARGS__)
#define AF_SHARED(type, name)                                                        \
  static const char af_shared_site_##name = 0;                                       \
  type& name = *static_cast<type*>(                                                  \
      ::adaptfuse_emu::shared_storage(&af_shared_site_##name, sizeof(type), alignof(type)))
#define AF_SHARED_ARRAY(type, name, count)                                           \
  static const char af_shared_site_##name = 0;                                       \
  type(&name)[count] = *static_cast<type(*)[count]>(::adaptfuse_emu::shared_storage( \
      &af_shared_site_##name, sizeof(type[count]), alignof(type)))
#define AF_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::adaptfuse_emu::dynamic_shared_storage())
#elif defined(__CUDACC__)
#define AF_LAUNCH(...) ::adaptfuse::launch_kernel(__FILE__, __LINE__, __VA_ARGS__)
#define AF_SHARED(type, name) __shared__ type name
#define AF_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define AF_DYNAMIC_SHARED(type, name)                         \
  extern __shared__ __align__(16) unsigned char af_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(af_dynamic_shared)
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

#if defined(AF_KERNEL_CODE)

#if defined(ADAPTFUSE_EMU)
template <class... Params, class... Args>
cudaError_t launch_kernel(const char* file, int line, const char* name, void (*kernel)(Params...),
                          dim3 grid, dim3 block, size_t dynamic_shared_bytes, cudaStream_t,
                          Args... args) {
  ::adaptfuse_emu::launch(name, file, line, grid, block, dynamic_shared_bytes,
                          [&]() { kernel(args...); });
  return cudaSuccess;
}
#else
template <class... Params, class... Args>
cudaError_t launch_kernel(const char*, int, const char*, void (*kernel)(Params...), dim3 grid,
                          dim3 block, size_t dynamic_shared_bytes, cudaStream_t stream,
                          Args... args) {
  kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...);
  return cudaGetLastError();
}
#endif

constexpr unsigned kFullWarpMask = 0xffffffffu;

// Sum over the 32 lanes of a warp; every lane gets the total. The butterfly order is
// fixed, so the result is deterministic.
AF_DEVICE float warp_sum(float value) {
AF_UNROLL
  for (int lane_offset = 16; lane_offset > 0; lane_offset >>= 1) {
    value += __shfl_xor_sync(kFullWarpMask, value, lane_offset);
  }
  return value;
}

AF_DEVICE int warp_sum(int value) {
AF_UNROLL
  for (int lane_offset = 16; lane_offset > 0; lane_offset >>= 1) {
    value += __shfl_xor_sync(kFullWarpMask, value, lane_offset);
  }
  return value;
}

AF_DEVICE unsigned warp_ballot(bool predicate) { return __ballot_sync(kFullWarpMask, predicate); }

// 16-byte global load and store (LDG.128/STG.128). The address must be 16-byte aligned; the
// emulated twin checks it and reports the kernel, thread and line of a misaligned access.
#if defined(ADAPTFUSE_EMU)
// The twins take the caller's location (GCC builtins) so that a fault names the kernel's line.
AF_DEVICE uint4 load_global_16(const void* address, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  ::adaptfuse_emu::check_alignment(address, 16, "16-byte global load", file, line);
  return *static_cast<const uint4*>(address);
}

AF_DEVICE void store_global_16(void* address, uint4 value, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  ::adaptfuse_emu::check_alignment(address, 16, "16-byte global store", file, line);
  *static_cast<uint4*>(address) = value;
}
#else
AF_DEVICE uint4 load_global_16(const void* address) { return *static_cast<const uint4*>(address); }

AF_DEVICE void store_global_16(void* address, uint4 value) { *static_cast<uint4*>(address) = value; }
#endif

AF_DEVICE int popcount(unsigned bits) { return __popc(bits); }

#endif  // AF_KERNEL_CODE

}  // namespace adaptfuse
