// Vectorised CPU kernels for shrink and expand over a chunk of tokens that share one adapter.
// Chosen at run time from the CPU's features, AVX-512 or AVX2 (the build targets plain
// x86-64); callers fall back to portable loops when shrink_rows_simd returns false.
#pragma once

#include <stdint.h>

#include "kernels/float_formats.cuh"

namespace adaptfuse {

enum class SimdLevel { kNone, kAvx2, kAvx512 };

// Bytes of one element of a storage dtype.
constexpr int64_t element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The vector kernels this process uses (fixed at first use; ADAPTFUSE_CPU_SIMD=0 or =avx2
// lowers it), and its name: "avx512", "avx2" or "none".
SimdLevel simd_level();
const char* simd_level_name();

// Token rows per shrink call: their H_in block stays in L1 beside the adapter rows' block.
constexpr int kSimdShrinkChunk = 8;

// Long segments (at least kShrinkPanelMinTokens tokens of one slot) take a GEMM-like kernel
// instead: the slot's A rows are packed once per call into panels of kShrinkPanelRanks ranks
// ([h_in][kShrinkPanelRanks] fp32 each, the last zero-padded), which tiles of tokens share.
constexpr int kShrinkPanelRanks = 16;
constexpr int kShrinkPanelMinTokens = 16;
constexpr int kSimdPanelChunk = 24;  // token rows per shrink_rows_panel call

// Floats that pack_shrink_panels writes for one slot.
int64_t shrink_panel_floats(int64_t rank, int64_t h_in);

// Packs A[k] (k < rank, starting at a_slot + k * a_rank_stride elements) into panels.
void pack_shrink_panels(DType a_dtype, const void* a_slot, int64_t a_rank_stride, int64_t rank,
                        int64_t h_in, float* panels);

// v_rows[i][k] = scale * dot(x_rows[i], A[k]) for k < rank from packed panels, each sum along
// H_in in order; count <= kSimdPanelChunk. Returns false when no vector kernel fits this CPU.
bool shrink_rows_panel(DType x_dtype, const void* const* x_rows, int count, const float* panels,
                       int64_t rank, int64_t h_in, float scale, float* const* v_rows);

// v_rows[i][k] = scale * dot(x_rows[i], A[k]) for k < rank, where A[k] starts at
// a_slot + k * a_rank_stride elements; count <= kSimdShrinkChunk. Each dot product is summed in
// a fixed order (deterministic). Returns false when no vector kernel fits this CPU/dtypes.
bool shrink_rows_simd(DType x_dtype, DType a_dtype, const void* const* x_rows, int count,
                      const void* a_slot, int64_t a_rank_stride, int64_t rank, int64_t h_in,
                      float scale, float* const* v_rows);

// y_rows[i][o] += sum_k v_rows[i][k] * B[k][o] for o in [o_begin, o_end), k < rank, where
// B[k] starts at b_slot + k * b_rank_stride elements (y_rows and B already offset to the
// slice); the fp32 sum (in k order, starting from bias[o] when bias is not null: a bottleneck
// adapter's, indexed like the outputs) is rounded once into y's dtype.
bool expand_rows_simd(DType y_dtype, DType b_dtype, void* const* y_rows, const float* const* v_rows,
                      int count, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                      int64_t o_begin, int64_t o_end, const float* bias);

// Long segments of expand: the slot's B rows packed once per call as fp32 ([rank][stride],
// zero-padded; stride from expand_packed_stride, which keeps rows off the same L1 sets), then
// expand_packed_rows_simd over chunks of the segment's tokens.
int64_t expand_packed_stride(int64_t h_out);
void pack_expand_rows(DType b_dtype, const void* b_slot, int64_t b_rank_stride, int64_t rank,
                      int64_t h_out, float* packed, int64_t packed_stride);
// As expand_rows_simd, with B already packed (packed_first: column o_begin of rank row 0).
bool expand_packed_rows_simd(DType y_dtype, void* const* y_rows, const float* const* v_rows,
                             int count, const float* packed_first, int64_t packed_stride,
                             int64_t rank, int64_t o_begin, int64_t o_end, const float* bias);

// Whether expand_rows_simd has a kernel for this CPU and these dtypes.
bool expand_simd_available(DType y_dtype, DType b_dtype);

// Whether shrink_rows_simd has a kernel for this CPU and these dtypes.
bool shrink_simd_available(DType x_dtype, DType a_dtype);

}  // namespace adaptfuse
