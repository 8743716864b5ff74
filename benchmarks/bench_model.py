"""Model benchmark: a mixed-adapter batch through a random-weight Llama, for the base model
alone, PEFT's mixed-adapter batch (adapter_names) and adaptfuse, side by side in one run.

Default shape (DESIGN.md's CPU targets): hidden 1024, intermediate 2816, 8 layers, 16 heads,
8 KV heads, vocab 32000, fp32; 16 sequences of 64-token prompts, 8 adapters of rank 16 on all
7 projections, two sequences per adapter. Prefill of the prompts, and one decode step with a
64-token KV cache. Targets: prefill <= 1.03x the base model, decode step <= 1.15x.

    python benchmarks/bench_model.py [--layers 8] [--repeats 9] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from common import interleaved_medians, random_llama, table, write_result

import adaptfuse


def build(args):
    import peft

    base = random_llama(args.hidden, args.intermediate, args.layers).eval().to(args.device)
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-")
    paths = {}
    for i in range(args.adapters):
        peft_model = peft.get_peft_model(
            copy.deepcopy(base),
            peft.LoraConfig(
                r=args.rank,
                lora_alpha=2 * args.rank,
                target_modules="all-linear",
                init_lora_weights=False,
            ),
        )
        paths[f"tenant-{i}"] = f"{directory}/tenant-{i}"
        peft_model.save_pretrained(paths[f"tenant-{i}"])
        del peft_model
    names = list(paths)
    peft_model = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), paths[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()
    ours = copy.deepcopy(base)
    manager = adaptfuse.patch(ours, max_loras=args.adapters, max_rank=args.rank)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    per_adapter = args.batch // args.adapters
    adapter_names = [names[i // per_adapter] for i in range(args.batch)]
    return base, peft_model, ours, adapter_names


def run(args) -> dict:
    base, peft_model, ours, adapter_names = build(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), generator=gen).to(args.device)
    next_ids = torch.randint(3, 32000, (args.batch, 1), generator=gen).to(args.device)
    results = {}
    with torch.inference_mode():
        prefill = {
            "base": lambda: base(ids),
            "peft": lambda: peft_model(ids, adapter_names=adapter_names),
            "adaptfuse": lambda: ours(ids, adapter_names=adapter_names),
        }
        results["prefill"] = interleaved_medians(
            prefill, repeats=args.repeats, device=args.device, warmup=1
        )
        caches = {
            "base": base(ids, use_cache=True).past_key_values,
            "peft": peft_model(ids, adapter_names=adapter_names, use_cache=True).past_key_values,
            "adaptfuse": ours(ids, adapter_names=adapter_names, use_cache=True).past_key_values,
        }

        def step(model_call, cache):
            # A decode step appends to the cache: crop it back so that every run sees 64 tokens.
            out = model_call(cache)
            cache.crop(-1)  # drop the token just appended (both old and new transformers)
            return out

        decode = {
            "base": lambda: step(lambda c: base(next_ids, past_key_values=c), caches["base"]),
            "peft": lambda: step(
                lambda c: peft_model(next_ids, past_key_values=c, adapter_names=adapter_names),
                caches["peft"],
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
            "rank": args.rank,
            "targets": "all 7 projections",
            "sequences_per_adapter": args.batch // args.adapters,
            "device": args.device,
            "threads": torch.get_num_threads(),
        },
        "timings": results,
        "ratios_to_base": ratios,
        "targets": {"prefill": 1.03, "decode_step": 1.15},
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
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    rows = []
    for phase, timings in result["timings"].items():
        for name, t in timings.items():
            rows.append(
                (
                    phase,
                    name,
                    f"{t['median_us'] / 1e3:.1f}",
                    f"{result['ratios_to_base'][phase][name]:.3f}",
                )
            )
    print(table(rows, ["phase", "candidate", "median ms", "x base"]))
    targets = result["targets"]
    print(f"targets: prefill <= {targets['prefill']}x, decode step <= {targets['decode_step']}x")
    print(f"wrote {write_result('model_llama_fp32', args.device, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
