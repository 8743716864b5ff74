// Argument checks of every op, in one place, shared by the CPU and CUDA implementations.
// Each check names the op, the argument, its value and what was expected; nothing is
// written before all checks pass. Each *_arguments function checks and fills the torch-free
// struct that the kernels take.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "kernels/merge_math.cuh"
#include "kernels/op_args.h"

namespace adaptfuse {

DType kernel_dtype(const char* op, const char* name, const at::Tensor& tensor);

// Value checks (slot ids in range, ranks within capacity) read the data: always on CPU, and
// on CUDA only with ADAPTFUSE_VALIDATE=1, since reading device data would synchronise.
bool validate_values(const at::Tensor& tensor);

PlanArgs plan_arguments(const at::Tensor& token_slots, int64_t num_slots);

ShrinkArgs shrink_arguments(const at::Tensor& x, const at::Tensor& a, const at::Tensor& ranks,
                            const at::Tensor& scales, const at::Tensor& token_slots,
                            const at::Tensor& token_order, const at::Tensor& slot_offsets,
                            const std::optional<at::Tensor>& bias = std::nullopt,
                            const std::optional<at::Tensor>& activations = std::nullopt);

ExpandArgs expand_arguments(const at::Tensor& y, const at::Tensor& v, at::TensorList b,
                            c10::IntArrayRef out_offsets, const at::Tensor& ranks,
                            const at::Tensor& token_slots, const at::Tensor& token_order,
                            const at::Tensor& slot_offsets,
                            const std::optional<at::Tensor>& bias = std::nullopt);

SegmentOuterArgs segment_outer_arguments(const at::Tensor& a, const at::Tensor& b,
                                         const at::Tensor& ranks, const at::Tensor& token_slots,
                                         const at::Tensor& token_order,
                                         const at::Tensor& slot_offsets);

MergeArgs merge_arguments(const char* op, const at::Tensor& w, at::TensorList a, at::TensorList b,
                          c10::ArrayRef<double> coefficients,
                          const std::optional<at::Tensor>& delta);

int64_t merge_num_tiles(const MergeArgs& args);

// The record of merge_, checked against W before unmerge_ touches anything.
void check_merge_record(const at::Tensor& w, const at::Tensor& tile_counts,
                        const at::Tensor& offsets, const at::Tensor& corrections,
                        const at::Tensor& escape_bits);

}  // namespace adaptfuse
