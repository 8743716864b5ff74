// The one dispatcher of shrink and expand: it picks the kernel family from the shapes alone
// (no host synchronisation, nothing read from the device), so a launch can be captured in a
// CUDA graph and replayed with other slot assignments.
//
// The auto rule. The plan's fixed-size metadata are T (tokens) and S (slots); at most S
// segments are used, so T / S bounds the mean segment length from below.
//   - batch_invariant launches: always SGMV, whose H_in splits are fixed by H_in alone
//     (sgmv.cu), so every token takes one kernel family and one summation order whatever
//     the rest of the batch is;
//   - otherwise SGMV when T >= kSgmvMinTokensPerSlot * S (the used segments fill at least one
//     16-token mma tile on average: weight tiles are reused across tokens), else BGMV (decode:
//     a few tokens per adapter, a matrix-vector product each, split over H_in to fill the
//     machine). A mixed batch (prefill and decode requests) runs in one pass of the chosen
//     family: both handle any segment lengths.
// SGMV then picks its own tiles and H_in splits from the same shapes (sgmv.cu).
// Bottleneck adapters (a bias, an activation) always take BGMV: a matrix-vector product per
// token at their 16-256 dimensions, whatever family is selected.
// The simple kernels stay as the baseline that benchmarks and tests measure the others against.
#include <string.h>

#include <atomic>

#include "kernels/launchers.h"

namespace adaptfuse {
namespace {

std::atomic<int> selected_family{static_cast<int>(KernelFamily::kAuto)};
constexpr int64_t kSgmvMinTokensPerSlot = 16;

bool is_bottleneck(const ShrinkArgs& args) {
  return args.bias != nullptr || args.activations != nullptr;
}
bool is_bottleneck(const ExpandArgs& args) { return args.bias != nullptr; }

// The family that runs a launch: BGMV for bottleneck adapters (the only family with their
// bias and activation; batch-invariant too), else the selected one or the auto rule's choice.
KernelFamily family_for(int64_t num_tokens, int64_t num_slots, bool batch_invariant,
                        bool bottleneck) {
  if (bottleneck) return KernelFamily::kBgmv;
  const KernelFamily selected = kernel_family();
  return selected == KernelFamily::kAuto
             ? auto_kernel_family(num_tokens, num_slots, batch_invariant)
             : selected;
}

}  // namespace

void set_kernel_family(KernelFamily family) {
  selected_family.store(static_cast<int>(family), std::memory_order_relaxed);
}

KernelFamily kernel_family() {
  return static_cast<KernelFamily>(selected_family.load(std::memory_order_relaxed));
}

bool set_kernel_family_by_name(const char* name) {
  const KernelFamily families[] = {KernelFamily::kAuto, KernelFamily::kSimple, KernelFamily::kBgmv,
                                   KernelFamily::kSgmv};
  for (const KernelFamily family : families) {
    if (strcmp(name, kernel_family_name(family)) == 0) {
      set_kernel_family(family);
      return true;
    }
  }
  return false;
}

const char* kernel_family_name(KernelFamily family) {
  switch (family) {
    case KernelFamily::kSimple:
      return "simple";
    case KernelFamily::kBgmv:
      return "bgmv";
    case KernelFamily::kSgmv:
      return "sgmv";
    default:
      return "auto";
  }
}

KernelFamily auto_kernel_family(int64_t num_tokens, int64_t num_slots, bool batch_invariant) {
  if (batch_invariant) return KernelFamily::kSgmv;
  return num_slots > 0 && num_tokens >= kSgmvMinTokensPerSlot * num_slots ? KernelFamily::kSgmv
                                                                          : KernelFamily::kBgmv;
}

int64_t shrink_workspace_floats(const ShrinkArgs& args) {
  switch (family_for(args.num_tokens, args.num_slots, args.batch_invariant, is_bottleneck(args))) {
    case KernelFamily::kSimple:
      return 0;
    case KernelFamily::kSgmv:
      return sgmv_shrink_workspace_floats(args);
    default:
      return bgmv_shrink_workspace_floats(args);
  }
}

cudaError_t launch_shrink(const ShrinkArgs& args, cudaStream_t stream) {
  switch (family_for(args.num_tokens, args.num_slots, args.batch_invariant, is_bottleneck(args))) {
    case KernelFamily::kSimple:
      return launch_shrink_simple(args, stream);
    case KernelFamily::kSgmv:
      return launch_shrink_sgmv(args, stream);
    default:
      return launch_shrink_bgmv(args, stream);
  }
}

cudaError_t launch_expand(const ExpandArgs& args, cudaStream_t stream) {
  switch (family_for(args.num_tokens, args.num_slots, args.batch_invariant, is_bottleneck(args))) {
    case KernelFamily::kSimple:
      return launch_expand_simple(args, stream);
    case KernelFamily::kSgmv:
      return launch_expand_sgmv(args, stream);
    default:
      return launch_expand_bgmv(args, stream);
  }
}

}  // namespace adaptfuse
