"""The oracle: every op of adaptfuse.ops in plain torch, float64 by default.

Nothing here is fast or clever on purpose; tests and benchmarks compare against these
functions and never against the code under test. Semantics: DESIGN.md, "The ops".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def valid_slots(token_slots: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Bool [T]: which tokens have an adapter slot."""
    return (token_slots >= 0) & (token_slots < num_slots)


def plan(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """token_order (stable grouping by slot, tokens without a slot last) and slot_offsets."""
    slots = token_slots.long()
    bucket = torch.where(valid_slots(slots, num_slots), slots, torch.full_like(slots, num_slots))
    token_order = torch.sort(bucket, stable=True).indices.to(torch.int32)
    counts = torch.bincount(bucket, minlength=num_slots + 1)[:num_slots]
    slot_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    return token_order, slot_offsets


def shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """v[t, :rank(s)] = scales[s] * x[t] @ A[s, :rank(s)]^T, computed in ``dtype``."""
    num_tokens, max_rank = x.shape[0], A.shape[1]
    v = torch.zeros(num_tokens, max_rank, dtype=dtype, device=x.device)
    for slot in range(A.shape[0]):
        rows = (token_slots == slot).nonzero().flatten()
        rank = int(ranks[slot])
        if rows.numel() == 0 or rank == 0:
            continue
        product = x[rows].to(dtype) @ A[slot, :rank].to(dtype).T
        v[rows, :rank] = product * scales[slot].to(dtype)
    return v


def expand(
    y: torch.Tensor,
    v: torch.Tensor,
    B: Sequence[torch.Tensor],
    out_offsets: Sequence[int],
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A new tensor: y + v @ B per output slice, in ``dtype`` (y itself is not touched)."""
    out = y.to(dtype).clone()
    v_column = 0
    for bank, offset in zip(B, out_offsets, strict=True):
        width = bank.shape[2]
        for slot in range(bank.shape[0]):
            rows = (token_slots == slot).nonzero().flatten()
            rank = int(ranks[slot])
            if rows.numel() == 0 or rank == 0:
                continue
            update = v[rows, v_column : v_column + rank].to(dtype) @ bank[slot, :rank].to(dtype)
            out[rows, offset : offset + width] += update
        v_column += bank.shape[1]
    return out


def merge_delta(
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """sum_i coefficients[i] * B_i^T @ A_i, [H_out, H_in], in ``dtype``."""
    delta = None
    for a, b, coefficient in zip(A, B, coefficients, strict=True):
        term = float(coefficient) * (b.to(dtype).T @ a.to(dtype))
        delta = term if delta is None else delta + term
    return delta


def merge(
    W: torch.Tensor,
    A: Sequence[torch.Tensor],
    B: Sequence[torch.Tensor],
    coefficients: Sequence[float],
) -> torch.Tensor:
    """A new tensor: W + delta computed in float64, rounded once into W's dtype."""
    return (W.double() + merge_delta(A, B, coefficients)).to(W.dtype)


def segment_outer(
    a: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """[S, R, H]: out[s, k] = sum over the tokens t of slot s of a[t, k] * b[t], k < rank(s)."""
    num_slots, max_rank = ranks.shape[0], a.shape[1]
    out = torch.zeros(num_slots, max_rank, b.shape[1], dtype=dtype, device=a.device)
    for slot in range(num_slots):
        rows = (token_slots == slot).nonzero().flatten()
        rank = min(int(ranks[slot]), max_rank)
        if rows.numel() and rank:
            out[slot, :rank] = a[rows, :rank].to(dtype).T @ b[rows].to(dtype)
    return out


# Bottleneck adapters (DESIGN.md, "Bottleneck adapters"): f(h) = scaling * (W_up act(W_down h +
# b_down) + b_up), written out from their formulas (not through torch.nn.functional's).
ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": lambda z: torch.where(z > 0, z, torch.zeros_like(z)),
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "gelu_new": lambda z: (
        0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))
    ),
    "silu": lambda z: z * torch.sigmoid(z),
    "tanh": torch.tanh,
}
ACTIVATIONS["swish"] = ACTIVATIONS["silu"]


def bottleneck_shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    bias: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    token_slots: torch.Tensor,
    activation: str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """v[t, :rank(s)] = scales[s] * act(x[t] @ A[s, :rank(s)]^T + bias[s, :rank(s)]), zero
    elsewhere, in ``dtype``."""
    act = ACTIVATIONS[activation]
    v = torch.zeros(x.shape[0], A.shape[1], dtype=dtype, device=x.device)
    for slot in range(A.shape[0]):
        rows = (token_slots == slot).nonzero().flatten()
        rank = int(ranks[slot])
        if rows.numel() == 0 or rank == 0:
            continue
        z = x[rows].to(dtype) @ A[slot, :rank].to(dtype).T + bias[slot, :rank].to(dtype)
        v[rows, :rank] = scales[slot].to(dtype) * act(z)
    return v


def bias_per_token(
    bias: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor, dtype=torch.float64
) -> torch.Tensor:
    """[T, H]: bias[slot of t] for tokens whose slot has a non-zero rank, zero for the others
    (what expand adds beside v @ B)."""
    out = torch.zeros(token_slots.shape[0], bias.shape[1], dtype=dtype, device=bias.device)
    for slot in range(bias.shape[0]):
        rows = (token_slots == slot).nonzero().flatten()
        if rows.numel() and int(ranks[slot]) > 0:
            out[rows] = bias[slot].to(dtype)
    return out


def bottleneck(
    h: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    up: torch.Tensor,
    up_bias: torch.Tensor,
    activation: str,
    scaling: float,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One adapter on rows h [N, H] with AdapterHub's tensors (down [m, H], up [H, m]):
    scaling * (up @ act(down @ h + down_bias) + up_bias), in ``dtype``."""
    z = h.to(dtype) @ down.to(dtype).T + down_bias.to(dtype)
    return scaling * (ACTIVATIONS[activation](z) @ up.to(dtype).T + up_bias.to(dtype))
