"""Training many adapters at once (DESIGN.md, "Training many adapters at once").

A trainable adapter's weights are fp32 leaf parameters, one A [r, H_in] and one B [H_out, r]
(PEFT's shapes and key names) per adapted layer. They are views into the layer's fp32
trainable banks (the storage layout of the served banks), so an optimizer step changes what
the next forward computes with nothing to refresh. The layer's forward turns the banks into
autograd inputs through _TrainableBanks, whose backward hands each parameter its slice of
the bank gradients; those come from the backward of shrink and expand (adaptfuse.ops).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from adaptfuse.adapters import (
    BASE_NAME,
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    AdapterError,
    matching_paths,
)


@dataclasses.dataclass
class TrainableLayer:
    A: nn.Parameter  # [r, H_in], a view of the layer's fp32 bank
    B: nn.Parameter  # [H_out, r], a transposed view of the layer's fp32 bank
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclasses.dataclass
class TrainableAdapter:
    name: str
    slot: int
    r: int
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    layers: dict[str, TrainableLayer]  # module path -> parameters


def select_layers(
    paths: Sequence[str],
    target_modules: Union[None, str, Sequence[str]],
    exclude_modules: Union[None, str, Sequence[str]] = None,
) -> list[str]:
    """PEFT's matching (adapters.matching_paths) of target_modules / exclude_modules against
    the patched layers; a list entry that matches nothing is refused by name."""
    if isinstance(target_modules, (list, tuple, set)):
        missing = [t for t in target_modules if not matching_paths(paths, [t])]
        if missing:
            raise ValueError(
                f"target_modules {missing} match no layer adaptfuse patched in this model "
                f"(patched layers end in {sorted({p.rsplit('.', 1)[-1] for p in paths})})"
            )
    chosen = matching_paths(paths, target_modules)
    if exclude_modules:
        excluded = set(select_layers(chosen, exclude_modules)) if chosen else set()
        chosen = [p for p in chosen if p not in excluded]
    if not chosen:
        raise ValueError(f"target_modules={target_modules!r} matches no patched layer")
    return chosen


class _TrainableBanks(torch.autograd.Function):
    """Makes a layer's fp32 banks depend on its trainable parameters (which are views of the
    banks): the forward returns the banks as they are, the backward hands each parameter its
    slice of the bank gradients."""

    @staticmethod
    def forward(ctx, bank_A, bank_B, slots, *parameters):
        ctx.slots = slots  # [(slot, rank)] in the order of `parameters` (A, B pairs)
        return bank_A.view_as(bank_A), bank_B.view_as(bank_B)

    @staticmethod
    def backward(ctx, grad_A, grad_B):
        grads = []
        for slot, rank in ctx.slots:
            grads.append(None if grad_A is None else grad_A[slot, :rank])
            grads.append(None if grad_B is None else grad_B[slot, :rank].t())
        return (None, None, None, *grads)


def trainable_banks(layer) -> tuple[torch.Tensor, torch.Tensor]:
    slots, parameters = [], []
    for slot, (A, B, _) in layer.trainable.items():
        slots.append((slot, A.shape[0]))
        parameters += [A, B]
    return _TrainableBanks.apply(layer.train_A, layer.train_B, slots, *parameters)


def per_adapter_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    adapter_names: Sequence[Optional[str]],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum over adapters (None / "__base__" is one group) of each adapter's mean token loss on
    its own rows. Labels as transformers takes them: aligned with input_ids, shifted here,
    ignore_index skipped. One backward gives every adapter the gradient it would get
    training alone on its own rows."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"per_adapter_loss: logits must be [batch, sequence, vocab] and labels "
            f"[batch, sequence]; got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if len(adapter_names) != logits.shape[0]:
        raise ValueError(
            f"per_adapter_loss: adapter_names has {len(adapter_names)} entries but the batch "
            f"has {logits.shape[0]} sequences"
        )
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    token_loss = nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).view(targets.shape)
    counted = (targets != ignore_index).float()
    groups: dict[Optional[str], list[int]] = {}
    for row, name in enumerate(adapter_names):
        groups.setdefault(None if name == BASE_NAME else name, []).append(row)
    total = logits.new_zeros((), dtype=torch.float32)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        total = total + token_loss[index].sum() / counted[index].sum().clamp(min=1)
    return total


def save_peft_folder(adapter: TrainableAdapter, directory: str, fan_in_fan_out: bool) -> None:
    """Writes adapter_config.json + adapter_model.safetensors as PEFT does (PeftModel loads it)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    rank_pattern = {p: w.rank for p, w in adapter.layers.items() if w.rank != adapter.r}
    alpha_pattern = {p: w.alpha for p, w in adapter.layers.items() if w.alpha != adapter.lora_alpha}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.r,
        "lora_alpha": adapter.lora_alpha,
        "lora_dropout": adapter.lora_dropout,
        "use_rslora": adapter.use_rslora,
        "target_modules": sorted(adapter.layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for path, layer in adapter.layers.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = layer.A.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = layer.B.detach().cpu().contiguous()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE))


def read_training_options(path: str) -> dict:
    """r, lora_alpha, use_rslora and lora_dropout of a PEFT folder (validated by the reader)."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{os.path.join(path, CONFIG_FILE)}: {error}") from None
    return {
        "r": int(config.get("r", 8)),
        "lora_alpha": float(config.get("lora_alpha", 8)),
        "use_rslora": bool(config.get("use_rslora", False)),
        "lora_dropout": float(config.get("lora_dropout", 0.0) or 0.0),
    }
