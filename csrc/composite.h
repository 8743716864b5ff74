// Ops composed of other ops through the dispatcher, written once for both op libraries
// ("adaptfuse" registers them in ops.cpp, "adaptfuse_emu" in emu/emu_ops.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

namespace adaptfuse {

// The functional expand of training: a new fp32 [T, h_out] holding zero plus expand_ of every
// slice (so autograd formulas can attach to it; torch refuses them on mutating schemas).
template <const char* kLibrary>
at::Tensor expand_functional(const at::Tensor& v, at::TensorList b, c10::IntArrayRef out_offsets,
                             int64_t h_out, const at::Tensor& ranks, const at::Tensor& token_slots,
                             const at::Tensor& token_order, const at::Tensor& slot_offsets,
                             bool batch_invariant, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(v.dim() == 2, "adaptfuse.expand: argument 'v' must be [T, sum of R_max_i], ",
                    "got shape ", v.sizes());
  for (size_t i = 0; i < b.size() && i < out_offsets.size(); ++i) {
    const int64_t width = b[i].dim() == 3 ? b[i].size(2) : 0;
    TORCH_CHECK_VALUE(out_offsets[i] >= 0 && out_offsets[i] + width <= h_out,
                      "adaptfuse.expand: slice ", i, " covers output columns [", out_offsets[i],
                      ", ", out_offsets[i] + width, ") outside h_out = ", h_out);
  }
  at::Tensor y = at::zeros({v.size(0), h_out}, v.options().dtype(at::kFloat));
  static const auto expand_in_place =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(c10::str(kLibrary, "::expand_").c_str(), "")
          .typed<void(const at::Tensor&, const at::Tensor&, at::TensorList, c10::IntArrayRef,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      bool, const std::optional<at::Tensor>&)>();
  expand_in_place.call(y, v, b, out_offsets, ranks, token_slots, token_order, slot_offsets,
                       batch_invariant, bias);
  return y;
}

}  // namespace adaptfuse
