"""Op benchmark: shrink + expand over a mixed batch against the same math done densely
with a single adapter, side by side in one run.

Default shape (the foundation target): 1024 tokens, H = 4096, r = 16, 8 adapters on 8
equal segments; target: adaptfuse <= 1.10x the dense single-adapter time.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--dtype float32] [--tokens 1024] ...
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians, table, write_result

import adaptfuse
from adaptfuse import ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    T, H, r, S = args.tokens, args.hidden, args.rank, args.adapters
    x = torch.randn(T, H, generator=gen).to(dtype).to(device)
    y = torch.zeros(T, H, dtype=dtype, device=device)
    A = (torch.randn(S, r, H, generator=gen) / H**0.5).to(dtype).to(device)
    B = (torch.randn(S, r, H, generator=gen) / r**0.5).to(dtype).to(device)
    ranks = torch.full((S,), r, dtype=torch.int32, device=device)
    scales = torch.full((S,), 2.0, device=device)
    token_slots = (torch.arange(T) * S // T).to(torch.int32).to(device)  # S equal segments
    plan = ops.plan(token_slots, S)
    A0, B0 = A[0], B[0]

    def adaptfuse_mixed():
        v = ops.shrink(x, A, ranks, scales, plan)
        ops.expand_(y, v, [B], [0], ranks, plan)

    def dense_single_adapter():
        # What a batch with one adapter costs in plain torch: x @ A^T, scaled, @ B into y.
        y.addmm_(torch.mm(x, A0.t()).mul_(2.0), B0)

    def plan_only():
        ops.plan(token_slots, S)

    timings = interleaved_medians(
        {
            "adaptfuse_shrink_expand": adaptfuse_mixed,
            "dense_single_adapter": dense_single_adapter,
            "plan": plan_only,
        },
        repeats=args.repeats,
        device=device,
    )
    ratio = (
        timings["adaptfuse_shrink_expand"]["median_us"]
        / timings["dense_single_adapter"]["median_us"]
    )
    return {
        "setup": {
            "tokens": T,
            "hidden": H,
            "rank": r,
            "adapters": S,
            "segments": "equal",
            "dtype": args.dtype,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "timings": timings,
        "ratio_adaptfuse_over_dense": ratio,
        "target_ratio": 1.10,
        "meets_target": ratio <= 1.10,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not adaptfuse.cuda_available():
        raise SystemExit("bench_ops: --device cuda needs a GPU and the CUDA build")
    result = run(args)
    path = write_result(f"ops_{args.dtype}", args.device, result, args.out_dir)
    rows = [
        (name, f"{t['median_us']:.1f}", f"{t['min_us']:.1f}")
        for name, t in result["timings"].items()
    ]
    print(table(rows, ["candidate", "median us", "min us"]))
    print(
        f"adaptfuse / dense single adapter = {result['ratio_adaptfuse_over_dense']:.3f} "
        "(target <= 1.10)"
    )
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
