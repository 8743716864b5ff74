// Tests of the CPU emulator itself (csrc/emu): barriers, every shuffle, ballot/any/all,
// shared memory per block and its poison, atomics, the device.cuh primitives' twins, the
// launch modes (in order, seeded random order, two OS threads), and that every fault the
// emulator promises to report is reported, with deliberately broken kernels.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/device.cuh"
#include "kernels/launchers.h"

using adaptfuse::launch_kernel;

static int failures = 0;
#define EXPECT(cond, ...)                                         \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

struct Mode {
  const char* name;
  unsigned seed;
  int os_threads;
};
static const Mode kModes[] = {
    {"ordered", 0, 1}, {"shuffled", 777, 1}, {"shuffled-2", 31337, 1}, {"two-threads", 0, 2}};

static void set_mode(const Mode& mode) {
  adaptfuse_emu::options().seed = mode.seed;
  adaptfuse_emu::options().os_threads = mode.os_threads;
}

// Expects `run` to fault with a message containing every one of `needles`.
template <class Run>
static void expect_fault(const char* what, Run run, std::initializer_list<const char*> needles) {
  try {
    run();
    ++failures;
    std::printf("FAIL: %s: no fault reported\n", what);
  } catch (const adaptfuse_emu::Fault& fault) {
    const std::string message = fault.what();
    for (const char* needle : needles) {
      if (message.find(needle) == std::string::npos) {
        ++failures;
        std::printf("FAIL: %s: fault message lacks '%s': %s\n", what, needle, message.c_str());
      }
    }
  }
}

// --- kernels ---------------------------------------------------------------------------

// Each thread writes its id, then reads its neighbour's: right only with the barrier.
__global__ void neighbour_kernel(int* out, bool with_barrier) {
  AF_SHARED_ARRAY(int, values, 128);
  const int t = threadIdx.x;
  values[t] = t * 10 + static_cast<int>(blockIdx.x);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = values[(t + 1) % blockDim.x];
}

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const int value = lane * 3 + 1;
  int* row = out + threadIdx.x * 8;
  row[0] = __shfl_sync(adaptfuse::kFullWarpMask, value, 5);
  row[1] = __shfl_xor_sync(adaptfuse::kFullWarpMask, value, 6);
  row[2] = __shfl_up_sync(adaptfuse::kFullWarpMask, value, 3);
  row[3] = __shfl_down_sync(adaptfuse::kFullWarpMask, value, 3);
  row[4] = __shfl_xor_sync(adaptfuse::kFullWarpMask, value, 9, 16);  // width 16: stays in its half
  row[5] = static_cast<int>(__ballot_sync(adaptfuse::kFullWarpMask, lane % 3 == 0));
  row[6] = __any_sync(adaptfuse::kFullWarpMask, lane == 31) +
           2 * __all_sync(adaptfuse::kFullWarpMask, lane < 31);
  row[7] = adaptfuse::warp_sum(lane);
}

// Two divergent groups run collectives with disjoint masks at the same time (legal in CUDA).
__global__ void disjoint_groups_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane % 2 == 0) {
    out[lane] = __shfl_sync(0x55555555u, lane * 10, (lane + 2) % 32);
  } else {
    out[lane] = __shfl_sync(0xaaaaaaaau, lane * 10, (lane + 2) % 32);
  }
}

// Only the even lanes take part, with a matching mask: legal, partial-warp collectives.
__global__ void partial_warp_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  if (lane % 2 == 0) out[lane] = __shfl_sync(0x55555555u, lane * 7, (lane + 2) % 32);
}

__global__ void poison_kernel(uint32_t* out) {
  AF_SHARED_ARRAY(uint32_t, never_written, 4);
  out[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void atomic_kernel(int* counter, float* sum) {
  atomicAdd(counter, 1);
  atomicAdd(sum, 0.5f);
}

__global__ void vector_kernel(const float* in, float* out, int offset) {
  const uint4 v = adaptfuse::load_global_16(in + offset + 4 * threadIdx.x);
  adaptfuse::store_global_16(out + 4 * threadIdx.x, v);
}

__global__ void dynamic_shared_kernel(int* out) {
  AF_DYNAMIC_SHARED(int, scratch);
  scratch[threadIdx.x] = static_cast<int>(threadIdx.x * 2 + blockIdx.x);
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = scratch[blockDim.x - 1 - threadIdx.x];
}

#if defined(ADAPTFUSE_EMU_CUDA_HEADERS)
// cuda_bf16.h on the host: 16 bytes read as uint4 and reinterpreted as four bf16 pairs (the
// usual kernel idiom, which needs -fno-strict-aliasing), then __hfma2 and back to float.
__global__ void bf16_pairs_kernel(const __nv_bfloat16* in, float* out) {
  const uint4 raw = adaptfuse::load_global_16(in + 8 * threadIdx.x);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
  const __nv_bfloat162 two = __floats2bfloat162_rn(2.0f, 2.0f);
  for (int i = 0; i < 4; ++i) {
    const float2 values = __bfloat1622float2(__hfma2(pairs[i], two, pairs[i]));  // 3x, rounded once
    out[8 * threadIdx.x + 2 * i] = values.x;
    out[8 * threadIdx.x + 2 * i + 1] = values.y;
  }
}

static void test_bf16_types() {
  set_mode(kModes[0]);
  alignas(16) __nv_bfloat16 in[8 * 32];
  float out[8 * 32];
  for (int i = 0; i < 8 * 32; ++i) in[i] = __float2bfloat16(0.01f * static_cast<float>(i) - 1.0f);
  launch_kernel(__FILE__, __LINE__, "bf16_pairs_kernel", bf16_pairs_kernel, dim3(1), dim3(32), 0,
                nullptr, static_cast<const __nv_bfloat16*>(in), out);
  for (int i = 0; i < 8 * 32; ++i) {
    const float expected = __bfloat162float(__float2bfloat16(3.0f * __bfloat162float(in[i])));
    EXPECT(out[i] == expected, "bf16 pair %d: %f vs %f", i, out[i], expected);
  }
}
#else
static void test_bf16_types() { std::printf("emu_test: no CUDA headers, bf16 types not tested\n"); }
#endif

// Broken on purpose.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void mask_mismatch_kernel(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_sync(mask, 1, 0);
}

__global__ void missing_lane_kernel(int* out) {
  if (threadIdx.x == 7) return;  // lane 7 exits, yet the mask names it
  out[threadIdx.x] = __shfl_xor_sync(adaptfuse::kFullWarpMask, 1, 1);
}

__global__ void lane_outside_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 1, 0);  // every lane calls, the mask names lane 0 only
}

// --- tests -----------------------------------------------------------------------------

static void test_barrier(const Mode& mode) {
  set_mode(mode);
  const int blocks = 3, threads = 96;
  std::vector<int> out(blocks * threads, -1);
  launch_kernel(__FILE__, __LINE__, "neighbour_kernel", neighbour_kernel, dim3(blocks),
                dim3(threads), 0, nullptr, out.data(), true);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      EXPECT(out[b * threads + t] == ((t + 1) % threads) * 10 + b, "%s: block %d thread %d",
             mode.name, b, t);
  // Without the barrier the neighbour's value is not there yet: the read returns poison.
  launch_kernel(__FILE__, __LINE__, "neighbour_kernel", neighbour_kernel, dim3(blocks),
                dim3(threads), 0, nullptr, out.data(), false);
  int wrong = 0;
  for (int i = 0; i < blocks * threads; ++i)
    wrong += out[i] != ((i % threads + 1) % threads) * 10 + i / threads;
  EXPECT(wrong > 0, "%s: a missing barrier went unnoticed", mode.name);
}

static void test_shuffles(const Mode& mode) {
  set_mode(mode);
  const int threads = 64;
  std::vector<int> out(threads * 8, 0);
  launch_kernel(__FILE__, __LINE__, "shuffle_kernel", shuffle_kernel, dim3(1), dim3(threads), 0,
                nullptr, out.data());
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane) ballot |= (lane % 3 == 0 ? 1u : 0u) << lane;
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32;
    auto value = [](int l) { return l * 3 + 1; };
    const int* row = &out[t * 8];
    EXPECT(row[0] == value(5), "shfl lane %d", lane);
    EXPECT(row[1] == value(lane ^ 6), "shfl_xor lane %d", lane);
    EXPECT(row[2] == (lane >= 3 ? value(lane - 3) : value(lane)), "shfl_up lane %d", lane);
    EXPECT(row[3] == (lane + 3 < 32 ? value(lane + 3) : value(lane)), "shfl_down lane %d", lane);
    EXPECT(row[4] == value(((lane ^ 9) / 16 == lane / 16) ? (lane ^ 9) : lane),
           "shfl_xor width 16 lane %d", lane);
    EXPECT(static_cast<unsigned>(row[5]) == ballot, "ballot lane %d", lane);
    EXPECT(row[6] == 1, "any/all lane %d: %d", lane, row[6]);
    EXPECT(row[7] == 496, "warp_sum lane %d: %d", lane, row[7]);
  }
  std::vector<int> partial(32, -1);
  launch_kernel(__FILE__, __LINE__, "partial_warp_kernel", partial_warp_kernel, dim3(1), dim3(32),
                0, nullptr, partial.data());
  for (int lane = 0; lane < 32; lane += 2)
    EXPECT(partial[lane] == ((lane + 2) % 32) * 7, "partial lane %d", lane);
  std::vector<int> groups(32, -1);
  launch_kernel(__FILE__, __LINE__, "disjoint_groups_kernel", disjoint_groups_kernel, dim3(1),
                dim3(32), 0, nullptr, groups.data());
  for (int lane = 0; lane < 32; ++lane) {
    EXPECT(groups[lane] == ((lane + 2) % 32) * 10, "%s: disjoint groups lane %d: %d", mode.name,
           lane, groups[lane]);
  }
}

static void test_shared_memory(const Mode& mode) {
  set_mode(mode);
  std::vector<uint32_t> out(4, 0);
  launch_kernel(__FILE__, __LINE__, "poison_kernel", poison_kernel, dim3(2), dim3(4), 0, nullptr,
                out.data());
  for (uint32_t word : out) {
    float as_float;
    std::memcpy(&as_float, &word, 4);
    EXPECT(std::isnan(as_float), "shared memory not poisoned: 0x%08x", word);
  }
  const int blocks = 5, threads = 64;
  std::vector<int> dyn(blocks * threads, -1);
  launch_kernel(__FILE__, __LINE__, "dynamic_shared_kernel", dynamic_shared_kernel, dim3(blocks),
                dim3(threads), threads * sizeof(int), nullptr, dyn.data());
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      EXPECT(dyn[b * threads + t] == (threads - 1 - t) * 2 + b,
             "%s: dynamic shared block %d thread %d", mode.name, b, t);
}

static void test_atomics(const Mode& mode) {
  set_mode(mode);
  int counter = 0;
  float sum = 0.0f;
  launch_kernel(__FILE__, __LINE__, "atomic_kernel", atomic_kernel, dim3(7), dim3(96), 0, nullptr,
                &counter, &sum);
  EXPECT(counter == 7 * 96, "%s: counter %d", mode.name, counter);
  EXPECT(sum == 7 * 96 * 0.5f, "%s: sum %f", mode.name, sum);
}

static void test_vector_access() {
  set_mode(kModes[0]);
  alignas(16) float in[4 * 33];
  alignas(16) float out[4 * 32];
  for (int i = 0; i < 4 * 33; ++i) in[i] = static_cast<float>(i);
  launch_kernel(__FILE__, __LINE__, "vector_kernel", vector_kernel, dim3(1), dim3(32), 0, nullptr,
                static_cast<const float*>(in), out, 0);
  for (int i = 0; i < 4 * 32; ++i) EXPECT(out[i] == in[i], "vector copy %d", i);
  expect_fault(
      "misaligned 16-byte load",
      [&] {
        launch_kernel(__FILE__, __LINE__, "vector_kernel", vector_kernel, dim3(1), dim3(32), 0,
                      nullptr, static_cast<const float*>(in), out, 1);
      },
      {"misaligned 16-byte global load", "vector_kernel", "thread (0, 0, 0)", "emu_test.cpp"});
}

static void test_faults() {
  set_mode(kModes[0]);
  std::vector<int> out(64, 0);
  expect_fault(
      "divergent __syncthreads",
      [&] {
        launch_kernel(__FILE__, __LINE__, "divergent_barrier_kernel", divergent_barrier_kernel,
                      dim3(1), dim3(32), 0, nullptr, out.data());
      },
      {"divergent __syncthreads", "divergent_barrier_kernel", "block (0, 0, 0)", "emu_test.cpp"});
  expect_fault("a thread exits before the barrier",
               [&] {
                 launch_kernel(__FILE__, __LINE__, "early_exit_kernel", early_exit_kernel, dim3(2),
                               dim3(32), 0, nullptr, out.data());
               },
               {"deadlock", "early_exit_kernel", "__syncthreads", "31 of 32 threads", "exited"});
  expect_fault(
      "mismatched collective masks",
      [&] {
        launch_kernel(__FILE__, __LINE__, "mask_mismatch_kernel", mask_mismatch_kernel, dim3(1),
                      dim3(32), 0, nullptr, out.data());
      },
      {"mask", "mask_mismatch_kernel"});  // a direct report, or a deadlock naming the masks
  expect_fault("a collective waits for a lane that exited",
               [&] {
                 launch_kernel(__FILE__, __LINE__, "missing_lane_kernel", missing_lane_kernel,
                               dim3(1), dim3(32), 0, nullptr, out.data());
               },
               {"deadlock", "missing_lane_kernel", "__shfl_xor_sync", "lane 7 exited"});
  expect_fault("a lane outside the mask calls a collective",
               [&] {
                 launch_kernel(__FILE__, __LINE__, "lane_outside_mask_kernel",
                               lane_outside_mask_kernel, dim3(1), dim3(32), 0, nullptr, out.data());
               },
               {"does not include", "lane_outside_mask_kernel"});
  expect_fault("a block of 2048 threads",
               [&] {
                 launch_kernel(__FILE__, __LINE__, "atomic_kernel", atomic_kernel, dim3(1),
                               dim3(2048), 0, nullptr, static_cast<int*>(nullptr),
                               static_cast<float*>(nullptr));
               },
               {"invalid launch configuration", "atomic_kernel"});
  // Faults in one block stop a two-thread launch too.
  set_mode(kModes[3]);
  expect_fault("a fault under two OS threads",
               [&] {
                 launch_kernel(__FILE__, __LINE__, "early_exit_kernel", early_exit_kernel, dim3(6),
                               dim3(32), 0, nullptr, out.data());
               },
               {"deadlock", "early_exit_kernel"});
}

// The foundation's plan kernel, emulated, against a counting sort written here.
static void test_plan_kernel(const Mode& mode) {
  set_mode(mode);
  const int tokens = 300, slots = 7;
  std::vector<int32_t> token_slots(tokens), order(tokens, -9), offsets(slots + 1, -9);
  for (int t = 0; t < tokens; ++t)
    token_slots[t] = (t * 37 % 11) - 2 < slots ? (t * 37 % 11) - 2 : -1;
  adaptfuse::PlanArgs args{token_slots.data(), tokens, slots, order.data(), offsets.data()};
  adaptfuse::launch_plan(args, nullptr);
  std::vector<int32_t> expected_order;
  std::vector<int32_t> expected_offsets(1, 0);
  for (int s = 0; s < slots; ++s) {
    for (int t = 0; t < tokens; ++t)
      if (token_slots[t] == s) expected_order.push_back(t);
    expected_offsets.push_back(static_cast<int32_t>(expected_order.size()));
  }
  for (int t = 0; t < tokens; ++t)
    if (token_slots[t] < 0) expected_order.push_back(t);
  EXPECT(order == expected_order, "%s: plan token order", mode.name);
  EXPECT(offsets == expected_offsets, "%s: plan slot offsets", mode.name);
}

__global__ void out_of_bounds_kernel(const float* in, float* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];  // reads one element past the end
}

// Run as `emu_test --out-of-bounds` under AddressSanitizer: must abort with a report.
static int read_out_of_bounds() {
  std::vector<float> in(32, 1.0f), out(32);
  launch_kernel(__FILE__, __LINE__, "out_of_bounds_kernel", out_of_bounds_kernel, dim3(1), dim3(32),
                0, nullptr, static_cast<const float*>(in.data()), out.data());
  std::printf("out-of-bounds read not caught (build with ADAPTFUSE_ASAN=ON)\n");
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--out-of-bounds") == 0) return read_out_of_bounds();
  for (const Mode& mode : kModes) {
    test_barrier(mode);
    test_shuffles(mode);
    test_shared_memory(mode);
    test_atomics(mode);
    test_plan_kernel(mode);
  }
  test_vector_access();
  test_bf16_types();
  test_faults();
  std::printf("emu_test: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
