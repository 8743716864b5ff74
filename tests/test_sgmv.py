"""SGMV (the prefill kernels) against adaptfuse.reference, over the shapes of the SGMV issue
combined pairwise; determinism, batch invariance and the dispatcher's auto rule.

The CUDA kernels run under the CPU emulator here and for real on a GPU. fp16/bf16 cases run
the tensor-core kernels (mma.sync, ldmatrix, cp.async); fp32 cases the CUDA-core kernels.
Shapes that are not multiples of 8 (7, 127, 4097) take the scalar load path, the others the
16-byte cp.async path with scalar tails (1000 is no multiple of the 64-deep stages)."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import (
    CUDA,
    EMULATED,
    Target,
    assert_bit_identical,
    check_shrink_expand,
    target_param,
)
from pairwise import case_id, pairwise_cases

from adaptfuse import ops

SEGMENT_LENGTHS = [1, 2, 7, 16, 64, 257, 1000]
SEGMENTS = [1, 2, 5, 16, 64]
SIZES = [7, 127, 1000, 4096, 4097]
RANKS = [1, 8, 16, 64, 128, 512]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# How requests fill the batch: prefill segments only; some requests without an adapter; or
# prefill segments mixed with decode tokens (one token each) of the same adapters.
LAYOUTS = ["prefill", "some_none", "mixed_decode"]
# Multiply-adds one emulated case may cost (the emulator does a few 10^7 a second here): the
# default tier stays near a minute, the slow tier takes the wide shapes.
DEFAULT_BUDGET = 8e6
SLOW_BUDGET = 2.5e8


def emulation_cost(case: dict) -> float:
    """Emulated multiply-adds, counting the padding of 16-token and 16-rank mma tiles."""
    tokens = case["segments"] * -(-case["length"] // 16) * 16
    rank = max(case["rank"], 16)
    return tokens * rank * (case["h_in"] + case["slices"] * case["h_out"])


def cases_within(budget: float, seed: int) -> list[dict]:
    return pairwise_cases(
        {
            "length": SEGMENT_LENGTHS,
            "segments": SEGMENTS,
            "h_in": SIZES,
            "h_out": SIZES,
            "rank": RANKS,
            "ranks": ["full", "mixed"],
            "dtype": DTYPES,
            "slices": [1, 3],
            "layout": LAYOUTS,
        },
        allowed=lambda case: emulation_cost(case) <= budget,
        seed=seed,
    )


DEFAULT_CASES = cases_within(DEFAULT_BUDGET, seed=6)
SLOW_CASES = [c for c in cases_within(SLOW_BUDGET, seed=7) if emulation_cost(c) > DEFAULT_BUDGET]


def build(case: dict, device: str):
    """Requests of `length` tokens, one adapter slot per segment (slots in shuffled order),
    plus the layout's extras; banks with one spare slot nobody uses."""
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    segments, length, rank, dtype = case["segments"], case["length"], case["rank"], case["dtype"]
    num_slots = segments + 1
    request_slots = torch.randperm(num_slots, generator=gen)[:segments]
    if case["layout"] == "some_none":
        request_slots[torch.rand(segments, generator=gen) < 0.3] = -1
        request_slots[0] = int(torch.randint(0, num_slots, (1,), generator=gen))
    token_slots = request_slots.repeat_interleave(length)
    if case["layout"] == "mixed_decode":
        decode = request_slots[torch.randint(0, segments, (5,), generator=gen)]
        token_slots = torch.cat([decode[:2], token_slots, decode[2:]])
    token_slots = token_slots.to(torch.int32)
    num_tokens = token_slots.numel()
    if case["ranks"] == "full":
        ranks = torch.full((num_slots,), rank, dtype=torch.int32)
    else:
        ranks = torch.randint(0, rank + 1, (num_slots,), generator=gen).to(torch.int32)
        ranks[request_slots[0]] = rank
    scales = (torch.rand(num_slots, generator=gen) * 2 + 0.25).float()
    h_in, h_out = case["h_in"], case["h_out"]
    x = torch.randn(num_tokens, h_in, generator=gen).to(dtype)
    A = (torch.randn(num_slots, rank, h_in, generator=gen) * h_in**-0.5).to(dtype)
    # Slices of a fused projection: widths h_out, h_out // 2 + 1, 5, side by side with gaps.
    widths = [h_out, h_out // 2 + 1, 5][: case["slices"]]
    offsets, column = [], 0
    for width in widths:
        offsets.append(column)
        column += width + 3
    B = [(torch.randn(num_slots, rank, w, generator=gen) * rank**-0.5).to(dtype) for w in widths]
    y = torch.randn(num_tokens, column, generator=gen).to(dtype)
    extra_v = torch.randn(num_tokens, rank * (len(widths) - 1), generator=gen)
    x, A, y, extra_v, token_slots, ranks, scales = (
        t.to(device) for t in (x, A, y, extra_v, token_slots, ranks, scales)
    )
    return x, A, [b.to(device) for b in B], offsets, y, extra_v, token_slots, ranks, scales


def run_sgmv(case: dict, target: Target, **options):
    inputs = build(case, target.device)
    if target.emulated:
        with ops.kernel_family("sgmv", library=target.library):
            return check_shrink_expand(*inputs, case["dtype"], target.library, **options)
    return check_shrink_expand(*inputs, case["dtype"], target.library, **options)


def params(cases, marks=()):
    return [
        pytest.param(case, t.values[0], id=f"{case_id(case)}-{t.id}", marks=[*t.marks, *marks])
        for case in cases
        for t in map(target_param, [EMULATED[0], CUDA])
    ]


@pytest.mark.parametrize("case,target", params(DEFAULT_CASES))
def test_sgmv_matches_reference(case, target):
    run_sgmv(case, target)


@pytest.mark.parametrize("case,target", params(SLOW_CASES, marks=[pytest.mark.slow]))
def test_sgmv_matches_reference_wide(case, target):
    run_sgmv(case, target)


def test_pairwise_cover_the_issue_values():
    """Every value of every parameter is exercised by the two tiers together, and the default
    tier alone covers every dtype, rank, size and segment count."""
    both = DEFAULT_CASES + SLOW_CASES
    for name, values in [
        ("length", SEGMENT_LENGTHS),
        ("segments", SEGMENTS),
        ("h_in", SIZES),
        ("h_out", SIZES),
        ("rank", RANKS),
        ("dtype", DTYPES),
        ("layout", LAYOUTS),
    ]:
        assert {c[name] for c in both} == set(values), name
    for name, values in [("dtype", DTYPES), ("rank", RANKS), ("segments", SEGMENTS)]:
        assert {c[name] for c in DEFAULT_CASES} == set(values), name


# One case per kernel path, run in the emulator's shuffled and two-thread modes too.
PATH_CASES = {
    # tensor cores, aligned rows (cp.async), 64-token tiles, H_in split in several parts
    "mma-aligned-split": dict(length=64, segments=3, h_in=4096, h_out=1000, rank=64),
    # tensor cores, unaligned rows (scalar loads), 16-rank tiles, mixed ranks
    "mma-unaligned": dict(length=7, segments=5, h_in=127, h_out=4097, rank=16),
    # tensor cores, 16-token tiles (few tokens per slot), the largest rank
    "mma-short-segments": dict(length=2, segments=16, h_in=1000, h_out=127, rank=128),
}


# bf16 in every emulator mode; fp16 and fp32 (the CUDA-core path) in the in-order mode.
PATH_RUNS = [
    (dtype, target)
    for dtype in [torch.bfloat16, torch.float16, torch.float32]
    for target in ([*EMULATED, CUDA] if dtype == torch.bfloat16 else [EMULATED[0], CUDA])
]


@pytest.mark.parametrize(
    "dtype,target",
    [
        pytest.param(
            dtype, target, id=f"{str(dtype)[6:]}-{target}", marks=target_param(target).marks
        )
        for dtype, target in PATH_RUNS
    ],
)
@pytest.mark.parametrize("path", list(PATH_CASES))
def test_each_path_in_every_emulator_mode(path, dtype, target):
    case = {**PATH_CASES[path], "ranks": "mixed", "dtype": dtype, "slices": 3}
    case["layout"] = "mixed_decode"
    run_sgmv(case, target)


@pytest.mark.parametrize("target", [target_param(t) for t in [EMULATED[1], CUDA]])
def test_same_bits_twice(target):
    """Deterministic: the same launch twice gives the same bits (H_in splits included)."""
    case = {**PATH_CASES["mma-aligned-split"], "ranks": "mixed", "dtype": torch.bfloat16}
    case.update(slices=1, layout="some_none")
    first_v, first_y = run_sgmv(case, target)
    second_v, second_y = run_sgmv(case, target)
    assert_bit_identical(second_v, first_v, "v")
    assert_bit_identical(second_y, first_y, "y")


def invariance_inputs(h_in, h_out, rank, dtype, device):
    """A 5-token request of slot 2 (rank `rank`), then 40 decode tokens of mixed slots, then
    a 300-token prefill of slot 2 and one of slot 4."""
    gen = torch.Generator().manual_seed(h_in * 7 + h_out + rank)
    num_slots = 6
    token_slots = torch.cat(
        [
            torch.full((5,), 2),
            torch.randint(-1, num_slots, (40,), generator=gen),
            torch.full((300,), 2),
            torch.full((100,), 4),
        ]
    ).to(torch.int32)
    num_tokens = token_slots.numel()
    x = torch.randn(num_tokens, h_in, generator=gen).to(dtype)
    A = (torch.randn(num_slots, rank, h_in, generator=gen) * h_in**-0.5).to(dtype)
    B = (torch.randn(num_slots, rank, h_out, generator=gen) * rank**-0.5).to(dtype)
    y = torch.randn(num_tokens, h_out, generator=gen).to(dtype)
    ranks = torch.tensor([rank, rank // 2, rank, 1, rank, 3], dtype=torch.int32)
    scales = torch.rand(num_slots, generator=gen) + 0.5
    return [t.to(device) for t in (x, A, B, y, token_slots, ranks, scales)]


@pytest.mark.parametrize("target", [target_param(t) for t in [EMULATED[0], CUDA]])
@pytest.mark.parametrize(
    "h_in,h_out,rank,dtype",
    [
        (4096, 1000, 16, torch.bfloat16),  # H_in split in two by the invariant rule
        (4097, 127, 64, torch.float16),  # unaligned rows, split
        (1000, 4096, 8, torch.float32),  # CUDA-core path
    ],
)
def test_batch_invariant_bits_do_not_depend_on_the_batch(target, h_in, h_out, rank, dtype):
    """With batch_invariant=True the auto dispatcher gives the first request the same v and y
    bits alone (5 tokens: a decode-sized batch) and among 440 other tokens (prefill-sized,
    where the default rule would pick other kernels and splits)."""
    x, A, B, y, token_slots, ranks, scales = invariance_inputs(h_in, h_out, rank, dtype, "cpu")
    library = target.library
    device = target.device

    def first_request(count):
        slots = token_slots[:count].to(device)
        plan = ops.plan(slots, A.shape[0], library=library)
        v = ops.shrink(
            x[:count].to(device),
            A.to(device),
            ranks.to(device),
            scales.to(device),
            plan,
            batch_invariant=True,
            library=library,
        )
        out = y[:count].to(device)
        ops.expand_(
            out,
            v,
            [B.to(device)],
            [0],
            ranks.to(device),
            plan,
            batch_invariant=True,
            library=library,
        )
        return v[:5].cpu(), out[:5].cpu()

    alone_v, alone_y = first_request(5)
    batch_v, batch_y = first_request(token_slots.numel())
    assert_bit_identical(batch_v, alone_v, "v of request 0")
    assert_bit_identical(batch_y, alone_y, "y of request 0")


@pytest.mark.parametrize(
    "num_tokens,num_slots,expected",
    [(445, 6, "sgmv"), (40, 6, "bgmv"), (96, 6, "sgmv"), (95, 6, "bgmv")],
)
def test_auto_picks_by_tokens_per_slot(num_tokens, num_slots, expected):
    """The auto rule: SGMV when T >= 16 S (the used segments fill a 16-token tile on average),
    else BGMV. Checked by bits: auto equals the family it should pick."""
    x, A, B, y, token_slots, ranks, scales = invariance_inputs(
        4096, 1000, 16, torch.bfloat16, "cpu"
    )
    x, y, token_slots = x[:num_tokens], y[:num_tokens], token_slots[:num_tokens]
    A, B, ranks, scales = A[:num_slots], B[:num_slots], ranks[:num_slots], scales[:num_slots]
    token_slots = token_slots.clamp(max=num_slots - 1)
    library = "adaptfuse_emu"

    def run(family):
        with ops.kernel_family(family, library=library):
            plan = ops.plan(token_slots, num_slots, library=library)
            v = ops.shrink(x, A, ranks, scales, plan, library=library)
            out = y.clone()
            ops.expand_(out, v, [B], [0], ranks, plan, library=library)
            return v, out

    auto_v, auto_y = run("auto")
    chosen_v, chosen_y = run(expected)
    assert_bit_identical(auto_v, chosen_v, f"v of auto vs {expected}")
    assert_bit_identical(auto_y, chosen_y, f"y of auto vs {expected}")
    # The two families sum in different orders: equal bits above do identify the choice.
    other_v, _ = run({"sgmv": "bgmv", "bgmv": "sgmv"}[expected])
    assert not torch.equal(other_v, auto_v), "bgmv and sgmv agree bit for bit here"
