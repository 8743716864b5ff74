// Dtype switches shared by the CPU ops and the CUDA launchers (torch-free).
//
//   AF_FORMAT_SWITCH(dtype, WFormat, { run<WFormat>(...); });
//
// expands the body once per storage format, with WFormat naming Float32Format,
// Float16Format or BFloat16Format. Nest two switches for two independent dtypes.
#pragma once

#include "kernels/float_formats.cuh"

#define AF_FORMAT_SWITCH(dtype, FORMAT, ...)        \
  do {                                              \
    switch (dtype) {                                \
      case ::adaptfuse::DType::kFloat32: {          \
        using FORMAT = ::adaptfuse::Float32Format;  \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
      case ::adaptfuse::DType::kFloat16: {          \
        using FORMAT = ::adaptfuse::Float16Format;  \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
      case ::adaptfuse::DType::kBFloat16: {         \
        using FORMAT = ::adaptfuse::BFloat16Format; \
        __VA_ARGS__;                                \
        break;                                      \
      }                                             \
    }                                               \
  } while (0)
