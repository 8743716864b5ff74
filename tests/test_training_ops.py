"""The training ops: functional expand, segment_outer, and the autograd of shrink/expand,
against the float64 reference's own autograd, on the CPU ops, the emulated kernels and a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, assert_within_torch_error

from adaptfuse import ops, reference

CASES = [
    # tokens, slots, rank, h_in, h_out, x dtype, bank dtype
    (1, 1, 1, 7, 5, torch.float32, torch.float32),
    (37, 4, 8, 130, 70, torch.float32, torch.float32),
    (64, 5, 16, 96, 200, torch.bfloat16, torch.float32),  # fp32 trainable banks, bf16 model
    (20, 3, 4, 33, 17, torch.float16, torch.float16),
    (0, 2, 4, 8, 8, torch.float32, torch.float32),
]


def inputs(tokens, slots, rank, h_in, h_out, x_dtype, bank_dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed + tokens + rank)
    x = torch.randn(tokens, h_in, generator=gen).to(x_dtype)
    A = (torch.randn(slots, rank, h_in, generator=gen) / h_in**0.5).to(bank_dtype)
    B = (torch.randn(slots, rank, h_out, generator=gen) / rank**0.5).to(bank_dtype)
    ranks = torch.randint(0, rank + 1, (slots,), generator=gen).to(torch.int32)
    ranks[0] = rank
    scales = torch.rand(slots, generator=gen) + 0.5
    token_slots = torch.randint(-1, slots, (tokens,), generator=gen).to(torch.int32)
    weights = torch.randn(tokens, h_out, generator=gen)
    to = dict(device=device)
    return [t.to(**to) for t in (x, A, B, ranks, scales, token_slots, weights)]


def reference_grads(x, A, B, ranks, scales, token_slots, weights, dtype):
    """Gradients of sum(weights * expand(shrink(x))) through the reference, in ``dtype``."""
    x_, A_, B_ = (t.detach().cpu().to(dtype).requires_grad_() for t in (x, A, B))
    v = reference.shrink(x_, A_, ranks.cpu(), scales.cpu().to(dtype), token_slots.cpu(), dtype)
    zero = torch.zeros(x.shape[0], B.shape[2], dtype=dtype)
    y = reference.expand(zero, v, [B_], [0], ranks.cpu(), token_slots.cpu(), dtype)
    # (the zero terms give every input a gradient even when no token reaches it)
    untouched = 0 * (x_.sum() + A_.sum() + B_.sum())
    ((y * weights.cpu().to(dtype)).sum() + untouched).backward()
    return y.detach(), x_.grad, A_.grad, B_.grad


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_backward_matches_reference(case, target):
    device, library = target.device, target.library
    x, A, B, ranks, scales, token_slots, weights = inputs(*case, device)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    plan = ops.plan(token_slots, A.shape[0], library=library)
    v = ops.shrink(x, A, ranks, scales, plan, library=library)
    y = ops.expand(v, [B], [0], B.shape[2], ranks, plan, library=library)
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], B.shape[2])
    ((y * weights).sum() + 0 * (x.sum() + A.sum() + B.sum())).backward()
    exact = reference_grads(x, A, B, ranks, scales, token_slots, weights, torch.float64)
    plain = reference_grads(x, A, B, ranks, scales, token_slots, weights, torch.float32)
    for name, got, e, p, dtype in [
        ("y", y.detach(), exact[0], plain[0], torch.float32),
        ("dx", x.grad, exact[1], plain[1], x.dtype),
        ("dA", A.grad, exact[2], plain[2], A.dtype),
        ("dB", B.grad, exact[3], plain[3], B.dtype),
    ]:
        assert got.dtype == dtype, name
        assert_within_torch_error(got, e, p, dtype, name)


@pytest.mark.parametrize("target", TARGETS)
def test_segment_outer_matches_reference(target):
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(300, 24, generator=gen).to(device)
    b = torch.randn(300, 1001, generator=gen).to(torch.bfloat16).to(device)
    token_slots = (torch.randint(-1, 6, (300,), generator=gen)).to(torch.int32).to(device)
    ranks = torch.tensor([24, 0, 7, 1, 16, 24], dtype=torch.int32, device=device)
    plan = ops.plan(token_slots, 6, library=library)
    out = ops.segment_outer(a, b, ranks, plan, library=library)
    exact = reference.segment_outer(a.cpu(), b.cpu(), ranks.cpu(), token_slots.cpu())
    plain = reference.segment_outer(a.cpu(), b.cpu(), ranks.cpu(), token_slots.cpu(), torch.float32)
    assert_within_torch_error(out, exact, plain, torch.float32, "segment_outer")
    assert bool((out.cpu()[1] == 0).all()) and bool((out.cpu()[2, 7:] == 0).all())


@pytest.mark.parametrize("target", TARGETS)
def test_weight_gradients_are_deterministic(target):
    device, library = target.device, target.library
    x, A, B, ranks, scales, token_slots, weights = inputs(
        64, 5, 16, 96, 200, torch.float32, torch.float32, device, seed=3
    )
    grads = []
    for _ in range(2):
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()
        plan = ops.plan(token_slots, 5, library=library)
        v = ops.shrink(x, a, ranks, scales, plan, library=library)
        y = ops.expand(v, [b], [0], 200, ranks, plan, library=library)
        (y * weights).sum().backward()
        grads.append((a.grad.cpu(), b.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_expand_refuses_a_slice_outside_h_out():
    x, A, B, ranks, scales, token_slots, _ = inputs(
        4, 2, 4, 8, 8, torch.float32, torch.float32, "cpu"
    )
    plan = ops.plan(token_slots, 2)
    v = ops.shrink(x, A, ranks, scales, plan)
    with pytest.raises(
        ValueError, match=r"slice 0 covers output columns \[3, 11\) outside h_out = 8"
    ):
        ops.expand(v, [B], [3], 8, ranks, plan)
