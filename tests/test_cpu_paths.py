"""The CPU ops have two implementations: AVX-512 kernels where the CPU has them, and portable
loops plus per-segment GEMMs everywhere else. The suite runs the vector kernels on machines
that have them; this runs the op tests once more with the vector kernels switched off."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["tests/test_ops.py", "tests/test_op_contract.py", "tests/test_bottleneck.py"]
)
def test_portable_cpu_path(module):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ADAPTFUSE_CPU_SIMD": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cpu", "-p", "no:cacheprovider", module],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
