"""Adapter layers: y = base(x) + expand(shrink(x)) for every token whose request names an
adapter, with the slot banks of DESIGN.md's storage layout."""

from __future__ import annotations

import contextvars
from typing import Optional

import torch
from torch import nn

from adaptfuse import ops
from adaptfuse.training import trainable_banks


class BatchPlans:
    """The plan of one forward: built once on the first device, and once more for every other
    device a layer lives on (device_map), on first use there."""

    def __init__(self, token_slots: torch.Tensor, num_slots: int):
        self._token_slots = token_slots
        self._num_slots = num_slots
        first = ops.plan(token_slots, num_slots)
        self._plans = {token_slots.device: first}
        self.num_tokens = token_slots.shape[0]

    def on(self, device: torch.device) -> ops.Plan:
        plan = self._plans.get(device)
        if plan is None:
            plan = ops.plan(self._token_slots.to(device, non_blocking=True), self._num_slots)
            self._plans[device] = plan
        return plan


# The plans of the forward in progress (set by the patched model's forward, read by every
# layer). A context variable: concurrent forwards in other threads see their own.
current_plan: contextvars.ContextVar[Optional[BatchPlans]] = contextvars.ContextVar(
    "adaptfuse_current_plan", default=None
)


def conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def layer_features(module: nn.Module) -> Optional[tuple[int, int]]:
    """(H_in, H_out) of a layer type adaptfuse adapts, or None. A dispatcher over layer
    types (first match wins), never a function per architecture: nn.Linear, then GPT-2's
    Conv1D (weight stored [H_in, H_out], PEFT's fan_in_fan_out)."""
    if type(module) is nn.Linear:  # subclasses (quantized linears...) are not plain matmuls
        return module.in_features, module.out_features
    conv1d = conv1d_class()
    if conv1d is not None and type(module) is conv1d:
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LoraLayer(nn.Module):
    """Wraps a base layer; holds the layer's slot banks (non-persistent buffers, allocated once
    at patch time): lora_A [S, R_max, H_in], lora_B [S, R_max, H_out] in the base dtype,
    lora_ranks [S] int32 (0: the slot's adapter does not adapt this layer), lora_scales [S].

    tensor_parallel (adaptfuse.distributed.ShardedLinear): how the base layer is sharded;
    the banks then hold this rank's slice, and H_in/H_out are the sizes this rank sees."""

    # patch(..., batch_invariant=True): CUDA splits fixed by shapes and one kernel family for
    # every token, so a request's bits never depend on the rest of its batch.
    batch_invariant = False

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, tensor_parallel=None):
        super().__init__()
        features = layer_features(base_layer)
        assert features is not None
        self.base_layer = base_layer
        self.tensor_parallel = tensor_parallel
        if tensor_parallel is not None:
            features = tensor_parallel.local_features
        self.in_features, self.out_features = features
        weight = base_layer.weight
        kwargs = dict(device=weight.device, dtype=weight.dtype)
        self.register_buffer(
            "lora_A", torch.zeros(num_slots, max_rank, self.in_features, **kwargs), persistent=False
        )
        self.register_buffer(
            "lora_B",
            torch.zeros(num_slots, max_rank, self.out_features, **kwargs),
            persistent=False,
        )
        self.register_buffer(
            "lora_ranks",
            torch.zeros(num_slots, dtype=torch.int32, device=weight.device),
            persistent=False,
        )
        # fp32 scales kept as their int32 bit patterns: model.to(dtype) casts every floating
        # buffer, and the scales must stay fp32 (and unrounded) whatever the model's dtype.
        self.register_buffer(
            "lora_scale_bits",
            torch.zeros(num_slots, dtype=torch.int32, device=weight.device),
            persistent=False,
        )
        self._slot_ranks: dict[int, int] = {}  # host mirror of lora_ranks (no device reads)
        self.active_slots = 0  # slots with a non-zero rank in this layer
        # Trainable adapters (adaptfuse.training): fp32 banks of the same layout, allocated on
        # the first one; slot -> (A [r, H_in], B [H_out, r] parameters, lora_dropout).
        self.train_A: Optional[torch.Tensor] = None
        self.train_B: Optional[torch.Tensor] = None
        self.trainable: dict[int, tuple[nn.Parameter, nn.Parameter, float]] = {}

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as [H_out, H_in] (a transposed view for GPT-2's Conv1D); this
        rank's shard (the DTensor's local tensor) under tensor parallelism."""
        weight = self.base_layer.weight.data
        if self.tensor_parallel is not None:
            weight = weight.to_local()
        return weight if isinstance(self.base_layer, nn.Linear) else weight.t()

    @property
    def full_features(self) -> tuple[int, int]:
        """(H_in, H_out) of the whole layer, which an adapter's tensors must fit (this rank's
        banks may hold a slice of them)."""
        return layer_features(self.base_layer)

    @property
    def lora_scales(self) -> torch.Tensor:
        return self.lora_scale_bits.view(torch.float32)

    @staticmethod
    def bank_bytes(module: nn.Module, num_slots: int, max_rank: int, tensor_parallel=None) -> int:
        h_in, h_out = tensor_parallel.local_features if tensor_parallel else layer_features(module)
        element = module.weight.element_size()
        return num_slots * (max_rank * (h_in + h_out) * element + 8)

    def write_slot(
        self, slot: int, A: Optional[torch.Tensor], B: Optional[torch.Tensor], scale: float
    ) -> None:
        """Fills one slot (A [r, H_in], B [r, H_out]); None clears it (rank 0). Rows beyond
        the rank are never read, so they are left as they are."""
        was_active = self._slot_ranks.get(slot, 0) > 0
        if A is None:
            self.lora_ranks[slot] = 0
            self.lora_scales[slot] = 0.0
            self._slot_ranks[slot] = 0
        else:
            rank = A.shape[0]
            self.lora_A[slot, :rank].copy_(A, non_blocking=True)
            self.lora_B[slot, :rank].copy_(B, non_blocking=True)
            self.lora_scales[slot] = scale
            self.lora_ranks[slot] = rank
            self._slot_ranks[slot] = rank
        self.active_slots += int(self._slot_ranks[slot] > 0) - int(was_active)

    def attach_trainable(
        self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float, dropout: float
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """Puts a trainable adapter (A [r, H_in], B [r, H_out], fp32) in a slot of the fp32
        banks; returns its parameters: views of the banks in PEFT's shapes."""
        num_slots, max_rank = self.lora_A.shape[:2]
        device = self.lora_A.device
        if self.train_A is None:
            self.train_A = torch.zeros(num_slots, max_rank, self.in_features, device=device)
            self.train_B = torch.zeros(num_slots, max_rank, self.out_features, device=device)
            self.train_ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
            self.train_scales = torch.zeros(num_slots, device=device)
            self.train_dropout = torch.zeros(num_slots, device=device)
        rank = A.shape[0]
        self.train_A[slot, :rank].copy_(A)
        self.train_B[slot, :rank].copy_(B)
        self.train_ranks[slot] = rank
        self.train_scales[slot] = scale
        self.train_dropout[slot] = dropout
        parameters = (
            nn.Parameter(self.train_A[slot, :rank]),
            nn.Parameter(self.train_B[slot, :rank].t()),
        )
        self.trainable[slot] = (*parameters, dropout)
        return parameters

    def detach_trainable(self, slot: int) -> None:
        if self.trainable.pop(slot, None) is not None:
            self.train_ranks[slot] = 0

    def _trainable_delta(self, tokens: torch.Tensor, plan: ops.Plan) -> torch.Tensor:
        """fp32 [T, H_out]: the trainable adapters' part, differentiable in their parameters."""
        bank_A, bank_B = trainable_banks(self)
        if self.training and any(dropout > 0 for _, _, dropout in self.trainable.values()):
            # PEFT's lora_dropout, per adapter: each token's rate is its adapter's.
            slots = plan.token_slots
            rate = torch.where(slots >= 0, self.train_dropout[slots.clamp(min=0).long()], 0.0)
            keep = torch.rand(tokens.shape, device=tokens.device) >= rate[:, None]
            tokens = tokens.float() * keep / (1.0 - rate[:, None])
        invariant = self.batch_invariant
        v = ops.shrink(
            tokens, bank_A, self.train_ranks, self.train_scales, plan, batch_invariant=invariant
        )
        return ops.expand(
            v, [bank_B], [0], self.out_features, self.train_ranks, plan, batch_invariant=invariant
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plans = current_plan.get()
        if plans is None or (self.active_slots == 0 and not self.trainable):
            return self.base_layer(x, *args, **kwargs)
        if self.tensor_parallel is not None:
            # Added to this rank's own matmul output, before the base layer's collective.
            return self.tensor_parallel.forward(
                self.base_layer, x, args, kwargs, lambda x, y: self._add_adapters(x, y, plans)
            )
        return self._add_adapters(x, self.base_layer(x, *args, **kwargs), plans)

    def _add_adapters(self, x: torch.Tensor, y: torch.Tensor, plans: BatchPlans) -> torch.Tensor:
        """y (the base output for input x) plus the adapters' part."""
        tokens = x.reshape(-1, self.in_features)
        if tokens.shape[0] != plans.num_tokens:
            raise RuntimeError(
                f"adaptfuse: layer input has {tokens.shape[0]} tokens but the batch plan has "
                f"{plans.num_tokens} "
                "(adapter_names apply to inputs shaped [batch, sequence])"
            )
        plan = plans.on(x.device)
        if self.trainable:
            # PEFT adds the fp32 adapter output to the base output and casts back once.
            y = self._frozen_part(x, y, tokens, plan)
            delta = self._trainable_delta(tokens, plan)
            return (y + delta.view(y.shape)).to(y.dtype)
        return self._frozen_part(x, y, tokens, plan)

    def _frozen_part(self, x, y, tokens, plan):
        if self.active_slots == 0:
            return y
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            # Frozen adapters in a forward with gradients: an ordinary forward, whose
            # activations get the adapters' part of their gradient (the adapters get none).
            delta = _FrozenLoraDelta.apply(
                self.batch_invariant,
                tokens,
                self.lora_A,
                self.lora_B,
                self.lora_ranks,
                self.lora_scales,
                *plan,
            )
            return y + delta.view(y.shape)
        invariant = self.batch_invariant
        v = ops.shrink(
            tokens, self.lora_A, self.lora_ranks, self.lora_scales, plan, batch_invariant=invariant
        )
        out = y.view(-1, self.out_features)
        ops.expand_(out, v, [self.lora_B], [0], self.lora_ranks, plan, batch_invariant=invariant)
        return y


class _FrozenLoraDelta(torch.autograd.Function):
    """delta = scale * (x A^T) B per token's slot; backward to x only, with the same two ops
    and the banks swapped: dx = expand(shrink(d_delta, B), A)."""

    @staticmethod
    def forward(
        ctx, invariant, tokens, A, B, ranks, scales, token_slots, token_order, slot_offsets
    ):
        plan = ops.Plan(token_slots, token_order, slot_offsets)
        v = ops.shrink(tokens, A, ranks, scales, plan, batch_invariant=invariant)
        delta = tokens.new_zeros(tokens.shape[0], B.shape[2])
        ops.expand_(delta, v, [B], [0], ranks, plan, batch_invariant=invariant)
        ctx.save_for_backward(A, B, ranks, scales, token_slots, token_order, slot_offsets)
        ctx.tokens_dtype, ctx.invariant = tokens.dtype, invariant
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        A, B, ranks, scales, token_slots, token_order, slot_offsets = ctx.saved_tensors
        plan = ops.Plan(token_slots, token_order, slot_offsets)
        invariant = ctx.invariant
        dv = ops.shrink(grad_delta.contiguous(), B, ranks, scales, plan, batch_invariant=invariant)
        grad_tokens = grad_delta.new_zeros(grad_delta.shape[0], A.shape[2], dtype=ctx.tokens_dtype)
        ops.expand_(grad_tokens, dv, [A], [0], ranks, plan, batch_invariant=invariant)
        return None, grad_tokens, None, None, None, None, None, None, None
