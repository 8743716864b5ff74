"""Typed wrappers over ``torch.ops.adaptfuse.*`` and their fake implementations.

Storage (DESIGN.md, "The ops"), fixed for every backend: per adapted layer
``A[S, R_max, H_in]`` and ``B[S, R_max, H_out]`` (both rank-major: PEFT's lora_B is
transposed once at load), ``ranks[S]`` int32 and ``scales[S]`` fp32. Token slot ids are int32,
-1 meaning "no adapter".

The schemas live in csrc/ops.cpp; argument checks in csrc/arguments.cpp.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from adaptfuse import _C  # defines the schemas

MERGE_TILE_ELEMENTS = 65536
"""Elements per tile of a merge record: offsets inside a tile fit in 16 bits."""

ESCAPE_CORRECTION = -128
"""A record correction with this value says: take the original bits from the escape list."""

LIBRARIES = ("adaptfuse", "adaptfuse_emu")
"""Op libraries with the same schemas: "adaptfuse" (CPU ops and CUDA kernels) and
"adaptfuse_emu" (the CUDA kernel sources under the CPU emulator, on CPU tensors; test-only,
loaded by importing adaptfuse._emu)."""


def _op(library: str, name: str):
    if library not in LIBRARIES:
        raise ValueError(f"unknown op library {library!r}; expected one of {LIBRARIES}")
    if library == "adaptfuse_emu":
        _load_emulator()
    return getattr(getattr(torch.ops, library), name).default


ACTIVATIONS = ("identity", "relu", "gelu", "gelu_new", "silu", "tanh")
"""The activations shrink applies for bottleneck adapters, indexed by their codes (shrink's
per-slot ``activations``, csrc/kernels/activation.cuh): gelu is the erf form, gelu_new the tanh
approximation, silu AdapterHub's "swish"."""

_ACTIVATION_ALIASES = {"swish": "silu"}


def activation_code(activation: str) -> int:
    """The op's code of an activation name; raises ValueError naming the choices."""
    if isinstance(activation, str):
        name = _ACTIVATION_ALIASES.get(activation.lower(), activation.lower())
        if name in ACTIVATIONS:
            return ACTIVATIONS.index(name)
    raise ValueError(
        f"unknown activation {activation!r}; expected one of {ACTIVATIONS} (or 'swish' for silu)"
    )


KERNEL_FAMILIES = ("auto", "simple", "bgmv", "sgmv")
"""shrink/expand kernel families of the CUDA dispatcher: "auto" (production: SGMV when the
tokens outnumber 16 per slot or the call is batch-invariant, else BGMV), "simple" (the
foundation's one-block-per-token kernels, the baseline), "bgmv" (the decode kernels) and
"sgmv" (the prefill kernels, on tensor cores for fp16/bf16)."""


@contextlib.contextmanager
def kernel_family(name: str, *, library: str = "adaptfuse"):
    """Within the block, the CUDA dispatcher of ``library`` uses only the named family of
    shrink/expand kernels (process-wide: for benchmarks and tests, not for serving)."""
    if name not in KERNEL_FAMILIES:
        raise ValueError(f"unknown kernel family {name!r}; expected one of {KERNEL_FAMILIES}")
    if library == "adaptfuse_emu":
        from adaptfuse import _emu as module
    elif library == "adaptfuse" and _C.cuda_built():
        module = _C
    else:
        raise RuntimeError(f"kernel families exist only for CUDA kernels; {library!r} has none")
    previous = module.kernel_family(name)
    try:
        yield
    finally:
        module.kernel_family(previous)


_EMULATOR_READY = False


def _load_emulator() -> None:
    """Imports adaptfuse._emu (torch.ops.adaptfuse_emu.*) and gives it the same fake impls and
    autograd formulas as the adaptfuse library."""
    global _EMULATOR_READY
    if _EMULATOR_READY:
        return
    from adaptfuse import _emu  # noqa: F401

    _EMULATOR_READY = True
    for name in ("plan", "shrink", "expand_", "expand", "segment_outer", "merge_", "unmerge_"):
        fake = _FAKES[name]
        torch.library.register_fake(f"adaptfuse_emu::{name}", fake)
    _register_autograd("adaptfuse_emu")


class Plan(NamedTuple):
    """Tokens grouped by slot, built once per forward and shared by every layer.

    token_slots:  int32 [T], the slot of each token (-1: none).
    token_order:  int32 [T], token indices grouped by slot, each slot's in ascending order;
                  tokens without a slot come last.
    slot_offsets: int32 [S + 1], slot s owns ``token_order[slot_offsets[s]:slot_offsets[s+1]]``.
    """

    token_slots: torch.Tensor
    token_order: torch.Tensor
    slot_offsets: torch.Tensor

    @property
    def num_slots(self) -> int:
        """S, the number of slots the plan was built for."""
        return self.slot_offsets.shape[0] - 1


def plan(token_slots: torch.Tensor, num_slots: int, *, library: str = "adaptfuse") -> Plan:
    """Build the plan on the tokens' device, without host synchronisation (graph-safe)."""
    token_order, slot_offsets = _op(library, "plan")(token_slots, num_slots)
    return Plan(token_slots, token_order, slot_offsets)


def shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    plan: Plan,
    *,
    batch_invariant: bool = False,
    bias: Optional[torch.Tensor] = None,
    activations: Optional[torch.Tensor] = None,
    library: str = "adaptfuse",
) -> torch.Tensor:
    """``v[t, :rank(s)] = scales[s] * (x[t] @ A[s, :rank(s)]^T)``, s = slot of t.

    x: [T, H_in] (fp32/fp16/bf16, stride 1 along H_in); A: [S, R_max, H_in].
    Returns v: fp32 [T, R_max], zero for tokens without a slot and beyond each slot's rank.
    batch_invariant: the CUDA kernels fix every split by the layer's shapes and run every
    token through one kernel family, so a token's bits do not depend on the rest of the batch
    (``patch(..., batch_invariant=True)``); the CPU ops are deterministic either way.
    bias, activations: bottleneck adapters' down-projections, ``v[t, :rank(s)] = scales[s] *
    act_s(x[t] @ A[s, :rank(s)]^T + bias[s, :rank(s)])`` with bias fp32 [S, R_max] and
    activations int32 [S], each slot's code in ACTIVATIONS (None: no bias / the identity).
    """
    return _op(library, "shrink")(
        x,
        A,
        ranks,
        scales,
        plan.token_slots,
        plan.token_order,
        plan.slot_offsets,
        batch_invariant,
        bias,
        activations,
    )


def expand_(
    y: torch.Tensor,
    v: torch.Tensor,
    B: Sequence[torch.Tensor],
    out_offsets: Sequence[int],
    ranks: torch.Tensor,
    plan: Plan,
    *,
    batch_invariant: bool = False,
    bias: Optional[torch.Tensor] = None,
    library: str = "adaptfuse",
) -> torch.Tensor:
    """In place: ``y[t, off_i:off_i + H_out_i] += v[t, col_i:col_i + rank(s)] @ B_i[s, :rank(s)]``.

    One launch covers several output slices (fused projections): B_i is [S, R_max_i, H_out_i],
    slice i reads v's columns starting at col_i = R_max_0 + ... + R_max_{i-1}, so v is
    fp32 [T, sum_i R_max_i]. The sum is accumulated in fp32 and rounded once into y's dtype.
    Tokens without a slot are left untouched. batch_invariant: as in shrink. bias: a
    bottleneck adapter's up-projection bias, fp32 [S, H_out] (one slice only), added inside the
    same fp32 sum for tokens whose slot has a non-zero rank. Returns y.
    """
    _op(library, "expand_")(
        y,
        v,
        list(B),
        list(out_offsets),
        ranks,
        plan.token_slots,
        plan.token_order,
        plan.slot_offsets,
        batch_invariant,
        bias,
    )
    return y


def expand(
    v: torch.Tensor,
    B: Sequence[torch.Tensor],
    out_offsets: Sequence[int],
    h_out: int,
    ranks: torch.Tensor,
    plan: Plan,
    *,
    batch_invariant: bool = False,
    bias: Optional[torch.Tensor] = None,
    library: str = "adaptfuse",
) -> torch.Tensor:
    """Functional expand (training): a new fp32 ``[T, h_out]`` tensor holding zero plus what
    expand_ would add. Differentiable in v, B and bias (autograd registered below)."""
    return _op(library, "expand")(
        v,
        list(B),
        list(out_offsets),
        h_out,
        ranks,
        plan.token_slots,
        plan.token_order,
        plan.slot_offsets,
        batch_invariant,
        bias,
    )


def segment_outer(
    a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor, plan: Plan, *, library: str = "adaptfuse"
) -> torch.Tensor:
    """fp32 ``[S, R, H]``: ``out[s, k] = sum over the tokens t of slot s of a[t, k] * b[t]`` for
    ``k < ranks[s]``, zero elsewhere; summed in the plan's token order (deterministic).

    a: fp32 [T, R]; b: [T, H]. The adapters' weight gradients are segmented reductions of
    this form: ``dB = segment_outer(v, dy)``, ``dA = segment_outer(scale * dv, x)``.
    """
    return _op(library, "segment_outer")(
        a, b, ranks, plan.token_slots, plan.token_order, plan.slot_offsets
    )


@dataclasses.dataclass(frozen=True)
class MergeRecord:
    """What makes unmerge exact: the elements whose bits would not come back.

    W is cut into tiles of MERGE_TILE_ELEMENTS elements (flat index ``o * H_in + i``).
    tile_counts: int32 [num_tiles, 2], entries and escapes per tile.
    offsets:     int16 [N], each entry's offset inside its tile (read as unsigned).
    corrections: int8 [N], original bits minus the bits unmerge computes, or
                 ESCAPE_CORRECTION when that does not fit in int8.
    escape_bits: int32 [E], the original bits of the escaped entries, in entry order.
    """

    tile_counts: torch.Tensor
    offsets: torch.Tensor
    corrections: torch.Tensor
    escape_bits: torch.Tensor

    @property
    def num_entries(self) -> int:
        """Number of elements whose bits the record restores."""
        return self.offsets.numel()

    @property
    def nbytes(self) -> int:
        """Bytes the record holds on its device."""
        return sum(t.numel() * t.element_size() for t in dataclasses.astuple(self))

    def fraction_of(self, W: torch.Tensor) -> float:
        """The record's size as a fraction of W's bytes (a full copy of W would be 1.0)."""
        return self.nbytes / (W.numel() * W.element_size())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MergeRecord:
        """A copy on another device (keep records in host memory, bring them back to unmerge)."""
        return MergeRecord(
            *(t.to(device, non_blocking=non_blocking) for t in dataclasses.astuple(self))
        )


def merge_(
    W: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    *,
    delta: Optional[torch.Tensor] = None,
    library: str = "adaptfuse",
) -> MergeRecord:
    """In place: ``W[H_out, H_in] += delta + sum_i coefficients[i] * B_i^T @ A_i``.

    A_i: [r_i, H_in], B_i: [r_i, H_out] (rank-major, as stored in the slots); coefficient_i
    is the merge weight times the adapter's scaling. delta: an optional fp32 [H_out, H_in]
    full delta (TIES/DARE merges), the first addend; A, B and coefficients may then be
    empty. The delta is computed in fp32 in a fixed order and rounded once into W. Refuses
    (and leaves W bit-identical) when an element would turn non-finite. Returns the record
    that unmerge_ needs.
    """
    tensors = _op(library, "merge_")(W, list(A), list(B), [float(c) for c in coefficients], delta)
    return MergeRecord(*tensors)


def unmerge_(
    W: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    record: MergeRecord,
    *,
    delta: Optional[torch.Tensor] = None,
    library: str = "adaptfuse",
) -> torch.Tensor:
    """Undo merge_ bit for bit: recompute the same delta, subtract, restore recorded elements.

    Takes the same A, B, coefficients and full delta as the merge_ that produced ``record``,
    on the same backend. Returns W.
    """
    _op(library, "unmerge_")(
        W, list(A), list(B), [float(c) for c in coefficients], *dataclasses.astuple(record), delta
    )
    return W


# Fake implementations: shapes and dtypes only, for torch.compile and opcheck.


def _plan_fake(token_slots, num_slots):
    return token_slots.new_empty(token_slots.shape), token_slots.new_empty((num_slots + 1,))


def _shrink_fake(
    x,
    A,
    ranks,
    scales,
    token_slots,
    token_order,
    slot_offsets,
    batch_invariant=False,
    bias=None,
    activations=None,
):
    return x.new_empty((x.shape[0], A.shape[1]), dtype=torch.float32)


def _expand_fake(
    y,
    v,
    B,
    out_offsets,
    ranks,
    token_slots,
    token_order,
    slot_offsets,
    batch_invariant=False,
    bias=None,
):
    return None


def _merge_fake(W, A, B, coefficients, delta=None):
    # The record's length depends on the data: declare it as such, never guess it.
    ctx = torch.library.get_ctx()
    entries = ctx.new_dynamic_size()
    escapes = ctx.new_dynamic_size()
    num_tiles = math.ceil(W.numel() / MERGE_TILE_ELEMENTS)
    return (
        W.new_empty((num_tiles, 2), dtype=torch.int32),
        W.new_empty((entries,), dtype=torch.int16),
        W.new_empty((entries,), dtype=torch.int8),
        W.new_empty((escapes,), dtype=torch.int32),
    )


def _unmerge_fake(
    W, A, B, coefficients, tile_counts, offsets, corrections, escape_bits, delta=None
):
    return None


def _expand_functional_fake(
    v,
    B,
    out_offsets,
    h_out,
    ranks,
    token_slots,
    token_order,
    slot_offsets,
    batch_invariant=False,
    bias=None,
):
    return v.new_empty((v.shape[0], h_out), dtype=torch.float32)


def _segment_outer_fake(a, b, ranks, token_slots, token_order, slot_offsets):
    return a.new_empty((ranks.shape[0], a.shape[1], b.shape[1]), dtype=torch.float32)


_FAKES = {
    "plan": _plan_fake,
    "shrink": _shrink_fake,
    "expand_": _expand_fake,
    "merge_": _merge_fake,
    "unmerge_": _unmerge_fake,
    "expand": _expand_functional_fake,
    "segment_outer": _segment_outer_fake,
}
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"adaptfuse::{_name}", _fake)


# Autograd of the functional ops (training). The backward is the same ops with the banks
# swapped (DESIGN.md): for v = scale * x A^T, dx = expand(scale * dv, A) and
# dA = segment_outer(scale * dv, x); for y = v B, dv = shrink(dy, B) and dB = segment_outer(v, dy).


def _token_scales(scales: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """scales[slot of t], 0 for tokens without a slot (a gather: no host synchronisation)."""
    has_slot = token_slots >= 0
    return torch.where(has_slot, scales[token_slots.clamp(min=0).long()], 0.0)


# torch's forms of ACTIVATIONS, for the derivative act'(z) in shrink's backward.
_ACTIVATION_FUNCTIONS = (
    lambda z: z,
    torch.nn.functional.relu,
    torch.nn.functional.gelu,
    lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    torch.nn.functional.silu,
    torch.tanh,
)


def _activation_grad(codes: torch.Tensor, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * act_t'(z) row by row, act_t the activation of code codes[t] (no host sync: every
    activation is differentiated on every row and the row's own one selected)."""
    result = torch.zeros_like(grad)
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        for code, function in enumerate(_ACTIVATION_FUNCTIONS):
            (derivative,) = torch.autograd.grad(function(z), z, grad)
            result = torch.where((codes == code)[:, None], derivative, result)
    return result


def _gradients_for_passed_arguments(ctx, grads: dict) -> tuple:
    """One gradient per argument the op was called with. The dispatcher drops trailing
    arguments equal to their defaults before autograd sees them (torch 2.11), while
    setup_context gets them filled back in: count what the backward must answer from
    needs_input_grad, which has one entry per passed argument in every version."""
    return tuple(grads.get(i) for i in range(len(ctx.needs_input_grad)))


def _register_autograd(library: str) -> None:
    # The backward uses the forward's batch_invariant (inputs carry it when the caller passed
    # it; the schema's default otherwise), and returns no gradient for it.
    def shrink_setup(ctx, inputs, output):
        x, A, ranks, scales, token_slots, token_order, slot_offsets, *rest = inputs
        rest = list(rest) + [False, None, None][len(rest) :]
        ctx.batch_invariant, bias, activations = bool(rest[0]), rest[1], rest[2]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(
            x, A, ranks, scales, token_slots, token_order, slot_offsets, bias, activations
        )

    def shrink_backward(ctx, grad_v):
        x, A, ranks, scales, token_slots, token_order, slot_offsets, bias, activations = (
            ctx.saved_tensors
        )
        plan = Plan(token_slots, token_order, slot_offsets)
        scaled = grad_v * _token_scales(scales, token_slots)[:, None]
        if activations is not None:
            # v = scale * act(z), z = x A^T + bias: the gradient of z is scale * dv * act'(z),
            # with z recomputed by the same op (unit scales, no activation).
            z = shrink(
                x,
                A,
                ranks,
                torch.ones_like(scales),
                plan,
                batch_invariant=ctx.batch_invariant,
                bias=bias,
                library=library,
            )
            codes = torch.where(token_slots >= 0, activations[token_slots.clamp(min=0).long()], 0)
            scaled = _activation_grad(codes, z, scaled)
        scaled = scaled.contiguous()
        grad_x = grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = expand(
                scaled,
                [A],
                [0],
                A.shape[2],
                ranks,
                plan,
                batch_invariant=ctx.batch_invariant,
                library=library,
            )
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_A = segment_outer(scaled, x, ranks, plan, library=library).to(A.dtype)
        passed = len(ctx.needs_input_grad)  # see _gradients_for_passed_arguments
        if ctx.has_bias and passed > 8 and ctx.needs_input_grad[8]:
            ones = scaled.new_ones(scaled.shape[0], 1)
            grad_bias = segment_outer(scaled, ones, ranks, plan, library=library)[:, :, 0]
        return _gradients_for_passed_arguments(ctx, {0: grad_x, 1: grad_A, 8: grad_bias})

    def expand_setup(ctx, inputs, output):
        v, B, out_offsets, h_out, ranks, token_slots, token_order, slot_offsets, *rest = inputs
        ctx.batch_invariant = bool(rest[0]) if rest else False
        ctx.has_bias = len(rest) > 1 and rest[1] is not None
        ctx.out_offsets = list(out_offsets)
        ctx.num_slices = len(B)
        ctx.save_for_backward(v, ranks, token_slots, token_order, slot_offsets, *B)

    def expand_backward(ctx, grad_y):
        v, ranks, token_slots, token_order, slot_offsets, *B = ctx.saved_tensors
        plan = Plan(token_slots, token_order, slot_offsets)
        ones = torch.ones_like(ranks, dtype=torch.float32)
        grad_y = grad_y.float()
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[0] else None
        grad_B = []
        column = 0
        for slice_B, offset in zip(B, ctx.out_offsets, strict=True):
            capacity, width = slice_B.shape[1], slice_B.shape[2]
            slice_ranks = ranks.clamp(max=capacity)
            dy = grad_y[:, offset : offset + width]
            if grad_v is not None:
                grad_v[:, column : column + capacity] = shrink(
                    dy,
                    slice_B,
                    slice_ranks,
                    ones,
                    plan,
                    batch_invariant=ctx.batch_invariant,
                    library=library,
                )
            if ctx.needs_input_grad[1]:
                v_slice = v[:, column : column + capacity].contiguous()
                grad_B.append(
                    segment_outer(v_slice, dy, slice_ranks, plan, library=library).to(slice_B.dtype)
                )
            column += capacity
        grads = {0: grad_v, 1: grad_B if ctx.needs_input_grad[1] else None}
        if ctx.has_bias and len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]:
            # Every token whose slot has a non-zero rank received its slot's bias.
            ones = grad_y.new_ones(grad_y.shape[0], 1)
            grads[9] = segment_outer(ones, grad_y, ranks.clamp(max=1), plan, library=library)[
                :, 0, :
            ]
        return _gradients_for_passed_arguments(ctx, grads)

    torch.library.register_autograd(
        f"{library}::shrink", shrink_backward, setup_context=shrink_setup
    )
    torch.library.register_autograd(
        f"{library}::expand", expand_backward, setup_context=expand_setup
    )


_register_autograd("adaptfuse")
