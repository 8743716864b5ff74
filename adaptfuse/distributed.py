"""Tensor parallelism (DESIGN.md, "More than one GPU") on transformers' own plans:
``from_pretrained(..., tp_plan="auto")`` under torchrun, with torch.distributed underneath
(gloo on CPU, NCCL on GPUs). Nothing here is a parallel runtime: the base layers keep the
sharding and the collectives transformers gave them, and adaptfuse fits its adapters in.

Placement follows each adapted layer's base weight, a DTensor on a 1-D mesh:

- column-parallel (transformers' ColwiseParallel styles: colwise, colwise_rep,
  colwise_gather_output; weight Shard(0)): a rank owns rows of W, i.e. output features.
  It holds A whole and its own rows of B; its part of the output needs nothing from others.
- row-parallel (RowwiseParallel styles: rowwise, rowwise_rep, rowwise_split_input; weight
  Shard(1)): a rank owns columns of W, i.e. input features. It holds its columns of A and B
  whole; its shrink gives a partial v, and the ranks' partials must be summed.

Where the sum happens: expand is linear in v, so sum_ranks(v_rank @ B) = (sum_ranks v_rank) @ B.
Each rank adds the expand of its partial v to its partial base output *before* the all-reduce
that the row-parallel base layer does anyway, so the adapters cost no collective at all.
transformers installs that all-reduce in the wrapped nn.Linear's own forward (an instance
attribute built by TensorParallelLayer.install_forward: inputs transform, local matmul,
output transform with the collective); the adapted layer runs the same three steps of the
same style object and adds its part between the matmul and the output transform. The same
rule serves colwise_gather_output (the adapters' rows are added before the all-gather) and
rowwise_split_input (the shrink reads the input slice the style cut).
The alternative, an all-reduce of the small fp32 v [tokens, max_rank] after the base layer,
costs one more collective per row-parallel layer. Measured side by side (benchmarks/bench_tp.py,
DESIGN.md's CPU shape, 8 layers, 16 sequences, 8 adapters of rank 16 on all 7 projections,
2 processes over gloo on 2 cores, medians): one decode step 93.8 ms this way against 110.6 ms
with the extra all-reduce (base model 82.5 ms: adapter overhead 1.14x against 1.34x); the
prefill of 64-token prompts 1502 ms against 1504 ms (base 1448 ms), equal within noise.

Layers under any other plan (packed or strided shards, replicated DTensors, plans transformers
does not name, meshes of more than one dimension) are not adapted; patch refuses them by name
and plan when target_modules names them, and an adapter that targets one is refused.

Loads: each rank reads only its slices of the safetensors file (safe_open / get_slice) and
validates them; the ranks then agree on the outcome (one all-reduce of a failure flag) before
any slot is written, so a file that is corrupt only where one rank reads fails on every rank
and leaves every rank as it was. Merges agree the same way. A forward needs no collective of
its own: every rank builds the same plan from the same adapter_names.

Bottleneck adapters (AdapterHub seq_bn, double_seq_bn, par_bn) are replicated: every rank
reads the whole folder (the ranks agree on the outcome as for LoRA), holds the whole adapter
and applies it to the whole hidden states. Under the column/row-parallel plans every point
sees those: attn_out and mlp_out hook the attention and MLP modules' outputs, which come out
of o_proj's and down_proj's all-reduce; par_bn reads the residual stream and block_out the
block's output, never sharded. Each rank computes the same f(h) from the same bits, so the
ranks stay identical with no collective. Plans that would hand a point a shard or a partial
sum (sequence-parallel norms, row-parallel outputs left sharded, MoE or module-level styles
in the blocks) make patch refuse the points (refuse_bottleneck_points).

Training: trainable adapters hold each rank's part as served ones do (mgr.named_parameters
gives this rank's parts under PEFT's names). The factor every rank holds whole (A of a
column-parallel layer, B of a row-parallel one) gets a partial gradient on each rank, summed
across ranks by a gradient hook, so every rank takes the same optimizer step. A new adapter's
random draw is group rank 0's on every rank; save_adapter gathers the parts and group rank 0
writes the folder. lora_dropout is refused (each rank would draw its own masks).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from adaptfuse.adapters import AdapterError
from adaptfuse.manager import AdapterManager
from adaptfuse.training import TrainableBottleneck, save_peft_folder

T = TypeVar("T")

COLUMN = "column"
ROW = "row"


class UnsupportedParallelLayer(ValueError):
    """A layer whose tensor-parallel plan adaptfuse cannot adapt; names the layer and plan."""


@dataclasses.dataclass(frozen=True)
class ShardedLinear:
    """How one nn.Linear is split across the ranks of its tensor-parallel mesh.

    kind: COLUMN (this rank owns output features [start, stop)) or ROW (input features
    [start, stop)). in_features/out_features: the whole layer's sizes.
    """

    path: str
    plan: str
    style: object  # transformers' TensorParallelLayer for `plan`
    mesh: object  # torch.distributed.device_mesh.DeviceMesh, one dimension
    kind: str
    start: int
    stop: int
    in_features: int
    out_features: int

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def local_features(self) -> tuple[int, int]:
        """(H_in, H_out) as this rank's forward sees them: the sizes of its slot banks."""
        if self.kind == COLUMN:
            return self.in_features, self.stop - self.start
        return self.stop - self.start, self.out_features

    @property
    def adapter_slices(self) -> tuple[slice, slice]:
        """What this rank reads of a PEFT adapter for this layer: (columns of lora_A
        [r, H_in], rows of lora_B [H_out, r])."""
        own = slice(self.start, self.stop)
        return (slice(None), own) if self.kind == COLUMN else (own, slice(None))

    @property
    def replicated_factor(self) -> str:
        """The adapter factor every rank holds whole: "A" (column-parallel) or "B" (row)."""
        return "A" if self.kind == COLUMN else "B"

    def own_part(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of an adapter's A [r, H_in] and B [r, H_out] given whole."""
        if self.kind == COLUMN:
            return A, B[:, self.start : self.stop]
        return A[:, self.start : self.stop], B

    def gather_whole(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole A [r, H_in], B [r, H_out] from every rank's part (a collective: every
        rank of the group calls it, in the same order)."""
        parts: list = [None] * self.mesh.size()
        sharded = B if self.kind == COLUMN else A
        dist.all_gather_object(parts, sharded.detach().cpu(), group=self.group)
        whole = torch.cat(parts, dim=1).to(sharded.device)
        return (A, whole) if self.kind == COLUMN else (whole, B)

    def sum_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Gradient hook of the factor every rank holds whole: each rank's gradient is a
        partial sum (column-parallel: over its output rows; row-parallel: over its input
        columns), and every rank must step with the whole sum."""
        grad = grad.clone()
        dist.all_reduce(grad, group=self.group)
        return grad

    def forward(
        self,
        base: nn.Linear,
        x: torch.Tensor,
        args: tuple,
        kwargs: dict,
        add_adapters: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """base(x, *args, **kwargs) with add_adapters(x_local, y_local) applied to this rank's
        own matmul output, between the style's matmul and its output collective."""
        style, mesh = self.style, self.mesh
        args, kwargs = style.transform_inputs_pre_forward(base, (x, *args), kwargs, mesh)
        with style.context_around_forward(base, mesh):
            y = nn.Linear.forward(base, *args, **kwargs)  # what install_forward wraps
            y = self._add_to_shard(args[0], y, add_adapters)
        return style.transform_output_post_forward(base, y, mesh)

    def _add_to_shard(self, x, y, add_adapters):
        from torch.distributed.tensor import DTensor, Partial

        if not isinstance(y, DTensor):  # transformers' inference path: local tensors already
            return add_adapters(x, y)
        # With autograd, the style computes on DTensors; the adapter ops take this rank's
        # local tensors. Column-parallel: x is replicated, and the adapters' gradient to it
        # from this rank's rows of B is a partial sum. Row-parallel: x is this rank's input
        # slice and its gradient is exactly this rank's slice (the default).
        grad_placements = [Partial()] if self.kind == COLUMN else None
        x_local = x.to_local(grad_placements=grad_placements)
        y_local = add_adapters(x_local, y.to_local())
        return DTensor.from_local(
            y_local,
            device_mesh=y.device_mesh,
            placements=y.placements,
            run_check=False,
            shape=y.shape,
            stride=y.stride(),
        )


def _shard_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """The rows [start, stop) that Shard(dim) gives mesh rank `index` of `parts` along a
    dimension of `size`: torch.chunk's split, ceil(size / parts) each, the last ones
    shorter or empty when size does not divide."""
    chunk = -(-size // parts)
    start = min(size, chunk * index)
    return start, min(size, start + chunk)


def _plan_name(model: nn.Module, path: str) -> Optional[str]:
    """The style transformers' tp_plan gives the module at `path` (layer numbers in the plan
    are wildcards), or None."""
    plan = getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {}
    generic = re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), path)
    return plan.get(generic, plan.get(path))


def sharded_linear(model: nn.Module, path: str, module: nn.Module) -> Optional[ShardedLinear]:
    """How `module` (at `path` in `model`) is sharded, or None when its weight is a plain
    tensor (every rank holds it whole: an ordinary layer). Raises UnsupportedParallelLayer,
    naming the layer and its plan, for a sharded layer adaptfuse cannot adapt."""
    from torch.distributed.tensor import DTensor, Shard

    weight = getattr(module, "weight", None)
    if not isinstance(weight, DTensor):
        return None
    plan = _plan_name(model, path)
    placements = tuple(weight.placements)

    def refuse(why: str):
        return UnsupportedParallelLayer(
            f"layer {path} (tensor-parallel plan {plan!r}, weight placements {placements}): {why}"
        )

    if type(module) is not nn.Linear:
        raise refuse("only plain nn.Linear layers are adapted under tensor parallelism")
    if weight.device_mesh.ndim != 1:
        raise refuse(f"its mesh has {weight.device_mesh.ndim} dimensions; adaptfuse needs one")
    from transformers.integrations.tensor_parallel import (
        ALL_PARALLEL_STYLES,
        ColwiseParallel,
        RowwiseParallel,
    )

    style = ALL_PARALLEL_STYLES[plan] if plan in ALL_PARALLEL_STYLES else None
    if style is None:
        raise refuse("its weight is sharded but transformers' tp_plan names no style for it")
    only_shard = len(placements) == 1 and type(placements[0]) is Shard
    if isinstance(style, ColwiseParallel) and only_shard and placements[0].dim == 0:
        kind, size = COLUMN, module.out_features
    elif isinstance(style, RowwiseParallel) and only_shard and placements[0].dim == 1:
        kind, size = ROW, module.in_features
    else:
        raise refuse(
            f"{type(style).__name__} is not a plan adaptfuse adapts (column-parallel "
            "ColwiseParallel styles with Shard(0) weights, row-parallel RowwiseParallel "
            "styles with Shard(1) weights)"
        )
    if "forward" not in module.__dict__:
        raise refuse("transformers did not install its tensor-parallel forward on it")
    if module._forward_hooks or module._forward_pre_hooks:
        raise refuse("it has forward hooks, which adaptfuse would skip around its local matmul")
    mesh = weight.device_mesh
    start, stop = _shard_range(size, mesh.size(), mesh.get_local_rank())
    local = weight.to_local().shape[0 if kind == COLUMN else 1]
    if local != stop - start:
        raise refuse(
            f"this rank holds {local} of its {size} {'output' if kind == COLUMN else 'input'} "
            f"features where an even torch.chunk split gives {stop - start}"
        )
    return ShardedLinear(
        path, plan, style, mesh, kind, start, stop, module.in_features, module.out_features
    )


def on_every_rank(
    group, device: torch.device, attempt: Callable[[], T], what: str, error: type = AdapterError
) -> T:
    """Runs attempt() on this rank and returns its result only if it succeeded on every rank
    of `group` (one all-reduce of a failure flag, plus a gather of the messages when one
    failed). A rank whose own attempt failed re-raises its exception; the others raise
    `error` naming the failed ranks and their exceptions."""
    try:
        result, failure = attempt(), None
    except Exception as exception:  # reported to the other ranks, then re-raised here
        result, failure = None, exception
    failed = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item() == 0:
        return result
    messages: list = [None] * dist.get_world_size(group)
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    dist.all_gather_object(messages, mine, group=group)
    if failure is not None:
        raise failure
    reports = "; ".join(f"rank {rank}: {m}" for rank, m in enumerate(messages) if m is not None)
    raise error(f"{what} failed on another rank, so on none ({reports})")


class TensorParallelManager(AdapterManager):
    """The AdapterManager of a tensor-parallel model: loads read this rank's slices and
    commit only when every rank read and validated its part; merges commit only when every
    rank's shards merged; trainable adapters train this rank's parts. Every rank calls every
    method in the same order, as with any torch.distributed program."""

    def _sharded_layers(self) -> list[ShardedLinear]:
        return [layer.tensor_parallel for layer in self.layers.values() if layer.tensor_parallel]

    def _on_every_rank(self, attempt, what, error=AdapterError):
        group = self._sharded_layers()[0].group
        return on_every_rank(group, self.device, attempt, what, error)

    def _read_adapter(self, path: str, name: str, dtype: torch.dtype, slices=None):
        slices = {
            p: layer.tensor_parallel.adapter_slices
            for p, layer in self.layers.items()
            if layer.tensor_parallel is not None
        }
        read_here = super()._read_adapter
        return self._on_every_rank(
            lambda: read_here(path, name, dtype, slices), f"loading {path!r}"
        )

    def _read_bottleneck(self, path: str, name: str, dtype: torch.dtype):
        """Bottleneck adapters are replicated: every rank reads the whole folder, and the
        ranks agree on the outcome before any slot is written, as for LoRA."""
        read_here = super()._read_bottleneck
        return self._on_every_rank(lambda: read_here(path, name, dtype), f"loading {path!r}")

    def _add_trainable(self, name, path, weights, r, lora_alpha, use_rslora, lora_dropout):
        """Trainable adapters hold this rank's part of each layer, as served ones do. Weights
        come whole from add_adapter (a random draw: every rank takes group rank 0's, so that
        the parts fit together) and already in parts from load_adapter. The factor every rank
        holds whole gets its gradient summed across ranks."""
        if lora_dropout:
            raise ValueError(
                f"cannot add trainable adapter {name!r} with lora_dropout={lora_dropout} on a "
                "tensor-parallel model: each rank would draw its own dropout masks"
            )
        group = self._sharded_layers()[0].group
        parts = {}
        for layer_path, (A, B, scale) in weights.items():
            layer = self.layers[layer_path]
            if (A.shape[1], B.shape[1]) == layer.full_features:
                A, B = A.to(self.device), B.to(self.device)
                for tensor in (A, B):
                    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
                if layer.tensor_parallel is not None:
                    A, B = layer.tensor_parallel.own_part(A, B)
            parts[layer_path] = (A, B, scale)
        super()._add_trainable(name, path, parts, r, lora_alpha, use_rslora, lora_dropout)
        for layer_path, trainable in self._trainable[name].layers.items():
            sharded = self.layers[layer_path].tensor_parallel
            if sharded is not None:
                replicated = trainable.A if sharded.replicated_factor == "A" else trainable.B
                replicated.register_hook(sharded.sum_gradient)

    def _add_trainable_bottleneck(self, name, path, options, weights) -> None:
        """Bottleneck adapters are replicated: every rank takes group rank 0's weights (a
        random draw in add_bottleneck_adapter). Their inputs are replicated activations, so
        every rank computes the same, whole gradients: nothing to sum."""
        group = self._sharded_layers()[0].group
        agreed = {}
        for key, tensors in weights.items():
            tensors = [t.to(self.device, torch.float32).contiguous() for t in tensors]
            for tensor in tensors:
                dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
            agreed[key] = tuple(tensors)
        super()._add_trainable_bottleneck(name, path, options, agreed)

    def save_adapter(self, name: str, directory: str) -> None:
        """Every rank calls it: the parts are gathered, and group rank 0 writes the whole
        adapter as a PEFT folder (a replicated bottleneck adapter as AdapterHub's)."""
        adapter = self._trainable_adapter(name)
        group = self._sharded_layers()[0].group
        # Group rank 0 writes; every rank learns whether that worked (a bare barrier would
        # leave the others waiting for a rank whose write raised).
        writes = dist.get_rank(group) == 0
        if isinstance(adapter, TrainableBottleneck):
            write_here = super().save_adapter
            self._on_every_rank(
                lambda: write_here(name, directory) if writes else None,
                f"save_adapter({name!r})",
                OSError,
            )
            return
        whole = {}
        for layer_path, trainable in adapter.layers.items():
            A, B = trainable.A.detach(), trainable.B.detach().t()
            sharded = self.layers[layer_path].tensor_parallel
            if sharded is not None:
                A, B = sharded.gather_whole(A, B)
            whole[layer_path] = dataclasses.replace(trainable, A=A, B=B.t())
        self._on_every_rank(
            lambda: (
                save_peft_folder(dataclasses.replace(adapter, layers=whole), directory, False)
                if writes
                else None
            ),
            f"save_adapter({name!r})",
            OSError,
        )

    def merge(self, spec, *, method: str = "linear", **options) -> None:
        if method != "linear":
            raise ValueError(
                f"merge method {method!r} trims or samples each layer's whole delta, and on a "
                "tensor-parallel model every rank holds only a shard of it: use method='linear'"
            )
        was_merged = self.merged is not None

        def merge_here():
            super(TensorParallelManager, self).merge(spec, method=method, **options)

        try:
            self._on_every_rank(merge_here, f"merge({spec!r})", RuntimeError)
        except BaseException:
            if not was_merged and self.merged is not None:
                self.unmerge()  # merged here but failed on another rank: every rank unmerged
            raise


def shard_layouts(
    model: nn.Module, modules: dict[str, nn.Module], named_explicitly: bool
) -> tuple[dict[str, Optional[ShardedLinear]], dict[str, str]]:
    """For patch: each target's ShardedLinear (None: held whole), and the targets adaptfuse
    leaves alone with the reason. A target named explicitly (target_modules given as names
    or a regex) that cannot be adapted is refused instead."""
    layouts, unsupported = {}, {}
    for path, module in modules.items():
        try:
            layouts[path] = sharded_linear(model, path, module)
        except UnsupportedParallelLayer as error:
            if named_explicitly:
                raise
            unsupported[path] = str(error)
    return layouts, unsupported


def refuse_bottleneck_points(model: nn.Module, blocks_path: str, points) -> None:
    """Bottleneck adapters on a tensor-parallel model are replicated: every rank holds each
    adapter whole and applies it to the whole hidden states at its points. That is right only
    where every rank sees the whole, already summed activations, as under transformers'
    column/row-parallel plans: a block's attention and MLP outputs come out of a row-parallel
    layer's all-reduce (output Replicate), the residual stream and the block's output are
    never sharded. Any other plan in the decoder blocks (sequence-parallel norms, row-parallel
    layers whose output stays sharded or partial, packed, MoE or module-level styles), or a
    sequence-parallel plan anywhere, would hand some point a shard or a partial sum: patch
    refuses the points then, naming them, the layer and its plan."""
    from torch.distributed.tensor import Replicate
    from transformers.integrations.tensor_parallel import (
        ALL_PARALLEL_STYLES,
        ColwiseParallel,
        RowwiseParallel,
    )

    prefix = f"{blocks_path}." if blocks_path else ""
    for path, _module in model.named_modules():
        plan = _plan_name(model, path)
        if plan is None:
            continue
        style = ALL_PARALLEL_STYLES.get(plan)
        in_blocks = path.startswith(prefix)
        if in_blocks and type(style) is ColwiseParallel:
            continue  # its output feeds a row-parallel layer or is gathered
        if (
            in_blocks
            and type(style) is RowwiseParallel
            and isinstance(style.output_layouts, Replicate)
        ):
            continue  # all-reduced before any point sees it
        if not in_blocks and plan != "sequence_parallel":
            continue  # embeddings, the output head: outside the blocks' residual stream
        raise UnsupportedParallelLayer(
            f"bottleneck points {list(points)} cannot be served on this tensor-parallel model: "
            f"layer {path} has tensor-parallel plan {plan!r}, so some point would see a shard "
            "or a partial sum of the hidden states where a replicated bottleneck adapter needs "
            "the whole; patch with max_bottleneck_dim=0"
        )
