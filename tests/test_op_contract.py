"""The op contract: every argument error names the argument, its value and what was
expected, and nothing is written; opcheck passes for every op; the LoRA path compiles."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import CPU, CUDA, EMULATED, TARGETS, assert_bit_identical, target_param

from adaptfuse import ops

# The argument checks are shared by every backend; they run on the CPU ops and once on the
# emulated kernels. opcheck and torch.compile need fake impls: the adaptfuse library only.
CHECKED = [target_param(CPU), target_param(EMULATED[0])]
NATIVE = [target_param(CPU), target_param(CUDA)]

I32 = torch.int32


def lora_inputs(device="cpu", dtype=torch.float32, tokens=6, slots=3, rank=4, h_in=10, h_out=5):
    gen = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(tokens, h_in, generator=gen).to(dtype).to(device),
        A=torch.randn(slots, rank, h_in, generator=gen).to(dtype).to(device),
        B=torch.randn(slots, rank, h_out, generator=gen).to(dtype).to(device),
        y=torch.randn(tokens, h_out, generator=gen).to(dtype).to(device),
        ranks=torch.tensor([rank, 2, 1][:slots], dtype=I32, device=device),
        scales=torch.ones(slots, device=device),
        token_slots=torch.tensor([0, 1, -1, 2, 0, 1][:tokens], dtype=I32, device=device),
    )


def run_shrink(d, library, **override):
    d = {**d, **override}
    plan = ops.plan(d["token_slots"], d["A"].shape[0], library=library)
    plan = plan._replace(
        **{k: override[k] for k in ("token_order", "slot_offsets") if k in override}
    )
    return ops.shrink(d["x"], d["A"], d["ranks"], d["scales"], plan, library=library)


SHRINK_ERRORS = [
    (
        "x has the wrong dtype",
        dict(x=torch.zeros(6, 10, dtype=torch.float64)),
        TypeError,
        r"'x' must be float32, float16 or bfloat16, got Double",
    ),
    (
        "x is 1-D",
        dict(x=torch.zeros(60)),
        ValueError,
        r"'x' must have 2 dimensions \[T, H_in\], got shape \[60\]",
    ),
    (
        "A has the wrong H_in",
        dict(A=torch.zeros(3, 4, 11)),
        ValueError,
        r"'A' has shape \[3, 4, 11\] but its dimension 2 \(H_in",
    ),
    (
        "A is column-strided",
        dict(A=torch.zeros(3, 10, 4).transpose(1, 2)),
        ValueError,
        r"'A' must have stride 1 along its last dimension",
    ),
    (
        "x is column-strided",
        dict(x=torch.zeros(10, 6).t()),
        ValueError,
        r"'x' must have stride 1 along its last dimension",
    ),
    (
        "ranks are int64",
        dict(ranks=torch.tensor([4, 2, 1])),
        TypeError,
        r"'ranks' must be Int, got Long",
    ),
    (
        "ranks have the wrong length",
        dict(ranks=torch.tensor([4, 2], dtype=I32)),
        ValueError,
        r"'ranks' has shape \[2\].*must be 3",
    ),
    (
        "a rank above capacity",
        dict(ranks=torch.tensor([4, 5, 1], dtype=I32)),
        ValueError,
        r"rank 5 for slot 1, above the capacity R_max of A = 4",
    ),
    (
        "a negative rank",
        dict(ranks=torch.tensor([4, -1, 1], dtype=I32)),
        ValueError,
        r"rank -1 for slot 1",
    ),
    (
        "scales are float64",
        dict(scales=torch.ones(3, dtype=torch.float64)),
        TypeError,
        r"'scales' must be Float, got Double",
    ),
    (
        "a slot id out of range",
        dict(token_slots=torch.tensor([0, 1, 3, 2, 0, 1], dtype=I32)),
        ValueError,
        r"slot id 3 at token 2; expected -1 \(no adapter\) or a slot in \[0, 3\)",
    ),
    (
        "a slot id below -1",
        dict(token_slots=torch.tensor([0, -2, 1, 2, 0, 1], dtype=I32)),
        ValueError,
        r"slot id -2 at token 1",
    ),
    (
        "a plan of another batch",
        dict(slot_offsets=torch.tensor([0, 2, 4, 9], dtype=I32)),
        ValueError,
        r"'slot_offsets' is not a plan of 6 tokens",
    ),
    (
        "a plan with the wrong slot count",
        dict(slot_offsets=torch.tensor([0, 2, 6], dtype=I32)),
        ValueError,
        r"'slot_offsets' has shape \[3\].*\(\[S \+ 1\]\) must be 4",
    ),
]


@pytest.mark.parametrize(
    "what,override,error,message", SHRINK_ERRORS, ids=[e[0] for e in SHRINK_ERRORS]
)
@pytest.mark.parametrize("target", CHECKED)
def test_shrink_argument_errors(what, override, error, message, target):
    library = target.library
    d = lora_inputs()
    if "token_slots" in override:  # a bad plan input is refused by plan itself first
        with pytest.raises(error, match=message):
            ops.plan(override["token_slots"], 3, library=library)
        good = ops.plan(d["token_slots"], 3, library=library)
        with pytest.raises(error, match=message):
            ops.shrink(
                d["x"],
                d["A"],
                d["ranks"],
                d["scales"],
                good._replace(token_slots=override["token_slots"]),
                library=library,
            )
        return
    with pytest.raises(error, match=message):
        run_shrink(d, library, **override)


EXPAND_ERRORS = [
    (
        "y has the wrong dtype",
        dict(y=torch.zeros(6, 5, dtype=torch.int32)),
        TypeError,
        r"'y' must be float32, float16 or bfloat16, got Int",
    ),
    (
        "v is bf16",
        dict(v=torch.zeros(6, 4, dtype=torch.bfloat16)),
        TypeError,
        r"'v' must be Float, got BFloat16",
    ),
    (
        "v has the wrong width",
        dict(v=torch.zeros(6, 5)),
        ValueError,
        r"'v' has shape \[6, 5\].*must be 4",
    ),
    (
        "v has the wrong rows",
        dict(v=torch.zeros(7, 4)),
        ValueError,
        r"'v' has shape \[7, 4\].*T, the rows of y",
    ),
    (
        "B slot count differs",
        dict(B=[torch.zeros(2, 4, 5)]),
        ValueError,
        r"'ranks' has shape \[3\].*must be 2",
    ),
    (
        "slices of mixed dtype",
        dict(
            B=[torch.zeros(3, 4, 2), torch.zeros(3, 4, 2, dtype=torch.float16)],
            offsets=[0, 2],
            v=torch.zeros(6, 8),
        ),
        TypeError,
        r"all slices of 'B' must share one dtype",
    ),
    (
        "a slice past y's end",
        dict(offsets=[1]),
        ValueError,
        r"slice 0 writes columns \[1, 6\) of 'y', which has 5 columns",
    ),
    (
        "overlapping slices",
        dict(B=[torch.zeros(3, 4, 3), torch.zeros(3, 4, 2)], offsets=[0, 2], v=torch.zeros(6, 8)),
        ValueError,
        r"output slices overlap: columns \[0, 3\) and \[2, 4\)",
    ),
    (
        "offsets and slices disagree",
        dict(offsets=[0, 0]),
        ValueError,
        r"'out_offsets' has 2 entries but 'B' has 1 slices",
    ),
    ("no slices", dict(B=[], offsets=[]), ValueError, r"'B' must hold 1 to 8 output slices, got 0"),
    (
        "a rank above a slice's capacity",
        dict(ranks=torch.tensor([4, 2, 9], dtype=I32)),
        ValueError,
        r"rank 9 for slot 2, above the capacity R_max of B = 4",
    ),
    (
        "y is column-strided",
        dict(y=torch.zeros(5, 6).t()),
        ValueError,
        r"'y' must have stride 1 along its last dimension",
    ),
]


@pytest.mark.parametrize(
    "what,override,error,message", EXPAND_ERRORS, ids=[e[0] for e in EXPAND_ERRORS]
)
@pytest.mark.parametrize("target", CHECKED)
def test_expand_argument_errors_write_nothing(what, override, error, message, target):
    library = target.library
    d = lora_inputs()
    plan = ops.plan(d["token_slots"], 3, library=library)
    y = override.get("y", d["y"])
    v = override.get("v", torch.ones(6, 4))
    ranks = override.get("ranks", d["ranks"])
    before = y.clone()
    with pytest.raises(error, match=message):
        ops.expand_(
            y,
            v,
            override.get("B", [d["B"]]),
            override.get("offsets", [0]),
            ranks,
            plan,
            library=library,
        )
    assert_bit_identical(y, before, "y after a refused expand_")


MERGE_ERRORS = [
    (
        "W is int",
        dict(W=torch.zeros(5, 10, dtype=torch.int64)),
        TypeError,
        r"'W' must be float32, float16 or bfloat16, got Long",
    ),
    (
        "W is 3-D",
        dict(W=torch.zeros(5, 10, 1)),
        ValueError,
        r"'W' must have 2 dimensions \[H_out, H_in\]",
    ),
    (
        "W overlaps itself",
        dict(W=torch.zeros(10).expand(5, 10)),
        ValueError,
        r"'W' has overlapping elements",
    ),
    (
        "A has the wrong H_in",
        dict(A=[torch.zeros(4, 11)]),
        ValueError,
        r"'A\[0\]' has shape \[4, 11\] but its dimension 1 \(H_in, W's dimension 1\) must be 10",
    ),
    (
        "B has the wrong H_out",
        dict(B=[torch.zeros(4, 6)]),
        ValueError,
        r"'B\[0\]' has shape \[4, 6\].*must be 5",
    ),
    (
        "ranks of A and B differ",
        dict(B=[torch.zeros(3, 5)]),
        ValueError,
        r"'B\[0\]' has shape \[3, 5\].*the rank r of A\[i\]\) must be 4",
    ),
    (
        "A and B of different dtypes",
        dict(B=[torch.zeros(4, 5, dtype=torch.float16)]),
        TypeError,
        r"every A\[i\] and B\[i\] must share one dtype",
    ),
    (
        "a coefficient too few",
        dict(coefficients=[]),
        ValueError,
        r"one entry per adapter; got 1, 1 and 0",
    ),
    (
        "a non-finite coefficient",
        dict(coefficients=[float("inf")]),
        ValueError,
        r"coefficient 0 is not finite: inf",
    ),
    (
        "nothing to merge",
        dict(A=[], B=[], coefficients=[]),
        ValueError,
        r"'A' must hold 1 to 64 adapters, got 0",
    ),
]


@pytest.mark.parametrize(
    "what,override,error,message", MERGE_ERRORS, ids=[e[0] for e in MERGE_ERRORS]
)
@pytest.mark.parametrize("target", CHECKED)
def test_merge_argument_errors_write_nothing(what, override, error, message, target):
    library = target.library
    gen = torch.Generator().manual_seed(0)
    W = override.get("W", torch.randn(5, 10, generator=gen))
    A = override.get("A", [torch.randn(4, 10, generator=gen)])
    B = override.get("B", [torch.randn(4, 5, generator=gen)])
    coefficients = override.get("coefficients", [1.0])
    before = W.clone()
    with pytest.raises(error, match=message):
        ops.merge_(W, A, B, coefficients, library=library)
    assert torch.equal(W, before)


@pytest.mark.parametrize("target", CHECKED)
def test_unmerge_refuses_a_foreign_record(target):
    library = target.library
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(50, 10, generator=gen)
    A, B = [torch.randn(4, 10, generator=gen)], [torch.randn(4, 50, generator=gen)]
    record = ops.merge_(W, A, B, [1.0], library=library)
    other = torch.randn(50, 10, generator=gen)
    other_record = ops.merge_(other, A, B, [0.001], library=library)
    assert other_record.num_entries != record.num_entries
    merged = W.clone()
    with pytest.raises(ValueError, match=r"the record does not belong to this W"):
        ops.unmerge_(
            W,
            A,
            B,
            [1.0],
            ops.MergeRecord(
                record.tile_counts,
                other_record.offsets,
                other_record.corrections,
                other_record.escape_bits,
            ),
            library=library,
        )
    with pytest.raises(ValueError, match=r"'tile_counts' has shape \[2, 2\].*must be 1"):
        ops.unmerge_(
            W,
            A,
            B,
            [1.0],
            ops.MergeRecord(torch.zeros(2, 2, dtype=I32), *list(record.__dict__.values())[1:]),
            library=library,
        )
    assert_bit_identical(W, merged, "W after refused unmerges")


@pytest.mark.parametrize("target", TARGETS)
def test_empty_batches_are_no_ops(target):
    device, library = target.device, target.library
    d = lora_inputs(device, tokens=0)
    plan = ops.plan(d["token_slots"], 3, library=library)
    assert plan.token_order.shape == (0,) and plan.slot_offsets.tolist() == [0, 0, 0, 0]
    v = ops.shrink(d["x"], d["A"], d["ranks"], d["scales"], plan, library=library)
    assert v.shape == (0, 4)
    ops.expand_(d["y"], v, [d["B"]], [0], d["ranks"], plan, library=library)


def opcheck_samples(device):
    d = lora_inputs(device)
    plan = ops.plan(d["token_slots"], 3)
    v = ops.shrink(d["x"], d["A"], d["ranks"], d["scales"], plan)
    lib = torch.ops.adaptfuse
    yield lib.plan.default, (d["token_slots"], 3)
    yield lib.shrink.default, (d["x"], d["A"], d["ranks"], d["scales"], *plan)
    yield lib.expand_.default, (d["y"].clone(), v, [d["B"]], [0], d["ranks"], *plan)
    bf = lora_inputs(device, torch.bfloat16)
    yield lib.shrink.default, (bf["x"], bf["A"], bf["ranks"], bf["scales"], *plan)
    two_slices = [bf["B"][:, :2, :3], bf["B"][:, :, 3:]]  # R_max 2 and 4, widths 3 and 2
    yield (
        lib.expand_.default,
        (
            bf["y"].clone(),
            torch.randn(6, 6, device=device),
            two_slices,
            [0, 3],
            bf["ranks"].clamp(max=2),
            *plan,
        ),
    )
    yield lib.expand.default, (v, [d["B"]], [0], 5, d["ranks"], *plan)
    yield lib.segment_outer.default, (v, d["x"], d["ranks"], *plan)
    yield lib.segment_outer.default, (v, bf["y"], d["ranks"], *plan)
    W = torch.randn(5, 10, device=device)
    A, B = [d["A"][0]], [d["B"][0]]
    yield lib.merge_.default, (W.clone(), A, B, [0.5])
    record = ops.merge_(W, A, B, [0.5])
    yield lib.unmerge_.default, (W, A, B, [0.5], *dataclasses.astuple(record))


@pytest.mark.parametrize("target", NATIVE)
def test_opcheck(target):
    device = target.device
    for op, args in opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("target", NATIVE)
def test_lora_path_compiles_fullgraph(target):
    device = target.device
    d = lora_inputs(device)

    def lora_delta(x, y, token_slots, A, B, ranks, scales):
        plan = ops.plan(token_slots, A.shape[0])
        v = ops.shrink(x, A, ranks, scales, plan)
        return ops.expand_(y, v, [B], [0], ranks, plan)

    eager = lora_delta(
        d["x"], d["y"].clone(), d["token_slots"], d["A"], d["B"], d["ranks"], d["scales"]
    )
    compiled = torch.compile(lora_delta, fullgraph=True, backend="aot_eager")
    out = compiled(
        d["x"], d["y"].clone(), d["token_slots"], d["A"], d["B"], d["ranks"], d["scales"]
    )
    assert torch.equal(out, eager)


@pytest.mark.parametrize("target", CHECKED)
def test_foreign_plans_and_records_are_refused(target):
    library = target.library
    d = lora_inputs()
    plan = ops.plan(d["token_slots"], 3, library=library)
    swapped = plan.token_order.clone()
    swapped[0], swapped[-1] = plan.token_order[-1], plan.token_order[0]
    with pytest.raises(ValueError, match="'token_order' is not the plan of 'token_slots'"):
        ops.shrink(
            d["x"],
            d["A"],
            d["ranks"],
            d["scales"],
            plan._replace(token_order=swapped),
            library=library,
        )
    repeated = plan.token_order.clone()
    repeated[1] = repeated[0]
    with pytest.raises(ValueError, match="'token_order' is not the plan"):
        ops.shrink(
            d["x"],
            d["A"],
            d["ranks"],
            d["scales"],
            plan._replace(token_order=repeated),
            library=library,
        )
    W = torch.randn(50, 10)
    before = W.clone()
    A, B = [torch.randn(4, 10)], [torch.randn(4, 50)]
    past_the_end = ops.MergeRecord(
        torch.tensor([[1, 0]], dtype=I32),
        torch.tensor([600], dtype=torch.int16),
        torch.tensor([1], dtype=torch.int8),
        torch.zeros(0, dtype=I32),
    )
    with pytest.raises(ValueError, match="points past the end of tile 0"):
        ops.unmerge_(W, A, B, [1.0], past_the_end, library=library)
    hidden_escape = ops.MergeRecord(
        torch.tensor([[1, 0]], dtype=I32),
        torch.tensor([3], dtype=torch.int16),
        torch.tensor([-128], dtype=torch.int8),
        torch.zeros(0, dtype=I32),
    )
    with pytest.raises(ValueError, match="tile 0 has 1 escaped entries but counts 0"):
        ops.unmerge_(W, A, B, [1.0], hidden_escape, library=library)
    assert_bit_identical(W, before, "W after refused unmerges")
