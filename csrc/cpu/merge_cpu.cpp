// merge_ and unmerge_ on the CPU: one pass over W per call, parallel over record tiles.
// The delta is the project's own fixed-order fp32 loop (the same sequence as merge_delta in
// kernels/merge_math.cuh, a row at a time so it vectorises), never a BLAS call: a BLAS whose
// blocking follows the thread count could compute another delta at unmerge time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "arguments.h"
#include "cpu/rounded_sums.h"
#include "kernels/dispatch.h"
#include "kernels/merge_math.cuh"

namespace adaptfuse {
namespace {

using MergeRecordTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct TileRecord {
  std::vector<int16_t> offsets;
  std::vector<int8_t> corrections;
  std::vector<int32_t> escape_bits;
  int64_t nonfinite = 0;
  int64_t first_nonfinite = -1;  // flat index
};

// Calls visit(flat_index, row_elements, element_stride, deltas, length) for each run of one
// tile's elements that lies in one row of W.
template <class WFormat, class AdapterFormat, class Visit>
void for_each_tile_row(const MergeArgs& args, int64_t tile, std::vector<float>& deltas,
                       Visit&& visit) {
  const int64_t numel = args.h_out * args.h_in;
  const int64_t tile_end = std::min(numel, (tile + 1) * kMergeTileElements);
  for (int64_t flat = tile * kMergeTileElements; flat < tile_end;) {
    const int64_t o = flat / args.h_in;
    const int64_t first_column = flat - o * args.h_in;
    const int64_t length = std::min(args.h_in - first_column, tile_end - flat);
    deltas.assign(length, 0.0f);
    float* delta = deltas.data();
    if (args.dense_delta != nullptr) {
      const float* dense =
          args.dense_delta + o * args.dense_stride_out + first_column * args.dense_stride_in;
      for (int64_t j = 0; j < length; ++j) delta[j] = dense[j * args.dense_stride_in];
    }
    for (int term_index = 0; term_index < args.num_terms; ++term_index) {
      const MergeTerm& term = args.terms[term_index];
      const auto* a = static_cast<const typename AdapterFormat::Bits*>(term.a) + first_column;
      const auto* b = static_cast<const typename AdapterFormat::Bits*>(term.b) + o;
      for (int64_t k = 0; k < term.rank; ++k) {
        const float scaled_b =
            mul_rn(term.coefficient, AdapterFormat::to_float(b[k * term.b_row_stride]));
        const auto* a_row = a + k * term.a_row_stride;
        for (int64_t j = 0; j < length; ++j) {
          delta[j] = add_rn(delta[j], mul_rn(scaled_b, AdapterFormat::to_float(a_row[j])));
        }
      }
    }
    auto* w = static_cast<typename WFormat::Bits*>(args.w) + o * args.w_stride_out +
              first_column * args.w_stride_in;
    visit(flat, w, args.w_stride_in, delta, length);
    flat += length;
  }
}

template <class WFormat, class AdapterFormat>
void merge_tile(const MergeArgs& args, int64_t tile, TileRecord& record) {
  using Bits = typename WFormat::Bits;
  std::vector<float> deltas;
  std::vector<Bits> merged, restored;
  std::vector<uint8_t> exact_needed;
  const int64_t tile_start = tile * kMergeTileElements;
  for_each_tile_row<WFormat, AdapterFormat>(
      args, tile, deltas,
      [&](int64_t flat, Bits* w, int64_t stride, const float* delta, int64_t length) {
        merged.resize(length);
        restored.resize(length);
        exact_needed.resize(length);
        rounded_sums<WFormat>(w, stride, delta, 1.0f, length, merged.data(), exact_needed.data());
        rounded_sums<WFormat>(merged.data(), 1, delta, -1.0f, length, restored.data(),
                              exact_needed.data());
        for (int64_t j = 0; j < length; ++j) {
          const Bits original = w[j * stride];
          w[j * stride] = merged[j];
          if (restored[j] == original && is_finite(WFormat::to_float(merged[j]))) continue;
          if (!is_finite(WFormat::to_float(merged[j])) && is_finite(WFormat::to_float(original))) {
            if (record.nonfinite++ == 0) record.first_nonfinite = flat + j;
          }
          if (restored[j] == original) continue;
          const int64_t difference = bits_difference<WFormat>(original, restored[j]);
          record.offsets.push_back(
              static_cast<int16_t>(static_cast<uint16_t>(flat + j - tile_start)));
          if (fits_correction(difference)) {
            record.corrections.push_back(static_cast<int8_t>(difference));
          } else {
            record.corrections.push_back(static_cast<int8_t>(kEscapeCorrection));
            record.escape_bits.push_back(static_cast<int32_t>(static_cast<uint32_t>(original)));
          }
        }
      });
}

template <class WFormat, class AdapterFormat>
void unmerge_tile(const MergeArgs& args, int64_t tile, const int16_t* offsets,
                  const int8_t* corrections, const int32_t* escape_bits, int64_t entry_begin,
                  int64_t entry_end, int64_t escape) {
  using Bits = typename WFormat::Bits;
  std::vector<float> deltas;
  std::vector<Bits> restored;
  std::vector<uint8_t> exact_needed;
  for_each_tile_row<WFormat, AdapterFormat>(
      args, tile, deltas,
      [&](int64_t, Bits* w, int64_t stride, const float* delta, int64_t length) {
        restored.resize(length);
        exact_needed.resize(length);
        rounded_sums<WFormat>(w, stride, delta, -1.0f, length, restored.data(),
                              exact_needed.data());
        for (int64_t j = 0; j < length; ++j) w[j * stride] = restored[j];
      });
  const int64_t tile_start = tile * kMergeTileElements;
  auto* w_base = static_cast<Bits*>(args.w);
  for (int64_t n = entry_begin; n < entry_end; ++n) {
    const int64_t flat = tile_start + static_cast<uint16_t>(offsets[n]);
    const int64_t o = flat / args.h_in;
    auto* w = w_base + o * args.w_stride_out + (flat - o * args.h_in) * args.w_stride_in;
    if (corrections[n] == kEscapeCorrection) {
      *w = static_cast<Bits>(static_cast<uint32_t>(escape_bits[escape++]));
    } else {
      *w = static_cast<Bits>(*w + corrections[n]);
    }
  }
}

// Subtracts the delta and restores the recorded elements; the record is already checked.
void unmerge_with_record(const MergeArgs& args, const at::Tensor& tile_counts,
                         const at::Tensor& offsets, const at::Tensor& corrections,
                         const at::Tensor& escape_bits) {
  const int64_t num_tiles = merge_num_tiles(args);
  const int32_t* counts = tile_counts.data_ptr<int32_t>();
  std::vector<int64_t> entry_starts(num_tiles + 1, 0), escape_starts(num_tiles + 1, 0);
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    entry_starts[tile + 1] = entry_starts[tile] + counts[2 * tile];
    escape_starts[tile + 1] = escape_starts[tile] + counts[2 * tile + 1];
  }
  const int16_t* offset_data = offsets.data_ptr<int16_t>();
  const int8_t* correction_data = corrections.data_ptr<int8_t>();
  const int32_t* escape_data = escape_bits.data_ptr<int32_t>();
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
                       for (int64_t tile = begin; tile < end; ++tile) {
                         unmerge_tile<WFormat, AdapterFormat>(
                             args, tile, offset_data, correction_data, escape_data,
                             entry_starts[tile], entry_starts[tile + 1], escape_starts[tile]);
                       }
                     });
                   }));
}

MergeRecordTensors merge_cpu(const at::Tensor& w, at::TensorList a, at::TensorList b,
                             c10::ArrayRef<double> coefficients,
                             const std::optional<at::Tensor>& delta) {
  const MergeArgs args = merge_arguments("merge_", w, a, b, coefficients, delta);
  const int64_t num_tiles = merge_num_tiles(args);
  std::vector<TileRecord> records(num_tiles);
  AF_FORMAT_SWITCH(args.w_dtype, WFormat, AF_FORMAT_SWITCH(args.adapter_dtype, AdapterFormat, {
                     at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
                       for (int64_t tile = begin; tile < end; ++tile)
                         merge_tile<WFormat, AdapterFormat>(args, tile, records[tile]);
                     });
                   }));
  int64_t entries = 0, escapes = 0, nonfinite = 0, first_nonfinite = -1;
  for (const TileRecord& record : records) {
    entries += static_cast<int64_t>(record.offsets.size());
    escapes += static_cast<int64_t>(record.escape_bits.size());
    if (record.nonfinite > 0 && nonfinite == 0) first_nonfinite = record.first_nonfinite;
    nonfinite += record.nonfinite;
  }
  const auto options = w.options();
  at::Tensor tile_counts = at::empty({num_tiles, 2}, options.dtype(at::kInt));
  at::Tensor offsets = at::empty({entries}, options.dtype(at::kShort));
  at::Tensor corrections = at::empty({entries}, options.dtype(at::kChar));
  at::Tensor escape_bits = at::empty({escapes}, options.dtype(at::kInt));
  int32_t* counts = tile_counts.data_ptr<int32_t>();
  int16_t* offset_out = offsets.data_ptr<int16_t>();
  int8_t* correction_out = corrections.data_ptr<int8_t>();
  int32_t* escape_out = escape_bits.data_ptr<int32_t>();
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const TileRecord& record = records[tile];
    counts[2 * tile] = static_cast<int32_t>(record.offsets.size());
    counts[2 * tile + 1] = static_cast<int32_t>(record.escape_bits.size());
    offset_out = std::copy(record.offsets.begin(), record.offsets.end(), offset_out);
    correction_out =
        std::copy(record.corrections.begin(), record.corrections.end(), correction_out);
    escape_out = std::copy(record.escape_bits.begin(), record.escape_bits.end(), escape_out);
  }
  if (nonfinite > 0) {
    unmerge_with_record(args, tile_counts, offsets, corrections, escape_bits);
    TORCH_CHECK_VALUE(false, "adaptfuse.merge_: the merge would make ", nonfinite,
                      " element(s) of W non-finite (the first at [", first_nonfinite / args.h_in,
                      ", ", first_nonfinite % args.h_in,
                      "]); W was restored bit for bit and nothing merged");
  }
  return {tile_counts, offsets, corrections, escape_bits};
}

void unmerge_cpu(const at::Tensor& w, at::TensorList a, at::TensorList b,
                 c10::ArrayRef<double> coefficients, const at::Tensor& tile_counts,
                 const at::Tensor& offsets, const at::Tensor& corrections,
                 const at::Tensor& escape_bits, const std::optional<at::Tensor>& delta) {
  const MergeArgs args = merge_arguments("unmerge_", w, a, b, coefficients, delta);
  check_merge_record(w, tile_counts, offsets, corrections, escape_bits);
  unmerge_with_record(args, tile_counts, offsets, corrections, escape_bits);
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptfuse, CPU, m) {
  m.impl("merge_", &merge_cpu);
  m.impl("unmerge_", &unmerge_cpu);
}

}  // namespace adaptfuse
