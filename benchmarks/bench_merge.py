"""Merge benchmark: merge_ + unmerge_ of one adapter into a weight, the share of elements the
exact-restore record must hold, and the record's size as a fraction of W, at three sizes of
delta relative to W (DESIGN.md's reference points: mean |delta| / mean |W| = 0.006, 0.06, 0.3).

    python benchmarks/bench_merge.py [--device cpu|cuda] [--dtype bfloat16] [--shape 4096 4096]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved_medians, table, write_result

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
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not adaptfuse.cuda_available():
        raise SystemExit("bench_merge: --device cuda needs a GPU and the CUDA build")
    result = run(args)
    print(f"wrote {write_result(f'merge_{args.dtype}', args.device, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
