// The device.cuh primitives (mma.sync, ldmatrix, cp.async) checked lane by lane against
// plain matrix products and the PTX ISA's documented fragment layouts. The same kernels and
// checks build twice: against the emulator (primitives_emu_test.cpp, run by every ctest)
// and with nvcc (primitives_cuda_test.cu, runs on a GPU: the twins against the hardware).
#pragma once

#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/device.cuh"
#include "kernels/float_formats.cuh"

namespace primitives_test {

using adaptfuse::BFloat16Format;
using adaptfuse::Float16Format;

inline int& failures() {
  static int count = 0;
  return count;
}
#define PRIM_EXPECT(cond, ...)                                    \
  do {                                                            \
    if (!(cond) && ++::primitives_test::failures() <= 20) {       \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

// Fragments built by hand from the documented layout (not through the twin's own code).
template <class Format>
__global__ void mma_layout_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d) {
  const int lane = threadIdx.x % 32, group = lane / 4, t = lane % 4;
  uint32_t a_regs[4], b_regs[2];
  float c_regs[4], d_regs[4];
  for (int r = 0; r < 4; ++r) {
    const int row = group + ((r == 1 || r == 3) ? 8 : 0);
    const int col = 2 * t + (r >= 2 ? 8 : 0);
    a_regs[r] = static_cast<uint32_t>(a[row * 16 + col]) |
                (static_cast<uint32_t>(a[row * 16 + col + 1]) << 16);
  }
  for (int r = 0; r < 2; ++r) {
    const int k = 2 * t + 8 * r;
    b_regs[r] = static_cast<uint32_t>(b[k * 8 + group]) |
                (static_cast<uint32_t>(b[(k + 1) * 8 + group]) << 16);
  }
  for (int i = 0; i < 4; ++i) c_regs[i] = c[(group + 8 * (i / 2)) * 8 + 2 * t + (i % 2)];
  adaptfuse::mma_m16n8k16<Format>(d_regs, a_regs, b_regs, c_regs);
  for (int i = 0; i < 4; ++i) d[(group + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = d_regs[i];
}

// Four 8x8 matrices through shared memory and ldmatrix.x4; every lane's registers out.
template <bool kTranspose>
__global__ void ldmatrix_kernel(const uint16_t* matrices, uint32_t* out) {
  using Tile = uint16_t[4 * 64];
  AF_SHARED_ALIGNED(Tile, tile, 16);
  const int lane = threadIdx.x;
  for (int i = lane; i < 4 * 64; i += 32) tile[i] = matrices[i];
  __syncthreads();
  uint32_t regs[4];
  adaptfuse::ldmatrix<4, kTranspose>(regs, &tile[(lane / 8) * 64 + (lane % 8) * 8]);
  for (int m = 0; m < 4; ++m) out[lane * 4 + m] = regs[m];
}

// The SGMV pattern: A (16x16, row-major) by ldmatrix.x4, B (16x8, K x N row-major) by
// ldmatrix.x2.trans, then mma: must equal the plain product.
template <class Format>
__global__ void mma_from_shared_kernel(const uint16_t* a, const uint16_t* b, float* d) {
  using TileA = uint16_t[16 * 16];
  using TileB = uint16_t[16 * 8];
  AF_SHARED_ALIGNED(TileA, tile_a, 16);
  AF_SHARED_ALIGNED(TileB, tile_b, 16);
  const int lane = threadIdx.x, group = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) tile_a[i] = a[i];
  for (int i = lane; i < 128; i += 32) tile_b[i] = b[i];
  __syncthreads();
  uint32_t a_regs[4], b_regs[2];
  // Matrices 0..3 = rows 0-7/8-15 of columns 0-7, then of columns 8-15 (registers a0..a3).
  adaptfuse::ldmatrix<4, false>(
      a_regs, &tile_a[((lane % 8) + 8 * ((lane / 8) % 2)) * 16 + 8 * (lane / 16)]);
  adaptfuse::ldmatrix<2, true>(b_regs, &tile_b[(lane % 16) * 8]);
  float c_regs[4] = {0, 0, 0, 0}, d_regs[4];
  adaptfuse::mma_m16n8k16<Format>(d_regs, a_regs, b_regs, c_regs);
  for (int i = 0; i < 4; ++i) d[(group + 8 * (i / 2)) * 8 + 2 * t + (i % 2)] = d_regs[i];
}

// Each thread brings 4 floats to shared memory with cp.async, then reads its neighbour's.
__global__ void cp_async_kernel(const float* in, float* out, bool wait) {
  using Tile = float[4 * 64];
  AF_SHARED_ALIGNED(Tile, tile, 16);
  const int t = threadIdx.x;
  adaptfuse::cp_async_16(&tile[4 * t], in + 4 * t);
  adaptfuse::cp_async_commit();
  if (wait) adaptfuse::cp_async_wait<0>();
  __syncthreads();
  const int neighbour = (t + 1) % blockDim.x;
  for (int i = 0; i < 4; ++i) out[4 * t + i] = tile[4 * neighbour + i];
}

// Small integers: every product and sum is exact in fp32, so results compare exactly.
template <class Format>
std::vector<uint16_t> small_integers(int count, int seed) {
  std::vector<uint16_t> bits(count);
  for (int i = 0; i < count; ++i)
    bits[i] = Format::from_float(static_cast<float>(((i * 7 + seed * 13) % 9) - 4));
  return bits;
}

// Runner supplies: template <class T> T* upload(const std::vector<T>&), template <class T>
// std::vector<T> download(const T*, size_t), and launch(name, kernel, grid, block, args...).
template <class Format, class Runner>
void check_mma(Runner& run, const char* format_name) {
  const auto a = small_integers<Format>(256, 1), b = small_integers<Format>(128, 2);
  std::vector<float> c(128);
  for (int i = 0; i < 128; ++i) c[i] = static_cast<float>(i % 5) - 2.0f;
  std::vector<float> expected(128);
  for (int row = 0; row < 16; ++row)
    for (int col = 0; col < 8; ++col) {
      float sum = c[row * 8 + col];
      for (int k = 0; k < 16; ++k)
        sum += Format::to_float(a[row * 16 + k]) * Format::to_float(b[k * 8 + col]);
      expected[row * 8 + col] = sum;
    }
  float* d = run.template upload<float>(std::vector<float>(128, -999.0f));
  run.launch("mma_layout_kernel", mma_layout_kernel<Format>, 1, 32,
             static_cast<const uint16_t*>(run.upload(a)),
             static_cast<const uint16_t*>(run.upload(b)), static_cast<const float*>(run.upload(c)),
             d);
  const auto got = run.download(d, 128);
  for (int i = 0; i < 128; ++i)
    PRIM_EXPECT(got[i] == expected[i], "%s mma element (%d, %d): %f vs %f", format_name, i / 8,
                i % 8, got[i], expected[i]);
  float* d2 = run.template upload<float>(std::vector<float>(128, -999.0f));
  run.launch("mma_from_shared_kernel", mma_from_shared_kernel<Format>, 1, 32,
             static_cast<const uint16_t*>(run.upload(a)),
             static_cast<const uint16_t*>(run.upload(b)), d2);
  const auto got2 = run.download(d2, 128);
  for (int i = 0; i < 128; ++i) {
    const float without_c = expected[i] - c[i];
    PRIM_EXPECT(got2[i] == without_c, "%s ldmatrix+mma element (%d, %d): %f vs %f", format_name,
                i / 8, i % 8, got2[i], without_c);
  }
}

template <class Runner>
void check_ldmatrix(Runner& run) {
  std::vector<uint16_t> matrices(4 * 64);
  for (int i = 0; i < 4 * 64; ++i) matrices[i] = static_cast<uint16_t>(i);  // value = its index
  for (int transpose = 0; transpose < 2; ++transpose) {
    uint32_t* out = run.template upload<uint32_t>(std::vector<uint32_t>(32 * 4, 0));
    const uint16_t* in = run.upload(matrices);
    if (transpose)
      run.launch("ldmatrix_kernel", ldmatrix_kernel<true>, 1, 32, in, out);
    else
      run.launch("ldmatrix_kernel", ldmatrix_kernel<false>, 1, 32, in, out);
    const auto got = run.download(out, 32 * 4);
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < 4; ++m)
        for (int j = 0; j < 2; ++j) {
          const int row = transpose ? 2 * (lane % 4) + j : lane / 4;
          const int col = transpose ? lane / 4 : 2 * (lane % 4) + j;
          const uint16_t element = static_cast<uint16_t>(got[lane * 4 + m] >> (16 * j));
          PRIM_EXPECT(element == m * 64 + row * 8 + col,
                      "ldmatrix%s lane %d matrix %d half %d: %d vs %d", transpose ? ".trans" : "",
                      lane, m, j, element, m * 64 + row * 8 + col);
        }
  }
}

template <class Runner>
void check_cp_async(Runner& run, bool expect_missing_wait_to_show) {
  std::vector<float> in(4 * 64);
  for (int i = 0; i < 4 * 64; ++i) in[i] = static_cast<float>(i) + 0.5f;
  for (int wait = 1; wait >= (expect_missing_wait_to_show ? 0 : 1); --wait) {
    float* out = run.template upload<float>(std::vector<float>(4 * 64, 0.0f));
    run.launch("cp_async_kernel", cp_async_kernel, 1, 64, static_cast<const float*>(run.upload(in)),
               out, wait != 0);
    const auto got = run.download(out, 4 * 64);
    int wrong = 0;
    for (int t = 0; t < 64; ++t)
      for (int i = 0; i < 4; ++i) wrong += got[4 * t + i] != in[4 * ((t + 1) % 64) + i];
    if (wait)
      PRIM_EXPECT(wrong == 0, "cp.async with its wait: %d wrong elements", wrong);
    else
      PRIM_EXPECT(wrong > 0, "a missing cp.async wait went unnoticed");
  }
}

template <class Runner>
int run_all(Runner& run, bool emulated) {
  check_mma<BFloat16Format>(run, "bf16");
  check_mma<Float16Format>(run, "fp16");
  check_ldmatrix(run);
  check_cp_async(run, emulated);
  std::printf("primitives (%s): %s (%d failures)\n", emulated ? "emulated" : "GPU",
              failures() ? "FAILED" : "ok", failures());
  return failures() ? 1 : 0;
}

}  // namespace primitives_test
