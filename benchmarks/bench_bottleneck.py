"""Bottleneck benchmark: a batch whose requests each name their own AdapterHub-style
bottleneck adapter (seq_bn: one adapter on every block's output), through a random-weight
Llama, for the base model alone, adaptfuse (one batch, BGMV/CPU ops over the slot banks) and
the per-adapter loop AdapterHub's BatchSplit runs (each adapter applied to its rows' slice in a
Python loop at every block, with plain torch matmuls), side by side in one run.

Default shape (DESIGN.md's CPU bottleneck target): hidden 1024, intermediate 2816, 8 layers, 16
heads, 8 KV heads, vocab 32000, fp32; 16 sequences of 64-token prompts, 8 adapters of dim 64,
two sequences per adapter. Prefill of the prompts, and one decode step with a 64-token KV cache.
Targets: prefill <= 1.03x the base model, decode step <= 1.10x.

    python benchmarks/bench_bottleneck.py [--layers 8] [--dim 64] [--repeats 9]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch
from common import interleaved_medians, random_llama, table, write_result
from safetensors.torch import save_file

import adaptfuse
from adaptfuse import reference


def random_seq_bn(hidden: int, dim: int, layers: int, gen) -> dict[str, torch.Tensor]:
    """One seq_bn adapter's tensors under AdapterHub's key names."""
    tensors = {}
    for index in range(layers):
        key = f"model.layers.{index}.output_adapters.adapters.a"
        tensors[f"{key}.adapter_down.0.weight"] = 0.02 * torch.randn(dim, hidden, generator=gen)
        tensors[f"{key}.adapter_down.0.bias"] = 0.02 * torch.randn(dim, generator=gen)
        tensors[f"{key}.adapter_up.weight"] = 0.02 * torch.randn(hidden, dim, generator=gen)
        tensors[f"{key}.adapter_up.bias"] = 0.02 * torch.randn(hidden, generator=gen)
    return tensors


def save_seq_bn(directory: str, tensors: dict, hidden: int, dim: int) -> None:
    """The folder AdapterHub's save_adapter(..., use_safetensors=True) writes for seq_bn."""
    os.makedirs(directory, exist_ok=True)
    config = {
        "mh_adapter": False,
        "output_adapter": True,
        "original_ln_before": True,
        "original_ln_after": True,
        "residual_before_ln": True,
        "is_parallel": False,
        "scaling": 1.0,
        "non_linearity": "relu",
        "reduction_factor": hidden / dim,
        "ln_before": False,
        "ln_after": False,
        "use_gating": False,
        "leave_out": [],
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"config": config, "hidden_size": hidden, "version": "adapters.1.3.0"}, f)
    save_file(tensors, os.path.join(directory, "adapter.safetensors"))


def batch_split_model(base, adapters: list[dict], rows_of: list[list[int]]):
    """AdapterHub's BatchSplit: at each block output, a Python loop over the adapters, each
    applied (reference.bottleneck, in fp32) to the rows of the batch that name it."""
    model = copy.deepcopy(base)
    for index, block in enumerate(model.model.layers):
        key = f"model.layers.{index}.output_adapters.adapters.a"

        def hook(module, args, output, key=key):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            for tensors, rows in zip(adapters, rows_of, strict=True):
                part = h[rows]
                delta = reference.bottleneck(
                    part.reshape(-1, part.shape[-1]),
                    tensors[f"{key}.adapter_down.0.weight"],
                    tensors[f"{key}.adapter_down.0.bias"],
                    tensors[f"{key}.adapter_up.weight"],
                    tensors[f"{key}.adapter_up.bias"],
                    "relu",
                    1.0,
                    dtype=h.dtype,
                )
                h[rows] = part + delta.view(part.shape)
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        block.register_forward_hook(hook)
    return model


def build(args):
    base = random_llama(args.hidden, args.intermediate, args.layers).eval().to(args.device)
    gen = torch.Generator().manual_seed(7)
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-bn-")
    adapters = [
        random_seq_bn(args.hidden, args.dim, args.layers, gen) for _ in range(args.adapters)
    ]
    names = [f"tenant-{i}" for i in range(args.adapters)]
    ours = copy.deepcopy(base)
    manager = adaptfuse.patch(ours, max_loras=args.adapters, max_bottleneck_dim=args.dim)
    for name, tensors in zip(names, adapters, strict=True):
        save_seq_bn(os.path.join(directory, name), tensors, args.hidden, args.dim)
        manager.load_adapter(os.path.join(directory, name), adapter_name=name)
    per_adapter = args.batch // args.adapters
    adapter_names = [names[i // per_adapter] for i in range(args.batch)]
    rows_of = [[r for r, n in enumerate(adapter_names) if n == name] for name in names]
    loop = batch_split_model(
        base, [{k: t.to(args.device) for k, t in a.items()} for a in adapters], rows_of
    )
    return base, loop, ours, adapter_names


def run(args) -> dict:
    base, loop, ours, adapter_names = build(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), generator=gen).to(args.device)
    next_ids = torch.randint(3, 32000, (args.batch, 1), generator=gen).to(args.device)
    results = {}
    with torch.inference_mode():
        # The two adapter paths compute the same function: check before timing.
        drift = (ours(ids, adapter_names=adapter_names).logits - loop(ids).logits).abs().max()
        prefill = {
            "base": lambda: base(ids),
            "adapterhub_batch_split": lambda: loop(ids),
            "adaptfuse": lambda: ours(ids, adapter_names=adapter_names),
        }
        results["prefill"] = interleaved_medians(
            prefill, repeats=args.repeats, device=args.device, warmup=1
        )
        caches = {
            "base": base(ids, use_cache=True).past_key_values,
            "adapterhub_batch_split": loop(ids, use_cache=True).past_key_values,
            "adaptfuse": ours(ids, adapter_names=adapter_names, use_cache=True).past_key_values,
        }

        def step(model_call, cache):
            out = model_call(cache)
            cache.crop(-1)  # every run sees the same 64-token cache
            return out

        decode = {
            "base": lambda: step(lambda c: base(next_ids, past_key_values=c), caches["base"]),
            "adapterhub_batch_split": lambda: step(
                lambda c: loop(next_ids, past_key_values=c), caches["adapterhub_batch_split"]
            ),
            "adaptfuse": lambda: step(
                lambda c: ours(next_ids, past_key_values=c, adapter_names=adapter_names),
                caches["adaptfuse"],
            ),
        }
        results["decode_step"] = interleaved_medians(
            decode, repeats=args.repeats * 3, device=args.device, warmup=2
        )
    ratios = {
        phase: {name: t["median_us"] / timings["base"]["median_us"] for name, t in timings.items()}
        for phase, timings in results.items()
    }
    return {
        "setup": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": 16,
            "kv_heads": 8,
            "vocab": 32000,
            "dtype": "float32",
            "batch": args.batch,
            "prompt": args.prompt,
            "adapters": args.adapters,
            "bottleneck": "seq_bn (block output), relu",
            "dim": args.dim,
            "sequences_per_adapter": args.batch // args.adapters,
            "device": args.device,
            "threads": torch.get_num_threads(),
        },
        "max_logit_difference_adaptfuse_vs_batch_split": float(drift),
        "timings": results,
        "ratios_to_base": ratios,
        "targets": {"prefill": 1.03, "decode_step": 1.10},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    rows = []
    for phase, timings in result["timings"].items():
        for name, t in timings.items():
            ratio = result["ratios_to_base"][phase][name]
            rows.append((phase, name, f"{t['median_us'] / 1e3:.1f}", f"{ratio:.3f}"))
    print(table(rows, ["phase", "candidate", "median ms", "x base"]))
    targets = result["targets"]
    print(f"targets: prefill <= {targets['prefill']}x, decode step <= {targets['decode_step']}x")
    drift = result["max_logit_difference_adaptfuse_vs_batch_split"]
    print(f"max logit difference, adaptfuse vs the loop: {drift:.2e}")
    kind = f"bottleneck_llama_dim{args.dim}_fp32"
    print(f"wrote {write_result(kind, args.device, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
