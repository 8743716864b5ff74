"""Merge benchmark, two parts.

record: merge_ + unmerge_ of one adapter into a weight, the share of elements the
exact-restore record must hold, and the record's size as a fraction of W, at three sizes of
delta relative to W (DESIGN.md's reference points: mean |delta| / mean |W| = 0.006, 0.06, 0.3).

swap: unmerge one adapter and merge another across every adapted layer of a random Llama
(rank 16 on all 7 projections), against the byte bound (each pass reads and writes W once:
4 x W bytes at the copy bandwidth measured in the same run) and side by side with PEFT's
unmerge_adapter / merge_adapter of the same two adapters. Also how far PEFT's base weights
have drifted after the swaps (adaptfuse's: not at all). Presets: "8b" is Llama-3-8B's shapes
(32 layers, 4096 / 14336, GQA 32/8) for a GPU; "cpu" is DESIGN.md's CPU model (8 layers,
1024 / 2816).

    python benchmarks/bench_merge.py [--device cpu|cuda] [--dtype bfloat16] [--shape 4096 4096]
        [--part record|swap|all] [--preset cpu|8b]
"""

from __future__ import annotations

import argparse

import torch
from common import copy_bandwidth, interleaved_medians, random_llama, table, write_result

import adaptfuse
from adaptfuse import ops, reference

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    h_out, h_in = args.shape
    W = (torch.randn(h_out, h_in, generator=gen) * 0.02).to(dtype).to(device)
    A = [(torch.randn(args.rank, h_in, generator=gen) * 0.1).to(dtype).to(device)]
    B = [(torch.randn(args.rank, h_out, generator=gen) * 0.1).to(dtype).to(device)]
    unit_delta = reference.merge_delta([a.cpu() for a in A], [b.cpu() for b in B], [1.0])
    w_mean = W.double().abs().mean().item()
    rows, points = [], []
    for ratio in (0.006, 0.06, 0.3):
        coefficient = ratio * w_mean / unit_delta.abs().mean().item()
        work = W.clone()
        record = ops.merge_(work, A, B, [coefficient])
        ops.unmerge_(work, A, B, [coefficient], record)
        assert torch.equal(
            work.view(torch.int16 if dtype != torch.float32 else torch.int32),
            W.view(torch.int16 if dtype != torch.float32 else torch.int32),
        )
        holder = {}

        def merge_then_unmerge(work=work, coefficient=coefficient, holder=holder):
            holder["record"] = ops.merge_(work, A, B, [coefficient])
            ops.unmerge_(work, A, B, [coefficient], holder["record"])

        timing = interleaved_medians(
            {"merge+unmerge": merge_then_unmerge}, repeats=args.repeats, device=device, warmup=1
        )
        point = {
            "mean_abs_delta_over_w": ratio,
            "mismatching_fraction": record.num_entries / W.numel(),
            "escapes": record.escape_bits.numel(),
            "record_fraction_of_w_bytes": record.fraction_of(W),
            "merge_plus_unmerge_us": timing["merge+unmerge"]["median_us"],
            "bytes_moved_per_pass": 2 * W.numel() * W.element_size(),
        }
        points.append(point)
        rows.append(
            (
                ratio,
                f"{point['mismatching_fraction']:.2%}",
                f"{point['record_fraction_of_w_bytes']:.2%}",
                point["escapes"],
                f"{point['merge_plus_unmerge_us'] / 1e3:.1f}",
            )
        )
    print(
        table(rows, ["|delta|/|W|", "mismatching", "record/W bytes", "escapes", "merge+unmerge ms"])
    )
    return {
        "setup": {
            "shape": [h_out, h_in],
            "rank": args.rank,
            "dtype": args.dtype,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "points": points,
        "target_record_fraction_at_5pct": 0.10,
    }


PRESETS = {  # hidden, intermediate, layers, heads, kv heads
    "cpu": (1024, 2816, 8, 16, 8),
    "8b": (4096, 14336, 32, 32, 8),
}


def swap(args) -> dict:
    import copy
    import tempfile

    import peft

    device, dtype = args.device, DTYPES[args.dtype]
    hidden, intermediate, layers, heads, kv_heads = PRESETS[args.preset]
    model = random_llama(hidden, intermediate, layers, device, dtype, heads, kv_heads).eval()
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=projections)
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **config), "first"
    )
    peft_model.add_adapter("second", peft.LoraConfig(init_lora_weights=False, **config))
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-merge-")
    peft_model.save_pretrained(directory)  # each named adapter in its own subfolder
    manager = adaptfuse.patch(model, max_loras=2, max_rank=args.rank)
    manager.load_adapter(f"{directory}/first", adapter_name="first")
    manager.load_adapter(f"{directory}/second", adapter_name="second")
    weights = [layer.weight_out_in() for layer in manager.layers.values()]
    w_bytes = sum(w.numel() * w.element_size() for w in weights)
    original = [w.clone() for w in weights]
    peft_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    peft_original = [m.get_base_layer().weight.detach().clone() for m in peft_layers]

    state = {"adaptfuse": "first", "peft": "first"}
    manager.merge("first")
    peft_model.base_model.merge_adapter(["first"])

    def adaptfuse_swap():
        state["adaptfuse"] = "second" if state["adaptfuse"] == "first" else "first"
        manager.unmerge()
        manager.merge(state["adaptfuse"])

    def peft_swap():
        state["peft"] = "second" if state["peft"] == "first" else "first"
        peft_model.base_model.unmerge_adapter()
        peft_model.base_model.merge_adapter([state["peft"]])

    bandwidth = copy_bandwidth(device, args.repeats)
    timing = interleaved_medians(
        {"adaptfuse": adaptfuse_swap, "peft": peft_swap}, args.repeats, device, warmup=1
    )
    swaps = args.repeats + 1
    manager.unmerge()
    peft_model.base_model.unmerge_adapter()
    drifted = sum(
        int((m.get_base_layer().weight.detach() != w).sum())
        for m, w in zip(peft_layers, peft_original, strict=True)
    )
    changed = sum(int((w != o).sum()) for w, o in zip(weights, original, strict=True))
    byte_bound_us = 4 * w_bytes / bandwidth * 1e6
    result = {
        "preset": args.preset,
        "shapes": {"hidden": hidden, "intermediate": intermediate, "layers": layers},
        "adapted_layers": len(weights),
        "rank": args.rank,
        "w_bytes": w_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "byte_bound_us": byte_bound_us,
        "adaptfuse_swap_us": timing["adaptfuse"]["median_us"],
        "peft_swap_us": timing["peft"]["median_us"],
        "adaptfuse_fraction_of_byte_bound": byte_bound_us / timing["adaptfuse"]["median_us"],
        "peft_fraction_of_byte_bound": byte_bound_us / timing["peft"]["median_us"],
        "peft_over_adaptfuse": timing["peft"]["median_us"] / timing["adaptfuse"]["median_us"],
        "swaps_before_drift_check": swaps,
        "peft_drifted_elements_fraction": drifted / sum(w.numel() for w in peft_original),
        "adaptfuse_changed_elements": changed,
        "target_fraction_of_byte_bound": 0.70,
        "timings": timing,
    }
    print(
        table(
            [
                (
                    name,
                    f"{result[f'{name}_swap_us'] / 1e3:.1f}",
                    f"{result[f'{name}_fraction_of_byte_bound']:.2f}",
                )
                for name in ("adaptfuse", "peft")
            ]
            + [("byte bound", f"{byte_bound_us / 1e3:.1f}", "1.00")],
            ["swap (all layers)", "ms", "of byte bound"],
        )
    )
    print(
        f"after {swaps} swaps and an unmerge: PEFT's base weights differ in "
        f"{result['peft_drifted_elements_fraction']:.2%} of elements, adaptfuse's in {changed}"
    )
    return result


def plot_swap(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["byte bound", "adaptfuse", "PEFT"]
    values = [
        result["byte_bound_us"] / 1e3,
        result["adaptfuse_swap_us"] / 1e3,
        result["peft_swap_us"] / 1e3,
    ]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.bar(names, values, color=["#999999", "#1f77b4", "#ff7f0e"])
    axis.set_ylabel("ms per swap (unmerge + merge, all layers)")
    axis.set_title(f"adapter swap, {result['preset']} preset, r={result['rank']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--part", default="all", choices=["record", "swap", "all"])
    parser.add_argument("--preset", default=None, choices=PRESETS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not adaptfuse.cuda_available():
        raise SystemExit("bench_merge: --device cuda needs a GPU and the CUDA build")
    args.preset = args.preset or ("8b" if args.device.startswith("cuda") else "cpu")
    result = {}
    if args.part in ("record", "all"):
        result.update(run(args))
    if args.part in ("swap", "all"):
        result["swap"] = swap(args)
    path = write_result(f"merge_{args.dtype}", args.device, result, args.out_dir)
    if "swap" in result:
        plot_swap(result["swap"], path.replace(".json", ".png"))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
