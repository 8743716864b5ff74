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
from typing import Optional, Union

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")
KEY_PREFIX = "base_model.model."
BASE_NAME = "__base__"  # PEFT's reserved name for "no adapter"
MAX_SUPPORTED_RANK = 512  # DESIGN.md: ranks 1..512
# A PEFT weight key: module path, lora_A or lora_B, an optional adapter name, ".weight".
_LORA_KEY = re.compile(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight")

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
    """A registered PEFT LoRA adapter: module path -> LoraWeights (A [r, H_in], B [r, H_out],
    scale), on the CPU."""
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


def _unsupported_options(config: dict, config_path: str) -> list[str]:
    problems = []
    for field, allowed in _DEFAULTS_OF_UNSUPPORTED.items():
        value = config.get(field)
        if value not in allowed:
            problems.append(
                f"{config_path}: option {field}={value!r} is not supported by adaptfuse "
                "(supported: plain LoRA with rank/alpha patterns and rsLoRA)"
            )
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("bias", "none") != "none":
        problems.append(
            f"{config_path}: option bias={config['bias']!r} is not supported (only 'none')"
        )
    for field, value in config.items():
        if field in _SUPPORTED_FIELDS or field in _DEFAULTS_OF_UNSUPPORTED:
            continue
        if value not in (None, False, [], {}, ""):
            problems.append(
                f"{config_path}: option {field}={value!r} is not supported by adaptfuse"
            )
    return problems


def _is_alpha(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value) -> bool:
    return _is_alpha(value) and value >= 1 and value == int(value)


def _malformed_values(config: dict, config_path: str) -> list[str]:
    """r, lora_alpha and their patterns that are not numbers of the right kind."""
    problems = []
    if not _is_rank(config.get("r", 8)):
        problems.append(f"{config_path}: r={config.get('r')!r} is not a positive integer")
    if not _is_alpha(config.get("lora_alpha", 8)):
        problems.append(
            f"{config_path}: lora_alpha={config.get('lora_alpha')!r} is not a finite number"
        )
    for field, valid, kind in (
        ("rank_pattern", _is_rank, "positive integers"),
        ("alpha_pattern", _is_alpha, "finite numbers"),
    ):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            problems.append(f"{config_path}: {field}={patterns!r} must map module names to {kind}")
    return problems


def option_problems(config: dict, config_path: str) -> list[str]:
    """Every option of an adapter_config.json that adaptfuse refuses or cannot read, one
    message each naming the file and the option (empty: plain LoRA that adaptfuse serves)."""
    return _unsupported_options(config, config_path) + _malformed_values(config, config_path)


def _load_safetensors(weights_path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({error})") from None


def _load_safetensor_slices(
    weights_path: str, slices: Mapping[str, tuple[slice, slice]]
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Like _load_safetensors, but reads only columns slices[module][0] of a module's lora_A
    and rows slices[module][1] of its lora_B (a tensor-parallel rank's part), and also
    returns every tensor's stored shape. Tensors of other modules, or not 2-D, are read
    whole."""
    from safetensors import SafetensorError, safe_open

    tensors, shapes = {}, {}
    try:
        with safe_open(weights_path, framework="pt", device="cpu") as f:
            for key in f.keys():
                stored = f.get_slice(key)
                shapes[key] = tuple(stored.get_shape())
                match = _LORA_KEY.fullmatch(key)
                module = match.group(1).removeprefix(KEY_PREFIX) if match else None
                if module in slices and len(shapes[key]) == 2:
                    a_columns, b_rows = slices[module]
                    part = (slice(None), a_columns) if match.group(2) == "A" else (b_rows,)
                    tensors[key] = stored[part]
                else:
                    tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return tensors, shapes


@dataclasses.dataclass
class PeftFolder:
    """A PEFT LoRA folder as stored, checked without any model.

    modules: module path in the base model -> {"A": lora_A [r, H_in], "B": lora_B [H_out, r]}
    as stored (PEFT's orientation and dtype, on the CPU). problems: what keeps adaptfuse from
    loading the folder and belongs to no single module (options, files, stray tensors);
    layer_problems: the same per module path. Whether each module exists in a given model,
    with matching shapes, is read_peft_adapter's check.
    """

    path: str
    config_path: str
    weights_path: str
    config: dict
    modules: dict[str, dict[str, torch.Tensor]]
    problems: list[str]
    layer_problems: dict[str, list[str]]
    # module path -> {"A": shape, "B": shape} as stored (modules may hold slices of them)
    stored_shapes: dict[str, dict[str, tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    # False when r, lora_alpha or their patterns are malformed: rank(), alpha() and scale()
    # have no answer then.
    settings_readable: bool = True

    @property
    def all_problems(self) -> list[str]:
        """Folder-wide problems first, then the layers' in module order."""
        layers = sorted(self.layer_problems)
        return self.problems + [p for module in layers for p in self.layer_problems[module]]

    def rank(self, module: str) -> int:
        """The rank adapter_config.json gives the module (r, or its rank_pattern entry)."""
        return int(pattern_value(self.config.get("rank_pattern"), module, self.config.get("r", 8)))

    def alpha(self, module: str) -> float:
        """lora_alpha of the module (alpha_pattern applied)."""
        default = self.config.get("lora_alpha", 8)
        return float(pattern_value(self.config.get("alpha_pattern"), module, default))

    def scale(self, module: str) -> float:
        """PEFT's scaling of the module: alpha / r, or alpha / sqrt(r) with use_rslora."""
        use_rslora = bool(self.config.get("use_rslora", False))
        return lora_scale(self.alpha(module), self.rank(module), use_rslora)


def _read_config(path: str) -> tuple[str, dict]:
    if not os.path.isdir(path):
        raise AdapterError(f"{path}: not a directory with a PEFT adapter")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise AdapterError(
            f"{path}: no {CONFIG_FILE}; a PEFT adapter folder holds "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise AdapterError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: holds a JSON {type(config).__name__}, not an object")
    return config_path, config


def _missing_weights_problem(path: str) -> str:
    pickles = [f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))]
    if pickles:
        return (
            f"{os.path.join(path, pickles[0])}: pickle files are never opened "
            "(they can run code). "
            "Convert once where you trust the file: PeftModel.from_pretrained(base, path)"
            ".save_pretrained(out, safe_serialization=True)"
        )
    return f"{path}: no {WEIGHTS_FILE}"


def _module_problems(
    weights_path: str, module: str, pair: dict[str, torch.Tensor], expected_rank: Optional[int]
) -> list[str]:
    """What keeps one module's lora_A / lora_B from loading into any model: a missing half,
    shapes that disagree on the rank, a rank other than the config's (expected_rank; None
    when the config's ranks are unreadable) or outside 1..MAX_SUPPORTED_RANK, values that
    are not finite floats."""
    where = f"{weights_path}: layer {module}"
    if set(pair) != {"A", "B"}:
        return [f"{where} has lora_{''.join(pair)} but not both lora_A and lora_B"]
    a, b = pair["A"], pair["B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        return [
            f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not agree on a "
            "rank (expected [r, H_in] and [H_out, r])"
        ]
    rank = a.shape[0]
    problems = []
    if expected_rank is not None and rank != expected_rank:
        problems.append(f"{where} has rank {rank} but {CONFIG_FILE} gives it rank {expected_rank}")
    if not 1 <= rank <= MAX_SUPPORTED_RANK:
        problems.append(
            f"{where} has rank {rank}; adaptfuse supports ranks 1..{MAX_SUPPORTED_RANK}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        problems.append(f"{where} holds {a.dtype} / {b.dtype} tensors, not floating point")
    elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        problems.append(f"{where} holds non-finite values (NaN or inf)")
    return problems


def read_peft_folder(
    path: str, slices: Optional[Mapping[str, tuple[slice, slice]]] = None
) -> PeftFolder:
    """Reads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors; a pickle
    file is never opened) and collects every problem that keeps adaptfuse from loading it
    into any model. Raises AdapterError only when there is nothing to read: not a folder,
    no config, or a config that is not a JSON object. slices: module path -> (columns of
    lora_A, rows of lora_B) to read instead of the whole tensors (a tensor-parallel rank's
    part; the checks of values then cover what was read)."""
    config_path, config = _read_config(path)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    folder = PeftFolder(path, config_path, weights_path, config, {}, [], {})
    folder.problems.extend(option_problems(config, config_path))
    if not os.path.isfile(weights_path):
        folder.problems.append(_missing_weights_problem(path))
        return folder
    try:
        if slices is None:
            tensors = _load_safetensors(weights_path)
            shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        else:
            tensors, shapes = _load_safetensor_slices(weights_path, slices)
    except AdapterError as error:
        folder.problems.append(str(error))
        return folder
    unexpected = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            unexpected.append(key)
            continue
        module = match.group(1)
        if module.startswith(KEY_PREFIX):
            module = module[len(KEY_PREFIX) :]
        folder.modules.setdefault(module, {})[match.group(2)] = tensor
        folder.stored_shapes.setdefault(module, {})[match.group(2)] = shapes[key]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        folder.problems.append(
            f"{weights_path}: unexpected tensor {unexpected[0]!r}{more} "
            "(only lora_A/lora_B weights are supported)"
        )
    elif not folder.modules:
        folder.problems.append(f"{weights_path}: holds no LoRA weights")
    folder.settings_readable = not _malformed_values(config, config_path)
    for module, pair in sorted(folder.modules.items()):
        expected_rank = folder.rank(module) if folder.settings_readable else None
        problems = _module_problems(weights_path, module, pair, expected_rank)
        if problems:
            folder.layer_problems[module] = problems
    return folder


def read_peft_adapter(
    path: str,
    name: str,
    layer_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
    slices: Optional[Mapping[str, tuple[slice, slice]]] = None,
    unsupported: Optional[Mapping[str, str]] = None,
) -> LoraAdapter:
    """Reads and validates a PEFT LoRA folder against the patched layers.

    layer_shapes: module path -> (H_in, H_out) of every layer adaptfuse patched.
    slices: module path -> (columns of lora_A, rows of lora_B) this process reads, for layers
    it holds in part (tensor parallelism); their A / B are those slices.
    unsupported: module path -> why adaptfuse left that layer alone (named when targeted).
    Returns the adapter with A [r, H_in] / B [r, H_out] in `dtype` (the base model's), on the
    CPU. Raises AdapterError naming the file and the first problem found.
    """
    folder = read_peft_folder(path, slices)
    problems = folder.all_problems
    if problems:
        raise AdapterError(problems[0])
    weights_path = folder.weights_path
    layers: dict[str, LoraWeights] = {}
    for module, pair in sorted(folder.modules.items()):
        if module in (unsupported or {}):
            raise AdapterError(
                f"{weights_path}: targets a layer adaptfuse does not adapt: {unsupported[module]}"
            )
        if module not in layer_shapes:
            raise AdapterError(
                f"{weights_path}: targets layer {module!r}, which the patched model does not adapt "
                "(missing from the model, a layer type adaptfuse does not support, "
                "or outside patch's target_modules)"
            )
        h_in, h_out = layer_shapes[module]
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        stored_a, stored_b = folder.stored_shapes[module]["A"], folder.stored_shapes[module]["B"]
        if stored_a != (rank, h_in) or stored_b != (h_out, rank):
            raise AdapterError(
                f"{weights_path}: layer {module}: lora_A {stored_a} and "
                f"lora_B {stored_b} do not fit "
                f"the layer ({h_in} in, {h_out} out): expected [r, {h_in}] and [{h_out}, r]"
            )
        if rank > max_rank:
            raise AdapterError(
                f"{weights_path}: layer {module} has rank {rank}, "
                f"above max_rank={max_rank} given to patch()"
            )
        served_a, served_b = a.to(dtype).contiguous(), b.t().to(dtype).contiguous()
        if not (torch.isfinite(served_a).all() and torch.isfinite(served_b).all()):
            raise AdapterError(
                f"{weights_path}: layer {module} holds values too large for the model's "
                f"{dtype} (they would become inf)"
            )
        layers[module] = LoraWeights(A=served_a, B=served_b, scale=folder.scale(module))
    return LoraAdapter(name=name, path=path, layers=layers)


def merge_terms(
    weighted: Sequence[tuple[LoraAdapter, float]], module: str
) -> list[tuple[LoraWeights, float, float]]:
    """The terms merge.merge_layer folds into one layer's weight: (weights, merge weight,
    scaling) of every adapter in `weighted` that adapts `module`, in the given order. The
    in-place merge and the CLI's merged checkpoint both build their terms here and fold them
    with merge_layer, so that merge_ gets the same A [r, H_in], B [r, H_out] and
    coefficients, bit for bit."""
    return [
        (adapter.layers[module], float(weight), adapter.layers[module].scale)
        for adapter, weight in weighted
        if module in adapter.layers
    ]


# ---- AdapterHub bottleneck adapters (DESIGN.md, "Bottleneck adapters") ----------------------

ADAPTERHUB_WEIGHTS_FILE = "adapter.safetensors"
ADAPTERHUB_PICKLE_FILE = "pytorch_adapter.bin"
BOTTLENECK_POINTS = ("attn_out", "mlp_out", "block_out", "par_bn")
"""Where a bottleneck adapter acts in a pre-LN decoder block: on the attention output (s + f(s),
then the residual add), on the MLP output (the same), on the block output after its residual
add (h + f(h): seq_bn), and parallel to the MLP (f of the residual stream entering the MLP
sub-block, added to the MLP's output: par_bn)."""
MAX_BOTTLENECK_DIM = 256
BOTTLENECK_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")

# A weight key of save_adapter: blocks path, block index, attention or output adapter, name.
_BOTTLENECK_KEY = re.compile(
    r"(?:(.*)\.)?(\d+)\.(attention_adapters|output_adapters)\.adapters\.([^.]+)\."
    r"(adapter_down\.0|adapter_up)\.(weight|bias)"
)
# BnConfig fields that decide what adaptfuse computes (checked below).
_BN_READ_FIELDS = {
    "mh_adapter",
    "output_adapter",
    "reduction_factor",
    "non_linearity",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "is_parallel",
    "scaling",
    "leave_out",
}
# Fields with no effect on a served adapter: initialisation, training-time dropout, and options
# that only apply together with one refused below (phm_*, ln_after, inv_adapter).
_BN_INERT_FIELDS = {
    "architecture",
    "init_weights",
    "init_weights_seed",
    "dropout",
    "adapter_residual_before_ln",
    "inv_adapter_reduction_factor",
    "phm_dim",
    "factorized_phm_W",
    "shared_W_phm",
    "shared_phm_rule",
    "factorized_phm_rule",
    "phm_c_init",
    "phm_init_range",
    "learn_phm",
    "hypercomplex_nonlinearity",
    "phm_rank",
    "phm_bias",
}


@dataclasses.dataclass
class BottleneckWeights:
    """One insertion point of one block, as served: down [m, H] and up [m, H] (AdapterHub's
    adapter_up.weight [H, m] transposed once, rank-major like LoRA's B) in the model's dtype;
    down_bias [m] and up_bias [H] in fp32."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor

    @property
    def dim(self) -> int:
        return self.down.shape[0]


@dataclasses.dataclass
class BottleneckAdapter:
    """A registered AdapterHub bottleneck adapter: f(h) = scaling * (up act(down h + b_down) +
    b_up) at each (block index, point) of `points`."""

    name: str
    path: str
    activation: str
    scaling: float
    points: dict[tuple[int, str], BottleneckWeights]


def is_adapterhub_folder(path: str) -> bool:
    """Whether a folder holds an AdapterHub adapter (its weights file, or a config whose options
    sit under "config", as save_adapter writes them) rather than a PEFT one."""
    if not os.path.isdir(path):
        return False
    if any(
        os.path.isfile(os.path.join(path, f))
        for f in (ADAPTERHUB_WEIGHTS_FILE, ADAPTERHUB_PICKLE_FILE)
    ):
        return True
    try:
        _, config = _read_config(path)
    except AdapterError:
        return False
    return isinstance(config.get("config"), dict) and "peft_type" not in config


def _bottleneck_points(options: dict, config_path: str) -> tuple[dict[str, str], list[str]]:
    """{"attention_adapters" / "output_adapters": point} of a BnConfig, and its problems."""
    problems = []

    def refuse(message):
        problems.append(f"{config_path}: {message} is not supported by adaptfuse")

    if options.get("architecture", "bottleneck") not in (None, "bottleneck"):
        refuse(f"architecture={options['architecture']!r} (only bottleneck adapters)")
    for field, value in options.items():
        if field in _BN_READ_FIELDS or field in _BN_INERT_FIELDS:
            continue
        if value not in (None, False, 0, 0.0, [], {}, ""):
            refuse(f"option {field}={value!r}")
    if options.get("residual_before_ln", True) is not True:
        refuse(f"option residual_before_ln={options['residual_before_ln']!r}")
    if options.get("original_ln_after", True) is not True:
        refuse(f"option original_ln_after={options['original_ln_after']!r}")
    scaling = options.get("scaling", 1.0)
    if not _is_alpha(scaling):
        refuse(f"option scaling={scaling!r} (a learned scaling)")
    activation = options.get("non_linearity")
    if not isinstance(activation, str) or activation.lower() not in BOTTLENECK_ACTIVATIONS:
        refuse(f"option non_linearity={activation!r} (supported: {BOTTLENECK_ACTIVATIONS})")
    parallel = bool(options.get("is_parallel", False))
    before = bool(options.get("original_ln_before", False))
    points = {}
    if options.get("mh_adapter", False):
        if parallel or before:
            setting = "is_parallel=True" if parallel else "original_ln_before=True"
            refuse(f"option mh_adapter=True with {setting}")
        points["attention_adapters"] = "attn_out"
    if options.get("output_adapter", False):
        if parallel and before:
            refuse("option is_parallel=True with original_ln_before=True")
        points["output_adapters"] = "par_bn" if parallel else "block_out" if before else "mlp_out"
    if not points:
        problems.append(f"{config_path}: neither mh_adapter nor output_adapter is set")
    return points, problems


def _reduced_dim(reduction_factor, index: int, hidden: int) -> Optional[int]:
    """AdapterHub's bottleneck dim of block `index`: hidden // reduction_factor, the factor a
    number or a mapping from block index (as a string) with a "default"; None if unreadable."""
    if isinstance(reduction_factor, Mapping):
        reduction_factor = reduction_factor.get(str(index), reduction_factor.get("default"))
    if not _is_alpha(reduction_factor) or reduction_factor <= 0:
        return None
    return int(hidden // reduction_factor)


def read_adapterhub_adapter(
    path: str,
    name: str,
    blocks_path: str,
    points: Mapping[tuple[int, str], tuple[int, int]],
    dtype: torch.dtype,
) -> BottleneckAdapter:
    """Reads and validates an AdapterHub bottleneck folder (adapter_config.json +
    adapter.safetensors; pytorch_adapter.bin is never unpickled) for a patched model.

    blocks_path: the module path of the model's decoder blocks ("model.layers");
    points: (block index, point) -> (hidden size, largest bottleneck dim) of every bottleneck
    slot bank patch allocated. Returns the adapter on the CPU, its weights in `dtype`. Raises
    AdapterError naming the file and the first problem.
    """
    config_path, config = _read_config(path)
    options = config.get("config")
    if not isinstance(options, dict):
        raise AdapterError(f'{config_path}: no "config" object with the adapter\'s options')
    kinds, problems = _bottleneck_points(options, config_path)
    weights_path = os.path.join(path, ADAPTERHUB_WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        if os.path.isfile(os.path.join(path, ADAPTERHUB_PICKLE_FILE)):
            problems.append(
                f"{os.path.join(path, ADAPTERHUB_PICKLE_FILE)}: pickle files are never opened "
                "(they can run code). Convert once where you trust the file: "
                "model.load_adapter(path) then model.save_adapter(out, name, "
                "use_safetensors=True) with AdapterHub's adapters library"
            )
        else:
            problems.append(f"{path}: no {ADAPTERHUB_WEIGHTS_FILE}")
    if problems:
        raise AdapterError(problems[0])
    tensors = _load_safetensors(weights_path)
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    saved_names = set()
    for key, tensor in tensors.items():
        match = _BOTTLENECK_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(
                f"{weights_path}: unexpected tensor {key!r} (only bottleneck adapter_down / "
                "adapter_up weights and biases are supported)"
            )
        prefix, index, location, saved_name, part, field = match.groups()
        if prefix and not (
            prefix == blocks_path
            or blocks_path.endswith("." + prefix)
            or prefix.endswith("." + blocks_path)
        ):
            raise AdapterError(
                f"{weights_path}: tensor {key!r} belongs to blocks at {prefix!r}, but the "
                f"patched model's blocks are at {blocks_path!r} (saved from another architecture?)"
            )
        if location not in kinds:
            raise AdapterError(
                f"{weights_path}: tensor {key!r} is an {location} tensor, which the options in "
                f"{CONFIG_FILE} do not declare"
            )
        saved_names.add(saved_name)
        part_name = ("down" if part.startswith("adapter_down") else "up") + "_" + field
        grouped.setdefault((int(index), kinds[location]), {})[part_name] = tensor
    if not grouped:
        raise AdapterError(f"{weights_path}: holds no bottleneck adapter weights")
    if len(saved_names) > 1:
        raise AdapterError(f"{weights_path}: holds several adapters {sorted(saved_names)}")
    leave_out = set(options.get("leave_out") or [])
    hidden_expected = config.get("hidden_size")
    served = {}
    for (index, point), parts in sorted(grouped.items()):
        where = f"{weights_path}: block {index} ({point})"
        if index in leave_out:
            raise AdapterError(f"{where} has weights but leave_out={sorted(leave_out)} skips it")
        missing = {"down_weight", "down_bias", "up_weight", "up_bias"} - set(parts)
        if missing:
            raise AdapterError(f"{where} lacks adapter {', '.join(sorted(missing))}")
        if (index, point) not in points:
            raise AdapterError(
                f"{where}: the patched model has no bottleneck slots there (block index out of "
                "range, or a point outside patch's bottleneck_points)"
            )
        hidden, max_dim = points[(index, point)]
        down, down_bias = parts["down_weight"], parts["down_bias"]
        up, up_bias = parts["up_weight"], parts["up_bias"]
        dim = down.shape[0] if down.dim() == 2 else -1
        if (
            down.shape != (dim, hidden)
            or down_bias.shape != (dim,)
            or up.shape != (hidden, dim)
            or up_bias.shape != (hidden,)
        ):
            raise AdapterError(
                f"{where}: adapter_down {tuple(down.shape)} + {tuple(down_bias.shape)} and "
                f"adapter_up {tuple(up.shape)} + {tuple(up_bias.shape)} do not fit hidden size "
                f"{hidden}: expected [m, {hidden}], [m], [{hidden}, m], [{hidden}]"
            )
        if hidden_expected is not None and hidden_expected != hidden:
            raise AdapterError(
                f"{config_path}: hidden_size={hidden_expected} but the model's is {hidden}"
            )
        expected_dim = _reduced_dim(options.get("reduction_factor"), index, hidden)
        if expected_dim is not None and dim != expected_dim:
            raise AdapterError(
                f"{where} has bottleneck dim {dim}, but reduction_factor="
                f"{options.get('reduction_factor')!r} in {CONFIG_FILE} gives {expected_dim}"
            )
        if not 1 <= dim <= min(max_dim, MAX_BOTTLENECK_DIM):
            raise AdapterError(
                f"{where} has bottleneck dim {dim}, above max_bottleneck_dim={max_dim} "
                "given to patch()"
            )
        parts_list = (down, down_bias, up, up_bias)
        if not all(t.is_floating_point() for t in parts_list):
            raise AdapterError(f"{where} holds tensors that are not floating point")
        if not all(torch.isfinite(t).all() for t in parts_list):
            raise AdapterError(f"{where} holds non-finite values (NaN or inf)")
        weights = BottleneckWeights(
            down=down.to(dtype).contiguous(),
            down_bias=down_bias.float().contiguous(),
            up=up.t().to(dtype).contiguous(),
            up_bias=up_bias.float().contiguous(),
        )
        if not (torch.isfinite(weights.down).all() and torch.isfinite(weights.up).all()):
            raise AdapterError(f"{where} holds values too large for the model's {dtype}")
        served[(index, point)] = weights
    return BottleneckAdapter(
        name=name,
        path=path,
        activation=options["non_linearity"].lower(),
        scaling=float(options.get("scaling", 1.0)),
        points=served,
    )


def read_adapterhub_options(path: str) -> dict:
    """The BnConfig options ("config") of an AdapterHub folder that read_adapterhub_adapter has
    validated."""
    _, config = _read_config(path)
    return dict(config["config"])
