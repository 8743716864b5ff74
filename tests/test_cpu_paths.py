"""The CPU ops have three implementations: AVX-512 kernels, AVX2 kernels (the same source
compiled for 8 lanes), and portable loops plus per-segment GEMMs everywhere else. The suite
runs the best vector kernels the machine has; this runs the op tests once more with the vector
kernels switched off, and once capped at AVX2 where the machine's best is AVX-512."""

import os
import subprocess
import sys

import pytest

import adaptfuse

MODULES = ["tests/test_ops.py", "tests/test_op_contract.py", "tests/test_bottleneck.py"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels_under(setting: str) -> str:
    """What adaptfuse.cpu_kernels() says in a process started with ADAPTFUSE_CPU_SIMD=setting."""
    env = {**os.environ, "ADAPTFUSE_CPU_SIMD": setting}
    script = "import adaptfuse; print(adaptfuse.cpu_kernels())"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_cpu_kernel_choice():
    assert adaptfuse.cpu_kernels() in ("avx512", "avx2", "none")
    assert kernels_under("0") == "none"
    capped = kernels_under("avx2")
    assert capped == ("none" if adaptfuse.cpu_kernels() == "none" else "avx2")


@pytest.mark.parametrize("module", MODULES)
def test_portable_cpu_path(module):
    run_op_tests(module, "0")


@pytest.mark.parametrize("module", MODULES)
def test_avx2_cpu_path(module):
    if adaptfuse.cpu_kernels() != "avx512":
        pytest.skip("the default run already uses this machine's best kernels (AVX2 or none)")
    run_op_tests(module, "avx2")


def run_op_tests(module: str, setting: str) -> None:
    env = {**os.environ, "ADAPTFUSE_CPU_SIMD": setting}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cpu", "-p", "no:cacheprovider", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
