"""Reading and validating adapter files (PEFT LoRA folders; safetensors only).

Everything is checked here, before any slot is touched: a failed load leaves the model, the
weights and every other adapter exactly as they were. Errors name the file, the layer, the
option or the shapes involved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Union

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")
KEY_PREFIX = "base_model.model."
BASE_NAME = "__base__"  # PEFT's reserved name for "no adapter"

# LoraConfig fields adaptfuse implements, and the values of those it refuses otherwise.
# Any other field set to a value other than its default is refused by name.
_SUPPORTED_FIELDS = {
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",
    "lora_dropout",
    "init_lora_weights",
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
}
_DEFAULTS_OF_UNSUPPORTED = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None, {}),
    "alora_invocation_tokens": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "layer_replication": (None, []),
    "megatron_config": (None, {}),
    "loftq_config": (None, {}),
    "eva_config": (None, {}),
    "corda_config": (None, {}),
    "arrow_config": (None, {}),
    "kasa_config": (None, {}),
    "lora_ga_config": (None, {}),
    "monteclora_config": (None, {}),
    "velora_config": (None, {}),
}


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message names the file and the problem."""


@dataclasses.dataclass
class LoraWeights:
    """One adapted layer of one adapter: A [r, H_in], B [r, H_out] (PEFT's lora_B transposed),
    and PEFT's scaling for this layer."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclasses.dataclass
class LoraAdapter:
    name: str
    path: str
    layers: dict[str, LoraWeights]  # module path in the base model -> weights


def pattern_value(patterns: Mapping[str, float], module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the
    module path (a plain name or a regex), else the default."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def matching_paths(paths: Sequence[str], target_modules: Union[None, str, Sequence[str]]) -> list:
    """PEFT's target_modules matching: None or "all-linear" = every path, a string = a regex
    on the full path, a list = names that equal the path or end it."""
    if target_modules is None or target_modules == "all-linear":
        return list(paths)
    if isinstance(target_modules, str):
        return [p for p in paths if re.fullmatch(target_modules, p)]
    wanted = list(target_modules)
    return [p for p in paths if any(p == t or p.endswith("." + t) for t in wanted)]


def _check_options(config: dict, config_path: str) -> None:
    for field, allowed in _DEFAULTS_OF_UNSUPPORTED.items():
        value = config.get(field)
        if value not in allowed:
            raise AdapterError(
                f"{config_path}: option {field}={value!r} is not supported by adaptfuse "
                "(supported: plain LoRA with rank/alpha patterns and rsLoRA)"
            )
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{config_path}: option bias={config['bias']!r} is not supported (only 'none')"
        )
    for field, value in config.items():
        if field in _SUPPORTED_FIELDS or field in _DEFAULTS_OF_UNSUPPORTED:
            continue
        if value not in (None, False, [], {}, ""):
            raise AdapterError(
                f"{config_path}: option {field}={value!r} is not supported by adaptfuse"
            )


def _load_safetensors(weights_path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({error})") from None


def read_peft_adapter(
    path: str,
    name: str,
    layer_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraAdapter:
    """Reads and validates a PEFT LoRA folder against the patched layers.

    layer_shapes: module path -> (H_in, H_out) of every layer adaptfuse patched.
    Returns the adapter with A/B in `dtype` (the base model's), on the CPU.
    """
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: not a directory with a PEFT adapter")
    config_path = os.path.join(path, CONFIG_FILE)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise AdapterError(
            f"{path}: no {CONFIG_FILE}; a PEFT adapter folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    if not os.path.isfile(weights_path):
        pickles = [f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))]
        if pickles:
            raise AdapterError(
                f"{os.path.join(path, pickles[0])}: pickle files are never opened "
                "(they can run code). "
                "Convert once where you trust the file: PeftModel.from_pretrained(base, path)"
                ".save_pretrained(out, safe_serialization=True)"
            )
        raise AdapterError(f"{path}: no {WEIGHTS_FILE}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_path}: not valid JSON ({error})") from None
    _check_options(config, config_path)
    tensors = _load_safetensors(weights_path)

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r} "
                "(only lora_A/lora_B weights are supported)"
            )
        module = match.group(1)
        if module.startswith(KEY_PREFIX):
            module = module[len(KEY_PREFIX) :]
        pairs.setdefault(module, {})[match.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"{weights_path}: holds no LoRA weights")

    layers: dict[str, LoraWeights] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"{weights_path}: layer {module} has lora_{''.join(pair)} "
                "but not both lora_A and lora_B"
            )
        if module not in layer_shapes:
            raise AdapterError(
                f"{weights_path}: targets layer {module!r}, which the patched model does not adapt "
                "(missing from the model, a layer type adaptfuse does not support, "
                "or outside patch's target_modules)"
            )
        h_in, h_out = layer_shapes[module]
        a, b = pair["A"], pair["B"]
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape != (rank, h_in) or b.shape != (h_out, rank):
            raise AdapterError(
                f"{weights_path}: layer {module}: lora_A {tuple(a.shape)} and "
                f"lora_B {tuple(b.shape)} do not fit "
                f"the layer ({h_in} in, {h_out} out): expected [r, {h_in}] and [{h_out}, r]"
            )
        expected_rank = int(pattern_value(rank_pattern, module, r_default))
        if rank != expected_rank:
            raise AdapterError(
                f"{weights_path}: layer {module} has rank {rank} but {CONFIG_FILE} "
                f"gives it rank {expected_rank}"
            )
        if rank > max_rank:
            raise AdapterError(
                f"{weights_path}: layer {module} has rank {rank}, "
                f"above max_rank={max_rank} given to patch()"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(
                f"{weights_path}: layer {module} holds non-finite values (NaN or inf)"
            )
        served_a, served_b = a.to(dtype).contiguous(), b.t().to(dtype).contiguous()
        if not (torch.isfinite(served_a).all() and torch.isfinite(served_b).all()):
            raise AdapterError(
                f"{weights_path}: layer {module} holds values too large for the model's "
                f"{dtype} (they would become inf)"
            )
        alpha = float(pattern_value(alpha_pattern, module, alpha_default))
        layers[module] = LoraWeights(
            A=served_a, B=served_b, scale=lora_scale(alpha, rank, use_rslora)
        )
    return LoraAdapter(name=name, path=path, layers=layers)
