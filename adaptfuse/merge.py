"""Folding adapters into base weights, and out again bit for bit.

Methods (``AdapterManager.merge(spec, method=...)``):

- ``linear`` (default): the exact weighted sum of the adapters' deltas,
  ``W += sum_i w_i * scale_i * B_i^T @ A_i``, computed by merge_ from the low-rank factors
  (not PEFT's approximate 'linear', which mixes A and B separately). No memory beyond the
  record.
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the methods of
  peft.utils.merge_utils (TIES-merging, Yadav et al. 2023; DARE, Yu et al. 2023), applied to
  the full deltas ``delta_i = scale_i * B_i^T @ A_i`` of each layer, with the same semantics
  as PEFT's functions given the same deltas (top-k magnitude trimming with
  k = int(density * numel), sign election by total or frequency, disjoint mean; DARE's
  Bernoulli keep mask with rescaling by 1/density). PEFT then compresses the result back to
  a low rank by SVD; adaptfuse folds the full combined delta into W instead, so nothing is
  approximated. Extra memory, transient and one layer at a time: the n full fp32 deltas,
  their stack and the masks, about (3n + 2) * H_out * H_in * 4 bytes for n adapters (for
  n = 2 and a 4096 x 14336 layer, 1.8 GB).

Exactness: unmerge recomputes the identical combined delta (the per-adapter deltas come from
merge_'s own fixed-order loop; trimming, sign election and sums are deterministic torch ops;
DARE's masks come from a generator seeded by the merge's seed and the layer's name) and hands
it to unmerge_ with the record. So a DARE merge is reproducible: the same seed gives the same
merged weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Optional

import torch

from adaptfuse import ops
from adaptfuse.adapters import LoraWeights

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_TRIMMED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_ELECTING = ("ties", "dare_ties")
_RANDOM = ("dare_linear", "dare_ties")


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How several adapters combine. density: the fraction of each delta's entries kept by
    the trimming methods (0 < density <= 1); majority_sign: "total" (sign of the summed
    values) or "frequency" (sign of the majority count) for TIES; seed: DARE's masks."""

    method: str = "linear"
    density: Optional[float] = None
    majority_sign: str = "total"
    seed: int = 0

    def __post_init__(self):
        if self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose from {MERGE_METHODS}")
        if self.method in _TRIMMED:
            if self.density is None or not 0.0 < float(self.density) <= 1.0:
                raise ValueError(
                    f"merge method {self.method!r} needs a density in (0, 1], got {self.density!r}"
                )
        elif self.density is not None:
            raise ValueError("density applies to ties, dare_linear, dare_ties and magnitude_prune")
        if self.majority_sign not in ("total", "frequency"):
            raise ValueError(
                f"majority_sign must be 'total' or 'frequency', got {self.majority_sign!r}"
            )


def full_delta(A: torch.Tensor, B: torch.Tensor, coefficient: float) -> torch.Tensor:
    """fp32 [H_out, H_in] = coefficient * B^T @ A, for A [r, H_in] and B [r, H_out].

    Computed by merge_ into zeros (0 + d is d exactly): the project's fixed-order loop, so the
    delta recomputed at unmerge time has the same bits on the same device, which a BLAS call
    whose blocking follows the thread count would not promise."""
    delta = torch.zeros(B.shape[1], A.shape[1], dtype=torch.float32, device=A.device)
    ops.merge_(delta, [A], [B], [coefficient])
    return delta


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """delta with all but its int(density * numel) largest magnitudes set to zero."""
    if density >= 1.0:
        return delta
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(delta.abs().flatten(), k=int(density * delta.numel())).indices] = 1
    return delta * keep.view_as(delta)


def _keep_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability density, survivors scaled by 1 / density."""
    if density >= 1.0:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def combine_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    options: MergeOptions,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One combined fp32 delta [H_out, H_in] from n full deltas by options.method (see the
    module docstring). weights: one per delta. generator: DARE's masks, drawn in delta order.
    """
    if options.method in _RANDOM:
        trimmed = [_keep_random(d, options.density, generator) for d in deltas]
    elif options.method in _TRIMMED:
        trimmed = [_keep_largest(d, options.density) for d in deltas]
    else:
        trimmed = list(deltas)
    stacked = torch.stack(trimmed)
    weight_column = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * weight_column.view(-1, *([1] * (stacked.dim() - 1)))
    if options.method not in _SIGN_ELECTING:
        return weighted.sum(dim=0)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if options.majority_sign == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


@dataclasses.dataclass
class LayerMerge:
    """What unmerging one layer needs: the same terms, the same combined-delta recipe, the
    record."""

    path: str
    A: list
    B: list
    coefficients: list
    weights: list
    record: ops.MergeRecord


def _layer_generator(options: MergeOptions, path: str, device: torch.device) -> torch.Generator:
    # The seed and the layer's name fix the masks, whatever order layers are visited in.
    digest = hashlib.sha256(f"{options.seed}:{path}".encode()).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def _layer_delta(merge: LayerMerge, options: MergeOptions) -> Optional[torch.Tensor]:
    """The full combined delta of a trimming method; None for linear (merge_ sums the terms)."""
    if options.method == "linear":
        return None
    device = merge.A[0].device
    factors = zip(merge.A, merge.B, merge.coefficients, strict=True)
    deltas = [full_delta(a, b, coefficient) for a, b, coefficient in factors]
    generator = None
    if options.method in _RANDOM:
        generator = _layer_generator(options, merge.path, device)
    return combine_deltas(deltas, merge.weights, options, generator)


def merge_layer(
    path: str,
    W: torch.Tensor,
    terms: Sequence[tuple[LoraWeights, float, float]],
    options: MergeOptions,
) -> LayerMerge:
    """Folds one layer's adapters into W [H_out, H_in] in place.

    terms: (weights, merge weight, scaling) per adapter adapting this layer. Linear merges
    hand merge_ the low-rank factors with coefficient = merge weight x scaling; the trimming
    methods fold the combined full delta of deltas scaling x B^T A, weighted by merge weight.
    """
    linear = options.method == "linear"
    merge = LayerMerge(
        path=path,
        A=[t.A.to(W.device) for t, _, _ in terms],
        B=[t.B.to(W.device) for t, _, _ in terms],
        coefficients=[w * s if linear else s for _, w, s in terms],
        weights=[w for _, w, _ in terms],
        record=None,
    )
    delta = _layer_delta(merge, options)
    if delta is None:
        merge.record = ops.merge_(W, merge.A, merge.B, merge.coefficients)
    else:
        merge.record = ops.merge_(W, [], [], [], delta=delta)
    return merge


def unmerge_layer(W: torch.Tensor, merge: LayerMerge, options: MergeOptions) -> None:
    """Restores W bit for bit after merge_layer (same device, same options)."""
    delta = _layer_delta(merge, options)
    if delta is None:
        ops.unmerge_(W, merge.A, merge.B, merge.coefficients, merge.record)
    else:
        ops.unmerge_(W, [], [], [], merge.record, delta=delta)


__all__ = [
    "MERGE_METHODS",
    "LayerMerge",
    "MergeOptions",
    "combine_deltas",
    "full_delta",
    "merge_layer",
    "unmerge_layer",
]
