"""BGMV (the decode kernels) against adaptfuse.reference, over the shapes of the BGMV issue
combined pairwise, plus batch invariance and CUDA-graph replay.

The CUDA kernels run under the CPU emulator here and for real on a GPU. The CPU ops run the
same cases: they are cheap, and keep both backends honest on the same data."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import (
    CPU,
    CUDA,
    EMULATED,
    Target,
    assert_bit_identical,
    assert_within_torch_error,
    check_shrink_expand,
    target_param,
    token_slots_for,
)
from pairwise import case_id, pairwise_cases

import adaptfuse
from adaptfuse import ops, reference

SIZES = [1, 7, 127, 128, 1000, 4096, 4097, 11008]
RANKS = [1, 8, 16, 64, 128, 512]
TOKENS = [0, 1, 2, 3, 7, 16, 64, 133]
# Adapter popularity across the requests of a decode batch.
POPULARITY = ["distinct", "uniform", "zipf", "identical", "skewed", "some_none"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Multiply-adds an emulated case may cost (the emulator does ~10^8 a second on this machine).
EMULATION_BUDGET = 2.5e7


def num_slots_for(popularity: str, num_tokens: int) -> int:
    return {"distinct": max(num_tokens, 1), "identical": 2}.get(popularity, 8)


def emulation_cost(case: dict) -> float:
    return case["tokens"] * case["rank"] * (case["h_in"] + case["slices"] * case["h_out"])


def feasible(case: dict) -> bool:
    bank = num_slots_for(case["popularity"], case["tokens"]) * case["rank"]
    return (
        emulation_cost(case) <= EMULATION_BUDGET
        and bank * (case["h_in"] + case["slices"] * case["h_out"]) <= 3e7
    )


CASES = pairwise_cases(
    {
        "h_in": SIZES,
        "h_out": SIZES,
        "rank": RANKS,
        "tokens": TOKENS,
        "popularity": POPULARITY,
        "ranks": ["full", "mixed"],
        "dtype": DTYPES,
        "slices": [1, 3],
    },
    allowed=feasible,
    seed=5,
)


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    num_tokens, rank, dtype = case["tokens"], case["rank"], case["dtype"]
    num_slots = num_slots_for(case["popularity"], num_tokens)
    token_slots = token_slots_for(case["popularity"], num_tokens, num_slots, gen)
    if case["ranks"] == "full":
        ranks = torch.full((num_slots,), rank, dtype=torch.int32)
    else:
        ranks = torch.randint(0, rank + 1, (num_slots,), generator=gen).to(torch.int32)
        ranks[0] = rank
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
    to = {"device": device}
    return (
        x.to(**to),
        A.to(**to),
        [b.to(**to) for b in B],
        offsets,
        y.to(**to),
        extra_v.to(**to),
        token_slots.to(**to),
        ranks.to(**to),
        scales.to(**to),
    )


def run_case(case: dict, target: Target):
    check_shrink_expand(*build(case, target.device), case["dtype"], target.library)


PARAMS = [
    pytest.param(case, target.values[0], id=f"{case_id(case)}-{target.id}", marks=target.marks)
    for case in CASES
    for target in map(target_param, [CPU, CUDA, EMULATED[0]])
]


@pytest.mark.parametrize("case,target", PARAMS)
def test_bgmv_matches_reference(case, target):
    if target.emulated:
        with ops.kernel_family("bgmv", library=target.library):
            run_case(case, target)
    else:
        run_case(case, target)


def test_pairwise_cover_the_issue_values():
    """Every value of every parameter is exercised (the budget must not drop one)."""
    for name, values in [
        ("h_in", SIZES),
        ("h_out", SIZES),
        ("rank", RANKS),
        ("tokens", TOKENS),
        ("popularity", POPULARITY),
        ("dtype", DTYPES),
    ]:
        assert {c[name] for c in CASES} == set(values), name


@pytest.mark.parametrize("target", [target_param(t) for t in [*EMULATED, CUDA]])
@pytest.mark.parametrize(
    "h_in,h_out,rank,dtype",
    [
        (4097, 1000, 16, torch.bfloat16),  # split H_in, aligned rows
        (4096, 4097, 64, torch.float16),  # unaligned expand rows
        (11008, 128, 8, torch.float32),
        (127, 7, 512, torch.bfloat16),
    ],
)
def test_request_bits_do_not_depend_on_the_batch(target, h_in, h_out, rank, dtype):
    """Batch invariance: the first request's v and y bits are the same alone and among 63
    other requests with other adapters."""
    gen = torch.Generator().manual_seed(h_in + h_out + rank)
    num_slots, device, library = 6, target.device, target.library
    x = torch.randn(64, h_in, generator=gen).to(dtype).to(device)
    A = (torch.randn(num_slots, rank, h_in, generator=gen) * h_in**-0.5).to(dtype).to(device)
    B = (torch.randn(num_slots, rank, h_out, generator=gen) * rank**-0.5).to(dtype).to(device)
    y = torch.randn(64, h_out, generator=gen).to(dtype).to(device)
    token_slots = torch.randint(-1, num_slots, (64,), generator=gen).to(torch.int32)
    token_slots[0] = 2
    token_slots = token_slots.to(device)
    ranks = torch.tensor([rank, rank // 2, rank, 1, rank, 3], dtype=torch.int32).to(device)
    scales = torch.rand(num_slots, generator=gen).to(device) + 0.5

    def first_row(count):
        plan = ops.plan(token_slots[:count], num_slots, library=library)
        v = ops.shrink(x[:count], A, ranks, scales, plan, library=library)
        out = y[:count].clone()
        ops.expand_(out, v, [B], [0], ranks, plan, library=library)
        return v[:1].cpu(), out[:1].cpu()

    alone_v, alone_y = first_row(1)
    batch_v, batch_y = first_row(64)
    assert_bit_identical(batch_v, alone_v, "v of request 0")
    assert_bit_identical(batch_y, alone_y, "y of request 0")


@pytest.mark.parametrize("family", ["simple", "bgmv", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_family_matches_reference(family, dtype):
    """The simple kernels stay correct: benchmarks measure BGMV against them."""
    case = {
        "h_in": 1000,
        "h_out": 4097,
        "rank": 16,
        "tokens": 16,
        "popularity": "some_none",
        "ranks": "mixed",
        "dtype": dtype,
        "slices": 3,
    }
    with ops.kernel_family(family, library="adaptfuse_emu"):
        run_case(case, EMULATED[0])


def test_unknown_kernel_family_is_refused():
    with pytest.raises(ValueError, match="unknown kernel family 'fast'"):
        with ops.kernel_family("fast", library="adaptfuse_emu"):
            pass


@pytest.mark.cuda
@pytest.mark.skipif(not adaptfuse.cuda_available(), reason="needs a GPU and the CUDA build")
def test_graph_replay_with_new_slot_assignments():
    """plan + shrink + expand_ captured once; each replay with other slots is correct."""
    gen = torch.Generator().manual_seed(9)
    device, num_tokens, num_slots, h, rank = "cuda", 32, 5, 4096, 16
    x = torch.randn(num_tokens, h, generator=gen).to(torch.bfloat16).to(device)
    A = (torch.randn(num_slots, rank, h, generator=gen) / 64).to(torch.bfloat16).to(device)
    B = (torch.randn(num_slots, rank, h, generator=gen) / 4).to(torch.bfloat16).to(device)
    ranks = torch.tensor([16, 8, 16, 4, 1], dtype=torch.int32, device=device)
    scales = torch.ones(num_slots, device=device)
    token_slots = torch.zeros(num_tokens, dtype=torch.int32, device=device)
    y_static = torch.zeros(num_tokens, h, dtype=torch.bfloat16, device=device)

    def step():
        y_static.zero_()
        plan = ops.plan(token_slots, num_slots)
        v = ops.shrink(x, A, ranks, scales, plan)
        ops.expand_(y_static, v, [B], [0], ranks, plan)

    step()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(4):
        new_slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen).to(torch.int32)
        token_slots.copy_(new_slots.to(device))
        graph.replay()
        torch.cuda.synchronize()
        v = reference.shrink(x.cpu(), A.cpu(), ranks.cpu(), scales.cpu(), new_slots)
        expected = reference.expand(
            torch.zeros(num_tokens, h), v, [B.cpu()], [0], ranks.cpu(), new_slots
        )
        plain = reference.expand(
            torch.zeros(num_tokens, h), v, [B.cpu()], [0], ranks.cpu(), new_slots, torch.bfloat16
        )
        assert_within_torch_error(y_static, expected, plain, torch.bfloat16, f"replay {replay}")
