// The CUDA kernel sources, compiled as plain C++ against the emulator (ADAPTFUSE_EMU).
#include "kernels/lora.cu"   // NOLINT(bugprone-suspicious-include)
#include "kernels/merge.cu"  // NOLINT(bugprone-suspicious-include)
#include "kernels/plan.cu"   // NOLINT(bugprone-suspicious-include)
