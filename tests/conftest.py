"""Shared helpers of the test suite: devices, tolerances by dtype, bit-pattern comparison."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import adaptfuse


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an op test runs: the CPU ops, the CUDA kernels on a GPU, or the CUDA kernel
    sources under the CPU emulator (in order, in a seeded random thread order, or with blocks
    spread over two OS threads)."""

    name: str
    device: str
    library: str = "adaptfuse"
    emu_seed: int = 0
    emu_os_threads: int = 1

    def __str__(self) -> str:
        return self.name

    @property
    def emulated(self) -> bool:
        return self.library == "adaptfuse_emu"


CPU = Target("cpu", "cpu")
CUDA = Target("cuda", "cuda")
EMULATED = [
    Target("emu", "cpu", "adaptfuse_emu"),
    Target("emu-shuffled", "cpu", "adaptfuse_emu", emu_seed=20261125),
    Target("emu-2threads", "cpu", "adaptfuse_emu", emu_os_threads=2),
]


def target_param(target: Target):
    if target is CUDA:
        return pytest.param(
            target,
            id=str(target),
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(
                    not adaptfuse.cuda_available(), reason="needs a GPU and the CUDA build"
                ),
            ],
        )
    return pytest.param(target, id=str(target))


TARGETS = [target_param(t) for t in [CPU, CUDA, *EMULATED]]


@pytest.fixture(autouse=True)
def emulator_mode(request):
    """Puts the emulator in the mode the test's target asks for, and back afterwards."""
    callspec = getattr(request.node, "callspec", None)
    target = callspec.params.get("target") if callspec else None
    if not isinstance(target, Target) or not target.emulated:
        yield
        return
    from adaptfuse import _emu

    previous = _emu.get_options()
    _emu.set_options(target.emu_seed, target.emu_os_threads)
    try:
        yield
    finally:
        _emu.set_options(*previous)


BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer bit patterns (-0.0 != 0.0 and NaN payloads count), as a copy: a snapshot taken
    before an in-place change must not follow the tensor."""
    t = t.detach()
    return (t.view(BIT_VIEW[t.dtype]) if t.is_floating_point() else t).cpu().clone()


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


def token_slots_for(popularity: str, num_tokens: int, num_slots: int, gen) -> torch.Tensor:
    """int32 slot per token for one way requests share adapters (Punica's "popularity"):
    single/identical (all slot 1), distinct, uniform, segments (prefill layout: consecutive
    runs of one adapter), zipf (P(slot k) ~ 1 / (k + 1)^1.5), skewed (one hot adapter, a few
    others), some_none (some -1), all_none."""
    if popularity in ("single", "identical"):
        slots = torch.full((num_tokens,), 1)
    elif popularity == "distinct":
        slots = torch.randperm(num_tokens, generator=gen)
    elif popularity == "uniform":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen)
    elif popularity == "segments":
        slots = torch.randint(0, num_slots, (num_tokens,), generator=gen).sort().values
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.5
        slots = torch.multinomial(weights, max(num_tokens, 1), True, generator=gen)[:num_tokens]
    elif popularity == "skewed":
        slots = torch.where(
            torch.rand(num_tokens, generator=gen) < 0.9,
            torch.zeros(num_tokens, dtype=torch.long),
            torch.randint(1, num_slots, (num_tokens,), generator=gen),
        )
    elif popularity == "some_none":
        slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    elif popularity == "all_none":
        slots = torch.full((num_tokens,), -1)
    else:
        raise ValueError(f"unknown popularity {popularity!r}")
    return slots.to(torch.int32)


def check_shrink_expand(
    x, A, B, offsets, y, extra_v, token_slots, ranks, scales, dtype, library, **options
):
    """shrink then expand_ (options: e.g. batch_invariant) against adaptfuse.reference with
    DESIGN.md's tolerance: v within tolerance and zero beyond each token's rank, y within
    tolerance, rows without a slot bit-identical. extra_v: the v columns of slices 1.., random.
    Returns (v, y) for bit comparisons."""
    from adaptfuse import ops, reference

    plan = ops.plan(token_slots, A.shape[0], library=library)
    v = ops.shrink(x, A, ranks, scales, plan, library=library, **options)
    exact_v = reference.shrink(x, A, ranks, scales, token_slots)
    plain_v = reference.shrink(x, A, ranks, scales, token_slots, dtype=dtype)
    assert_within_torch_error(v, exact_v, plain_v, torch.float32, "shrink")
    slots = token_slots.long().cpu()
    token_rank = torch.where(slots >= 0, ranks.cpu().long()[slots.clamp(min=0)], 0)
    beyond = torch.arange(A.shape[1])[None, :] >= token_rank[:, None]
    assert bool((v.cpu()[beyond] == 0).all()), "shrink: nonzero beyond a token's rank"

    v_all = torch.cat([v, extra_v], dim=1)
    exact_y = reference.expand(y, v_all, B, offsets, ranks, token_slots)
    plain_y = reference.expand(y, v_all, B, offsets, ranks, token_slots, dtype=dtype)
    y_before = y.clone()
    ops.expand_(y, v_all, B, offsets, ranks, plan, library=library, **options)
    assert_within_torch_error(y, exact_y, plain_y, dtype, "expand_")
    untouched = (token_slots < 0).cpu()
    assert_bit_identical(y.cpu()[untouched], y_before.cpu()[untouched], "slot -1 rows")
    return v, y


def correctly_rounded(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype rounded once. torch converts float64 to 16-bit formats through fp32
    (rounding twice); rounding to fp32 *to odd* first keeps the second rounding correct."""
    if dtype == torch.float32:
        return exact.float()
    nearest = exact.float()
    inexact = nearest.double() != exact
    toward_zero = torch.where(
        nearest.double().abs() > exact.abs(),
        torch.nextafter(nearest, torch.zeros_like(nearest)),
        nearest,
    )
    odd = torch.where(inexact, toward_zero.view(torch.int32) | 1, toward_zero.view(torch.int32))
    return odd.view(torch.float32).to(dtype)


def record_blocked_layers(monkeypatch) -> list[int]:
    """A list that gets the out_features of every layer forward taking the CPU prefill path
    that computes the base output block by block (layers.LoraLayer), for this test."""
    from adaptfuse import layers

    calls: list[int] = []
    by_block = layers.LoraLayer._base_and_adapters_by_output_block

    def recorded(layer, x, plans):
        calls.append(layer.out_features)
        return by_block(layer, x, plans)

    monkeypatch.setattr(layers.LoraLayer, "_base_and_adapters_by_output_block", recorded)
    return calls
