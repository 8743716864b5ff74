// The one dispatcher of shrink and expand: it picks the kernel family from the shapes alone
// (no host synchronisation, nothing read from the device), so a launch can be captured in a
// CUDA graph and replayed with other slot assignments.
//
// Today every launch goes to BGMV, which is correct and bandwidth-bound for any token count;
// the simple kernels stay as the baseline that benchmarks and tests measure BGMV against.
#include <string.h>

#include <atomic>

#include "kernels/launchers.h"

namespace adaptfuse {
namespace {

std::atomic<int> selected_family{static_cast<int>(KernelFamily::kAuto)};

}  // namespace

void set_kernel_family(KernelFamily family) {
  selected_family.store(static_cast<int>(family), std::memory_order_relaxed);
}

KernelFamily kernel_family() {
  return static_cast<KernelFamily>(selected_family.load(std::memory_order_relaxed));
}

bool set_kernel_family_by_name(const char* name) {
  const KernelFamily families[] = {KernelFamily::kAuto, KernelFamily::kSimple, KernelFamily::kBgmv};
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
    default:
      return "auto";
  }
}

int64_t shrink_workspace_floats(const ShrinkArgs& args) {
  return kernel_family() == KernelFamily::kSimple ? 0 : bgmv_shrink_workspace_floats(args);
}

cudaError_t launch_shrink(const ShrinkArgs& args, cudaStream_t stream) {
  if (kernel_family() == KernelFamily::kSimple) return launch_shrink_simple(args, stream);
  return launch_shrink_bgmv(args, stream);
}

cudaError_t launch_expand(const ExpandArgs& args, cudaStream_t stream) {
  if (kernel_family() == KernelFamily::kSimple) return launch_expand_simple(args, stream);
  return launch_expand_bgmv(args, stream);
}

}  // namespace adaptfuse
