"""Training many adapters at once (DESIGN.md, "Training many adapters at once").

A trainable adapter's weights are fp32 leaf parameters, one A [r, H_in] and one B [H_out, r]
(PEFT's shapes and key names) per adapted layer. They are views into the layer's fp32
trainable banks (the storage layout of the served banks), so an optimizer step changes what
the next forward computes with nothing to refresh. The layer's forward turns the banks into
autograd inputs through _BankViews, whose backward hands each parameter its slice of
the bank gradients; those come from the backward of shrink and expand (adaptfuse.ops).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from adaptfuse.adapters import (
    ADAPTERHUB_WEIGHTS_FILE,
    BASE_NAME,
    BOTTLENECK_ACTIVATIONS,
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    AdapterError,
    matching_paths,
)


@dataclasses.dataclass
class TrainableLayer:
    """One adapted layer of a trainable LoRA adapter: its parameters, alpha and scale."""
    A: nn.Parameter  # [r, H_in], a view of the layer's fp32 bank
    B: nn.Parameter  # [H_out, r], a transposed view of the layer's fp32 bank
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclasses.dataclass
class TrainableAdapter:
    """A trainable LoRA adapter: its slot, PEFT options and parameters per module path."""
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


class _BankViews(torch.autograd.Function):
    """Makes a layer's fp32 banks depend on its trainable parameters (which are views of the
    banks): the forward returns the banks as they are, the backward hands each parameter its
    slice of the bank gradients."""

    @staticmethod
    def forward(ctx, views, num_banks, *tensors):
        # views: per parameter (bank index, slot, length, transposed), in the order of the
        # parameters that follow the banks in `tensors`.
        ctx.views = views
        return tuple(bank.view_as(bank) for bank in tensors[:num_banks])

    @staticmethod
    def backward(ctx, *bank_grads):
        grads = []
        for bank, slot, length, transposed in ctx.views:
            grad = bank_grads[bank]
            if grad is not None:
                grad = grad[slot, :length]
                grad = grad.t() if transposed else grad
            grads.append(grad)
        return (None, None, *(None for _ in bank_grads), *grads)


def bank_views(banks: Sequence[torch.Tensor], parameters) -> tuple[torch.Tensor, ...]:
    """The banks, as autograd outputs of their trainable parameters. parameters: (parameter,
    bank index, slot, transposed) for every parameter that is a view of bank[slot, :length]
    (transposed: of its transpose)."""
    views, tensors = [], []
    for parameter, bank, slot, transposed in parameters:
        length = parameter.shape[-1 if transposed else 0]
        views.append((bank, slot, length, transposed))
        tensors.append(parameter)
    return _BankViews.apply(views, len(banks), *banks, *tensors)


def trainable_banks(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA layer's fp32 banks A and B, differentiable in its trainable parameters."""
    parameters = []
    for slot, (A, B, _) in tuple(layer.trainable.items()):  # attach/detach may run meanwhile
        parameters += [(A, 0, slot, False), (B, 1, slot, True)]
    return bank_views((layer.train_A, layer.train_B), parameters)


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
    # The labels are shifted, not the logits ([batch, sequence, vocab]: a shifted slice of
    # them would be copied, forward and backward); the last position predicts nothing.
    labels = labels.to(logits.device)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], 1)
    token_loss = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
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


# ---- bottleneck adapters (DESIGN.md "Bottleneck adapters") ---------------------------------

# AdapterHub's BnConfig as its save_adapter writes it, every option at the value adaptfuse
# implements; the presets below set the fields that differ between its named configs.
_BOTTLENECK_CONFIG = {
    "adapter_residual_before_ln": False,
    "cross_adapter": False,
    "dropout": 0.0,
    "factorized_phm_W": True,
    "factorized_phm_rule": False,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "is_parallel": False,
    "learn_phm": True,
    "leave_out": [],
    "ln_after": False,
    "ln_before": False,
    "mh_adapter": False,
    "non_linearity": "relu",
    "original_ln_after": True,
    "original_ln_before": False,
    "output_adapter": True,
    "phm_bias": True,
    "phm_c_init": "normal",
    "phm_dim": 4,
    "phm_init_range": 0.0001,
    "phm_layer": False,
    "phm_rank": 1,
    "reduction_factor": 16,
    "residual_before_ln": True,
    "scaling": 1.0,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "stochastic_depth": 0.0,
    "use_gating": False,
}
# AdapterHub's SeqBnConfig (Pfeiffer), DoubleSeqBnConfig (Houlsby) and ParBnConfig defaults.
BOTTLENECK_PRESETS = {
    "seq_bn": {"original_ln_before": True},
    "double_seq_bn": {"mh_adapter": True, "non_linearity": "swish"},
    "par_bn": {
        "is_parallel": True,
        "reduction_factor": 2,
        "scaling": 4.0,
        "init_weights": "mam_adapter",
    },
}
# The point each preset's adapters act at, by the AdapterHub module that holds them.
PRESET_POINTS = {
    "seq_bn": {"output_adapters": "block_out"},
    "double_seq_bn": {"attention_adapters": "attn_out", "output_adapters": "mlp_out"},
    "par_bn": {"output_adapters": "par_bn"},
}
BOTTLENECK_INITS = ("bert", "mam_adapter")


def bottleneck_options(
    config: str,
    reduction_factor=None,
    non_linearity: Optional[str] = None,
    scaling: Optional[float] = None,
    init_weights: Optional[str] = None,
    leave_out: Sequence[int] = (),
) -> dict:
    """A full AdapterHub BnConfig dict for one of BOTTLENECK_PRESETS with the given overrides;
    raises ValueError naming a bad choice."""
    if config not in BOTTLENECK_PRESETS:
        raise ValueError(f"config={config!r}: expected one of {sorted(BOTTLENECK_PRESETS)}")
    options = {**_BOTTLENECK_CONFIG, **BOTTLENECK_PRESETS[config]}
    overrides = dict(
        reduction_factor=reduction_factor,
        non_linearity=non_linearity,
        scaling=scaling,
        init_weights=init_weights,
    )
    options.update({k: v for k, v in overrides.items() if v is not None})
    options["leave_out"] = sorted({int(i) for i in leave_out})
    if options["init_weights"] not in BOTTLENECK_INITS:
        raise ValueError(
            f"init_weights={options['init_weights']!r}: expected one of {BOTTLENECK_INITS}"
        )
    factor = options["reduction_factor"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"reduction_factor must be a positive number, got {factor!r}")
    scaling = options["scaling"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ValueError(f"scaling must be a number, got {scaling!r}")
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    activation = options["non_linearity"]
    if not isinstance(activation, str) or activation.lower() not in BOTTLENECK_ACTIVATIONS:
        raise ValueError(
            f"non_linearity={activation!r}: expected one of {BOTTLENECK_ACTIVATIONS} "
            "(AdapterHub's)"
        )
    return options


def init_bottleneck(dim: int, hidden: int, init_weights: str) -> tuple[torch.Tensor, ...]:
    """(down [m, H], down_bias [m], up [H, m], up_bias [H]) initialised as AdapterHub does:
    "bert" draws both weights from N(0, 0.02); "mam_adapter" draws down as nn.Linear does and
    starts up at zero (the adapter starts as the identity). Biases start at zero."""
    down, up = torch.empty(dim, hidden), torch.empty(hidden, dim)
    if init_weights == "bert":
        down.normal_(0.0, 0.02)
        up.normal_(0.0, 0.02)
    else:
        nn.init.kaiming_uniform_(down, a=5**0.5)
        up.zero_()
    return down, torch.zeros(dim), up, torch.zeros(hidden)


@dataclasses.dataclass
class TrainableBottleneckPoint:
    """One insertion point of a trainable bottleneck adapter: fp32 parameters in AdapterHub's
    shapes."""
    down: nn.Parameter  # [m, H], a view of the layer's fp32 bank (AdapterHub's adapter_down.0)
    down_bias: nn.Parameter  # [m]
    up: nn.Parameter  # [H, m], a transposed view (AdapterHub's adapter_up.weight)
    up_bias: nn.Parameter  # [H], unscaled

    def named(self) -> list[tuple[str, nn.Parameter]]:
        return [
            ("adapter_down.0.weight", self.down),
            ("adapter_down.0.bias", self.down_bias),
            ("adapter_up.weight", self.up),
            ("adapter_up.bias", self.up_bias),
        ]


@dataclasses.dataclass
class TrainableBottleneck:
    """A trainable bottleneck adapter: its slot, AdapterHub options and parameters per
    (block index, point)."""
    name: str
    slot: int
    options: dict  # AdapterHub's BnConfig fields
    points: dict[tuple[int, str], TrainableBottleneckPoint]  # (block index, point) -> params

    @property
    def activation(self) -> str:
        return self.options["non_linearity"].lower()

    @property
    def scaling(self) -> float:
        return float(self.options["scaling"])


def adapterhub_key(blocks_path: str, index: int, point: str, name: str, part: str) -> str:
    """AdapterHub's state-dict key of one tensor of a bottleneck adapter."""
    location = "attention_adapters" if point == "attn_out" else "output_adapters"
    return f"{blocks_path}.{index}.{location}.adapters.{name}.{part}"


def save_adapterhub_folder(
    adapter: TrainableBottleneck, directory: str, blocks_path: str, model: nn.Module
) -> None:
    """Writes adapter_config.json + adapter.safetensors as AdapterHub's save_adapter does
    (adaptfuse's load_adapter, and AdapterHub's, read it back)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    model_config = getattr(model, "config", None)
    config = {
        "config": dict(adapter.options),
        "hidden_size": getattr(model_config, "hidden_size", None),
        "model_class": type(model).__name__,
        "model_name": getattr(model_config, "_name_or_path", ""),
        "model_type": getattr(model_config, "model_type", ""),
        "name": adapter.name,
        "version": "adapters.1.3.0",
    }
    tensors = {}
    for (index, point), parameters in adapter.points.items():
        for part, parameter in parameters.named():
            key = adapterhub_key(blocks_path, index, point, adapter.name, part)
            tensors[key] = parameter.detach().cpu().contiguous()
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(directory, ADAPTERHUB_WEIGHTS_FILE))
