"""Bottleneck against LoRA: what each kind costs per request in a mixed batch, at equal
parameter budgets, side by side with the base model in one run.

For each bottleneck dim (seq_bn: one adapter on every block's output, relu) the LoRA rank on
all 7 projections whose parameter count is closest to the bottleneck's is chosen; 8 adapters
of each kind, two sequences per adapter, DESIGN.md's CPU Llama (hidden 1024, intermediate
2816, 8 layers, 16 heads, 8 KV heads, fp32). Prefill of 64-token prompts and one decode step
with a 64-token KV cache, each as a ratio to the base model (targets for seq_bn at dim 64:
prefill <= 1.03x, decode <= 1.10x).

    python benchmarks/bench_adapter_kinds.py [--dims 16 32 64] [--layers 8] [--repeats 9]

(`adaptfuse bench kinds` runs it and plots the ratios.) The quality half of the comparison
(both kinds trained on held-out tasks) is bench_adapter_quality.py (`adaptfuse bench quality`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch
from bench_bottleneck import random_seq_bn, save_seq_bn
from common import interleaved_medians, random_llama, table, write_result
from safetensors.torch import save_file

import adaptfuse

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(H_in, H_out) of each Llama projection."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def equal_budget_rank(config, dim: int) -> int:
    """The LoRA rank on all 7 projections closest in parameters to a seq_bn of `dim`."""
    hidden = config.hidden_size
    bottleneck = 2 * dim * hidden + dim + hidden
    per_rank = sum(h_in + h_out for h_in, h_out in projection_shapes(config).values())
    return max(1, round(bottleneck / per_rank))


def save_lora(directory: str, config, rank: int, gen) -> None:
    tensors = {}
    for block in range(config.num_hidden_layers):
        for name, (h_in, h_out) in projection_shapes(config).items():
            module = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{block}.{module}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h_in, generator=gen) * h_in**-0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(h_out, rank, generator=gen) * 0.02
    os.makedirs(directory, exist_ok=True)
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none"}
    adapter_config["target_modules"] = list(PROJECTIONS)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))


def measure(base, models: dict, names: dict, args) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), generator=gen)
    next_ids = torch.randint(3, 32000, (args.batch, 1), generator=gen)
    timings = {}
    with torch.inference_mode():
        prefill = {"base": lambda: base(ids)}
        for kind, model in models.items():
            prefill[kind] = lambda m=model, k=kind: m(ids, adapter_names=names[k])
        timings["prefill"] = interleaved_medians(prefill, args.repeats, "cpu", warmup=1)
        caches = {"base": base(ids, use_cache=True).past_key_values}
        for kind, model in models.items():
            caches[kind] = model(ids, adapter_names=names[kind], use_cache=True).past_key_values

        def step(call, cache):
            out = call(cache)
            cache.crop(-1)  # every run sees the same 64-token cache
            return out

        decode = {"base": lambda: step(lambda c: base(next_ids, past_key_values=c), caches["base"])}
        for kind, model in models.items():
            decode[kind] = lambda m=model, k=kind: step(
                lambda c: m(next_ids, past_key_values=c, adapter_names=names[k]), caches[k]
            )
        timings["decode_step"] = interleaved_medians(decode, args.repeats * 3, "cpu", warmup=2)
    return timings


def run(args) -> dict:
    base = random_llama(args.hidden, args.intermediate, args.layers).eval()
    config = base.config
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-kinds-")
    gen = torch.Generator().manual_seed(7)
    per_adapter = args.batch // args.adapters
    points = []
    for dim in args.dims:
        rank = equal_budget_rank(config, dim)
        bottleneck_model = copy.deepcopy(base)
        bottleneck_manager = adaptfuse.patch(
            bottleneck_model, max_loras=args.adapters, max_bottleneck_dim=dim
        )
        lora_model = copy.deepcopy(base)
        lora_manager = adaptfuse.patch(lora_model, max_loras=args.adapters, max_rank=rank)
        names = {"bottleneck": [], "lora": []}
        for i in range(args.adapters):
            path = os.path.join(directory, f"bn{dim}-{i}")
            save_seq_bn(path, random_seq_bn(args.hidden, dim, args.layers, gen), args.hidden, dim)
            bottleneck_manager.load_adapter(path, adapter_name=f"bn-{i}")
            path = os.path.join(directory, f"lora{rank}-{i}")
            save_lora(path, config, rank, gen)
            lora_manager.load_adapter(path, adapter_name=f"lora-{i}")
        names["bottleneck"] = [f"bn-{r // per_adapter}" for r in range(args.batch)]
        names["lora"] = [f"lora-{r // per_adapter}" for r in range(args.batch)]
        timings = measure(base, {"bottleneck": bottleneck_model, "lora": lora_model}, names, args)
        hidden = config.hidden_size
        points.append(
            {
                "dim": dim,
                "lora_rank": rank,
                "bottleneck_parameters_per_block": 2 * dim * hidden + dim + hidden,
                "lora_parameters_per_block": rank
                * sum(a + b for a, b in projection_shapes(config).values()),
                "timings": timings,
                "ratios_to_base": {
                    phase: {n: t["median_us"] / ts["base"]["median_us"] for n, t in ts.items()}
                    for phase, ts in timings.items()
                },
            }
        )
        del bottleneck_model, lora_model
    return {
        "setup": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "dtype": "float32",
            "batch": args.batch,
            "prompt": args.prompt,
            "adapters_per_kind": args.adapters,
            "sequences_per_adapter": per_adapter,
            "bottleneck": "seq_bn (block output), relu",
            "lora": "all 7 projections, rank of equal parameter budget",
            "device": "cpu",
            "threads": torch.get_num_threads(),
        },
        "points": points,
        "targets": {"bottleneck_dim_64": {"prefill": 1.03, "decode_step": 1.10}},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    rows = []
    for point in result["points"]:
        for phase, ratios in point["ratios_to_base"].items():
            rows.append(
                (
                    point["dim"],
                    point["lora_rank"],
                    phase,
                    f"{ratios['bottleneck']:.3f}",
                    f"{ratios['lora']:.3f}",
                )
            )
    print(table(rows, ["bn dim", "LoRA r", "phase", "bottleneck x base", "LoRA x base"]))
    print(f"wrote {write_result('kinds_llama_fp32', 'cpu', result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
