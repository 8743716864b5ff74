// The per-instruction-set entry points of the vector kernels (simd_lora_kernels.h, compiled
// once per instruction set); simd_lora.cpp picks one for the running CPU. Each returns false
// for dtype pairs it has no kernel for. Arguments as in simd_lora.h.
#pragma once

#include <stdint.h>

#include "kernels/float_formats.cuh"

namespace adaptfuse {

#define AF_DECLARE_SIMD_ENTRY_POINTS(isa)                                                       \
  namespace isa {                                                                               \
  bool shrink_rows_any(DType x_dtype, DType a_dtype, const void* const* x_rows, int count,      \
                       const void* a_slot, int64_t a_rank_stride, int64_t rank, int64_t h_in,   \
                       float scale, float* const* v_rows);                                      \
  bool shrink_panel_rows_any(DType x_dtype, const void* const* x_rows, int count,               \
                             const float* panels, int64_t rank, int64_t h_in, float scale,      \
                             float* const* v_rows);                                             \
  bool expand_packed_rows_any(DType y_dtype, void* const* y_rows, const float* const* v_rows,   \
                              int count, const float* packed_first, int64_t packed_stride,      \
                              int64_t rank, int64_t o_begin, int64_t o_end, const float* bias); \
  bool expand_rows_any(DType y_dtype, DType b_dtype, void* const* y_rows,                       \
                       const float* const* v_rows, int count, const void* b_slot,               \
                       int64_t b_rank_stride, int64_t rank, int64_t o_begin, int64_t o_end,     \
                       const float* bias);                                                      \
  }

AF_DECLARE_SIMD_ENTRY_POINTS(avx512)
AF_DECLARE_SIMD_ENTRY_POINTS(avx2)

#undef AF_DECLARE_SIMD_ENTRY_POINTS

}  // namespace adaptfuse
