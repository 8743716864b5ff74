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
// alias or AF_SHARED_ARRAY; AF_SHARED_ALIGNED for the 16-byte alignment of vector, ldmatrix
// and cp.async accesses), dynamic shared memory through AF_DYNAMIC_SHARED, so that the
// emulator gives each block its own poisoned storage.
#if defined(ADAPTFUSE_EMU)
#define AF_LAUNCH(...) ::adaptfuse::launch_kernel(__FILE__, __LINE__, __VA_ARGS__)
#define AF_SHARED(type, name)                  \
  static const char af_shared_site_##name = 0; \
  type& name = *static_cast<type*>(            \
      ::adaptfuse_emu::shared_storage(&af_shared_site_##name, sizeof(type), alignof(type)))
#define AF_SHARED_ALIGNED(type, name, alignment) \
  static const char af_shared_site_##name = 0;   \
  type& name = *static_cast<type*>(              \
      ::adaptfuse_emu::shared_storage(&af_shared_site_##name, sizeof(type), alignment))
#define AF_SHARED_ARRAY(type, name, count)           \
  static const char af_shared_site_##name = 0;       \
  type(&name)[count] = *static_cast<type(*)[count]>( \
      ::adaptfuse_emu::shared_storage(&af_shared_site_##name, sizeof(type[count]), alignof(type)))
#define AF_DYNAMIC_SHARED(type, name) \
  type* name = static_cast<type*>(::adaptfuse_emu::dynamic_shared_storage())
#elif defined(__CUDACC__)
#define AF_LAUNCH(...) ::adaptfuse::launch_kernel(__FILE__, __LINE__, __VA_ARGS__)
#define AF_SHARED(type, name) __shared__ type name
#define AF_SHARED_ALIGNED(type, name, alignment) \
  __shared__ __align__(alignment)                \
  type name
#define AF_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define AF_DYNAMIC_SHARED(type, name)                                \
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
  // clang-format does not know CUDA's launch syntax in .cuh files.
  // clang-format off
  kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...);
  // clang-format on
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

AF_DEVICE void store_global_16(void* address, uint4 value) {
  *static_cast<uint4*>(address) = value;
}
#endif

AF_DEVICE int popcount(unsigned bits) { return __popc(bits); }

// ---- Tensor cores and asynchronous copies (sm_80+) ----------------------------------------
// Fragment layouts are the PTX ISA's for mma.m16n8k16 with 16-bit inputs and fp32 results;
// with groupID = lane / 4 and t = lane % 4 (element pairs packed low half first):
//   A (16x16, row-major), registers a[0..3] hold elements i = 0..7:
//       row = groupID + 8 * ((i / 2) % 2), col = 2 * t + (i % 2) + 8 * (i / 4)
//   B (16x8, K x N), registers b[0..1] hold elements i = 0..3:
//       row = 2 * t + (i % 2) + 8 * (i / 2), col = groupID
//   C, D (16x8 fp32) c[0..3]:  row = groupID + 8 * (i / 2), col = 2 * t + (i % 2)

// D = A * B + C on the tensor cores; Format is BFloat16Format or Float16Format.
template <class Format>
AF_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                            const float (&c)[4]
#if defined(ADAPTFUSE_EMU)
                            ,
                            const char* file = __builtin_FILE(), int line = __builtin_LINE()
#endif
) {
#if defined(ADAPTFUSE_EMU)
  // The twin gathers all 32 lanes' fragments, rebuilds A, B and C, and returns this lane's
  // part of D, summed in fp32 in k order (the hardware's order inside the MMA is undocumented).
  struct Fragments {
    uint32_t a[4], b[2];
    float c[4];
  } mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  const unsigned char* all = ::adaptfuse_emu::warp_exchange_bytes(
      kFullWarpMask, &mine, sizeof(mine), "mma.sync", file, line);
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    Fragments f;
    memcpy(&f, all + lane * ::adaptfuse_emu::kExchangeBytes, sizeof(f));
    const int group = lane / 4, t = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const uint16_t bits = static_cast<uint16_t>(f.a[i / 2] >> (16 * (i % 2)));
      A[group + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = Format::to_float(bits);
    }
    for (int i = 0; i < 4; ++i) {
      const uint16_t bits = static_cast<uint16_t>(f.b[i / 2] >> (16 * (i % 2)));
      B[2 * t + (i % 2) + 8 * (i / 2)][group] = Format::to_float(bits);
      C[group + 8 * (i / 2)][2 * t + (i % 2)] = f.c[i];
    }
  }
  const int lane = ::adaptfuse_emu::lane_id(), group = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = group + 8 * (i / 2), col = 2 * t + (i % 2);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] = C[row][col] + sum;
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // (spelled through decltype: device.cuh comes before float_formats.cuh defines DType)
  if constexpr (Format::kDType == decltype(Format::kDType)::kBFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
#elif defined(__CUDA_ARCH__)
  static_assert(sizeof(Format) == 0, "mma_m16n8k16 needs sm_80 or newer");
#endif  // (the host pass of nvcc sees no body)
}

// ldmatrix.m8n8.x{1,2,4}[.trans].b16 from shared memory: lanes 8m..8m+7 pass the addresses
// (16-byte aligned) of the 8 rows of matrix m; register m of lane l receives row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m (of its transpose with kTranspose).
template <int kMatrices, bool kTranspose>
AF_DEVICE void ldmatrix(uint32_t (&r)[kMatrices], const void* row_address
#if defined(ADAPTFUSE_EMU)
                        ,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()
#endif
) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4,
                "ldmatrix loads 1, 2 or 4 matrices");
#if defined(ADAPTFUSE_EMU)
  const int lane = ::adaptfuse_emu::lane_id();
  if (lane < 8 * kMatrices)
    ::adaptfuse_emu::check_alignment(row_address, 16, "ldmatrix row address", file, line);
  const uint64_t* rows = ::adaptfuse_emu::warp_exchange(
      kFullWarpMask, reinterpret_cast<uintptr_t>(row_address), "ldmatrix", file, line);
  for (int m = 0; m < kMatrices; ++m) {
    uint32_t packed = 0;
    for (int j = 0; j < 2; ++j) {
      const int row = kTranspose ? 2 * (lane % 4) + j : lane / 4;
      const int col = kTranspose ? lane / 4 : 2 * (lane % 4) + j;
      uint16_t element;
      memcpy(&element, reinterpret_cast<const uint16_t*>(rows[8 * m + row]) + col, 2);
      packed |= static_cast<uint32_t>(element) << (16 * j);
    }
    r[m] = packed;
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (kMatrices == 1) {
    if constexpr (kTranspose) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                   : "=r"(r[0])
                   : "r"(address));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                   : "=r"(r[0])
                   : "r"(address));
    }
  } else if constexpr (kMatrices == 2) {
    if constexpr (kTranspose) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(address));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(address));
    }
  } else {
    if constexpr (kTranspose) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
    }
  }
#elif defined(__CUDA_ARCH__)
  static_assert(kMatrices == 0, "ldmatrix needs sm_75 or newer");
#endif
}

// cp.async of 16 bytes, global to shared (both 16-byte aligned), in commit groups; the data is
// in shared memory only after cp_async_wait<N>() leaves at most the N newest groups pending.
AF_DEVICE void cp_async_16(void* shared_destination, const void* global_source
#if defined(ADAPTFUSE_EMU)
                           ,
                           const char* file = __builtin_FILE(), int line = __builtin_LINE()
#endif
) {
#if defined(ADAPTFUSE_EMU)
  ::adaptfuse_emu::check_alignment(shared_destination, 16, "cp.async shared destination", file,
                                   line);
  ::adaptfuse_emu::check_alignment(global_source, 16, "cp.async global source", file, line);
  ::adaptfuse_emu::async_copy(shared_destination, global_source, 16);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global_source));
#elif defined(__CUDA_ARCH__)
  *static_cast<uint4*>(shared_destination) = *static_cast<const uint4*>(global_source);
#endif
}

AF_DEVICE void cp_async_commit() {
#if defined(ADAPTFUSE_EMU)
  ::adaptfuse_emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int kNewestGroupsLeftPending>
AF_DEVICE void cp_async_wait() {
#if defined(ADAPTFUSE_EMU)
  ::adaptfuse_emu::async_wait(kNewestGroupsLeftPending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kNewestGroupsLeftPending));
#endif
}

#endif  // AF_KERNEL_CODE

}  // namespace adaptfuse
