// CUDA backend of the ops: the shared glue (kernel_glue.h) on the current CUDA stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernel_glue.h"

namespace adaptfuse {
namespace {

struct CudaBackend {
  struct Guard {
    explicit Guard(const at::Tensor& on) : guard(on.device()) {}
    c10::cuda::CUDAGuard guard;
  };
  static cudaStream_t stream(const at::Tensor& on) {
    return c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(adaptfuse, CUDA, m) {
  m.impl("plan", &plan_op<CudaBackend>);
  m.impl("shrink", &shrink_op<CudaBackend>);
  m.impl("expand_", &expand_op<CudaBackend>);
  m.impl("segment_outer", &segment_outer_op<CudaBackend>);
  m.impl("merge_", &merge_op<CudaBackend>);
  m.impl("unmerge_", &unmerge_op<CudaBackend>);
}

}  // namespace adaptfuse
