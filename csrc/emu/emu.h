// CPU emulation of the CUDA execution model: the project's .cu kernel sources compile as plain
// C++ (g++, -DADAPTFUSE_EMU) and run here. A launch runs the grid's blocks (on one or two OS
// threads); each block's threads run as cooperative fibers, so __syncthreads() suspends a
// thread until every thread of its block arrives, and warp collectives wait for the lanes
// their mask names. Faults that are undefined behaviour on a GPU (a barrier some threads never
// reach, a collective whose mask names lanes that do not call it, a misaligned vector access)
// stop the launch with an error that names the kernel, block, thread and source line.
// Rules for kernel authors and the limits of the emulation: csrc/emu/README.md.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

// With the CUDA headers on the include path (the toolkit's, or torch's CUDA wheels'), their
// host definitions of the vector types, dim3, the error and stream types and the 16-bit
// float types are used; without them, minimal equivalents below.
#if __has_include(<cuda_bf16.h>) && __has_include(<cuda_fp16.h>) && __has_include(<vector_types.h>)
#define ADAPTFUSE_EMU_CUDA_HEADERS 1
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>
#endif

// CUDA's declaration specifiers vanish.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

#if !defined(ADAPTFUSE_EMU_CUDA_HEADERS)
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
// Vector types with the device's sizes and alignments (16-byte loads need 16-byte addresses).
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
using cudaStream_t = struct EmuStream*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 4 };
#endif

// Faults throw adaptfuse_emu::Fault from the launch itself, so nothing is left to report.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated launch failed";
}

namespace adaptfuse_emu {

// Thrown by launch() when a kernel faults; the message names kernel, block, thread and line.
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  unsigned seed = 0;   // 0: threads run in order; otherwise a seeded shuffle per round
  int os_threads = 1;  // blocks spread over this many OS threads
  size_t stack_bytes = 64 * 1024;
};
Options& options();  // process-wide; set before launching

struct Fiber;
struct Block;
const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();

// Suspends the calling thread until every thread of its block arrives.
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

// A warp collective: every lane named in `mask` deposits `bytes` (at most kExchangeBytes) and
// waits for the others; returns the 32 lanes' deposits, lane l's at l * kExchangeBytes.
constexpr size_t kExchangeBytes = 64;
const unsigned char* warp_exchange_bytes(unsigned mask, const void* data, size_t bytes,
                                         const char* what, const char* file, int line);
// The same for one 8-byte value per lane: returns the 32 values.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, const char* what, const char* file,
                              int line);

// Asynchronous copies (cp.async): queued per thread, performed only when a wait covers their
// group, so a kernel that forgets the wait reads stale (poisoned) shared memory.
void async_copy(void* destination, const void* source, size_t bytes);
void async_commit();
void async_wait(int newest_groups_left_pending);
int lane_id();

[[noreturn]] void fault(const std::string& what, const char* file, int line);

// Per-block shared memory: every thread of a block gets the same storage for one call site;
// fresh storage is filled with a poison pattern (a NaN in every 4-byte word).
void* shared_storage(const void* site, size_t bytes, size_t alignment);
void* dynamic_shared_storage();

void check_alignment(const void* pointer, size_t alignment, const char* what, const char* file,
                     int line);

using KernelBody = std::function<void()>;
void launch(const char* kernel, const char* file, int line, dim3 grid, dim3 block,
            size_t dynamic_shared_bytes, const KernelBody& body);

template <class T>
T bits_to(uint64_t bits) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp collectives move up to 8 bytes");
  T value;
  __builtin_memcpy(&value, &bits, sizeof(T));
  return value;
}

template <class T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp collectives move up to 8 bytes");
  uint64_t bits = 0;
  __builtin_memcpy(&bits, &value, sizeof(T));
  return bits;
}

// Every shuffle: exchange the lanes' values, then read the one of `source` (a lane outside
// the segment or the warp maps to the caller itself, which gets its own value back).
template <class T>
T shuffle_from(const char* file, int line, const char* what, unsigned mask, T value, int source) {
  const uint64_t* values = warp_exchange(mask, to_bits(value), what, file, line);
  if (!((mask >> source) & 1u))
    fault(
        std::string(what) + " reads lane " + std::to_string(source) + ", which is not in the mask",
        file, line);
  return bits_to<T>(values[source]);
}

// The shuffles, with CUDA's argument order after the call site; width defaults to 32.
template <class T>
T shfl_sync_at(const char* file, int line, unsigned mask, T value, int source_lane,
               int width = 32) {
  const int lane = lane_id();
  const int source = lane - lane % width + ((source_lane % width) + width) % width;
  return shuffle_from(file, line, "__shfl_sync", mask, value, source);
}

template <class T>
T shfl_xor_sync_at(const char* file, int line, unsigned mask, T value, int lane_mask,
                   int width = 32) {
  const int lane = lane_id();
  const int source = lane ^ lane_mask;
  return shuffle_from(file, line, "__shfl_xor_sync", mask, value,
                      source / width == lane / width ? source : lane);
}

template <class T>
T shfl_up_sync_at(const char* file, int line, unsigned mask, T value, unsigned delta,
                  int width = 32) {
  const int lane = lane_id();
  const int source = lane - static_cast<int>(delta);
  return shuffle_from(file, line, "__shfl_up_sync", mask, value,
                      source >= lane - lane % width ? source : lane);
}

template <class T>
T shfl_down_sync_at(const char* file, int line, unsigned mask, T value, unsigned delta,
                    int width = 32) {
  const int lane = lane_id();
  const int source = lane + static_cast<int>(delta);
  return shuffle_from(file, line, "__shfl_down_sync", mask, value,
                      source < lane - lane % width + width ? source : lane);
}

inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  syncwarp(mask, file, line);
}

unsigned ballot(unsigned mask, bool predicate, const char* file, int line);

// Atomics: fibers of one OS thread never interleave inside these; blocks on other OS threads
// are serialised by a lock, so the result equals some sequential order, as on the device.
int atomic_add(int* address, int value);
unsigned atomic_add(unsigned* address, unsigned value);
float atomic_add(float* address, float value);

}  // namespace adaptfuse_emu

#define threadIdx (::adaptfuse_emu::thread_index())
#define blockIdx (::adaptfuse_emu::block_index())
#define blockDim (::adaptfuse_emu::block_dim())
#define gridDim (::adaptfuse_emu::grid_dim())
#define warpSize 32

#define __syncthreads() ::adaptfuse_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::adaptfuse_emu::syncwarp_at(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(...) ::adaptfuse_emu::shfl_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::adaptfuse_emu::shfl_xor_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::adaptfuse_emu::shfl_up_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::adaptfuse_emu::shfl_down_sync_at(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::adaptfuse_emu::ballot(mask, predicate, __FILE__, __LINE__)
#define __any_sync(mask, predicate) \
  (::adaptfuse_emu::ballot(mask, predicate, __FILE__, __LINE__) != 0u)
#define __all_sync(mask, predicate) \
  (::adaptfuse_emu::ballot(mask, predicate, __FILE__, __LINE__) == (mask))
#define atomicAdd(address, value) ::adaptfuse_emu::atomic_add(address, value)

inline int __popc(unsigned bits) { return __builtin_popcount(bits); }

// cuda_fp16.h / cuda_bf16.h compile on the host (types, conversions, most arithmetic) where
// the toolkit's or torch's CUDA wheels' headers are on the include path; the fused
// multiply-adds are device-only there, so they get host versions: the exact a * b + c
// (a * b is exact in double) rounded once to the 16-bit format, as the device does.
#if defined(ADAPTFUSE_EMU_CUDA_HEADERS)
inline __half __hfma(__half a, __half b, __half c) {
  return __double2half(static_cast<double>(__half2float(a)) * __half2float(b) + __half2float(c));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __double2bfloat16(static_cast<double>(__bfloat162float(a)) * __bfloat162float(b) +
                           __bfloat162float(c));
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(__hfma(__low2half(a), __low2half(b), __low2half(c)),
                        __hfma(__high2half(a), __high2half(b), __high2half(c)));
}
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __halves2bfloat162(__hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
                            __hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}
#endif
