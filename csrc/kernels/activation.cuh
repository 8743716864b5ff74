// The activations of bottleneck adapters, applied between shrink and expand (DESIGN.md,
// "Bottleneck adapters"): v = scale * act(x A^T + bias). One definition for the CPU ops, the
// CUDA kernels and the emulator; the codes are the `activation` argument of the shrink op and
// adaptfuse.ops.ACTIVATIONS lists them in the same order.
#pragma once

#include <math.h>

#include "kernels/device.cuh"

namespace adaptfuse {

enum class Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kGelu = 2,      // erf form (torch.nn.functional.gelu)
  kGeluTanh = 3,  // tanh approximation (transformers' gelu_new)
  kSilu = 4,      // AdapterHub's "swish"
  kTanh = 5,
};
constexpr int kNumActivations = 6;

AF_HOST_DEVICE float apply_activation(Activation activation, float z) {
  switch (activation) {
    case Activation::kRelu:
      return z > 0.0f ? z : 0.0f;
    case Activation::kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case Activation::kSilu:
      return z / (1.0f + expf(-z));
    case Activation::kTanh:
      return tanhf(z);
    default:
      return z;
  }
}

}  // namespace adaptfuse
