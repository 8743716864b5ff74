"""Shared helpers of the test suite: devices, tolerances by dtype, bit-pattern comparison."""

from __future__ import annotations

import pytest
import torch

import adaptfuse

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not adaptfuse.cuda_available(), reason="needs a GPU and the CUDA build"),
        ],
    ),
]

BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns: -0.0 != 0.0 and NaN payloads count."""
    t = t.detach().contiguous()
    return (t.view(BIT_VIEW[t.dtype]) if t.is_floating_point() else t).cpu()


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor"):
    a, e = bits(actual), bits(expected)
    mismatches = (a != e).sum().item()
    assert mismatches == 0, f"{what}: {mismatches} of {a.numel()} elements differ in their bits"


def assert_within_torch_error(actual, exact, plain, dtype, what="result"):
    """DESIGN.md's tolerance rule: the error of `actual` against the float64 truth `exact` is
    at most 2x the error of plain torch at the same precision (`plain`), plus a floor of
    4 ulps of the output dtype (relative to the largest magnitude)."""
    exact = exact.double().cpu()
    error = (actual.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    torch_error = (plain.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    scale = exact.abs().max().item() if exact.numel() else 0.0
    floor = 4 * torch.finfo(dtype).eps * scale
    assert error <= 2 * torch_error + floor, (
        f"{what}: max error {error:.3e} exceeds 2 x torch's {torch_error:.3e} + floor {floor:.3e}"
    )
