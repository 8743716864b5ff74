"""adaptfuse.patch(model) / adaptfuse.unpatch(model): swap LoRA layers in place and route
adapter_names through forward."""

from __future__ import annotations

import contextvars
import inspect
import os
from typing import Optional, Sequence, Union

import torch
from torch import nn

from adaptfuse import distributed
from adaptfuse.adapters import BOTTLENECK_POINTS, MAX_BOTTLENECK_DIM, matching_paths
from adaptfuse.layers import (
    BottleneckLayer,
    LoraLayer,
    current_plan,
    decoder_blocks,
    insert_bottlenecks,
    layer_features,
)
from adaptfuse.manager import AdapterManager

_STATE = "_adaptfuse_state"

# The adapter_names of a generate() call in progress, read by each of its forwards.
generate_names: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "adaptfuse_generate_names", default=None
)


def _expand_for_generation(names: Sequence[Optional[str]], batch: int) -> list:
    """generate() expands the batch (num_beams, num_return_sequences) by repeating each row in
    place: each name is repeated batch / len(names) times, the same way."""
    if batch % len(names) != 0:
        raise ValueError(
            f"adapter_names has {len(names)} entries, which does not divide the expanded "
            f"batch of {batch} sequences"
        )
    repeat = batch // len(names)
    return [name for name in names for _ in range(repeat)]


class _PlanDuringBackward(torch.autograd.Function):
    """Identity on the logits (and loss) whose backward makes the forward's plan current
    again: gradient checkpointing recomputes layers during backward, after the forward's
    context is gone, and every recomputed layer must see each row's adapter. The plan is
    current from the logits' backward (which runs before any recomputation) to the end of
    that backward."""

    @staticmethod
    def forward(ctx, plans, logits):
        ctx.plans = plans
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        previous = current_plan.get()
        if previous is ctx.plans:  # set already (by the loss's twin of this node)
            return None, grad
        current_plan.set(ctx.plans)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: current_plan.set(previous))
        return None, grad


def _plan_during_backward(output, plans):
    for field in ("logits", "loss"):  # the loss, when transformers computed it from labels
        value = getattr(output, field, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            setattr(output, field, _PlanDuringBackward.apply(plans, value))
    return output


def _targets(model: nn.Module, target_modules: Union[None, str, Sequence[str]]) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        n for n, m in model.named_modules() if n and m is not head and layer_features(m) is not None
    ]
    return matching_paths(names, target_modules)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _bottleneck_blocks(model: nn.Module, max_dim: int, tensor_parallel: bool, points):
    """(blocks path, [(block, hidden size, device, dtype)], layout) of the decoder blocks that
    get bottleneck slots, or None when max_dim is 0. On a tensor-parallel model the adapters
    are replicated, and the points must see the whole hidden states (distributed.py)."""
    if max_dim == 0:
        return None
    found = decoder_blocks(model)
    if found is None:
        raise ValueError(
            "max_bottleneck_dim > 0 but adaptfuse found no stack of decoder blocks it knows "
            "(adaptfuse.layers.BLOCK_LAYOUTS) in this model"
        )
    path, blocks, layout = found
    if tensor_parallel:
        distributed.refuse_bottleneck_points(model, path, points)
    described = []
    for block in blocks:
        # The block's hidden size, device and dtype: those of its MLP norm's input.
        weight = next(p for p in getattr(block, layout.mlp_norm).parameters() if p.dim() == 1)
        described.append((block, weight.shape[0], weight.device, _block_dtype(block)))
    return path, described, layout


def _block_dtype(block: nn.Module) -> torch.dtype:
    """The dtype of the block's projections (its norms may be kept in fp32)."""
    dtypes = [p.dtype for p in block.parameters() if p.dim() == 2 and p.is_floating_point()]
    return dtypes[0] if dtypes else torch.get_default_dtype()


def _remove_bottlenecks(model: nn.Module, hooks: list) -> None:
    for handle in hooks:
        handle.remove()
    for module in list(model.modules()):
        if "adaptfuse_bottlenecks" in module._modules:
            del module._modules["adaptfuse_bottlenecks"]


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 62


def patch(
    model: nn.Module,
    max_loras: int = 32,
    max_rank: int = 64,
    target_modules: Union[None, str, Sequence[str]] = None,
    batch_invariant: bool = False,
    max_bottleneck_dim: int = 0,
    bottleneck_points: Sequence[str] = BOTTLENECK_POINTS,
) -> AdapterManager:
    """Swaps the adapted layers of `model` in place and returns its AdapterManager.

    target_modules: None or "all-linear" (every nn.Linear / GPT-2 Conv1D except the output
    head), a list of names (matched as module-path suffixes) or a regex (full match).
    max_bottleneck_dim: 0 (no bottleneck adapters), or the largest bottleneck dim (1..256) of
    the AdapterHub adapters to serve: every decoder block then gets bottleneck slot banks at
    each point of `bottleneck_points` (default: all of adapters.BOTTLENECK_POINTS; narrow it
    to the points your adapters use, e.g. ["block_out"] for seq_bn, to save memory), on the
    same max_loras slots as LoRA.
    """
    if getattr(model, _STATE, None) is not None:
        raise ValueError("this model is already patched; call adaptfuse.unpatch(model) first")
    if max_loras < 1 or max_rank < 1:
        raise ValueError(f"max_loras and max_rank must be positive, got {max_loras} and {max_rank}")
    if not 0 <= max_bottleneck_dim <= MAX_BOTTLENECK_DIM:
        raise ValueError(
            f"max_bottleneck_dim must be in 0..{MAX_BOTTLENECK_DIM}, got {max_bottleneck_dim}"
        )
    points = list(dict.fromkeys(bottleneck_points))
    unknown_points = [p for p in points if p not in BOTTLENECK_POINTS]
    if unknown_points or not points:
        raise ValueError(
            f"bottleneck_points must name some of {BOTTLENECK_POINTS}, got {bottleneck_points!r}"
        )
    # Before anything changes: transformers' generate reads the wrapper's signature.
    forward_signature = _signature_with_adapter_names(model.forward)
    names = _targets(model, target_modules)
    if not names:
        raise ValueError(f"no layer of the model matches target_modules={target_modules!r}")
    modules = {n: model.get_submodule(n) for n in names}
    sharding, unsupported = distributed.shard_layouts(
        model, modules, named_explicitly=target_modules not in (None, "all-linear")
    )
    modules = {n: m for n, m in modules.items() if n not in unsupported}
    if not modules:
        raise ValueError(f"no layer adaptfuse can adapt: {next(iter(unsupported.values()))}")
    per_device: dict[torch.device, int] = {}
    for name, module in modules.items():
        device = module.weight.device
        per_device[device] = per_device.get(device, 0) + LoraLayer.bank_bytes(
            module, max_loras, max_rank, sharding[name]
        )
    blocks = _bottleneck_blocks(model, max_bottleneck_dim, any(sharding.values()), points)
    if blocks is not None:
        for _block, hidden, device, dtype in blocks[1]:
            per_device[device] = per_device.get(device, 0) + len(
                points
            ) * BottleneckLayer.bank_bytes(
                hidden, max_loras, max_bottleneck_dim, torch.empty((), dtype=dtype).element_size()
            )
    for device, needed in per_device.items():
        free = _free_bytes(device)
        if needed > free:
            raise MemoryError(
                f"adaptfuse.patch: the adapter slots need {needed / 2**20:.1f} MiB "
                f"on {device} but only "
                f"{free / 2**20:.1f} MiB are free; lower max_loras ({max_loras}) "
                f"or max_rank ({max_rank}) or max_bottleneck_dim ({max_bottleneck_dim})"
            )
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    layers: dict[str, LoraLayer] = {}
    bottleneck_layers: dict[tuple[int, str], BottleneckLayer] = {}
    hooks: list = []
    try:  # all layers or none: a failure midway (out of memory...) puts back what was swapped
        for name, module in modules.items():
            layers[name] = LoraLayer(module, max_loras, max_rank, sharding[name])
            layers[name].batch_invariant = bool(batch_invariant)
            _set_submodule(model, name, layers[name])
        if blocks is not None:
            layout = blocks[2]
            for index, (block, hidden, device, dtype) in enumerate(blocks[1]):
                block_layers = {
                    point: BottleneckLayer(hidden, max_loras, max_bottleneck_dim, device, dtype)
                    for point in points
                }
                hooks.extend(insert_bottlenecks(block, layout, block_layers))
                bottleneck_layers.update({(index, p): layer for p, layer in block_layers.items()})
    except BaseException:
        for name, layer in layers.items():
            _set_submodule(model, name, layer.base_layer)
        _remove_bottlenecks(model, hooks)
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    manager_class = distributed.TensorParallelManager if any(sharding.values()) else AdapterManager
    manager = manager_class(model, layers, max_loras, max_rank, sum(per_device.values()))
    manager.unsupported_layers = unsupported
    manager.bottleneck_layers = bottleneck_layers
    manager.blocks_path = blocks[0] if blocks is not None else ""
    manager.max_bottleneck_dim = max_bottleneck_dim
    original_forward = model.forward
    had_own_forward = "forward" in model.__dict__  # e.g. accelerate's device hooks

    def forward(*args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        # The session keeps merges out while this forward reads the weights.
        with manager.forward_session():
            return serve(*args, adapter_names=adapter_names, **kwargs)

    def serve(*args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        from_generate = adapter_names is None
        if from_generate:
            adapter_names = generate_names.get()
            if adapter_names is None:
                return original_forward(*args, **kwargs)  # merged or not: the current weights
        reference = kwargs.get("input_ids", args[0] if args else None)
        if reference is None:
            reference = kwargs.get("inputs_embeds")
        if reference is None or reference.dim() < 2:
            raise ValueError(
                "adapter_names needs input_ids or inputs_embeds shaped [batch, sequence, ...]"
            )
        if from_generate:
            adapter_names = _expand_for_generation(adapter_names, reference.shape[0])
        if manager.merged is not None:
            manager.check_merged_names(getattr(adapter_names, "names", adapter_names))
            return original_forward(*args, **kwargs)  # the merged weights, no LoRA kernels
        plans, pinned = manager.plan_for(adapter_names, reference.shape[0], reference.shape[1])
        token = current_plan.set(plans)
        try:
            output = original_forward(*args, **kwargs)
        finally:
            current_plan.reset(token)
            manager.release(pinned)
        if torch.is_grad_enabled() and getattr(model, "is_gradient_checkpointing", False):
            output = _plan_during_backward(output, plans)
        return output

    # transformers' generate inspects forward's signature (position_ids, logits_to_keep,
    # attention_mask...): the wrapper shows the original's, plus adapter_names.
    forward.__signature__ = forward_signature
    model.forward = forward

    original_apply = model._apply
    had_own_apply = "_apply" in model.__dict__

    def _apply(fn, *args, **kwargs):
        # Exactness of unmerge rests on recomputing the same delta on the same device/dtype.
        if manager.merged is not None:
            raise RuntimeError(
                f"{', '.join(repr(n) for n in manager.merged)} is merged; call unmerge() before "
                "moving the model to another device or dtype"
            )
        if manager.trainable_adapters:
            raise RuntimeError(
                f"trainable adapter(s) {manager.trainable_adapters} hold fp32 parameters on "
                "their device; freeze() them before moving the model to another device or dtype"
            )
        return original_apply(fn, *args, **kwargs)

    model._apply = _apply

    original_generate = getattr(model, "generate", None)
    had_own_generate = "generate" in model.__dict__
    if original_generate is not None:

        def generate(*args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
            # transformers refuses unknown generate kwargs: the names travel in a context
            # variable to every forward of this generate call instead.
            if adapter_names is None:
                return original_generate(*args, **kwargs)
            if not isinstance(adapter_names, (list, tuple)):
                raise TypeError("adapter_names must be a list with one entry per input sequence")
            token = generate_names.set(list(adapter_names))
            try:
                return original_generate(*args, **kwargs)
            finally:
                generate_names.reset(token)

        model.generate = generate
    state = {"manager": manager, "requires_grad": requires_grad, "bottleneck_hooks": hooks}
    if had_own_forward:
        state["forward"] = original_forward
    if original_generate is not None and had_own_generate:
        state["generate"] = original_generate
    if had_own_apply:
        state["_apply"] = original_apply
    object.__setattr__(model, _STATE, state)
    return manager


def _signature_with_adapter_names(function) -> inspect.Signature:
    """function's signature with a keyword-only adapter_names (before any **kwargs)."""
    signature = inspect.signature(function)
    parameters = [p for p in signature.parameters.values() if p.name != "adapter_names"]
    names = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next(
        (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD),
        len(parameters),
    )
    return signature.replace(parameters=parameters[:at] + [names] + parameters[at:])


def unpatch(model: nn.Module) -> nn.Module:
    """Puts the original layers back (their weights were never touched), restores every
    parameter's requires_grad and the model's forward."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("this model is not patched by adaptfuse")
    manager: AdapterManager = state["manager"]
    if manager.merged is not None:
        manager.unmerge()
    for name, layer in manager.layers.items():
        _set_submodule(model, name, layer.base_layer)
    _remove_bottlenecks(model, state["bottleneck_hooks"])
    for name, p in model.named_parameters():
        p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
    for method in ("forward", "generate", "_apply"):
        if method in state:
            setattr(model, method, state[method])  # the instance's own, from before patch
        elif method in model.__dict__:
            delattr(model, method)
    object.__delattr__(model, _STATE)
    return model


def manager_of(model: nn.Module) -> AdapterManager:
    """The AdapterManager that adaptfuse.patch(model) returned; raises ValueError naming the
    problem when the model is not patched."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError("this model is not patched by adaptfuse")
    return state["manager"]
