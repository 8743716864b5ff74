"""Merged checkpoints: a base model folder plus PEFT adapters -> a new model folder whose
weights have the adapters folded in (`adaptfuse merge`).

The merge runs one safetensors shard at a time (read, merge the adapted weights it holds,
write), so peak memory stays near one shard plus the adapters. Each weight gets exactly
what the in-place merge gives it (`mgr.merge({...})` on the same base loaded with
transformers in the checkpoint's dtype, on the same device): the same adapters read the same
way, the same terms (adapters.merge_terms) folded by merge.merge_layer, on the weight seen as
[H_out, H_in] (a transposed view for GPT-2's Conv1D, as LoraLayer.weight_out_in gives it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import torch
from torch import nn

from adaptfuse.adapters import (
    MAX_SUPPORTED_RANK,
    AdapterError,
    LoraAdapter,
    merge_terms,
    read_peft_adapter,
    read_peft_folder,
)
from adaptfuse.merge import MergeOptions, merge_layer

CONFIG_FILE = "config.json"
SINGLE_SHARD = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
PROVENANCE_FILE = "adaptfuse_merge.json"
# Weights in other formats would still hold the unmerged base: never copied (and pickles are
# never opened).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")


class CheckpointError(ValueError):
    """A base folder, adapter or output folder the merge cannot use; the message names it."""


@dataclasses.dataclass
class MergedCheckpoint:
    """What merge_checkpoint wrote: the shards (same names and layout as the base), how many
    weights the adapters changed, the other files copied and the entries left out."""

    out_dir: str
    shards: list[str]
    merged_layers: int
    dtype: torch.dtype
    copied: list[str]
    skipped: list[str]


def parse_adapter_argument(text: str) -> tuple[str, float]:
    """ "DIR" or "DIR:WEIGHT" -> (DIR, WEIGHT); the weight defaults to 1.0. A suffix after the
    last colon that is not a number is part of the path."""
    path, colon, tail = text.rpartition(":")
    if colon and path:
        try:
            weight = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(weight):
            raise CheckpointError(f"adapter {text!r}: the merge weight {tail!r} is not finite")
        return path, weight
    return text, 1.0


def _shard_layout(base_dir: str) -> tuple[list[str], dict[str, str]]:
    """(shard file names in order, tensor key -> shard file name) of a safetensors checkpoint."""
    index_path = os.path.join(base_dir, SHARD_INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path}: not a safetensors index ({error})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(base_dir, s))]
        if missing:
            raise CheckpointError(f"{index_path}: lists shard {missing[0]!r}, which is missing")
        return shards, dict(weight_map)
    single = os.path.join(base_dir, SINGLE_SHARD)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return [SINGLE_SHARD], dict.fromkeys(f.keys(), SINGLE_SHARD)
    others = sorted(f for f in os.listdir(base_dir) if f.endswith(OTHER_WEIGHT_SUFFIXES))
    found = f" (found {', '.join(others)}: pickle files are never opened)" if others else ""
    raise CheckpointError(
        f"{base_dir}: no {SINGLE_SHARD} or {SHARD_INDEX}; only safetensors checkpoints are "
        f"merged{found}"
    )


def _adapted_layers(base_dir: str) -> dict[str, tuple[int, int, bool]]:
    """Module path -> (H_in, H_out, stored transposed) of every layer adaptfuse.patch adapts
    in this model (all nn.Linear / GPT-2 Conv1D except the output head), from the config
    alone: the model is built on the meta device, without weights."""
    import transformers

    from adaptfuse.layers import layer_features
    from adaptfuse.patch import _targets

    try:
        config = transformers.AutoConfig.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{base_dir}: cannot read {CONFIG_FILE} ({error})") from None
    classes = [getattr(transformers, name, None) for name in config.architectures or []]
    model_class = next((c for c in classes if c is not None), None)
    with torch.device("meta"):
        if model_class is not None:
            model = model_class(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    layers = {}
    for path in _targets(model, None):
        module = model.get_submodule(path)
        h_in, h_out = layer_features(module)
        layers[path] = (h_in, h_out, not isinstance(module, nn.Linear))
    return layers


def _prepare_output(base_dir: str, out_dir: str, overwrite: bool) -> None:
    out, base = os.path.realpath(out_dir), os.path.realpath(base_dir)
    if out == base or base.startswith(out + os.sep):
        raise CheckpointError(f"{out_dir}: holds the base folder; write the merge elsewhere")
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: exists and is not a folder")
    if not os.listdir(out_dir):
        return
    if not overwrite:
        raise CheckpointError(f"{out_dir}: exists and is not empty (--force replaces it)")
    # --force deletes the folder: only one that an earlier merge wrote, never anything else.
    if not os.path.isfile(os.path.join(out_dir, PROVENANCE_FILE)):
        raise CheckpointError(
            f"{out_dir}: --force replaces only a folder written by adaptfuse merge "
            f"(with {PROVENANCE_FILE}); remove this one yourself"
        )


def _copy_other_files(base_dir: str, target: str, written: set[str]) -> tuple[list, list]:
    copied, skipped = [], []
    for entry in sorted(os.listdir(base_dir)):
        source = os.path.join(base_dir, entry)
        if entry in written or entry == PROVENANCE_FILE:
            continue
        if not os.path.isfile(source):
            skipped.append(f"{entry}/ (a folder)")
        elif entry.endswith(OTHER_WEIGHT_SUFFIXES) or entry.endswith(".safetensors"):
            skipped.append(f"{entry} (weights outside the checkpoint's safetensors layout)")
        else:
            shutil.copy2(source, os.path.join(target, entry))
            copied.append(entry)
    return copied, skipped


def merge_checkpoint(
    base_dir: str,
    adapters: Sequence[tuple[str, float]],
    out_dir: str,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> MergedCheckpoint:
    """Writes base_dir's checkpoint with the weighted adapters merged in, to out_dir.

    base_dir: a transformers model folder with config.json and safetensors weights (one
    model.safetensors, or shards listed in model.safetensors.index.json). adapters: (PEFT
    folder, merge weight) pairs, merged as mgr.merge({name: weight, ...}) in this order.
    Every adapted weight W [H_out, H_in] becomes W + sum_i weight_i * scale_i * B_i^T A_i,
    computed by ops.merge_ on `device` in the weight's own dtype, bit for bit what the
    in-place merge gives on that device. The output has the same shard names, index and
    dtypes; config, tokenizer and other non-weight files are copied; weights in other
    formats and sub-folders are left out (listed in the result). The folder appears only
    when complete: it is written beside out_dir and renamed at the end.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if not adapters:
        raise CheckpointError("merge needs at least one adapter")
    if not os.path.isfile(os.path.join(base_dir, CONFIG_FILE)):
        raise CheckpointError(f"{base_dir}: no {CONFIG_FILE}; not a transformers model folder")
    _prepare_output(base_dir, out_dir, overwrite)
    shards, shard_of = _shard_layout(base_dir)
    for path, _ in adapters:  # what needs no model fails before the model is built
        problems = _adapter_problems(path)
        if problems:
            raise CheckpointError(problems[0])
    layers = _adapted_layers(base_dir)
    if not layers:
        raise CheckpointError(f"{base_dir}: the model has no layer adaptfuse adapts")
    layer_shapes = {path: (h_in, h_out) for path, (h_in, h_out, _) in layers.items()}
    keys = {path: f"{path}.weight" for path in layers}
    # The adapters are served in the dtype of the first adapted layer, as patch() does.
    first_key = keys[next(iter(layers))]
    if first_key not in shard_of:
        raise CheckpointError(f"{base_dir}: the checkpoint has no tensor {first_key!r}")
    with safe_open(os.path.join(base_dir, shard_of[first_key]), "pt") as f:
        dtype = f.get_slice(first_key)[:1].dtype
    weighted: list[tuple[LoraAdapter, float]] = []
    for i, (path, weight) in enumerate(adapters):
        name = f"{i}:{os.path.basename(os.path.normpath(path))}"
        try:
            adapter = read_peft_adapter(path, name, layer_shapes, MAX_SUPPORTED_RANK, dtype)
        except AdapterError as error:
            raise CheckpointError(str(error)) from None
        weighted.append((adapter, float(weight)))
    merged_paths = [p for p in layers if merge_terms(weighted, p)]
    absent = [keys[p] for p in merged_paths if keys[p] not in shard_of]
    if absent:
        raise CheckpointError(
            f"{base_dir}: the checkpoint has no tensor {absent[0]!r} for an adapted layer "
            f"({len(absent)} adapted weights absent in all)"
        )
    by_shard: dict[str, list[str]] = {}
    for path in merged_paths:
        by_shard.setdefault(shard_of[keys[path]], []).append(path)

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)
    try:
        bar = tqdm(total=len(merged_paths), desc="merging", unit="layer", disable=not progress)
        with bar:
            for shard in shards:
                source = os.path.join(base_dir, shard)
                with safe_open(source, "pt") as f:
                    metadata = f.metadata()
                tensors = load_file(source)  # one shard in memory at a time
                bar.set_postfix_str(shard)
                for path in by_shard.get(shard, []):
                    _merge_weight(tensors[keys[path]], layers[path], weighted, path, device, source)
                    bar.update(1)
                save_file(tensors, os.path.join(staging, shard), metadata=metadata)
                del tensors
        written = set(shards)
        if os.path.isfile(os.path.join(base_dir, SHARD_INDEX)):  # same layout: same index
            shutil.copy2(os.path.join(base_dir, SHARD_INDEX), os.path.join(staging, SHARD_INDEX))
            written.add(SHARD_INDEX)
        copied, skipped = _copy_other_files(base_dir, staging, written)
        _write_provenance(staging, base_dir, adapters, dtype, device, len(merged_paths))
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergedCheckpoint(out_dir, shards, len(merged_paths), dtype, copied, skipped)


def _adapter_problems(path: str) -> list[str]:
    try:
        return read_peft_folder(path).all_problems
    except AdapterError as error:
        return [str(error)]


def _merge_weight(stored, layer, weighted, path, device, source) -> None:
    """Folds the adapters' terms into one stored weight, in place: stored is [H_out, H_in]
    (nn.Linear) or [H_in, H_out] (Conv1D, merged through its transposed view)."""
    h_in, h_out, transposed = layer
    expected = (h_in, h_out) if transposed else (h_out, h_in)
    if tuple(stored.shape) != expected:
        raise CheckpointError(
            f"{source}: {path}.weight is {tuple(stored.shape)}, but the model's config gives "
            f"the layer {expected}"
        )
    on_device = stored.to(device)
    W = on_device.t() if transposed else on_device
    try:  # no unmerge here: the record is dropped
        merge_layer(path, W, merge_terms(weighted, path), MergeOptions())
    except (RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: {str(error).splitlines()[0]}") from None
    if on_device is not stored:
        stored.copy_(on_device)


def _write_provenance(directory, base_dir, adapters, dtype, device, merged_layers) -> None:
    import adaptfuse

    document = {
        "base": os.path.abspath(base_dir),
        "adapters": [{"path": os.path.abspath(p), "weight": w} for p, w in adapters],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "merged_layers": merged_layers,
        "adaptfuse": adaptfuse.__version__,
    }
    with open(os.path.join(directory, PROVENANCE_FILE), "w") as f:
        json.dump(document, f, indent=2)


__all__ = ["CheckpointError", "MergedCheckpoint", "merge_checkpoint", "parse_adapter_argument"]
