"""Build of the adaptfuse._C extension.

CPU ops are always built. CUDA kernels are built whenever nvcc is found, also on a machine
without a GPU; ADAPTFUSE_CUDA=0 forces a CPU-only build. TORCH_CUDA_ARCH_LIST overrides the
default architectures (sm_80, sm_86, sm_89, sm_90 and PTX).

Build against the torch that is installed:  pip install --no-build-isolation .
"""

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def find_cuda_home():
    """CUDA toolkit root, or None. Set before torch.utils.cpp_extension is imported: its own
    guess goes wrong when nvcc is a wrapper script and no GPU driver is present."""
    if os.environ.get("ADAPTFUSE_CUDA", "1") == "0":
        return None
    for env in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(env)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
            os.path.join(path, "include", "cuda_runtime.h")
        ):
            return path
    return None


def wheel_cuda_include_dirs():
    """Headers that torch's CUDA 13 wheels bring (cublas, cusparse...): the toolkit may lack them."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            path = os.path.join(root, sub)
            if os.path.isdir(path) and path not in found:
                found.append(path)
    return found


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# No -std flag: torch picks the standard its headers need (C++20 for 2.14, C++17 before).
# -ffp-contract=off: merge and unmerge must compute bit-identical deltas, so no FMA
# contraction may differ between the two; it also keeps the CPU delta equal to the CUDA one.
# -fopenmp: at::parallel_for is a header template; without it the loop runs on one thread.
cxx_flags = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-fopenmp"]
# ADAPTFUSE_LDFLAGS: extra link flags (e.g. "-static-libstdc++ -Wl,--exclude-libs,ALL" for a
# toolchain that would otherwise mix a static libstdc++ with the process's shared one).
link_flags = ["-fopenmp"] + os.environ.get("ADAPTFUSE_LDFLAGS", "").split()
include_dirs = [os.path.join(ROOT, "csrc")]
define_macros = []

if CUDA_HOME:
    cuda_includes = [os.path.join(CUDA_HOME, "include")] + wheel_cuda_include_dirs()
    ext = CUDAExtension(
        "adaptfuse._C",
        sources=sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/cuda/*.cpp")
        + sources("csrc/kernels/*.cu"),
        include_dirs=include_dirs + cuda_includes,
        define_macros=define_macros + [("ADAPTFUSE_WITH_CUDA", "1")],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            # No global --fmad=false: the merge kernels spell their adds and multiplies
            # with __fadd_rn/__fmul_rn, which nvcc never contracts; other kernels want FMA.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
else:
    ext = CppExtension(
        "adaptfuse._C",
        sources=sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp"),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

# Test-only: the CUDA kernel sources compiled as plain C++ against the CPU emulator
# (csrc/emu), registered as torch.ops.adaptfuse_emu.*; built on every machine.
emu_ext = CppExtension(
    "adaptfuse._emu",
    sources=sources("csrc/emu/*.cpp") + ["csrc/arguments.cpp"],
    # CUDA headers, where found, give emulated kernels cuda_fp16.h / cuda_bf16.h's types.
    include_dirs=include_dirs + ([os.path.join(CUDA_HOME, "include")] if CUDA_HOME else []) + wheel_cuda_include_dirs(),
    define_macros=[("ADAPTFUSE_EMU", "1")],
    extra_compile_args={"cxx": ["-O2", "-ffp-contract=off", "-fno-strict-aliasing"]},
)

setup(
    ext_modules=[ext, emu_ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
