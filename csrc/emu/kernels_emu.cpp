// The CUDA kernel sources, compiled as plain C++ against the emulator (ADAPTFUSE_EMU).
#include "kernels/bgmv.cu"           // NOLINT(bugprone-suspicious-include)
#include "kernels/lora.cu"           // NOLINT(bugprone-suspicious-include)
#include "kernels/lora_dispatch.cu"  // NOLINT(bugprone-suspicious-include)
#include "kernels/lora_grad.cu"      // NOLINT(bugprone-suspicious-include)
#include "kernels/merge.cu"          // NOLINT(bugprone-suspicious-include)
#include "kernels/plan.cu"           // NOLINT(bugprone-suspicious-include)
#include "kernels/sgmv.cu"           // NOLINT(bugprone-suspicious-include)
