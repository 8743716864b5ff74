"""Model benchmark: a mixed-adapter batch through a random-weight Llama, for the base model
alone, PEFT's mixed-adapter batch (adapter_names) and adaptfuse, side by side in one run.

Presets (DESIGN.md's targets):
- cpu (default): hidden 1024, intermediate 2816, 8 layers, 16 heads, 8 KV heads, vocab
  32000, fp32; 16 sequences of 64-token prompts, 8 adapters of rank 16 on all 7
  projections, two sequences per adapter. Prefill <= 1.03x the base model, one decode step
  with a 64-token KV cache <= 1.15x.
- llama-3-8b: Llama-3-8B's shapes (4096 / 14336, 32 layers, 32 heads, 8 KV heads, vocab
  128256) in bf16, 32 sequences each with its own rank-16 adapter. On CUDA the decode step
  is also timed as CUDA-graph replays (static KV cache; adaptfuse's adapters through a
  StaticAssignment): <= 1.10x (base step x (1 + adapter bytes / weight bytes)) and >= 5x
  faster than PEFT's mixed-adapter batch.

Every ratio comes with a 95% bootstrap interval over the interleaved rounds: on a shared
machine the median ratio moves by several percent from run to run, and the interval says how
far this run's could be from the machine's steady figure.

    python benchmarks/bench_model.py [--preset cpu|llama-3-8b] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from common import interleaved_medians, random_llama, ratio_interval, table, write_result

import adaptfuse
from adaptfuse import graphs

PRESETS = {
    "cpu": dict(
        hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8, vocab=32000,
        dtype="float32", batch=16, adapters=8, targets={"prefill": 1.03, "decode_step": 1.15},
    ),
    "llama-3-8b": dict(
        hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
        dtype="bfloat16", batch=32, adapters=32, targets={"decode_step_graphs": 1.10},
    ),
}


def build(args):
    import peft

    dtype = getattr(torch, args.dtype)
    base = random_llama(
        args.hidden, args.intermediate, args.layers, args.device, dtype,
        heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
    ).eval()
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-")
    names = [f"tenant-{i}" for i in range(args.adapters)]
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False
    )
    # One PeftModel holds every adapter (PEFT's mixed batch), and saves each to its folder.
    peft_model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.save_pretrained(directory)
    peft_model.eval()
    ours = copy.deepcopy(base)
    manager = adaptfuse.patch(ours, max_loras=args.adapters, max_rank=args.rank)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    begin = time.perf_counter()
    for name in names:
        manager.load_adapter(f"{directory}/{name}", adapter_name=name)
    sync()
    load_ms = (time.perf_counter() - begin) * 1e3 / len(names)
    per_adapter = args.batch // args.adapters
    adapter_names = [names[i // per_adapter] for i in range(args.batch)]
    return base, peft_model, ours, manager, adapter_names, load_ms


def byte_bound(base, manager, adapter_names, rank: int) -> dict:
    """What a decode step must read: every weight but the embedding table (a gather), and
    each distinct adapter's A and B in every adapted layer."""
    element = next(base.parameters()).element_size()
    embedding = base.get_input_embeddings().weight
    weight_bytes = sum(p.numel() for p in base.parameters()) * element - embedding.numel() * element
    per_adapter = sum(
        rank * (layer.in_features + layer.out_features) for layer in manager.layers.values()
    )
    adapter_bytes = len(set(adapter_names)) * per_adapter * element
    return {
        "weight_bytes": weight_bytes,
        "adapter_bytes": adapter_bytes,
        "adapter_over_weight": adapter_bytes / weight_bytes,
    }


def graph_decode(model, config, ids, next_ids, **adapter_kwargs):
    """One decode step over a static KV cache holding the prompt, captured as a CUDA graph.
    Returns (replay, logits of the step) or raises what capture raised."""
    import transformers

    prompt = ids.shape[1]
    cache = transformers.StaticCache(config=config, max_cache_len=prompt + 1)
    positions = torch.arange(prompt, device=ids.device)
    model(ids, past_key_values=cache, cache_position=positions, use_cache=True, **adapter_kwargs)
    position = torch.tensor([prompt], device=ids.device)
    outputs = {}

    def step():
        graphs.rewind_static_cache(cache, prompt)  # recorded: every replay writes `prompt`
        outputs["logits"] = model(
            next_ids, past_key_values=cache, cache_position=position, use_cache=True,
            **adapter_kwargs,
        ).logits

    return graphs.capture(step).replay, outputs


def run(args) -> dict:
    base, peft_model, ours, manager, adapter_names, load_ms = build(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=gen).to(args.device)
    next_ids = torch.randint(3, args.vocab, (args.batch, 1), generator=gen).to(args.device)
    results = {}
    checks = {}
    failures = {}
    with torch.inference_mode():
        no_adapter = [None] * args.batch
        prefill = {
            "base": lambda: base(ids),
            "peft": lambda: peft_model(ids, adapter_names=adapter_names),
            "adaptfuse": lambda: ours(ids, adapter_names=adapter_names),
            # The patched model with every request on the base model: its layers compute the
            # base matmul their own way (on the CPU, block by block), so adaptfuse over this is
            # what the adapters themselves cost.
            "adaptfuse_no_adapter": lambda: ours(ids, adapter_names=no_adapter),
        }
        results["prefill"] = interleaved_medians(
            prefill, repeats=args.repeats, device=args.device, warmup=1
        )
        checks["no_adapter_logits_bit_identical_to_base"] = bool(
            torch.equal(ours(ids, adapter_names=no_adapter).logits, base(ids).logits)
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
        eager_logits = {
            "peft": step(
                lambda c: peft_model(next_ids, past_key_values=c, adapter_names=adapter_names),
                caches["peft"],
            ).logits.float(),
            "adaptfuse": step(
                lambda c: ours(next_ids, past_key_values=c, adapter_names=adapter_names),
                caches["adaptfuse"],
            ).logits.float(),
        }
        if args.graphs:
            assignment = manager.static_assignment(args.batch)
            assignment.assign(adapter_names)
            models = {  # PEFT last: a failed capture may leave the stream unusable
                "base": (base, {}),
                "adaptfuse": (ours, {"adapter_names": assignment}),
                "peft": (peft_model, {"adapter_names": adapter_names}),
            }
            replays = {}
            for name, (model, kwargs) in models.items():
                try:
                    replay, outputs = graph_decode(model, base.config, ids, next_ids, **kwargs)
                except Exception as error:  # noqa: BLE001 - recorded: PEFT's batch may not capture
                    failures[name] = f"{type(error).__name__}: {str(error)[:300]}"
                    torch.cuda.synchronize()
                    continue
                replays[name] = replay
                replay()
                torch.cuda.synchronize()
                if name in eager_logits:
                    got = outputs["logits"].float()
                    want = eager_logits[name]
                    checks[f"{name}_graph_vs_eager_rel"] = float((got - want).norm() / want.norm())
            if replays:
                results["decode_step_graphs"] = interleaved_medians(
                    replays, repeats=args.repeats * 5, device=args.device, warmup=3
                )
        want = eager_logits["peft"]
        error = (eager_logits["adaptfuse"] - want).norm() / want.norm()
        checks["adaptfuse_vs_peft_rel"] = float(error)
    ratios = {
        phase: {
            name: t["median_us"] / timings["base"]["median_us"]
            for name, t in timings.items()
            if "base" in timings
        }
        for phase, timings in results.items()
    }
    intervals = {
        phase: {
            name: ratio_interval(t["samples_us"], timings["base"]["samples_us"])
            for name, t in timings.items()
            if "base" in timings and "samples_us" in t
        }
        for phase, timings in results.items()
    }
    bound = byte_bound(base, manager, adapter_names, args.rank)
    targets = dict(PRESETS[args.preset]["targets"])
    summary = {}
    own_base = results["prefill"].get("adaptfuse_no_adapter")
    if own_base is not None:
        adapters = results["prefill"]["adaptfuse"]
        summary["prefill_adapter_cost"] = adapters["median_us"] / own_base["median_us"]
        summary["prefill_adapter_cost_95_interval"] = ratio_interval(
            adapters["samples_us"], own_base["samples_us"]
        )
    if "decode_step_graphs" in results and "base" in results["decode_step_graphs"]:
        allowed = 1.10 * (1 + bound["adapter_over_weight"])
        graph_times = results["decode_step_graphs"]
        summary["decode_graphs_ratio"] = ratios["decode_step_graphs"].get("adaptfuse")
        summary["decode_graphs_allowed_ratio"] = allowed
        peft_us = results["decode_step"]["peft"]["median_us"]  # PEFT's eager mixed batch
        if "adaptfuse" in graph_times:
            summary["speedup_over_peft_eager"] = peft_us / graph_times["adaptfuse"]["median_us"]
        targets = {"decode_step_graphs": round(allowed, 4), "speedup_over_peft": 5.0}
    return {
        "setup": {
            "preset": args.preset,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "vocab": args.vocab,
            "dtype": args.dtype,
            "batch": args.batch,
            "prompt": args.prompt,
            "adapters": args.adapters,
            "rank": args.rank,
            "targets": "all 7 projections",
            "sequences_per_adapter": args.batch // args.adapters,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "cpu_kernels": adaptfuse.cpu_kernels(),
            "graphs": bool(args.graphs),
        },
        "timings": results,
        "ratios_to_base": ratios,
        "ratio_95_intervals": intervals,
        "byte_bound": bound,
        "load_ms_per_adapter": load_ms,
        "checks": checks,
        "capture_failures": failures,
        "summary": summary,
        "targets": targets,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    sizes = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "batch", "adapters")
    for option in sizes:
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--graphs", action=argparse.BooleanOptionalAction, default=None,
        help="also time the decode step as CUDA-graph replays (default: on CUDA)",
    )
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    for option, value in PRESETS[args.preset].items():
        if option != "targets" and getattr(args, option) is None:
            setattr(args, option, value)
    if args.graphs is None:
        args.graphs = args.device.startswith("cuda")
    if args.graphs and not args.device.startswith("cuda"):
        parser.error("--graphs needs --device cuda")
    result = run(args)
    rows = []
    for phase, timings in result["timings"].items():
        for name, t in timings.items():
            low, high = result["ratio_95_intervals"][phase].get(name, (float("nan"),) * 2)
            rows.append(
                (
                    phase,
                    name,
                    f"{t['median_us'] / 1e3:.2f}",
                    f"{result['ratios_to_base'][phase].get(name, float('nan')):.3f}",
                    f"{low:.3f}-{high:.3f}",
                )
            )
    print(table(rows, ["phase", "candidate", "median ms", "x base", "95% interval"]))
    print(f"targets: {result['targets']}  summary: {result['summary']}")
    print(f"checks: {result['checks']}  load {result['load_ms_per_adapter']:.1f} ms/adapter")
    for name, failure in result["capture_failures"].items():
        print(f"capture failed for {name}: {failure}")
    kind = "model_llama_fp32" if args.preset == "cpu" else f"model_{args.preset}_{args.dtype}"
    print(f"wrote {write_result(kind, args.device, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
