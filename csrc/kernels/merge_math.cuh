// Element-level arithmetic of merge_/unmerge_, shared by the CPU ops and the CUDA kernels so
// that both compute the same delta with the same rounding, and the exact-restore record.
//
// Record format (per merged weight W of numel elements, flat index o * H_in + i):
//   tiles of kMergeTileElements consecutive elements; per tile the number of entries and
//   of escapes (int32 [num_tiles, 2]); per entry its 16-bit offset inside the tile and an
//   int8 correction: original bits - bits that unmerge computes. A correction outside
//   [-127, 127] is stored as kEscapeCorrection and the original bits go, in entry order,
//   to the escape list (int32). Entries are in ascending offset order inside each tile.
#pragma once

#include "kernels/float_formats.cuh"

namespace adaptfuse {

constexpr int64_t kMergeTileElements = 65536;  // offsets fit in 16 bits
constexpr int kEscapeCorrection = -128;

// Loads element `index` of a bank row (raw bits of Format) as float.
template <class Format>
AF_HOST_DEVICE float load_as_float(const void* base, int64_t index) {
  return Format::to_float(static_cast<const typename Format::Bits*>(base)[index]);
}

// Difference of bit patterns, as the correction to add to what unmerge computes.
template <class Format>
AF_HOST_DEVICE int64_t bits_difference(typename Format::Bits original,
                                       typename Format::Bits computed) {
  return static_cast<int64_t>(original) - static_cast<int64_t>(computed);
}

// merge_/unmerge_: W[o, i] (+/-)= D[o, i] + sum_terms sum_k (c * B[k, o]) * A[k, i], in fp32,
// in this fixed order (the optional full delta D, then terms, then k), each product and sum
// rounded on its own.
constexpr int kMaxMergeTerms = 64;
struct MergeTerm {
  const void* a;  // [r, H_in], inner stride 1
  const void* b;  // [r, H_out], inner stride 1
  int64_t rank, a_row_stride, b_row_stride;
  float coefficient;
};
struct MergeArgs {
  void* w;
  int64_t h_out, h_in, w_stride_out, w_stride_in;
  const float* dense_delta;  // optional fp32 [H_out, H_in], the first addend of every delta
  int64_t dense_stride_out, dense_stride_in;
  DType w_dtype, adapter_dtype;
  int num_terms;
  MergeTerm terms[kMaxMergeTerms];
};

// The delta of one element; the CPU op computes the same sequence a row at a time.
template <class AdapterFormat>
AF_HOST_DEVICE float merge_delta(const MergeArgs& args, int64_t out_index, int64_t in_index) {
  float delta =
      args.dense_delta == nullptr
          ? 0.0f
          : args.dense_delta[out_index * args.dense_stride_out + in_index * args.dense_stride_in];
  for (int term = 0; term < args.num_terms; ++term) {
    const MergeTerm& t = args.terms[term];
    for (int64_t k = 0; k < t.rank; ++k) {
      const float scaled_b =
          mul_rn(t.coefficient, load_as_float<AdapterFormat>(t.b, k * t.b_row_stride + out_index));
      delta = add_rn(delta, mul_rn(scaled_b, load_as_float<AdapterFormat>(
                                                 t.a, k * t.a_row_stride + in_index)));
    }
  }
  return delta;
}

AF_HOST_DEVICE bool fits_correction(int64_t difference) {
  return difference > kEscapeCorrection && difference <= 127;
}

}  // namespace adaptfuse
