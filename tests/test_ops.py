"""plan, shrink and expand_ against adaptfuse.reference, over pairwise-combined shapes."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import TARGETS, assert_within_torch_error, correctly_rounded, token_slots_for
from pairwise import case_id, pairwise_cases

from adaptfuse import ops, reference

SIZES = [1, 7, 64, 127, 1000, 4097]
RANKS = [1, 8, 16, 64, 256, 512]
TOKENS = [0, 1, 3, 64, 1000]
# How requests share adapters (Punica's "popularity"), plus the no-adapter cases.
POPULARITY = ["single", "distinct", "uniform", "segments", "some_none", "all_none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def num_slots_for(popularity: str, num_tokens: int) -> int:
    return {"single": 3, "distinct": max(num_tokens, 1), "all_none": 2}.get(popularity, 4)


def feasible(case: dict) -> bool:
    slots = num_slots_for(case["popularity"], case["tokens"])
    width = case["h_in"] + case["h_out"]
    # Keep the float64 reference and the banks small enough for a 2-core CI machine.
    return slots * case["rank"] * width <= 24e6 and case["tokens"] * case["rank"] * width <= 60e6


CASES = pairwise_cases(
    {
        "h_in": SIZES,
        "h_out": SIZES,
        "rank": RANKS,
        "tokens": TOKENS,
        "popularity": POPULARITY,
        "ranks": ["full", "mixed"],
        "dtype": DTYPES,
        "layout": ["contiguous", "strided"],
    },
    allowed=feasible,
)


def ranks_for(kind: str, num_slots: int, max_rank: int, gen) -> torch.Tensor:
    if kind == "full":
        return torch.full((num_slots,), max_rank, dtype=torch.int32)
    ranks = torch.randint(0, max_rank + 1, (num_slots,), generator=gen)
    ranks[0] = max_rank
    return ranks.to(torch.int32)


def make_operand(shape, dtype, device, layout, gen, scale=1.0):
    """A random tensor; with layout "strided", a view into a larger buffer (row strides and
    slot strides larger than the shape), unit stride along the last dimension."""
    if layout == "contiguous":
        return (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    padded = list(shape)
    padded[-1] += 5
    if len(shape) == 3:
        padded[1] += 3
    big = (torch.randn(padded, generator=gen) * scale).to(dtype).to(device)
    view = big[..., 2 : 2 + shape[-1]]
    return view[:, : shape[1]] if len(shape) == 3 else view


def build_case(case: dict, device: str):
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    num_tokens, rank, dtype = case["tokens"], case["rank"], case["dtype"]
    num_slots = num_slots_for(case["popularity"], num_tokens)
    token_slots = token_slots_for(case["popularity"], num_tokens, num_slots, gen)
    ranks = ranks_for(case["ranks"], num_slots, rank, gen)
    scales = (torch.rand(num_slots, generator=gen) * 2 + 0.25).float()
    x = make_operand((num_tokens, case["h_in"]), dtype, device, case["layout"], gen)
    A = make_operand(
        (num_slots, rank, case["h_in"]), dtype, device, case["layout"], gen, case["h_in"] ** -0.5
    )
    B = make_operand(
        (num_slots, rank, case["h_out"]), dtype, device, case["layout"], gen, rank**-0.5
    )
    y = make_operand((num_tokens, case["h_out"]), dtype, device, case["layout"], gen)
    return x, A, B, y, token_slots.to(device), ranks.to(device), scales.to(device)


def emulation_cost(case: dict) -> float:
    """Work of the simple kernels (multiply-adds, and the plan's slots x tokens scan): what an
    emulated run costs."""
    slots = num_slots_for(case["popularity"], case["tokens"])
    return case["tokens"] * (case["rank"] * (case["h_in"] + case["h_out"]) + 2 * slots)


# Every case on the CPU ops and on a GPU; under the emulator (about 10^8 multiply-adds a
# second) the cases up to 2e6 multiply-adds, which still cover every value of every parameter.
CASE_TARGETS = [
    pytest.param(case, target.values[0], id=f"{case_id(case)}-{target.id}", marks=target.marks)
    for case in CASES
    for target in TARGETS
    if not target.values[0].emulated or emulation_cost(case) <= 2e6
]


@pytest.mark.parametrize("case,target", CASE_TARGETS)
def test_shrink_expand_match_reference(case, target):
    device, library = target.device, target.library
    x, A, B, y, token_slots, ranks, scales = build_case(case, device)
    plan = ops.plan(token_slots, A.shape[0], library=library)
    expected_order, expected_offsets = reference.plan(token_slots.cpu(), A.shape[0])
    assert torch.equal(plan.token_order.cpu(), expected_order)
    assert torch.equal(plan.slot_offsets.cpu(), expected_offsets)

    v = ops.shrink(x, A, ranks, scales, plan, library=library)
    assert v.dtype == torch.float32 and v.shape == (x.shape[0], A.shape[1])
    exact_v = reference.shrink(x, A, ranks, scales, token_slots)
    plain_v = reference.shrink(x, A, ranks, scales, token_slots, dtype=case["dtype"])
    assert_within_torch_error(v, exact_v, plain_v, torch.float32, "shrink")
    # Columns beyond each token's rank, and rows without a slot, are exactly zero.
    slots = token_slots.long().cpu()
    token_rank = torch.where(slots >= 0, ranks.cpu().long()[slots.clamp(min=0)], 0)
    must_be_zero = torch.arange(A.shape[1])[None, :] >= token_rank[:, None]
    assert bool((v.cpu()[must_be_zero] == 0).all())

    y_before = y.clone()
    exact_y = reference.expand(y, v, [B], [0], ranks, token_slots)
    plain_y = reference.expand(y, v, [B], [0], ranks, token_slots, dtype=case["dtype"])
    ops.expand_(y, v, [B], [0], ranks, plan, library=library)
    assert_within_torch_error(y, exact_y, plain_y, case["dtype"], "expand_")
    untouched = (token_slots < 0).cpu()
    assert torch.equal(y.cpu()[untouched], y_before.cpu()[untouched])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_several_output_slices(target, dtype):
    """A fused projection: three slices of different rank capacity and width, with gaps,
    given out of column order, in one launch."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_slots = 37, 5
    slot_ranks = [(8, 96), (16, 33), (4, 200)]  # (R_max_i, H_out_i)
    offsets = [250, 0, 40]
    B = [
        (torch.randn(num_slots, r, h, generator=gen) / r**0.5).to(dtype).to(device)
        for r, h in slot_ranks
    ]
    v = torch.randn(num_tokens, sum(r for r, _ in slot_ranks), generator=gen).to(device)
    y = torch.randn(num_tokens, 460, generator=gen).to(dtype).to(device)
    token_slots = (
        torch.randint(-1, num_slots, (num_tokens,), generator=gen).to(torch.int32).to(device)
    )
    ranks = torch.tensor([4, 1, 0, 3, 2], dtype=torch.int32, device=device)
    plan = ops.plan(token_slots, num_slots, library=library)
    exact = reference.expand(y, v, B, offsets, ranks, token_slots)
    plain = reference.expand(y, v, B, offsets, ranks, token_slots, dtype=dtype)
    y_before = y.clone()
    ops.expand_(y, v, B, offsets, ranks, plan, library=library)
    assert_within_torch_error(y, exact, plain, dtype, "expand_ slices")
    # Columns no slice covers are untouched.
    gap = torch.cat([torch.arange(33, 40), torch.arange(240, 250), torch.arange(450, 460)])
    assert torch.equal(y[:, gap].cpu(), y_before[:, gap].cpu())


@pytest.mark.parametrize("a_dtype", ["same", torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_segments_around_the_panel_threshold_on_cpu(dtype, a_dtype):
    """The CPU vector path sends segments of 16+ tokens to the panel kernel (A packed once,
    16 ranks per panel) and shorter ones to the dot-product kernel: segments of 15, 16, 17 and
    29 tokens, interleaved with rows without a slot, ranks across panel edges (16, 20, 33, 3)."""
    gen = torch.Generator().manual_seed(11)
    sizes, ranks_list = [15, 16, 17, 29], [20, 16, 33, 3]
    slots = torch.cat([torch.full((n,), s, dtype=torch.int32) for s, n in enumerate(sizes)])
    slots = torch.cat([slots, torch.full((7,), -1, dtype=torch.int32)])
    token_slots = slots[torch.randperm(slots.shape[0], generator=gen)]
    x = torch.randn(token_slots.shape[0], 37, generator=gen).to(dtype)
    A = (torch.randn(4, 40, 37, generator=gen) / 6).to(dtype if a_dtype == "same" else a_dtype)
    ranks = torch.tensor(ranks_list, dtype=torch.int32)
    scales = torch.tensor([0.5, 2.0, 1.0, 0.25])
    v = ops.shrink(x, A, ranks, scales, ops.plan(token_slots, 4))
    exact = reference.shrink(x, A, ranks, scales, token_slots)
    plain = reference.shrink(x, A, ranks, scales, token_slots, torch.float32)
    assert_within_torch_error(v, exact, plain, torch.float32, "shrink")
    token_rank = torch.where(token_slots >= 0, ranks.long()[token_slots.clamp(min=0).long()], 0)
    assert bool((v[torch.arange(40)[None, :] >= token_rank[:, None]] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_expand_rounds_16_bit_outputs_once_on_cpu(dtype):
    """y + v @ B is rounded once into a 16-bit y, also where the fp32 sum is a tie that the
    exact sum is not (1 + 2^-8 + 2^-30 in fp32 is 1 + 2^-8: halfway between two bf16 values),
    on both CPU paths: a 20-token segment (B packed once) and a 3-token one."""
    small = 2.0**-30 if dtype == torch.bfloat16 else 2.0**-36
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    row = torch.tensor([half_ulp + small, -(half_ulp + small), half_ulp - small, half_ulp, 3.0])
    B = row.repeat(1, 9)[:, :43].reshape(1, 1, 43).repeat(2, 1, 1).double()
    token_slots = torch.tensor([0] * 20 + [1] * 3, dtype=torch.int32)
    gen = torch.Generator().manual_seed(3)
    y = torch.where(torch.rand(23, 43, generator=gen) < 0.5, 1.0, -1.5).to(dtype)
    v = torch.ones(23, 1)  # rank 1: the fp32 sum is B's value itself, exactly
    exact = y.double() + B[token_slots.long(), 0]
    ops.expand_(y, v, [B.float()], [0], torch.tensor([1, 1], dtype=torch.int32),
                ops.plan(token_slots, 2))
    expected = correctly_rounded(exact, dtype)
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("target", TARGETS)
def test_mixed_input_and_adapter_dtypes(target):
    """Trainable adapters keep fp32 banks inside a bf16 model: x and A may differ in dtype."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(9, 130, generator=gen).to(torch.bfloat16).to(device)
    A = (torch.randn(3, 8, 130, generator=gen) / 11).to(device)
    B = (torch.randn(3, 8, 70, generator=gen) / 3).to(device)
    y = torch.randn(9, 70, generator=gen).to(torch.bfloat16).to(device)
    token_slots = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 0], dtype=torch.int32, device=device)
    ranks = torch.tensor([8, 3, 5], dtype=torch.int32, device=device)
    scales = torch.tensor([0.5, 2.0, 1.0], device=device)
    plan = ops.plan(token_slots, 3, library=library)
    v = ops.shrink(x, A, ranks, scales, plan, library=library)
    exact_v = reference.shrink(x, A, ranks, scales, token_slots)
    assert_within_torch_error(
        v, exact_v, reference.shrink(x, A, ranks, scales, token_slots, torch.float32), torch.float32
    )
    exact_y = reference.expand(y, v, [B], [0], ranks, token_slots)
    ops.expand_(y, v, [B], [0], ranks, plan, library=library)
    assert_within_torch_error(
        y,
        exact_y,
        reference.expand(y, v, [B], [0], ranks, token_slots, torch.bfloat16),
        torch.bfloat16,
    )


@pytest.mark.parametrize("target", TARGETS)
def test_ops_are_deterministic(target):
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(300, 513, generator=gen).to(device)
    A = torch.randn(6, 16, 513, generator=gen).to(device)
    B = torch.randn(6, 16, 257, generator=gen).to(device)
    token_slots = torch.randint(-1, 6, (300,), generator=gen).to(torch.int32).to(device)
    ranks = torch.tensor([16, 8, 1, 16, 5, 12], dtype=torch.int32, device=device)
    scales = torch.ones(6, device=device)
    outputs = []
    for _ in range(3):
        plan = ops.plan(token_slots, 6, library=library)
        v = ops.shrink(x, A, ranks, scales, plan, library=library)
        y = torch.zeros(300, 257, device=device)
        ops.expand_(y, v, [B], [0], ranks, plan, library=library)
        outputs.append((v.cpu(), y.cpu()))
    for v, y in outputs[1:]:
        assert torch.equal(v, outputs[0][0]) and torch.equal(y, outputs[0][1])


@pytest.mark.parametrize("target", TARGETS)
def test_ops_under_inference_mode(target):
    """Serving runs under torch.inference_mode; prefill-sized segments take the CPU's
    parallel GEMM path, whose worker threads must see the caller's mode."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(12)
    with torch.inference_mode():
        x = torch.randn(256, 96, generator=gen).to(device)
        A = torch.randn(4, 8, 96, generator=gen).to(device)
        B = torch.randn(4, 8, 80, generator=gen).to(device)
        y = torch.randn(256, 80, generator=gen).to(device)
        token_slots = (torch.arange(256) // 64).to(torch.int32).to(device)
        ranks = torch.tensor([8, 4, 8, 2], dtype=torch.int32, device=device)
        scales = torch.ones(4, device=device)
        plan = ops.plan(token_slots, 4, library=library)
        v = ops.shrink(x, A, ranks, scales, plan, library=library)
        exact = reference.expand(y, v, [B], [0], ranks, token_slots)
        ops.expand_(y, v, [B], [0], ranks, plan, library=library)
    plain = reference.expand(y, v, [B], [0], ranks, token_slots, dtype=torch.float32)
    assert_within_torch_error(y, exact, plain, torch.float32, "expand_ under inference_mode")


def wide_cases(count: int = 240, seed: int = 7) -> list[dict]:
    """A seeded random sample of the full cross product (beyond pairwise coverage)."""
    import itertools
    import random

    space = list(
        itertools.product(
            SIZES,
            SIZES,
            RANKS,
            TOKENS,
            POPULARITY,
            ["full", "mixed"],
            DTYPES,
            ["contiguous", "strided"],
        )
    )
    keys = ["h_in", "h_out", "rank", "tokens", "popularity", "ranks", "dtype", "layout"]
    rng = random.Random(seed)
    cases = [dict(zip(keys, values, strict=True)) for values in rng.sample(space, 4 * count)]
    return [c for c in cases if feasible(c)][:count]


WIDE = [
    pytest.param(
        case,
        target.values[0],
        id=f"{case_id(case)}-{target.id}",
        marks=[pytest.mark.slow, *target.marks],
    )
    for case in wide_cases()
    for target in TARGETS
    if not target.values[0].emulated or emulation_cost(case) <= 2e6
]


@pytest.mark.parametrize("case,target", WIDE)
def test_wide_sweep_matches_reference(case, target):
    """make test-full: the same checks over a wider sample of shapes."""
    test_shrink_expand_match_reference(case, target)
