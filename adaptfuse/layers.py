"""Adapter layers: y = base(x) + expand(shrink(x)) for every token whose request names an
adapter, with the slot banks of DESIGN.md's storage layout."""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from adaptfuse import ops
from adaptfuse.training import bank_views, trainable_banks


def traced(x: torch.Tensor) -> bool:
    """Whether this forward is being traced by torch.compile or captured into a CUDA graph.
    Layers then always take the adapter path, even with no adapter in any slot: a graph
    recorded while a layer was empty must still serve the adapters loaded later (and a
    compiled graph must not guard on how many slots are filled)."""
    return torch.compiler.is_compiling() or (
        x.is_cuda and torch.cuda.is_current_stream_capturing()
    )


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
        """The plan (token_slots [T] int32, token_order [T], slot_offsets [S + 1]) on `device`."""
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


# CPU prefill: a layer's base output is computed and finished with its adapters in blocks of
# OUTPUT_BLOCK outputs (1024 tokens x 512 fp32 outputs: 2 MB, cache-resident), for batches
# of at least OUTPUT_BLOCK_MIN_TOKENS tokens (decode keeps the base layer's own call).
OUTPUT_BLOCK = 512
OUTPUT_BLOCK_MIN_TOKENS = 256


def output_blocks(out_features: int) -> list[tuple[int, int]]:
    """[begin, end) of each block of outputs: OUTPUT_BLOCK wide, the last one widened rather
    than left under a quarter of that. A matmul a few outputs wide takes MKL's small-matrix
    path, whose sums round differently from the whole layer's; blocks at least 128 wide gave
    the whole matmul's bits in every shape checked (684, up to 4096 x 4096 x 14336)."""
    edges = list(range(0, out_features, OUTPUT_BLOCK)) + [out_features]
    if len(edges) > 2 and edges[-1] - edges[-2] < OUTPUT_BLOCK // 4:
        del edges[-2]
    return list(itertools.pairwise(edges))


def plain_matmul(module: nn.Module, dtype: torch.dtype) -> bool:
    """Whether module(x) is exactly one matmul plus bias in dtype: an nn.Linear or GPT-2's
    Conv1D (not a subclass), its parameters in dtype, and no hook (of its own or global) and
    no replaced forward (accelerate's offloading wraps forward) that calling it would run."""
    return (
        type(module) in (nn.Linear, conv1d_class())
        and module.weight.dtype == dtype
        and (module.bias is None or module.bias.dtype == dtype)
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not module_globals._global_forward_hooks
        and not module_globals._global_forward_pre_hooks
        and "forward" not in module.__dict__
    )


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
        if self.train_A is None or self.train_A.device != device:  # first, or model moved
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
        """base(x) plus each token's adapter: x [..., H_in] with one row per token of the
        forward's plan -> [..., H_out] in x's dtype."""
        plans = current_plan.get()
        if plans is None or (not traced(x) and self.active_slots == 0 and not self.trainable):
            return self.base_layer(x, *args, **kwargs)
        if self.tensor_parallel is not None:
            # Added to this rank's own matmul output, before the base layer's collective.
            return self.tensor_parallel.forward(
                self.base_layer, x, args, kwargs, lambda x, y: self._add_adapters(x, y, plans)
            )
        if not args and not kwargs and self._adds_into_output_blocks(x, plans):
            return self._base_and_adapters_by_output_block(x, plans)
        return self._add_adapters(x, self.base_layer(x, *args, **kwargs), plans)

    def _adds_into_output_blocks(self, x: torch.Tensor, plans: BatchPlans) -> bool:
        """Whether this forward computes the base matmul itself, one block of outputs at a
        time, adding the adapters to each block while it is still in cache: a fp32 CPU prefill
        (many tokens, many outputs) through a plain matmul layer, with frozen adapters only, no
        gradients and no tracing. On the CPU the separate pass over y that the adapters
        otherwise need costs about as much as their arithmetic (y is bigger than the cache)."""
        base = self.base_layer
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and plans.num_tokens >= OUTPUT_BLOCK_MIN_TOKENS
            and self.out_features > OUTPUT_BLOCK
            and self.active_slots > 0
            and not self.trainable
            and self.tensor_parallel is None
            and plain_matmul(base, x.dtype)
            and not (
                torch.is_grad_enabled()
                and (x.requires_grad or any(p.requires_grad for p in base.parameters()))
            )
            and not traced(x)
        )

    def _base_and_adapters_by_output_block(
        self, x: torch.Tensor, plans: BatchPlans
    ) -> torch.Tensor:
        """base(x) plus the adapters, computed OUTPUT_BLOCK outputs at a time: each block's
        base matmul writes it, then the adapters add into it. The same sums as the base
        layer's output followed by expand_, in another order of blocks; with MKL each block's
        matmul also rounds as the whole one does (see output_blocks)."""
        tokens = self._tokens(x, plans)
        plan = plans.on(x.device)
        invariant = self.batch_invariant
        v = ops.shrink(
            tokens, self.lora_A, self.lora_ranks, self.lora_scales, plan, batch_invariant=invariant
        )
        weight, bias = self.weight_out_in(), self.base_layer.bias  # [H_out, H_in], either layout
        y = tokens.new_empty(tokens.shape[0], self.out_features)
        for begin, end in output_blocks(self.out_features):
            block = y[:, begin:end]
            if bias is None:
                torch.mm(tokens, weight[begin:end].t(), out=block)
            else:
                torch.addmm(bias[begin:end], tokens, weight[begin:end].t(), out=block)
            bank = self.lora_B[:, :, begin:end]
            ops.expand_(block, v, [bank], [0], self.lora_ranks, plan, batch_invariant=invariant)
        return y.view(*x.shape[:-1], self.out_features)

    def _tokens(self, x: torch.Tensor, plans: BatchPlans) -> torch.Tensor:
        """x as [T, H_in], one row per token of the forward's plan."""
        tokens = x.reshape(-1, self.in_features)
        if tokens.shape[0] != plans.num_tokens:
            raise RuntimeError(
                f"adaptfuse: layer input has {tokens.shape[0]} tokens but the batch plan has "
                f"{plans.num_tokens} "
                "(adapter_names apply to inputs shaped [batch, sequence])"
            )
        return tokens

    def _add_adapters(self, x: torch.Tensor, y: torch.Tensor, plans: BatchPlans) -> torch.Tensor:
        """y (the base output for input x) plus the adapters' part."""
        tokens = self._tokens(x, plans)
        plan = plans.on(x.device)
        if self.trainable:
            # PEFT adds the fp32 adapter output to the base output and casts back once.
            y = self._frozen_part(x, y, tokens, plan)
            delta = self._trainable_delta(tokens, plan)
            return (y + delta.view(y.shape)).to(y.dtype)
        return self._frozen_part(x, y, tokens, plan)

    def _frozen_part(self, x, y, tokens, plan):
        if not traced(x) and self.active_slots == 0:
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


class BottleneckLayer(nn.Module):
    """The bottleneck adapters of one insertion point of one block, for every slot: banks
    allocated once at patch time (non-persistent buffers) in DESIGN.md's layout, the
    down-projection as shrink's A [S, m_max, H] and the up-projection as expand's B
    [S, m_max, H] (both rank-major), with ranks [S] (the slot's dim m; 0: no bottleneck here),
    fp32 scales [S] (AdapterHub's scaling), fp32 biases [S, m_max] and [S, H] (the up bias
    stored pre-multiplied by the scaling: scaling (W_up a + b_up) = W_up (scaling a) +
    scaling b_up) and activation codes [S]. fp32 tables are kept as int32 bit patterns, since
    model.to(dtype) casts every floating buffer."""

    def __init__(self, hidden: int, num_slots: int, max_dim: int, device, dtype):
        super().__init__()
        self.hidden = hidden
        tables = dict(
            down=torch.zeros(num_slots, max_dim, hidden, device=device, dtype=dtype),
            up=torch.zeros(num_slots, max_dim, hidden, device=device, dtype=dtype),
            down_bias_bits=torch.zeros(num_slots, max_dim, dtype=torch.int32, device=device),
            up_bias_bits=torch.zeros(num_slots, hidden, dtype=torch.int32, device=device),
            ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
            scale_bits=torch.zeros(num_slots, dtype=torch.int32, device=device),
            activations=torch.zeros(num_slots, dtype=torch.int32, device=device),
        )
        for name, tensor in tables.items():
            self.register_buffer(name, tensor, persistent=False)
        self._slot_dims: dict[int, int] = {}  # host mirror of ranks (no device reads)
        self.active_slots = 0
        # Trainable bottleneck adapters: fp32 banks of the same layout (the up bias unscaled),
        # allocated on the first one; slot -> training.TrainableBottleneckPoint.
        self.train_banks: Optional[dict[str, torch.Tensor]] = None
        self.trainable: dict = {}

    @staticmethod
    def bank_bytes(hidden: int, num_slots: int, max_dim: int, element_size: int) -> int:
        return num_slots * (2 * max_dim * hidden * element_size + 4 * (max_dim + hidden) + 12)

    @property
    def scales(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    def write_slot(self, slot: int, weights, activation: str = "identity", scaling: float = 0.0):
        """Fills one slot from adapters.BottleneckWeights; None clears it (dim 0). Rows beyond
        the dim are never read, so they are left as they are."""
        was_active = self._slot_dims.get(slot, 0) > 0
        if weights is None:
            self.ranks[slot] = 0
            self._slot_dims[slot] = 0
        else:
            dim = weights.dim
            self.down[slot, :dim].copy_(weights.down, non_blocking=True)
            self.up[slot, :dim].copy_(weights.up, non_blocking=True)
            self.down_bias_bits.view(torch.float32)[slot, :dim].copy_(weights.down_bias)
            self.up_bias_bits.view(torch.float32)[slot].copy_(weights.up_bias * scaling)
            self.scales[slot] = scaling
            self.activations[slot] = ops.activation_code(activation)
            self.ranks[slot] = dim
            self._slot_dims[slot] = dim
        self.active_slots += int(self._slot_dims[slot] > 0) - int(was_active)

    def attach_trainable(self, slot: int, down, down_bias, up, up_bias, activation, scaling):
        """Puts a trainable bottleneck (down [m, H], down_bias [m], up [H, m] as AdapterHub
        stores it, up_bias [H]; fp32) in a slot of the fp32 banks; returns its parameters, views
        of the banks, as a training.TrainableBottleneckPoint."""
        from adaptfuse.training import TrainableBottleneckPoint

        num_slots, max_dim = self.down.shape[:2]
        device = self.down.device
        if self.train_banks is None or self.train_banks["down"].device != device:
            self.train_banks = dict(
                down=torch.zeros(num_slots, max_dim, self.hidden, device=device),
                up=torch.zeros(num_slots, max_dim, self.hidden, device=device),
                down_bias=torch.zeros(num_slots, max_dim, device=device),
                up_bias=torch.zeros(num_slots, self.hidden, device=device),
                ranks=torch.zeros(num_slots, dtype=torch.int32, device=device),
                scales=torch.zeros(num_slots, device=device),
                activations=torch.zeros(num_slots, dtype=torch.int32, device=device),
            )
        banks = self.train_banks
        dim = down.shape[0]
        banks["down"][slot, :dim].copy_(down)
        banks["up"][slot, :dim].copy_(up.t())
        banks["down_bias"][slot, :dim].copy_(down_bias)
        banks["up_bias"][slot].copy_(up_bias)
        banks["ranks"][slot] = dim
        banks["scales"][slot] = scaling
        banks["activations"][slot] = ops.activation_code(activation)
        point = TrainableBottleneckPoint(
            down=nn.Parameter(banks["down"][slot, :dim]),
            down_bias=nn.Parameter(banks["down_bias"][slot, :dim]),
            up=nn.Parameter(banks["up"][slot, :dim].t()),
            up_bias=nn.Parameter(banks["up_bias"][slot]),
        )
        self.trainable[slot] = point
        return point

    def detach_trainable(self, slot: int) -> None:
        if self.trainable.pop(slot, None) is not None:
            self.train_banks["ranks"][slot] = 0

    def _trainable_delta(self, tokens: torch.Tensor, plan: ops.Plan) -> torch.Tensor:
        """fp32 [T, H]: the trainable bottlenecks' part, differentiable in their parameters."""
        banks = self.train_banks
        parameters = []
        for slot, point in tuple(self.trainable.items()):  # attach/detach may run meanwhile
            parameters += [
                (point.down, 0, slot, False),
                (point.up, 1, slot, True),
                (point.down_bias, 2, slot, False),
                (point.up_bias, 3, slot, False),
            ]
        down, up, down_bias, up_bias = bank_views(
            (banks["down"], banks["up"], banks["down_bias"], banks["up_bias"]), parameters
        )
        ranks, scales = banks["ranks"], banks["scales"]
        v = ops.shrink(
            tokens, down, ranks, scales, plan, bias=down_bias, activations=banks["activations"]
        )
        # scaling * (W_up a + b_up) = W_up (scaling a) + scaling b_up: shrink applied the
        # scaling to a, the bias gets it here (differentiably).
        scaled_up_bias = up_bias * scales[:, None]
        return ops.expand(v, [up], [0], self.hidden, ranks, plan, bias=scaled_up_bias)

    def add(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """target + f(source) for the rows whose slot holds a bottleneck here (source and
        target [..., H], one row per token of the batch plan); other rows pass untouched."""
        plans = current_plan.get()
        if plans is None or (not traced(source) and self.active_slots == 0 and not self.trainable):
            return target
        tokens = source.reshape(-1, self.hidden)
        if tokens.shape[0] != plans.num_tokens:
            raise RuntimeError(
                f"adaptfuse: bottleneck input has {tokens.shape[0]} tokens but the batch plan "
                f"has {plans.num_tokens} (adapter_names apply to inputs shaped [batch, sequence])"
            )
        if not self.trainable:
            return self._add_served(tokens, target, plans)
        # The trainable part first: the served part may write into target, which can be the
        # source itself (s + f(s)).
        delta = self._trainable_delta(tokens.contiguous(), plans.on(source.device))
        served = (
            self._add_served(tokens, target, plans)
            if self.active_slots or traced(source)
            else target
        )
        # As the LoRA layers do: the fp32 adapter output added, then one cast back.
        return (served + delta.view(served.shape)).to(target.dtype)

    def _add_served(self, tokens: torch.Tensor, target: torch.Tensor, plans: BatchPlans):
        """target + f(tokens) through the served (frozen) banks (tokens: the source as
        [T, H])."""
        plan = plans.on(tokens.device)
        down_bias = self.down_bias_bits.view(torch.float32)
        up_bias = self.up_bias_bits.view(torch.float32)
        v = ops.shrink(
            tokens.contiguous(),
            self.down,
            self.ranks,
            self.scales,
            plan,
            bias=down_bias,
            activations=self.activations,
        )
        if torch.is_grad_enabled() and (tokens.requires_grad or target.requires_grad):
            # An ordinary differentiable forward (the ops carry autograd formulas); the
            # adapters' banks are buffers and get no gradient.
            delta = ops.expand(v, [self.up], [0], self.hidden, self.ranks, plan, bias=up_bias)
            return (target + delta.view(target.shape)).to(target.dtype)
        # In place: shrink has read the source already, and the target is this point's own
        # fresh output.
        out = target if target.is_contiguous() else target.contiguous()
        ops.expand_(out.view(-1, self.hidden), v, [self.up], [0], self.ranks, plan, bias=up_bias)
        return out


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How a decoder block names its parts: the attention and MLP sub-modules, and the norm
    in front of the MLP (whose input is the residual stream a parallel adapter reads)."""

    attention: str
    mlp: str
    mlp_norm: str

    def matches(self, block: nn.Module) -> bool:
        return all(
            isinstance(getattr(block, part, None), nn.Module)
            for part in (self.attention, self.mlp, self.mlp_norm)
        )


# Decoder block layouts, first match wins (a dispatcher over layouts, not one function per
# architecture): Llama, Mistral, Qwen2, Phi-3, Gemma...; then GPT-2's.
BLOCK_LAYOUTS = (
    BlockLayout("self_attn", "mlp", "post_attention_layernorm"),
    BlockLayout("attn", "mlp", "ln_2"),
)


def decoder_blocks(model: nn.Module) -> Optional[tuple[str, nn.ModuleList, BlockLayout]]:
    """(path, blocks, layout) of the model's stack of decoder blocks, or None."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            layout = next((lay for lay in BLOCK_LAYOUTS if lay.matches(module[0])), None)
            if layout is not None and all(layout.matches(block) for block in module):
                return path, module, layout
    return None


def _with_first(output, replace):
    """A module's output with its first tensor replaced (blocks and attention modules may
    return tuples)."""
    if isinstance(output, tuple):
        return (replace(output[0]),) + tuple(output[1:])
    return replace(output)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def insert_bottlenecks(block: nn.Module, layout: BlockLayout, layers: dict[str, BottleneckLayer]):
    """Hooks the points of `layers` into one block; returns the hook handles (remove() them to
    take the adapters out). The layers become the block's submodule `adaptfuse_bottlenecks`,
    so model.to(...) moves their banks along."""
    block.adaptfuse_bottlenecks = nn.ModuleDict(layers)
    handles = []
    attention = getattr(block, layout.attention)
    mlp = getattr(block, layout.mlp)
    norm = getattr(block, layout.mlp_norm)
    if "attn_out" in layers:
        layer = layers["attn_out"]
        handles.append(
            attention.register_forward_hook(
                lambda module, args, output: _with_first(output, lambda s: layer.add(s, s))
            )
        )
    if "mlp_out" in layers:
        layer_mlp = layers["mlp_out"]
        handles.append(
            mlp.register_forward_hook(
                lambda module, args, output: _with_first(output, lambda s: layer_mlp.add(s, s))
            )
        )
    if "block_out" in layers:
        layer_block = layers["block_out"]
        handles.append(
            block.register_forward_hook(
                lambda module, args, output: _with_first(output, lambda h: layer_block.add(h, h))
            )
        )
    if "par_bn" in layers:
        layer_par = layers["par_bn"]
        stream: dict[str, torch.Tensor] = {}

        def keep_residual(module, args, kwargs):
            stream["residual"] = args[0] if args else next(iter(kwargs.values()))

        def add_parallel(module, args, output):
            residual = stream.pop("residual", None)
            if residual is None:
                return output
            return _with_first(output, lambda y: layer_par.add(residual, y))

        handles.append(norm.register_forward_pre_hook(keep_residual, with_kwargs=True))
        handles.append(mlp.register_forward_hook(add_parallel))
    return handles
