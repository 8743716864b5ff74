"""adaptfuse: one frozen Hugging Face base model, many LoRA adapters per batch.

Importing adaptfuse loads the compiled ops (``torch.ops.adaptfuse.*``) and their fake
implementations; it works on machines without a GPU whether or not CUDA was built.
"""

import torch

from adaptfuse import _C, ops, routing  # _C registers torch.ops.adaptfuse.*
from adaptfuse.adapters import AdapterError
from adaptfuse.manager import AdapterManager, StaticAssignment
from adaptfuse.ops import MergeRecord
from adaptfuse.patch import manager_of, patch, unpatch
from adaptfuse.routing import Split
from adaptfuse.training import per_adapter_loss

__version__ = "0.1.0"


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(_C.cuda_built())


def cpu_kernels() -> str:
    """The vector kernels the CPU ops use on this machine: "avx512", "avx2" or "none"
    (portable loops). ADAPTFUSE_CPU_SIMD=0 or =avx2, set before the first op, lowers it."""
    return str(_C.cpu_kernels())


def cuda_available() -> bool:
    """Whether CUDA kernels were built and a GPU is usable right now."""
    return cuda_built() and torch.cuda.is_available()


__all__ = [
    "AdapterError",
    "AdapterManager",
    "MergeRecord",
    "Split",
    "StaticAssignment",
    "__version__",
    "cpu_kernels",
    "cuda_available",
    "cuda_built",
    "manager_of",
    "ops",
    "patch",
    "per_adapter_loss",
    "routing",
    "unpatch",
]
