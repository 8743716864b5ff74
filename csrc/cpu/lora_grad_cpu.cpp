// segment_outer on the CPU: one ATen GEMM per slot over its gathered tokens (the GEMM is
// parallel inside). Deterministic; like the other CPU GEMM paths, not batch-invariant.
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "arguments.h"

namespace adaptfuse {
namespace {

at::Tensor segment_outer_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& ranks,
                             const at::Tensor& token_slots, const at::Tensor& token_order,
                             const at::Tensor& slot_offsets) {
  const SegmentOuterArgs args =
      segment_outer_arguments(a, b, ranks, token_slots, token_order, slot_offsets);
  at::Tensor out = at::zeros({args.num_slots, args.max_rank, args.h}, a.options());
  const at::Tensor order = token_order.to(at::kLong);
  for (int64_t slot = 0; slot < args.num_slots; ++slot) {
    const int64_t begin = args.slot_offsets[slot];
    const int64_t count = args.slot_offsets[slot + 1] - begin;
    const int64_t rank = std::min<int64_t>(args.ranks[slot], args.max_rank);
    if (count == 0 || rank == 0 || args.h == 0) continue;
    const at::Tensor rows = order.narrow(0, begin, count);
    const at::Tensor a_rows = a.index_select(0, rows).narrow(1, 0, rank);
    const at::Tensor b_rows = b.index_select(0, rows).to(at::kFloat);
    at::Tensor target = out.select(0, slot).narrow(0, 0, rank);
    at::mm_out(target, a_rows.t(), b_rows);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptfuse, CPU, m) { m.impl("segment_outer", &segment_outer_cpu); }

}  // namespace adaptfuse
