#include "arguments.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <utility>
#include <vector>

namespace adaptfuse {
namespace {

bool is_float_storage(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "adaptfuse.", op, ": argument '", name, "' is undefined");
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType expected) {
  check_defined(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == expected, "adaptfuse.", op, ": argument '", name,
                   "' must be ", expected, ", got ", t.scalar_type());
}

void check_float_storage(const char* op, const char* name, const at::Tensor& t) {
  check_defined(op, name, t);
  TORCH_CHECK_TYPE(is_float_storage(t.scalar_type()), "adaptfuse.", op, ": argument '", name,
                   "' must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, "adaptfuse.", op, ": argument '", name, "' must have ", dim,
                    " dimensions ", layout, ", got shape ", t.sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                int64_t expected, const char* meaning) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "adaptfuse.", op, ": argument '", name, "' has shape ",
                    t.sizes(), " but its dimension ", dim, " (", meaning, ") must be ", expected);
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const char* reference_name, const at::Tensor& reference) {
  TORCH_CHECK_VALUE(t.device() == reference.device(), "adaptfuse.", op, ": argument '", name,
                    "' is on ", t.device(), " but '", reference_name, "' is on ",
                    reference.device());
}

void check_unit_inner_stride(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "adaptfuse.", op, ": argument '", name,
                    "' must have stride 1 along its last dimension, got strides ", t.strides(),
                    " for shape ", t.sizes());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK_VALUE(t.stride(d) >= 0, "adaptfuse.", op, ": argument '", name,
                      "' has a negative stride: ", t.strides());
  }
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "adaptfuse.", op, ": argument '", name,
                    "' must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
}

// A 1-D int32/float32 table with one entry per slot or token.
void check_table(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                 int64_t length, const char* meaning, const char* reference_name,
                 const at::Tensor& reference) {
  check_dtype(op, name, t, dtype);
  check_dim(op, name, t, 1, meaning);
  check_size(op, name, t, 0, length, meaning);
  check_same_device(op, name, t, reference_name, reference);
  check_contiguous(op, name, t);
}

// A per-slot fp32 table [S, columns] (a bottleneck adapter's bias), stride 1 along its rows.
void check_slot_rows(const char* op, const char* name, const at::Tensor& t, int64_t num_slots,
                     int64_t columns, const char* layout, const char* reference_name,
                     const at::Tensor& reference) {
  check_dtype(op, name, t, at::kFloat);
  check_dim(op, name, t, 2, layout);
  check_size(op, name, t, 0, num_slots, "S, the number of slots");
  check_size(op, name, t, 1, columns, layout);
  check_same_device(op, name, t, reference_name, reference);
  check_unit_inner_stride(op, name, t);
}

void check_token_slot_values(const char* op, const at::Tensor& token_slots, int64_t num_slots) {
  if (!validate_values(token_slots) || token_slots.numel() == 0) return;
  const at::Tensor host = token_slots.cpu();
  const int32_t* slots = host.data_ptr<int32_t>();
  for (int64_t t = 0; t < host.numel(); ++t) {
    TORCH_CHECK_VALUE(slots[t] >= -1 && slots[t] < num_slots, "adaptfuse.", op,
                      ": argument 'token_slots' has slot id ", slots[t], " at token ", t,
                      "; expected -1 (no adapter) or a slot in [0, ", num_slots, ")");
  }
}

void check_rank_values(const char* op, const at::Tensor& ranks, int64_t capacity,
                       const char* capacity_name) {
  if (!validate_values(ranks) || ranks.numel() == 0) return;
  const at::Tensor host = ranks.cpu();
  const int32_t* values = host.data_ptr<int32_t>();
  for (int64_t s = 0; s < host.numel(); ++s) {
    TORCH_CHECK_VALUE(values[s] >= 0 && values[s] <= capacity, "adaptfuse.", op,
                      ": argument 'ranks' has rank ", values[s], " for slot ", s,
                      ", above the capacity ", capacity_name, " = ", capacity, " (or negative)");
  }
}

void check_plan(const char* op, const at::Tensor& token_slots, const at::Tensor& token_order,
                const at::Tensor& slot_offsets, int64_t num_slots) {
  const int64_t num_tokens = token_slots.size(0);
  check_table(op, "token_order", token_order, at::kInt, num_tokens, "[T]", "token_slots",
              token_slots);
  check_table(op, "slot_offsets", slot_offsets, at::kInt, num_slots + 1, "[S + 1]", "token_slots",
              token_slots);
  if (!validate_values(slot_offsets)) return;
  const at::Tensor host = slot_offsets.cpu();
  const int32_t* offsets = host.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(offsets[0] == 0 && offsets[num_slots] <= num_tokens, "adaptfuse.", op,
                    ": argument 'slot_offsets' is not a plan of ", num_tokens, " tokens (first ",
                    offsets[0], ", last ", offsets[num_slots],
                    "); build it with adaptfuse.ops.plan");
  for (int64_t s = 0; s < num_slots; ++s) {
    TORCH_CHECK_VALUE(offsets[s] <= offsets[s + 1], "adaptfuse.", op,
                      ": argument 'slot_offsets' decreases at slot ", s,
                      "; build it with adaptfuse.ops.plan");
  }
  // The CPU kernels index rows through token_order: it must be the plan of token_slots.
  const at::Tensor host_order = token_order.cpu();
  const at::Tensor host_slots = token_slots.cpu();
  const int32_t* order = host_order.data_ptr<int32_t>();
  const int32_t* slots = host_slots.data_ptr<int32_t>();
  std::vector<bool> seen(num_tokens, false);
  for (int64_t s = 0; s <= num_slots; ++s) {
    const int64_t end = s < num_slots ? offsets[s + 1] : num_tokens;
    for (int64_t i = offsets[s]; i < end; ++i) {
      const bool in_range = order[i] >= 0 && order[i] < num_tokens;
      const int32_t slot = in_range ? slots[order[i]] : -2;
      const bool belongs = s < num_slots ? slot == s : in_range && (slot < 0 || slot >= num_slots);
      const bool first_time = in_range && !seen[order[i]];
      if (in_range) seen[order[i]] = true;
      TORCH_CHECK_VALUE(belongs && first_time, "adaptfuse.", op,
                        ": argument 'token_order' is not the plan of ", "'token_slots' (position ",
                        i, "); build it with adaptfuse.ops.plan");
    }
  }
}

}  // namespace

DType kernel_dtype(const char* op, const char* name, const at::Tensor& tensor) {
  check_float_storage(op, name, tensor);
  switch (tensor.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

bool validate_values(const at::Tensor& tensor) {
  static const bool validate_device_values = [] {
    const char* flag = std::getenv("ADAPTFUSE_VALIDATE");
    return flag != nullptr && flag[0] == '1';
  }();
  return tensor.is_cpu() || validate_device_values;
}

PlanArgs plan_arguments(const at::Tensor& token_slots, int64_t num_slots) {
  const char* op = "plan";
  check_dtype(op, "token_slots", token_slots, at::kInt);
  check_dim(op, "token_slots", token_slots, 1, "[T]");
  check_contiguous(op, "token_slots", token_slots);
  TORCH_CHECK_VALUE(num_slots >= 0 && num_slots < (int64_t{1} << 31),
                    "adaptfuse.plan: argument 'num_slots' must be in [0, 2^31), got ", num_slots);
  TORCH_CHECK_VALUE(token_slots.size(0) < (int64_t{1} << 31),
                    "adaptfuse.plan: at most 2^31 - 1 tokens, got ", token_slots.size(0));
  check_token_slot_values(op, token_slots, num_slots);
  PlanArgs args{};
  args.token_slots = token_slots.data_ptr<int32_t>();
  args.num_tokens = token_slots.size(0);
  args.num_slots = num_slots;
  return args;
}

ShrinkArgs shrink_arguments(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ranks,
                            const at::Tensor& scales, const at::Tensor& token_slots,
                            const at::Tensor& token_order, const at::Tensor& slot_offsets,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& activations) {
  const char* op = "shrink";
  ShrinkArgs args{};
  args.x_dtype = kernel_dtype(op, "x", x);
  check_dim(op, "x", x, 2, "[T, H_in]");
  check_unit_inner_stride(op, "x", x);
  args.a_dtype = kernel_dtype(op, "A", a);
  check_dim(op, "A", a, 3, "[S, R_max, H_in]");
  check_same_device(op, "A", a, "x", x);
  check_unit_inner_stride(op, "A", a);
  check_size(op, "A", a, 2, x.size(1), "H_in, the size of x's last dimension");
  const int64_t num_slots = a.size(0);
  check_table(op, "ranks", ranks, at::kInt, num_slots, "[S]", "x", x);
  check_table(op, "scales", scales, at::kFloat, num_slots, "[S]", "x", x);
  check_table(op, "token_slots", token_slots, at::kInt, x.size(0), "[T]", "x", x);
  check_token_slot_values(op, token_slots, num_slots);
  check_plan(op, token_slots, token_order, slot_offsets, num_slots);
  check_rank_values(op, ranks, a.size(1), "R_max of A");
  args.x = x.data_ptr();
  args.x_row_stride = x.stride(0);
  args.a = a.data_ptr();
  args.a_slot_stride = a.stride(0);
  args.a_rank_stride = a.stride(1);
  args.num_slots = num_slots;
  args.max_rank = a.size(1);
  args.h_in = a.size(2);
  args.num_tokens = x.size(0);
  args.ranks = ranks.data_ptr<int32_t>();
  args.scales = scales.data_ptr<float>();
  args.token_slots = token_slots.data_ptr<int32_t>();
  args.token_order = token_order.data_ptr<int32_t>();
  args.slot_offsets = slot_offsets.data_ptr<int32_t>();
  if (activations.has_value()) {
    check_table(op, "activations", *activations, at::kInt, num_slots, "[S]", "x", x);
    if (validate_values(*activations)) {
      const at::Tensor host = activations->cpu();
      for (int64_t s = 0; s < num_slots; ++s) {
        const int32_t code = host.data_ptr<int32_t>()[s];
        TORCH_CHECK_VALUE(code >= 0 && code < kNumActivations,
                          "adaptfuse.shrink: argument 'activations' has code ", code, " at slot ",
                          s, "; expected [0, ", kNumActivations,
                          ") (adaptfuse.ops.ACTIVATIONS lists them)");
      }
    }
    args.activations = activations->data_ptr<int32_t>();
  }
  if (bias.has_value()) {
    check_slot_rows(op, "bias", *bias, num_slots, a.size(1), "[S, R_max]", "x", x);
    args.bias = bias->data_ptr<float>();
    args.bias_slot_stride = bias->stride(0);
  }
  return args;
}

ExpandArgs expand_arguments(const at::Tensor& y, const at::Tensor& v, at::TensorList b,
                            c10::IntArrayRef out_offsets, const at::Tensor& ranks,
                            const at::Tensor& token_slots, const at::Tensor& token_order,
                            const at::Tensor& slot_offsets, const std::optional<at::Tensor>& bias) {
  const char* op = "expand_";
  ExpandArgs args{};
  args.y_dtype = kernel_dtype(op, "y", y);
  check_dim(op, "y", y, 2, "[T, H_out]");
  check_unit_inner_stride(op, "y", y);
  TORCH_CHECK_VALUE(!b.empty() && b.size() <= static_cast<size_t>(kMaxExpandSlices),
                    "adaptfuse.expand_: argument 'B' must hold 1 to ", kMaxExpandSlices,
                    " output slices, got ", b.size());
  TORCH_CHECK_VALUE(out_offsets.size() == b.size(),
                    "adaptfuse.expand_: argument 'out_offsets' has ", out_offsets.size(),
                    " entries but 'B' has ", b.size(), " slices");
  const int64_t num_slots = b[0].dim() == 3 ? b[0].size(0) : -1;
  int64_t v_columns = 0;
  int64_t smallest_capacity = INT64_MAX;
  std::vector<std::pair<int64_t, int64_t>> spans;  // output columns of each slice
  for (size_t i = 0; i < b.size(); ++i) {
    const std::string name = c10::str("B[", i, "]");
    const DType dtype = kernel_dtype(op, name.c_str(), b[i]);
    TORCH_CHECK_TYPE(i == 0 || dtype == args.b_dtype,
                     "adaptfuse.expand_: all slices of 'B' must share one dtype; B[0] is ",
                     b[0].scalar_type(), ", ", name, " is ", b[i].scalar_type());
    args.b_dtype = dtype;
    check_dim(op, name.c_str(), b[i], 3, "[S, R_max, H_out]");
    check_same_device(op, name.c_str(), b[i], "y", y);
    check_unit_inner_stride(op, name.c_str(), b[i]);
    check_size(op, name.c_str(), b[i], 0, num_slots, "S, the number of slots of B[0]");
    const int64_t offset = out_offsets[i];
    const int64_t width = b[i].size(2);
    TORCH_CHECK_VALUE(offset >= 0 && offset + width <= y.size(1), "adaptfuse.expand_: slice ", i,
                      " writes columns [", offset, ", ", offset + width, ") of 'y', which has ",
                      y.size(1), " columns");
    spans.emplace_back(offset, offset + width);
    ExpandSlice& slice = args.slices[i];
    slice.b = b[i].data_ptr();
    slice.slot_stride = b[i].stride(0);
    slice.rank_stride = b[i].stride(1);
    slice.max_rank = b[i].size(1);
    slice.h_out = width;
    slice.out_offset = offset;
    slice.v_column = v_columns;
    v_columns += b[i].size(1);
    smallest_capacity = std::min(smallest_capacity, b[i].size(1));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    TORCH_CHECK_VALUE(spans[i].first >= spans[i - 1].second,
                      "adaptfuse.expand_: output slices overlap: columns [", spans[i - 1].first,
                      ", ", spans[i - 1].second, ") and [", spans[i].first, ", ", spans[i].second,
                      ")");
  }
  check_dtype(op, "v", v, at::kFloat);
  check_dim(op, "v", v, 2, "[T, sum of the slices' R_max]");
  check_same_device(op, "v", v, "y", y);
  check_unit_inner_stride(op, "v", v);
  check_size(op, "v", v, 0, y.size(0), "T, the rows of y");
  check_size(op, "v", v, 1, v_columns, "the sum of the slices' R_max");
  check_table(op, "ranks", ranks, at::kInt, num_slots, "[S]", "y", y);
  check_table(op, "token_slots", token_slots, at::kInt, y.size(0), "[T]", "y", y);
  check_token_slot_values(op, token_slots, num_slots);
  check_plan(op, token_slots, token_order, slot_offsets, num_slots);
  check_rank_values(op, ranks, smallest_capacity, "R_max of B");
  args.y = y.data_ptr();
  args.y_row_stride = y.stride(0);
  args.v = v.data_ptr<float>();
  args.v_row_stride = v.stride(0);
  args.ranks = ranks.data_ptr<int32_t>();
  args.token_slots = token_slots.data_ptr<int32_t>();
  args.token_order = token_order.data_ptr<int32_t>();
  args.slot_offsets = slot_offsets.data_ptr<int32_t>();
  args.num_slots = num_slots;
  args.num_tokens = y.size(0);
  args.num_slices = static_cast<int>(b.size());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(b.size() == 1,
                      "adaptfuse.expand_: argument 'bias' needs exactly one slice "
                      "in 'B', got ",
                      b.size());
    check_slot_rows(op, "bias", *bias, num_slots, b[0].size(2), "[S, H_out]", "y", y);
    args.bias = bias->data_ptr<float>();
    args.bias_slot_stride = bias->stride(0);
  }
  return args;
}

SegmentOuterArgs segment_outer_arguments(const at::Tensor& a, const at::Tensor& b,
                                         const at::Tensor& ranks, const at::Tensor& token_slots,
                                         const at::Tensor& token_order,
                                         const at::Tensor& slot_offsets) {
  const char* op = "segment_outer";
  SegmentOuterArgs args{};
  check_dtype(op, "a", a, at::kFloat);
  check_dim(op, "a", a, 2, "[T, R]");
  check_unit_inner_stride(op, "a", a);
  args.b_dtype = kernel_dtype(op, "b", b);
  check_dim(op, "b", b, 2, "[T, H]");
  check_same_device(op, "b", b, "a", a);
  check_unit_inner_stride(op, "b", b);
  check_size(op, "b", b, 0, a.size(0), "T, the number of tokens of 'a'");
  check_defined(op, "ranks", ranks);
  check_dim(op, "ranks", ranks, 1, "[S]");
  const int64_t num_slots = ranks.size(0);
  check_table(op, "ranks", ranks, at::kInt, num_slots, "[S]", "a", a);
  check_table(op, "token_slots", token_slots, at::kInt, a.size(0), "[T]", "a", a);
  check_token_slot_values(op, token_slots, num_slots);
  check_plan(op, token_slots, token_order, slot_offsets, num_slots);
  check_rank_values(op, ranks, a.size(1), "R, the columns of 'a'");
  args.a = a.data_ptr<float>();
  args.a_row_stride = a.stride(0);
  args.b = b.data_ptr();
  args.b_row_stride = b.stride(0);
  args.num_slots = num_slots;
  args.max_rank = a.size(1);
  args.h = b.size(1);
  args.num_tokens = a.size(0);
  args.ranks = ranks.data_ptr<int32_t>();
  args.token_order = token_order.data_ptr<int32_t>();
  args.slot_offsets = slot_offsets.data_ptr<int32_t>();
  return args;
}

MergeArgs merge_arguments(const char* op, const at::Tensor& w, at::TensorList a, at::TensorList b,
                          c10::ArrayRef<double> coefficients,
                          const std::optional<at::Tensor>& delta) {
  MergeArgs args{};
  args.w_dtype = kernel_dtype(op, "W", w);
  check_dim(op, "W", w, 2, "[H_out, H_in]");
  TORCH_CHECK_VALUE(at::has_internal_overlap(w) != at::MemOverlap::Yes, "adaptfuse.", op,
                    ": argument 'W' has overlapping elements (strides ", w.strides(), ")");
  // A full delta alone (no low-rank terms) is a merge too: TIES/DARE fold in that way.
  const size_t min_terms = delta.has_value() ? 0 : 1;
  TORCH_CHECK_VALUE(a.size() >= min_terms && a.size() <= static_cast<size_t>(kMaxMergeTerms),
                    "adaptfuse.", op, ": argument 'A' must hold ", min_terms, " to ",
                    kMaxMergeTerms, " adapters, got ", a.size());
  if (delta.has_value()) {
    const at::Tensor& d = *delta;
    check_dtype(op, "delta", d, at::kFloat);
    check_dim(op, "delta", d, 2, "[H_out, H_in]");
    check_same_device(op, "delta", d, "W", w);
    check_size(op, "delta", d, 0, w.size(0), "H_out, W's dimension 0");
    check_size(op, "delta", d, 1, w.size(1), "H_in, W's dimension 1");
    args.dense_delta = d.data_ptr<float>();
    args.dense_stride_out = d.stride(0);
    args.dense_stride_in = d.stride(1);
  }
  TORCH_CHECK_VALUE(b.size() == a.size() && coefficients.size() == a.size(), "adaptfuse.", op,
                    ": 'A', 'B' and 'coefficients' must have one entry per adapter; got ", a.size(),
                    ", ", b.size(), " and ", coefficients.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string a_name = c10::str("A[", i, "]");
    const std::string b_name = c10::str("B[", i, "]");
    const DType a_dtype = kernel_dtype(op, a_name.c_str(), a[i]);
    const DType b_dtype = kernel_dtype(op, b_name.c_str(), b[i]);
    TORCH_CHECK_TYPE(a_dtype == b_dtype && (i == 0 || a_dtype == args.adapter_dtype), "adaptfuse.",
                     op, ": every A[i] and B[i] must share one dtype; A[0] is ", a[0].scalar_type(),
                     ", ", a_name, " is ", a[i].scalar_type(), ", ", b_name, " is ",
                     b[i].scalar_type());
    args.adapter_dtype = a_dtype;
    check_dim(op, a_name.c_str(), a[i], 2, "[r, H_in]");
    check_dim(op, b_name.c_str(), b[i], 2, "[r, H_out]");
    check_same_device(op, a_name.c_str(), a[i], "W", w);
    check_same_device(op, b_name.c_str(), b[i], "W", w);
    check_unit_inner_stride(op, a_name.c_str(), a[i]);
    check_unit_inner_stride(op, b_name.c_str(), b[i]);
    check_size(op, a_name.c_str(), a[i], 1, w.size(1), "H_in, W's dimension 1");
    check_size(op, b_name.c_str(), b[i], 1, w.size(0), "H_out, W's dimension 0");
    check_size(op, b_name.c_str(), b[i], 0, a[i].size(0), "the rank r of A[i]");
    TORCH_CHECK_VALUE(std::isfinite(coefficients[i]), "adaptfuse.", op, ": coefficient ", i,
                      " is not finite: ", coefficients[i]);
    MergeTerm& term = args.terms[i];
    term.a = a[i].data_ptr();
    term.b = b[i].data_ptr();
    term.rank = a[i].size(0);
    term.a_row_stride = a[i].stride(0);
    term.b_row_stride = b[i].stride(0);
    term.coefficient = static_cast<float>(coefficients[i]);
  }
  args.w = w.data_ptr();
  args.h_out = w.size(0);
  args.h_in = w.size(1);
  args.w_stride_out = w.stride(0);
  args.w_stride_in = w.stride(1);
  args.num_terms = static_cast<int>(a.size());
  return args;
}

int64_t merge_num_tiles(const MergeArgs& args) {
  return (args.h_out * args.h_in + kMergeTileElements - 1) / kMergeTileElements;
}

void check_merge_record(const at::Tensor& w, const at::Tensor& tile_counts,
                        const at::Tensor& offsets, const at::Tensor& corrections,
                        const at::Tensor& escape_bits) {
  const char* op = "unmerge_";
  const int64_t num_tiles = (w.numel() + kMergeTileElements - 1) / kMergeTileElements;
  check_dtype(op, "tile_counts", tile_counts, at::kInt);
  check_dim(op, "tile_counts", tile_counts, 2, "[num_tiles, 2]");
  check_size(op, "tile_counts", tile_counts, 0, num_tiles,
             "the number of 65536-element tiles of W");
  check_size(op, "tile_counts", tile_counts, 1, 2, "entries and escapes");
  check_dtype(op, "offsets", offsets, at::kShort);
  check_dim(op, "offsets", offsets, 1, "[N]");
  check_dtype(op, "corrections", corrections, at::kChar);
  check_dim(op, "corrections", corrections, 1, "[N]");
  check_size(op, "corrections", corrections, 0, offsets.size(0), "N, the entries of 'offsets'");
  check_dtype(op, "escape_bits", escape_bits, at::kInt);
  check_dim(op, "escape_bits", escape_bits, 1, "[E]");
  for (const auto& [name, t] :
       {std::pair<const char*, const at::Tensor&>{"tile_counts", tile_counts},
        {"offsets", offsets},
        {"corrections", corrections},
        {"escape_bits", escape_bits}}) {
    check_same_device(op, name, t, "W", w);
    check_contiguous(op, name, t);
  }
  const at::Tensor host = tile_counts.cpu();
  const int32_t* counts = host.data_ptr<int32_t>();
  int64_t entries = 0, escapes = 0;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    TORCH_CHECK_VALUE(counts[2 * tile] >= counts[2 * tile + 1] && counts[2 * tile + 1] >= 0,
                      "adaptfuse.unmerge_: 'tile_counts' is not a merge record (tile ", tile, ")");
    entries += counts[2 * tile];
    escapes += counts[2 * tile + 1];
  }
  TORCH_CHECK_VALUE(entries == offsets.size(0) && escapes == escape_bits.size(0),
                    "adaptfuse.unmerge_: the record does not belong to this W: its tiles count ",
                    entries, " entries and ", escapes, " escapes, but it holds ", offsets.size(0),
                    " and ", escape_bits.size(0));
  // Every entry must address an element of W, and each tile's escapes must be where its
  // count says: unmerge writes through these offsets.
  const at::Tensor host_offsets = offsets.cpu();
  const at::Tensor host_corrections = corrections.cpu();
  const int16_t* offset_data = host_offsets.data_ptr<int16_t>();
  const int8_t* correction_data = host_corrections.data_ptr<int8_t>();
  int64_t entry = 0;
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int64_t tile_size =
        std::min<int64_t>(kMergeTileElements, w.numel() - tile * kMergeTileElements);
    int64_t tile_escapes = 0;
    for (int64_t end = entry + counts[2 * tile]; entry < end; ++entry) {
      TORCH_CHECK_VALUE(static_cast<uint16_t>(offset_data[entry]) < tile_size,
                        "adaptfuse.unmerge_: the record does not belong to this W: entry ", entry,
                        " points past the end of tile ", tile);
      tile_escapes += correction_data[entry] == kEscapeCorrection ? 1 : 0;
    }
    TORCH_CHECK_VALUE(tile_escapes == counts[2 * tile + 1],
                      "adaptfuse.unmerge_: the record does not belong to this W: tile ", tile,
                      " has ", tile_escapes, " escaped entries but counts ", counts[2 * tile + 1]);
  }
}

}  // namespace adaptfuse
