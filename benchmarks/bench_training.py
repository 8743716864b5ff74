"""Training benchmark: one step (forward, backward, AdamW) training 8 adapters in one mixed
batch with adaptfuse, against PEFT training one adapter on the whole batch and PEFT training
the 8 adapters one after another on their own rows, side by side in one run.

Default shape (DESIGN.md's CPU training target): Llama hidden 1024, intermediate 2816,
4 layers, 16 heads, 8 KV heads, vocab 32000, fp32; 16 sequences of 64 tokens; rank 16 on
all 7 projections; 8 adapters on two sequences each. Target: the mixed step <= 1.05x PEFT's
single-adapter step.

    python benchmarks/bench_training.py [--layers 4] [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import interleaved_medians, random_llama, table, write_result

import adaptfuse


def build(args):
    import peft

    base = random_llama(args.hidden, args.intermediate, args.layers).to(args.device).train()
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    names = [f"tenant-{i}" for i in range(args.adapters)]

    peft_single = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora)).train()
    peft_many = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(**lora), adapter_name=names[0]
    )
    for name in names[1:]:
        peft_many.add_adapter(name, peft.LoraConfig(**lora))
    peft_many.train()
    ours = copy.deepcopy(base)
    mgr = adaptfuse.patch(ours, max_loras=args.adapters, max_rank=args.rank)
    for name in names:
        mgr.add_adapter(name, **lora)
    ours.train()
    return base, peft_single, peft_many, ours, mgr, names


def run(args) -> dict:
    base, peft_single, peft_many, ours, mgr, names = build(args)
    gen = torch.Generator().manual_seed(1)
    batch = args.adapters * args.rows_per_adapter
    input_ids = torch.randint(3, 32000, (batch, args.tokens), generator=gen).to(args.device)
    row_names = [n for n in names for _ in range(args.rows_per_adapter)]

    single_opt = torch.optim.AdamW([p for p in peft_single.parameters() if p.requires_grad])
    ours_opt = torch.optim.AdamW([{"params": mgr.parameters(n), "lr": 1e-4} for n in names])
    many_opts = {}
    for name in names:
        params = [p for k, p in peft_many.named_parameters() if f".{name}." in k]
        many_opts[name] = torch.optim.AdamW(params)

    def peft_one_adapter_all_rows():
        peft_single(input_ids=input_ids, labels=input_ids).loss.backward()
        single_opt.step()
        single_opt.zero_grad()

    def peft_loop_over_adapters():
        for i, name in enumerate(names):
            peft_many.set_adapter(name)
            rows = slice(i * args.rows_per_adapter, (i + 1) * args.rows_per_adapter)
            peft_many(input_ids=input_ids[rows], labels=input_ids[rows]).loss.backward()
            many_opts[name].step()
            many_opts[name].zero_grad()

    def adaptfuse_mixed():
        logits = ours(input_ids, adapter_names=row_names).logits
        adaptfuse.per_adapter_loss(logits, input_ids, row_names).backward()
        ours_opt.step()
        ours_opt.zero_grad()

    timings = interleaved_medians(
        {
            "peft_one_adapter_all_rows": peft_one_adapter_all_rows,
            "peft_loop_over_adapters": peft_loop_over_adapters,
            "adaptfuse_mixed_adapters": adaptfuse_mixed,
        },
        repeats=args.repeats,
        device=args.device,
        warmup=1,
    )
    single = timings["peft_one_adapter_all_rows"]["median_us"]
    ratio = timings["adaptfuse_mixed_adapters"]["median_us"] / single
    return {
        "setup": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "sequences": batch,
            "tokens": args.tokens,
            "adapters": args.adapters,
            "rank": args.rank,
            "dtype": "float32",
            "device": args.device,
            "threads": torch.get_num_threads(),
        },
        "timings": timings,
        "ratio_adaptfuse_over_peft_single": ratio,
        "ratio_peft_loop_over_peft_single": timings["peft_loop_over_adapters"]["median_us"]
        / single,
        "target_ratio": 1.05,
        "meets_target": ratio <= 1.05,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rows-per-adapter", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    path = write_result("training_llama_fp32", args.device, result, args.out_dir)
    rows = [
        (name, f"{t['median_us'] / 1e3:.1f}", f"{t['min_us'] / 1e3:.1f}")
        for name, t in result["timings"].items()
    ]
    print(table(rows, ["candidate", "median ms", "min ms"]))
    print(
        f"adaptfuse (8 adapters) / PEFT (one adapter) = "
        f"{result['ratio_adaptfuse_over_peft_single']:.3f} (target <= 1.05); "
        f"PEFT loop / PEFT one = {result['ratio_peft_loop_over_peft_single']:.3f}"
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
