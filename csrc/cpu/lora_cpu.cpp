// shrink and expand on the CPU. Tokens are taken segment by segment from the plan (all
// tokens of one slot). With vector kernels (simd_lora.h), long segments (prefill) take panel
// kernels whose adapter rows are packed once per call, short ones (decode) kernels that read
// each adapter row once for a chunk of tokens, all parallel over chunks; training, and
// machines without vector kernels, run long segments as ATen GEMMs on views (gathered when
// their tokens are not consecutive) and short ones as portable blocked loops. fp32
// accumulation throughout; deterministic for a given batch (not batch-invariant: the blocking
// follows the segment lengths).
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "arguments.h"
#include "cpu/simd_lora.h"
#include "kernels/dispatch.h"

namespace adaptfuse {
namespace {

constexpr int64_t kGemmMinTokens = 16;
constexpr int64_t kTokensPerChunk = 4;                // portable loops
constexpr int64_t kSimdExpandChunk = kGemmMinTokens;  // vector expand: tokens per work item
constexpr int64_t kSimdExpandColumns = 512;           // vector expand: outputs per work item

// Tokens token_order[begin:end] all use `slot`.
struct Segment {
  int64_t slot, begin, end;
  int64_t size() const { return end - begin; }
};

struct SegmentWork {
  std::vector<Segment> long_segments;  // GEMM path
  std::vector<Segment> chunks;         // loop path, at most chunk_tokens tokens each
};

// Segments of at least gemm_min_tokens tokens go to the GEMM path, the rest is cut into
// chunks of at most chunk_tokens tokens.
SegmentWork split_segments(const at::Tensor& slot_offsets, const int32_t* ranks,
                           int64_t gemm_min_tokens, int64_t chunk_tokens) {
  SegmentWork work;
  const int32_t* offsets = slot_offsets.data_ptr<int32_t>();
  const int64_t num_slots = slot_offsets.size(0) - 1;
  for (int64_t s = 0; s < num_slots; ++s) {
    const Segment segment{s, offsets[s], offsets[s + 1]};
    if (segment.size() == 0 || ranks[s] == 0) continue;
    if (segment.size() >= gemm_min_tokens) {
      work.long_segments.push_back(segment);
      continue;
    }
    for (int64_t begin = segment.begin; begin < segment.end; begin += chunk_tokens) {
      work.chunks.push_back({s, begin, std::min(begin + chunk_tokens, segment.end)});
    }
  }
  return work;
}

// Dot products of up to N token rows with one adapter row, 8 independent fp32 accumulators
// per row in a fixed order (vectorisable, deterministic).
template <class XFormat, class AFormat, int N>
void dot_rows(const typename XFormat::Bits* const* rows, const typename AFormat::Bits* adapter_row,
              int64_t length, float* dots) {
  constexpr int kLanes = 8;
  float acc[N][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const float a = AFormat::to_float(adapter_row[i + lane]);
      for (int r = 0; r < N; ++r) acc[r][lane] += XFormat::to_float(rows[r][i + lane]) * a;
    }
  }
  for (int r = 0; r < N; ++r) {
    float tail = 0.0f;
    for (int64_t j = i; j < length; ++j) {
      tail += XFormat::to_float(rows[r][j]) * AFormat::to_float(adapter_row[j]);
    }
    const float* a = acc[r];
    dots[r] = (((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))) + tail;
  }
}

template <class XFormat, class AFormat, int N>
void shrink_chunk(const ShrinkArgs& args, const int32_t* tokens, int64_t slot, float* v,
                  int64_t v_row_stride) {
  const typename XFormat::Bits* rows[N];
  for (int r = 0; r < N; ++r) {
    rows[r] = static_cast<const typename XFormat::Bits*>(args.x) + tokens[r] * args.x_row_stride;
  }
  const float scale = args.scales[slot];
  const auto* a_slot =
      static_cast<const typename AFormat::Bits*>(args.a) + slot * args.a_slot_stride;
  float dots[N];
  for (int64_t k = 0; k < args.ranks[slot]; ++k) {
    dot_rows<XFormat, AFormat, N>(rows, a_slot + k * args.a_rank_stride, args.h_in, dots);
    for (int r = 0; r < N; ++r) v[tokens[r] * v_row_stride + k] = scale * dots[r];
  }
}

template <class XFormat, class AFormat>
void shrink_chunk_any(const ShrinkArgs& args, const int32_t* tokens, int64_t count, int64_t slot,
                      float* v, int64_t v_row_stride) {
  const void* x_rows[kSimdShrinkChunk];
  float* v_rows[kSimdShrinkChunk];
  for (int64_t r = 0; r < count; ++r) {
    x_rows[r] = static_cast<const typename XFormat::Bits*>(args.x) + tokens[r] * args.x_row_stride;
    v_rows[r] = v + tokens[r] * v_row_stride;
  }
  const void* a_slot =
      static_cast<const typename AFormat::Bits*>(args.a) + slot * args.a_slot_stride;
  if (shrink_rows_simd(args.x_dtype, args.a_dtype, x_rows, static_cast<int>(count), a_slot,
                       args.a_rank_stride, args.ranks[slot], args.h_in, args.scales[slot],
                       v_rows)) {
    return;
  }
  switch (count) {
    case 1:
      return shrink_chunk<XFormat, AFormat, 1>(args, tokens, slot, v, v_row_stride);
    case 2:
      return shrink_chunk<XFormat, AFormat, 2>(args, tokens, slot, v, v_row_stride);
    case 3:
      return shrink_chunk<XFormat, AFormat, 3>(args, tokens, slot, v, v_row_stride);
    default:
      return shrink_chunk<XFormat, AFormat, 4>(args, tokens, slot, v, v_row_stride);
  }
}

// Runs fn(segment) for every long segment. With at least as many segments as threads and a
// BLAS whose threads can be pinned, segments run in parallel with single-threaded GEMMs
// (small GEMMs split poorly across threads); otherwise one after another, each GEMM using
// every thread.
template <class Fn>
void for_each_long_segment(const SegmentWork& work, Fn&& fn) {
  const int64_t count = static_cast<int64_t>(work.long_segments.size());
  if (count >= at::get_num_threads() && count > 1) {
    // Worker threads run ATen ops: give them the caller's thread-local state (inference
    // mode, grad mode), which at::parallel_for does not carry over by itself.
    const at::ThreadLocalState caller_state;
    at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard state_guard(caller_state);
      for (int64_t i = begin; i < end; ++i) fn(work.long_segments[i]);
    });
  } else {
    for (const Segment& segment : work.long_segments) fn(segment);
  }
}

at::Tensor as_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// Whether the segment's tokens are consecutive rows of the batch (the usual prefill layout).
bool consecutive_tokens(const int32_t* order, const Segment& segment) {
  // The plan keeps each slot's tokens in ascending order, so this means "consecutive".
  return order[segment.end - 1] - order[segment.begin] == segment.size() - 1;
}

at::Tensor segment_rows(const at::Tensor& rows_of, const at::Tensor& token_order,
                        const Segment& segment, bool* consecutive, int64_t* first,
                        at::Tensor* indices) {
  const int32_t* order = token_order.data_ptr<int32_t>();
  *first = order[segment.begin];
  *consecutive = consecutive_tokens(order, segment);
  if (*consecutive) return rows_of.narrow(0, *first, segment.size());
  *indices = token_order.narrow(0, segment.begin, segment.size()).to(at::kLong);
  return rows_of.index_select(0, *indices);
}

// The vector path for long segments: each segment's adapter rows are packed into panels once
// (shared by all of its tokens), then chunks of kSimdPanelChunk tokens run in parallel.
void shrink_long_segments_with_panels(const ShrinkArgs& args, const std::vector<Segment>& segments,
                                      const at::Tensor& token_order, const at::Tensor& v) {
  if (segments.empty()) return;
  const int64_t count = static_cast<int64_t>(segments.size());
  std::vector<int64_t> panel_offsets(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) {
    panel_offsets[i + 1] =
        panel_offsets[i] + shrink_panel_floats(args.ranks[segments[i].slot], args.h_in);
  }
  std::vector<float> panels(static_cast<size_t>(panel_offsets[count]));
  const int64_t a_element_bytes = element_bytes(args.a_dtype);
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = segments[i].slot;
      const char* a_slot =
          static_cast<const char*>(args.a) + slot * args.a_slot_stride * a_element_bytes;
      pack_shrink_panels(args.a_dtype, a_slot, args.a_rank_stride, args.ranks[slot], args.h_in,
                         panels.data() + panel_offsets[i]);
    }
  });
  std::vector<std::pair<int64_t, Segment>> chunks;  // (segment index, its tokens)
  for (int64_t i = 0; i < count; ++i) {
    const Segment& segment = segments[i];
    for (int64_t begin = segment.begin; begin < segment.end; begin += kSimdPanelChunk) {
      chunks.push_back({i, {segment.slot, begin, std::min(begin + kSimdPanelChunk, segment.end)}});
    }
  }
  const int32_t* order = token_order.data_ptr<int32_t>();
  float* v_data = v.data_ptr<float>();
  const int64_t x_row_bytes = args.x_row_stride * element_bytes(args.x_dtype);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    const void* x_rows[kSimdPanelChunk];
    float* v_rows[kSimdPanelChunk];
    for (int64_t c = begin; c < end; ++c) {
      const auto& [segment_index, chunk] = chunks[c];
      for (int64_t r = 0; r < chunk.size(); ++r) {
        const int64_t t = order[chunk.begin + r];
        x_rows[r] = static_cast<const char*>(args.x) + t * x_row_bytes;
        v_rows[r] = v_data + t * v.stride(0);
      }
      const bool done =
          shrink_rows_panel(args.x_dtype, x_rows, static_cast<int>(chunk.size()),
                            panels.data() + panel_offsets[segment_index], args.ranks[chunk.slot],
                            args.h_in, args.scales[chunk.slot], v_rows);
      TORCH_INTERNAL_ASSERT(done, "adaptfuse.shrink: no panel kernel for this CPU");
    }
  });
}

at::Tensor shrink_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ranks,
                      const at::Tensor& scales, const at::Tensor& token_slots,
                      const at::Tensor& token_order, const at::Tensor& slot_offsets,
                      bool /*batch_invariant: the CPU path is deterministic, not invariant*/,
                      const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& activations) {
  ShrinkArgs args = shrink_arguments(x, a, ranks, scales, token_slots, token_order, slot_offsets,
                                     bias, activations);
  at::Tensor v = at::zeros({args.num_tokens, args.max_rank}, x.options().dtype(at::kFloat));
  if (args.num_tokens == 0 || args.max_rank == 0) return v;
  // A bottleneck's bias and activation come before its scale: the products are taken unscaled
  // and finished by one pass over v's used rows (v is [T, R_max]: small and still in cache).
  const bool epilogue = args.bias != nullptr || args.activations != nullptr;
  const float* slot_scales = args.scales;
  const std::vector<float> unit_scales(epilogue ? args.num_slots : 0, 1.0f);
  if (epilogue) args.scales = unit_scales.data();
  // With a vector kernel, long segments take the panel kernel and short ones the dot-product
  // kernel, both parallel over chunks (no nested BLAS threads); otherwise per-segment GEMMs.
  const bool vector_kernel = shrink_simd_available(args.x_dtype, args.a_dtype);
  const SegmentWork work =
      vector_kernel
          ? split_segments(slot_offsets, args.ranks, kShrinkPanelMinTokens, kSimdShrinkChunk)
          : split_segments(slot_offsets, args.ranks, kGemmMinTokens, kTokensPerChunk);
  // Training (an input requires grad) keeps the BLAS for long segments: x @ A^T then rounds as
  // torch's own matmul does, which is what PEFT computes, and trained adapters stay within
  // DESIGN.md's 2x-of-torch rule after several optimizer steps. The panel kernel is as
  // accurate per op (measured), but its independent rounding compounded to 2.2-6x torch's
  // error over 5 AdamW steps in the training tests.
  const bool training = x.requires_grad() || a.requires_grad();
  if (vector_kernel && !training) {
    shrink_long_segments_with_panels(args, work.long_segments, token_order, v);
  } else {
    for_each_long_segment(work, [&](const Segment& segment) {
      bool consecutive;
      int64_t first;
      at::Tensor indices;
      const at::Tensor xs =
          as_float(segment_rows(x, token_order, segment, &consecutive, &first, &indices));
      const int64_t rank = args.ranks[segment.slot];
      const at::Tensor a_rows = as_float(a.select(0, segment.slot).narrow(0, 0, rank));
      const float scale = args.scales[segment.slot];
      if (consecutive) {
        v.narrow(0, first, segment.size()).narrow(1, 0, rank).addmm_(xs, a_rows.t(), 0.0, scale);
      } else {
        at::Tensor product = at::mm(xs, a_rows.t());
        product.mul_(scale);
        v.narrow(1, 0, rank).index_copy_(0, indices, product);
      }
    });
  }
  const int32_t* order = token_order.data_ptr<int32_t>();
  float* v_data = v.data_ptr<float>();
  const int64_t v_row_stride = v.stride(0);
  AF_FORMAT_SWITCH(args.x_dtype, XFormat, AF_FORMAT_SWITCH(args.a_dtype, AFormat, {
                     at::parallel_for(0, static_cast<int64_t>(work.chunks.size()), 1,
                                      [&](int64_t begin, int64_t end) {
                                        for (int64_t c = begin; c < end; ++c) {
                                          const Segment& chunk = work.chunks[c];
                                          shrink_chunk_any<XFormat, AFormat>(
                                              args, order + chunk.begin, chunk.size(), chunk.slot,
                                              v_data, v_row_stride);
                                        }
                                      });
                   }));
  if (epilogue) {
    at::parallel_for(0, args.num_tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int32_t slot = args.token_slots[t];
        if (slot < 0) continue;
        const float* slot_bias = args.bias ? args.bias + slot * args.bias_slot_stride : nullptr;
        const Activation activation = args.activations
                                          ? static_cast<Activation>(args.activations[slot])
                                          : Activation::kIdentity;
        float* row = v_data + t * v_row_stride;
        for (int64_t k = 0; k < args.ranks[slot]; ++k) {
          const float z = slot_bias ? row[k] + slot_bias[k] : row[k];
          row[k] = slot_scales[slot] * apply_activation(activation, z);
        }
      }
    });
  }
  return v;
}

// Adds each chunk row's fp32 sum (plus the slot's bias, when the op has one) into y with a
// single rounding; all tokens of a chunk share one slot.
template <class YFormat>
void add_rows_into_y(const ExpandArgs& args, const ExpandSlice& slice, const int32_t* tokens,
                     int64_t count, const float* sums, int64_t sums_row_stride) {
  const float* bias = args.bias && count > 0
                          ? args.bias + args.token_slots[tokens[0]] * args.bias_slot_stride
                          : nullptr;
  for (int64_t r = 0; r < count; ++r) {
    auto* y = static_cast<typename YFormat::Bits*>(args.y) + tokens[r] * args.y_row_stride +
              slice.out_offset;
    const float* sum = sums + r * sums_row_stride;
    for (int64_t o = 0; o < slice.h_out; ++o) {
      const float total = bias ? sum[o] + bias[o] : sum[o];
      y[o] = YFormat::sum_rounded_once(YFormat::to_float(y[o]), total);
    }
  }
}

template <class YFormat, class BFormat>
void expand_chunk(const ExpandArgs& args, const ExpandSlice& slice, const int32_t* tokens,
                  int64_t count, int64_t slot, std::vector<float>& sums) {
  const auto* b_slot =
      static_cast<const typename BFormat::Bits*>(slice.b) + slot * slice.slot_stride;
  sums.assign(count * slice.h_out, 0.0f);
  const int64_t rank = args.ranks[slot];
  for (int64_t k = 0; k < rank; ++k) {
    const auto* b_row = b_slot + k * slice.rank_stride;
    for (int64_t r = 0; r < count; ++r) {
      const float vk = args.v[tokens[r] * args.v_row_stride + slice.v_column + k];
      float* sum = sums.data() + r * slice.h_out;
      for (int64_t o = 0; o < slice.h_out; ++o) sum[o] += vk * BFormat::to_float(b_row[o]);
    }
  }
  add_rows_into_y<YFormat>(args, slice, tokens, count, sums.data(), slice.h_out);
}

// The y rows (at the slice's first output) and v rows (at the slice's first column) of a
// chunk's tokens, for the vector expand kernels.
void chunk_rows(const ExpandArgs& args, const ExpandSlice& slice, const int32_t* order,
                const Segment& chunk, void** y_rows, const float** v_rows) {
  const int64_t y_element_bytes = element_bytes(args.y_dtype);
  for (int64_t r = 0; r < chunk.size(); ++r) {
    const int64_t t = order[chunk.begin + r];
    y_rows[r] =
        static_cast<char*>(args.y) + (t * args.y_row_stride + slice.out_offset) * y_element_bytes;
    v_rows[r] = args.v + t * args.v_row_stride + slice.v_column;
  }
}

// The vector path for short segments: work items of (chunk of one slot's tokens, slice,
// range of outputs), so that decode batches of a few tokens still spread over every thread.
void expand_vectorized(const ExpandArgs& args, const std::vector<Segment>& chunks,
                       const at::Tensor& token_order) {
  struct Item {
    Segment chunk;
    int slice;
    int64_t o_begin, o_end;
  };
  std::vector<Item> items;
  for (const Segment& chunk : chunks) {
    for (int i = 0; i < args.num_slices; ++i) {
      for (int64_t o = 0; o < args.slices[i].h_out; o += kSimdExpandColumns) {
        items.push_back({chunk, i, o, std::min(o + kSimdExpandColumns, args.slices[i].h_out)});
      }
    }
  }
  const int32_t* order = token_order.data_ptr<int32_t>();
  const int64_t b_element_bytes = element_bytes(args.b_dtype);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    void* y_rows[kSimdExpandChunk];
    const float* v_rows[kSimdExpandChunk];
    for (int64_t n = begin; n < end; ++n) {
      const Item& item = items[n];
      const ExpandSlice& slice = args.slices[item.slice];
      chunk_rows(args, slice, order, item.chunk, y_rows, v_rows);
      const void* b_slot =
          static_cast<const char*>(slice.b) + item.chunk.slot * slice.slot_stride * b_element_bytes;
      const float* bias = args.bias ? args.bias + item.chunk.slot * args.bias_slot_stride : nullptr;
      expand_rows_simd(args.y_dtype, args.b_dtype, y_rows, v_rows,
                       static_cast<int>(item.chunk.size()), b_slot, slice.rank_stride,
                       args.ranks[item.chunk.slot], item.o_begin, item.o_end, bias);
    }
  });
}

// The vector path for long segments: each (segment, slice)'s B rows are packed once, then
// work items of (kSimdExpandChunk tokens, slice, kSimdExpandColumns outputs) run in parallel.
void expand_long_segments_packed(const ExpandArgs& args, const std::vector<Segment>& segments,
                                 const at::Tensor& token_order) {
  if (segments.empty()) return;
  struct Packed {
    int64_t segment, slice, offset, stride;
  };
  std::vector<Packed> packs;
  int64_t floats = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(segments.size()); ++i) {
    for (int s = 0; s < args.num_slices; ++s) {
      const int64_t stride = expand_packed_stride(args.slices[s].h_out);
      packs.push_back({i, s, floats, stride});
      floats += args.ranks[segments[i].slot] * stride;
    }
  }
  std::vector<float> packed(static_cast<size_t>(floats));
  const int64_t b_element_bytes = element_bytes(args.b_dtype);
  at::parallel_for(0, static_cast<int64_t>(packs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Packed& pack = packs[p];
      const ExpandSlice& slice = args.slices[pack.slice];
      const int64_t slot = segments[pack.segment].slot;
      const char* b_slot =
          static_cast<const char*>(slice.b) + slot * slice.slot_stride * b_element_bytes;
      pack_expand_rows(args.b_dtype, b_slot, slice.rank_stride, args.ranks[slot], slice.h_out,
                       packed.data() + pack.offset, pack.stride);
    }
  });
  struct Item {
    int64_t pack;
    Segment chunk;
    int64_t o_begin, o_end;
  };
  std::vector<Item> items;
  for (int64_t p = 0; p < static_cast<int64_t>(packs.size()); ++p) {
    const Segment& segment = segments[packs[p].segment];
    const int64_t h_out = args.slices[packs[p].slice].h_out;
    for (int64_t begin = segment.begin; begin < segment.end; begin += kSimdExpandChunk) {
      const Segment chunk{segment.slot, begin, std::min(begin + kSimdExpandChunk, segment.end)};
      for (int64_t o = 0; o < h_out; o += kSimdExpandColumns) {
        items.push_back({p, chunk, o, std::min(o + kSimdExpandColumns, h_out)});
      }
    }
  }
  const int32_t* order = token_order.data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    void* y_rows[kSimdExpandChunk];
    const float* v_rows[kSimdExpandChunk];
    for (int64_t n = begin; n < end; ++n) {
      const Item& item = items[n];
      const Packed& pack = packs[item.pack];
      const ExpandSlice& slice = args.slices[pack.slice];
      chunk_rows(args, slice, order, item.chunk, y_rows, v_rows);
      const float* bias = args.bias ? args.bias + item.chunk.slot * args.bias_slot_stride : nullptr;
      const bool done =
          expand_packed_rows_simd(args.y_dtype, y_rows, v_rows, static_cast<int>(item.chunk.size()),
                                  packed.data() + pack.offset + item.o_begin, pack.stride,
                                  args.ranks[item.chunk.slot], item.o_begin, item.o_end, bias);
      TORCH_INTERNAL_ASSERT(done, "adaptfuse.expand_: no vector kernel for this CPU");
    }
  });
}

void expand_cpu(const at::Tensor& y, const at::Tensor& v, at::TensorList b,
                c10::IntArrayRef out_offsets, const at::Tensor& ranks,
                const at::Tensor& token_slots, const at::Tensor& token_order,
                const at::Tensor& slot_offsets,
                bool /*batch_invariant: the CPU path is deterministic, not invariant*/,
                const std::optional<at::Tensor>& bias) {
  const ExpandArgs args =
      expand_arguments(y, v, b, out_offsets, ranks, token_slots, token_order, slot_offsets, bias);
  if (args.num_tokens == 0) return;
  const bool vector_kernel = expand_simd_available(args.y_dtype, args.b_dtype);
  const SegmentWork work = split_segments(slot_offsets, args.ranks, kGemmMinTokens,
                                          vector_kernel ? kSimdExpandChunk : kTokensPerChunk);
  const int32_t* order = token_order.data_ptr<int32_t>();
  // Long segments take the vector kernel with B packed once: on the blocks of a layer's base
  // output (layers.py adds the adapters block by block) it measured faster than per-segment
  // BLAS calls (AVX2, fp32, a Llama layer of 1024 tokens, r 16: 1.00-1.04x the base layer's
  // time against 1.03-1.09x), and as fast across whole rows.
  // Training (an input requires grad) keeps the BLAS wherever it adds into y directly (fp32
  // y, consecutive tokens, no bias), for the reason shrink gives: trained adapters then round
  // as PEFT's torch matmuls do.
  bool training = v.requires_grad();
  for (const at::Tensor& bank : b) training = training || bank.requires_grad();
  SegmentWork gemm_work;
  std::vector<Segment> packed_segments;
  for (const Segment& segment : work.long_segments) {
    const bool gemm_adds_in_place = args.y_dtype == DType::kFloat32 && args.bias == nullptr &&
                                    consecutive_tokens(order, segment);
    const bool packed = vector_kernel && !(training && gemm_adds_in_place);
    (packed ? packed_segments : gemm_work.long_segments).push_back(segment);
  }
  expand_long_segments_packed(args, packed_segments, token_order);
  for_each_long_segment(gemm_work, [&](const Segment& segment) {
    bool consecutive;
    int64_t first;
    at::Tensor indices;
    const at::Tensor vs = segment_rows(v, token_order, segment, &consecutive, &first, &indices);
    const int64_t rank = args.ranks[segment.slot];
    for (int i = 0; i < args.num_slices; ++i) {
      const ExpandSlice& slice = args.slices[i];
      const at::Tensor v_slice = vs.narrow(1, slice.v_column, rank);
      const at::Tensor b_rows = as_float(b[i].select(0, segment.slot).narrow(0, 0, rank));
      if (consecutive && y.scalar_type() == at::kFloat && args.bias == nullptr) {
        y.narrow(0, first, segment.size())
            .narrow(1, slice.out_offset, slice.h_out)
            .addmm_(v_slice, b_rows);
        continue;
      }
      const at::Tensor sums = at::mm(v_slice, b_rows);
      const float* sums_data = sums.data_ptr<float>();
      AF_FORMAT_SWITCH(args.y_dtype, YFormat, {
        at::parallel_for(0, segment.size(), 16, [&](int64_t begin, int64_t end) {
          add_rows_into_y<YFormat>(args, slice, order + segment.begin + begin, end - begin,
                                   sums_data + begin * sums.stride(0), sums.stride(0));
        });
      });
    }
  });
  if (vector_kernel) {
    expand_vectorized(args, work.chunks, token_order);
    return;
  }
  AF_FORMAT_SWITCH(args.y_dtype, YFormat, AF_FORMAT_SWITCH(args.b_dtype, BFormat, {
                     at::parallel_for(0, static_cast<int64_t>(work.chunks.size()), 1,
                                      [&](int64_t begin, int64_t end) {
                                        std::vector<float> sums;
                                        for (int64_t c = begin; c < end; ++c) {
                                          const Segment& chunk = work.chunks[c];
                                          for (int i = 0; i < args.num_slices; ++i) {
                                            expand_chunk<YFormat, BFormat>(
                                                args, args.slices[i], order + chunk.begin,
                                                chunk.size(), chunk.slot, sums);
                                          }
                                        }
                                      });
                   }));
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptfuse, CPU, m) {
  m.impl("shrink", &shrink_cpu);
  m.impl("expand_", &expand_cpu);
}

}  // namespace adaptfuse
