"""Adapter management timings: load_adapter from disk into a slot (read, validate, place),
and swap-in of a registered adapter from the host cache into a slot (what a batch naming an
evicted adapter pays), for adapters of Llama-3-8B's layer shapes (hidden 4096, intermediate
14336, GQA 32/8; r=16 on all 7 projections).

On a CPU the model has --layers of those layers (default 4: an 8B model does not fit this
machine's memory twice over); times are reported per adapted layer too, so that the 32-layer
figure is a multiplication the reader can check, not a measurement claimed here.

    python benchmarks/bench_serving.py [--device cpu|cuda] [--layers 4] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from common import interleaved_medians, random_llama, table, write_result

import adaptfuse

PROJECTIONS = {  # name: (H_in, H_out) at Llama-3-8B's shapes
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn"}
MODULE.update({"o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"})


def write_adapter(directory: str, layers: int, rank: int, dtype: torch.dtype, seed: int) -> int:
    """A PEFT-format adapter with random weights; returns its weight bytes."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(layers):
        for name, (h_in, h_out) in PROJECTIONS.items():
            key = f"base_model.model.model.layers.{block}.{MODULE[name]}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, h_in, generator=gen) * 0.01).to(
                dtype
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(h_out, rank, generator=gen) * 0.01).to(
                dtype
            )
    os.makedirs(directory, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none"}
    config["target_modules"] = list(PROJECTIONS)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not adaptfuse.cuda_available():
        raise SystemExit("bench_serving: --device cuda needs a GPU and the CUDA build")
    dtype = torch.bfloat16
    model = random_llama(4096, 14336, args.layers, args.device, dtype, heads=32, kv_heads=8)
    manager = adaptfuse.patch(model.eval(), max_loras=1, max_rank=args.rank)
    directory = tempfile.mkdtemp(prefix="adaptfuse-bench-serving-")
    paths = [os.path.join(directory, f"adapter-{i}") for i in range(2)]
    adapter_bytes = [
        write_adapter(p, args.layers, args.rank, dtype, i) for i, p in enumerate(paths)
    ]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    loads = [0]

    def load_from_disk():
        name = f"disk-{loads[0]}"
        loads[0] += 1
        manager.load_adapter(paths[0], adapter_name=name)  # one slot: placed at once
        sync()
        manager.unload_adapter(name)

    manager.load_adapter(paths[0], adapter_name="first")
    manager.load_adapter(paths[1], adapter_name="second")  # waits in the host cache
    turn = ["second"]

    def swap_in():
        # A batch naming the adapter that is not in the single slot: evict, place, release.
        name = turn[0]
        turn[0] = "first" if name == "second" else "second"
        _, pinned = manager.plan_for([name], 1, 1)
        sync()
        manager.release(pinned)

    timing = interleaved_medians(
        {"load_from_disk": load_from_disk, "swap_in_from_host": swap_in},
        args.repeats,
        args.device,
        warmup=1,
    )
    adapted = len(manager.layers)
    result = {
        "setup": {
            "layer_shapes": "Llama-3-8B (4096 / 14336, GQA 32/8)",
            "layers": args.layers,
            "adapted_layers": adapted,
            "rank": args.rank,
            "dtype": "bfloat16",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "adapter_bytes": adapter_bytes[0],
        },
        "timings": timing,
        "per_adapted_layer_us": {k: v["median_us"] / adapted for k, v in timing.items()},
        "bytes_per_s": {k: adapter_bytes[0] / (v["median_us"] * 1e-6) for k, v in timing.items()},
    }
    print(
        table(
            [
                (
                    name,
                    f"{value['median_us'] / 1e3:.1f}",
                    f"{result['per_adapted_layer_us'][name]:.0f}",
                    f"{result['bytes_per_s'][name] / 1e9:.2f}",
                )
                for name, value in timing.items()
            ],
            ["step", "ms", "us per adapted layer", "GB/s of adapter"],
        )
    )
    print(
        f"{args.layers} layers x 7 projections, r={args.rank}, "
        f"{adapter_bytes[0] / 1e6:.1f} MB per adapter"
    )
    path = write_result("serving_llama8b_shapes_bf16", args.device, result, args.out_dir)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
