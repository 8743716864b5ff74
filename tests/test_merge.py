"""merge_ and unmerge_: the merged weights against the reference, and exact restore after
many cycles with random and adversarial values, compared as integer bit patterns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import BIT_VIEW, TARGETS, assert_bit_identical

from adaptfuse import ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_adapters(shape, ranks, dtype, device, gen, scale=0.02):
    h_out, h_in = shape
    A = [(torch.randn(r, h_in, generator=gen) * scale).to(dtype).to(device) for r in ranks]
    B = [(torch.randn(r, h_out, generator=gen) * scale).to(dtype).to(device) for r in ranks]
    return A, B


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 127), (1000, 67), (257, 513)], ids=str)
def test_merge_matches_reference(target, dtype, shape):
    """Merged W is W + delta rounded once; the delta is fp32, so the merged value may differ
    from the float64 truth by the fp32 delta's own error plus the final rounding."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(1)
    W = (torch.randn(shape, generator=gen) * 0.02).to(dtype).to(device)
    A, B = random_adapters(shape, [16, 3, 1], dtype, device, gen, scale=0.3)
    coefficients = [2.0, -0.5, 0.125]
    expected = reference.merge(W.cpu(), [a.cpu() for a in A], [b.cpu() for b in B], coefficients)
    exact = W.cpu().double() + reference.merge_delta(A, B, coefficients).cpu()
    delta_fp32_error = (
        (
            reference.merge_delta(A, B, coefficients, torch.float32).cpu().double()
            - reference.merge_delta(A, B, coefficients).cpu()
        )
        .abs()
        .max()
        .item()
    )
    original = W.clone()
    record = ops.merge_(W, A, B, coefficients, library=library)
    error = (W.cpu().double() - exact).abs()
    ulp = (
        torch.finfo(dtype).eps * exact.abs()
        + torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    )
    assert bool((error <= 2 * delta_fp32_error + ulp).all()), (
        "merged W is off by more than the fp32 delta error + 1 ulp"
    )
    if dtype != torch.float32 and W.numel() >= 1000:
        # The fp32 delta's error rarely moves a 16-bit rounding: mostly float64's result.
        assert (W.cpu() != expected).float().mean().item() < 0.05
    ops.unmerge_(W, A, B, coefficients, record, library=library)
    assert_bit_identical(W, original, "W after unmerge")


def adversarial_weights(dtype: torch.dtype, shape, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """W and a per-row delta that hit the hard cases of rounding: exact ties, binade edges,
    subnormals, signed zeros, deltas far larger than W, NaN with payloads and infinities."""
    info = torch.finfo(dtype)
    h_out, h_in = shape
    ulp_at_one = info.eps
    rows = [
        (torch.ones(h_in), ulp_at_one / 2),  # w + delta is an exact tie
        (torch.ones(h_in) * 1.5, ulp_at_one / 2),  # tie, odd neighbour
        (torch.ones(h_in), -ulp_at_one / 4),  # crosses the binade edge below 1
        (torch.full((h_in,), 2.0), -ulp_at_one),  # lands exactly on the edge
        (torch.full((h_in,), info.tiny), -info.tiny / 2),  # into the subnormals
        (torch.full((h_in,), info.tiny / 4), info.tiny / 8),  # subnormal + subnormal
        (torch.full((h_in,), -0.0), 0.0),  # -0.0 + 0.0 gives +0.0
        (torch.zeros(h_in), -0.0),
        (torch.randn(h_in, generator=gen) * 1e-3, 5.0),  # delta far larger than W
        (torch.randn(h_in, generator=gen) * 1e-6, -300.0),
        (torch.full((h_in,), info.max / 2), 0.25),  # large weights
    ]
    while len(rows) < h_out:
        rows.append(
            (torch.randn(h_in, generator=gen) * 0.02, float(torch.randn(1, generator=gen)) * 0.01)
        )
    W = torch.stack([r for r, _ in rows[:h_out]]).to(dtype)
    row_delta = torch.tensor([d for _, d in rows[:h_out]], dtype=torch.float64)
    # NaN with payloads (quiet and signalling patterns) and infinities, in the random rows.
    flat_bits = W.view(BIT_VIEW[dtype]).flatten()
    special = {  # quiet NaN with payload, signalling NaN, negative NaN, +inf, -inf
        torch.float32: [0x7FC00001, 0x7F800001, 0xFFC00123, 0x7F800000, 0xFF800000],
        torch.float16: [0x7E01, 0x7C01, 0xFE23, 0x7C00, 0xFC00],
        torch.bfloat16: [0x7FC1, 0x7F81, 0xFFC3, 0x7F80, 0xFF80],
    }[dtype]
    width = 8 * W.element_size()
    for i, pattern in enumerate(special):
        signed = pattern - (1 << width) if pattern >= 1 << (width - 1) else pattern
        flat_bits[(12 + i) * h_in + 3 * i] = signed  # in the random rows below the special ones
    return W, row_delta


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", ["random", "adversarial"])
def test_thousand_cycles_restore_bits(target, dtype, values):
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(7)
    shape = (24, 97)
    if values == "random":
        W = (torch.randn(shape, generator=gen) * 0.02).to(dtype).to(device)
        A, B = random_adapters(shape, [8, 16], dtype, device, gen, scale=0.2)
        coefficients = [1.5, -0.75]
    else:
        W, row_delta = adversarial_weights(dtype, shape, gen)
        W = W.to(device)
        # Rank 1: delta[o, i] = row_delta[o] exactly (A = 1, B = the row deltas), plus a
        # random rank-4 term so that deltas also vary along rows.
        A = [torch.ones(1, shape[1], dtype=torch.float32, device=device)]
        B = [row_delta.float()[None, :].to(device)]
        A2, B2 = random_adapters(shape, [4], torch.float32, device, gen, scale=0.05)
        A, B = A + A2, B + B2
        coefficients = [1.0, 1.0]
    original = W.clone()
    record = None
    # 1000 cycles on the CPU ops, on the device and on the emulated kernels in order (~3 s);
    # the shuffled and two-thread emulations, which check that the bits do not depend on the
    # scheduling, run 100 each.
    cycles = 100 if target.name in ("emu-shuffled", "emu-2threads") else 1000
    for cycle in range(cycles):
        record = ops.merge_(W, A, B, coefficients, library=library)
        if cycle == 0:
            assert record.num_entries > 0, "these values must need a record"
            merged_once = W.clone()
        else:
            assert_bit_identical(W, merged_once, f"merged W at cycle {cycle}")
        ops.unmerge_(W, A, B, coefficients, record, library=library)
        if cycle % 100 == 0:
            assert_bit_identical(W, original, f"W after cycle {cycle}")
    assert_bit_identical(W, original, f"W after {cycles} merge/unmerge cycles")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_is_refused_and_w_restored(target, dtype):
    device, library = target.device, target.library
    info = torch.finfo(dtype)
    W = torch.full((3, 70000 // 3 + 5), 0.5, dtype=dtype)  # more than one record tile
    W[2, 9] = info.max
    W[1, 4] = float("nan")  # already non-finite: not counted as "turning non-finite"
    W = W.to(device)
    original = W.clone()
    A = [torch.ones(1, W.shape[1], device=device, dtype=dtype)]
    B = [torch.tensor([[0.0, 0.25, info.max / 4]], device=device, dtype=dtype)]
    with pytest.raises(ValueError, match=r"non-finite"):
        ops.merge_(W, A, B, [2.0], library=library)
    assert_bit_identical(W, original, "W after a refused merge")


@pytest.mark.parametrize("target", TARGETS)
def test_strided_weight_and_record_on_host(target):
    """GPT-2's Conv1D stores W transposed: merge a transposed view, keep the record on the
    host in between (as a serving process may), and restore bit for bit."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(9)
    storage = (torch.randn(300, 200, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    W = storage.t()  # [H_out=200, H_in=300], strides (1, 200)
    A, B = random_adapters((200, 300), [16], torch.bfloat16, device, gen, scale=0.3)
    original = storage.clone()
    record = ops.merge_(W, A, B, [1.0], library=library).to("cpu")
    expected = reference.merge(
        original.t().cpu(), [a.cpu() for a in A], [b.cpu() for b in B], [1.0]
    )
    assert (W.cpu() != expected).float().mean().item() < 0.05
    ops.unmerge_(W, A, B, [1.0], record.to(device), library=library)
    assert_bit_identical(storage, original, "transposed W after unmerge")


@pytest.mark.parametrize("target", TARGETS)
def test_record_is_compact(target):
    """At DESIGN.md's reference point (bf16, W ~ N(0, 0.02), r=16, about 5% of elements
    mismatching) the record takes at most 10% of W's bytes."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(2)
    shape = (1024, 1024)
    W = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    A, B = random_adapters(shape, [16], torch.bfloat16, device, gen, scale=0.1)
    # Scale the delta to mean |delta| / mean |W| = 0.06, where DESIGN.md measured ~5.4%.
    delta = reference.merge_delta(A, B, [1.0])
    coefficient = 0.06 * W.double().abs().mean().item() / delta.abs().mean().item()
    record = ops.merge_(W, A, B, [coefficient], library=library)
    mismatching = record.num_entries / W.numel()
    assert 0.03 < mismatching < 0.08
    # 3 bytes per entry (16-bit offset, 8-bit correction) over 2 bytes per element.
    assert record.fraction_of(W) <= 1.5 * mismatching + 0.002
    assert record.fraction_of(W) <= 0.10


@pytest.mark.parametrize(
    "target",
    [t for t in TARGETS if t.values[0].library != "adaptfuse" or t.values[0].device == "cuda"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_merge_exactly_like_the_cpu_ops(target, dtype):
    """The CUDA kernels (on a GPU or emulated) and the CPU ops share merge_math.cuh: the same
    fixed-order fp32 delta and the same rounding, so they produce the same merged bits and
    the same record."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(4)
    shape = (300, 700)  # several record tiles, a partial last one
    W = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    A, B = random_adapters(shape, [16, 5], dtype, "cpu", gen, scale=0.1)
    on_cpu = W.clone()
    cpu_record = ops.merge_(on_cpu, A, B, [0.75, -2.0])
    on_target = W.to(device)
    record = ops.merge_(
        on_target,
        [a.to(device) for a in A],
        [b.to(device) for b in B],
        [0.75, -2.0],
        library=library,
    )
    assert_bit_identical(on_target, on_cpu, "merged W, kernels against CPU ops")
    for name, mine, theirs in zip(
        ("tile_counts", "offsets", "corrections", "escape_bits"),
        dataclasses.astuple(record),
        dataclasses.astuple(cpu_record),
        strict=True,
    ):
        assert torch.equal(mine.cpu(), theirs), f"record field {name} differs"
