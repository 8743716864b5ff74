// plan on the CPU: a stable counting sort of tokens by slot, O(T + S).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "arguments.h"

namespace adaptfuse {
namespace {

std::tuple<at::Tensor, at::Tensor> plan_cpu(const at::Tensor& token_slots, int64_t num_slots) {
  const PlanArgs args = plan_arguments(token_slots, num_slots);
  at::Tensor token_order = at::empty({args.num_tokens}, token_slots.options());
  at::Tensor slot_offsets = at::empty({num_slots + 1}, token_slots.options());
  int32_t* order = token_order.data_ptr<int32_t>();
  int32_t* offsets = slot_offsets.data_ptr<int32_t>();
  // Bucket num_slots collects the tokens without a slot; they go last.
  std::vector<int64_t> next(num_slots + 2, 0);
  auto bucket_of = [&](int32_t slot) -> int64_t {
    return slot >= 0 && slot < num_slots ? slot : num_slots;
  };
  for (int64_t t = 0; t < args.num_tokens; ++t) ++next[bucket_of(args.token_slots[t]) + 1];
  for (int64_t b = 1; b <= num_slots + 1; ++b) next[b] += next[b - 1];
  for (int64_t s = 0; s <= num_slots; ++s) offsets[s] = static_cast<int32_t>(next[s]);
  for (int64_t t = 0; t < args.num_tokens; ++t) {
    order[next[bucket_of(args.token_slots[t])]++] = static_cast<int32_t>(t);
  }
  return {token_order, slot_offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(adaptfuse, CPU, m) { m.impl("plan", &plan_cpu); }

}  // namespace adaptfuse
