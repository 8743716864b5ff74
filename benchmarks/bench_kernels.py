"""Kernel benchmark: BGMV (decode) shrink + expand against the byte bound, the foundation's
simple kernels and a torch gather + bmm baseline, side by side in one run.

For every shape (H_in/H_out), rank, token count and adapter popularity it reports the
effective bandwidth over the bytes the launch must move (each used adapter row read once,
x read, v written, y read and written) as a fraction of the device-to-device copy bandwidth
measured in the same run (DESIGN.md target: >= 0.80 for launches reading >= 4 MB; smaller
launches <= 1.5 x (empty-launch time + byte bound)).

    python benchmarks/bench_kernels.py --device cuda            # the issue's full sweep
    python benchmarks/bench_kernels.py --device cpu --quick     # CPU ops vs gather + bmm

On CPU there are no kernel families: the CPU ops are timed against gather + bmm.

Prefill (CUDA only; skipped with a message on CPU): SGMV shrink + expand on segments of
tokens that share an adapter, against torch._grouped_mm (where this torch and GPU have it)
and a torch loop of per-segment matmuls on the same data, and as a fraction of the roofline
max(FLOPs / matmul rate, bytes / copy bandwidth), both rates measured in the same run
(DESIGN.md targets: faster than both, >= 60% of roofline).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
from common import copy_bandwidth, graph_medians, interleaved_medians, table, write_result

import adaptfuse
from adaptfuse import ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DECODE_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
RANKS = [8, 16, 64, 128]
TOKENS = [1, 4, 16, 64, 256]
POPULARITY = ["distinct", "identical", "zipf"]
LARGE_LAUNCH_BYTES = 4 << 20
PREFILL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
PREFILL_TOKENS = [16, 256, 1024, 4096, 8192]
PREFILL_SEGMENTS = [1, 4, 16, 64]
PREFILL_SKIPPED = "prefill section skipped: the SGMV kernels run on CUDA only (--device cpu)"


# How candidates are timed: graph replays of back-to-back calls on CUDA (the kernels' own
# time), or one call at a time with --per-call (what one eager call costs, host included).
TIMER = [graph_medians]


def slots_for(popularity: str, tokens: int, gen: torch.Generator) -> torch.Tensor:
    if popularity == "identical":
        return torch.zeros(tokens, dtype=torch.int32)
    if popularity == "distinct":
        return torch.arange(tokens, dtype=torch.int32)
    weights = 1.0 / torch.arange(1, tokens + 1, dtype=torch.float64) ** 1.5
    return torch.multinomial(weights, tokens, True, generator=gen).to(torch.int32)


def empty_launch_us(device: str, repeats: int) -> float:
    if not device.startswith("cuda"):
        return 0.0
    tiny = torch.zeros(1, device=device)
    return TIMER[0]({"empty": lambda: tiny.add_(0)}, repeats, device)["empty"]["median_us"]


def decode_case(h_in, h_out, rank, tokens, popularity, dtype, device, repeats, gen, families):
    slots = slots_for(popularity, tokens, gen)
    used = int(slots.max()) + 1
    element = torch.finfo(dtype).bits // 8
    x = torch.randn(tokens, h_in, generator=gen).to(dtype).to(device)
    y = torch.randn(tokens, h_out, generator=gen).to(dtype).to(device)
    A = (torch.randn(used, rank, h_in, generator=gen) * h_in**-0.5).to(dtype).to(device)
    B = (torch.randn(used, rank, h_out, generator=gen) * rank**-0.5).to(dtype).to(device)
    ranks = torch.full((used,), rank, dtype=torch.int32, device=device)
    scales = torch.ones(used, device=device)
    token_slots = slots.to(device)
    plan = ops.plan(token_slots, used)
    distinct = int(torch.unique(slots).numel())
    # The fewest bytes: each used adapter row once, x once, v written and read once (fp32),
    # y read and written once.
    shrink_bytes = distinct * rank * h_in * element + tokens * h_in * element + tokens * rank * 4
    expand_bytes = (
        distinct * rank * h_out * element + tokens * rank * 4 + 2 * tokens * h_out * element
    )
    long_slots = token_slots.long()

    def adaptfuse_step():
        v = ops.shrink(x, A, ranks, scales, plan)
        ops.expand_(y, v, [B], [0], ranks, plan)

    def gather_bmm():
        # The naive batched form: gather each token's adapter, then two bmm's.
        v = torch.bmm(A[long_slots].float(), x.float().unsqueeze(2)).squeeze(2)
        y.add_(torch.bmm(v.unsqueeze(1), B[long_slots].float()).squeeze(1).to(dtype))

    candidates = {}
    for family in families:
        candidates[family] = family_step(family, adaptfuse_step)
    candidates["gather_bmm"] = gather_bmm
    timings = TIMER[0](candidates, repeats, device)
    return {
        "h_in": h_in,
        "h_out": h_out,
        "rank": rank,
        "tokens": tokens,
        "popularity": popularity,
        "distinct_adapters": distinct,
        "bytes": shrink_bytes + expand_bytes,
        "timings": timings,
    }


def matmul_rate(device: str, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of one large dense matmul through torch (the tensor-core ceiling of the run)."""
    n = 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timings = interleaved_medians({"matmul": lambda: torch.matmul(a, b)}, repeats, device)
    return 2 * n**3 / (timings["matmul"]["median_us"] * 1e-6)


def prefill_case(h_in, h_out, rank, tokens, segments, dtype, device, repeats, gen):
    """Segments of (nearly) equal length, each its own adapter, tokens contiguous per segment
    (as a prefill batch lays them out)."""
    lengths = [tokens // segments + (1 if i < tokens % segments else 0) for i in range(segments)]
    ends = torch.tensor(lengths).cumsum(0)
    slots = torch.repeat_interleave(torch.arange(segments), torch.tensor(lengths))
    element = torch.finfo(dtype).bits // 8
    x = torch.randn(tokens, h_in, generator=gen).to(dtype).to(device)
    y = torch.randn(tokens, h_out, generator=gen).to(dtype).to(device)
    A = (torch.randn(segments, rank, h_in, generator=gen) * h_in**-0.5).to(dtype).to(device)
    B = (torch.randn(segments, rank, h_out, generator=gen) * rank**-0.5).to(dtype).to(device)
    ranks = torch.full((segments,), rank, dtype=torch.int32, device=device)
    scales = torch.ones(segments, device=device)
    plan = ops.plan(slots.to(torch.int32).to(device), segments)
    flops = 2 * tokens * rank * (h_in + h_out)
    nbytes = (
        segments * rank * (h_in + h_out) * element
        + tokens * h_in * element
        + 2 * tokens * rank * 4
        + 2 * tokens * h_out * element
    )
    bounds = [0, *ends.tolist()]

    def adaptfuse_step():
        v = ops.shrink(x, A, ranks, scales, plan)
        ops.expand_(y, v, [B], [0], ranks, plan)

    def torch_loop():
        for s in range(segments):
            rows = slice(bounds[s], bounds[s + 1])
            v = (x[rows] @ A[s].T).float() * scales[s]
            y[rows] += (v.to(dtype) @ B[s]).to(dtype)

    offsets = ends.to(torch.int32).to(device)
    A_t = A.transpose(1, 2)

    def grouped_mm():
        v = torch._grouped_mm(x, A_t, offs=offsets)
        y.add_(torch._grouped_mm(v, B, offs=offsets))

    candidates = {
        "sgmv": family_step("sgmv", adaptfuse_step),
        "auto": family_step("auto", adaptfuse_step),
        "torch_loop": torch_loop,
    }
    grouped_status = "unavailable: this torch has no torch._grouped_mm"
    if hasattr(torch, "_grouped_mm"):
        try:
            grouped_mm()
            torch.cuda.synchronize()
            candidates["grouped_mm"] = grouped_mm
            grouped_status = "measured"
        except (RuntimeError, TypeError, NotImplementedError) as error:
            grouped_status = f"unavailable: {str(error).splitlines()[0]}"
    timings = TIMER[0](candidates, repeats, device)
    return {
        "h_in": h_in,
        "h_out": h_out,
        "rank": rank,
        "tokens": tokens,
        "segments": segments,
        "flops": flops,
        "bytes": nbytes,
        "grouped_mm": grouped_status,
        "timings": timings,
    }


def prefill_section(args, copy_bw: float) -> dict:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(1)
    rate = matmul_rate(args.device, dtype, args.repeats)
    shapes = args.shapes or (PREFILL_SHAPES[:1] if args.quick else PREFILL_SHAPES)
    ranks = args.ranks or ([16] if args.quick else RANKS)
    tokens = args.tokens or ([256, 4096] if args.quick else PREFILL_TOKENS)
    rows = []
    for (h_in, h_out), rank, count, segments in [
        (shape, rank, count, segments)
        for shape in shapes
        for rank in ranks
        for count in tokens
        for segments in PREFILL_SEGMENTS
        if segments <= count
    ]:
        row = prefill_case(
            h_in, h_out, rank, count, segments, dtype, args.device, args.repeats, gen
        )
        floor_s = max(row["flops"] / rate, row["bytes"] / copy_bw)
        sgmv_us = row["timings"]["sgmv"]["median_us"]
        row["roofline_us"] = floor_s * 1e6
        row["fraction_of_roofline"] = floor_s / (sgmv_us * 1e-6)
        for baseline in ("torch_loop", "grouped_mm"):
            if baseline in row["timings"]:
                row[f"ratio_to_{baseline}"] = sgmv_us / row["timings"][baseline]["median_us"]
        row["meets_target"] = row["fraction_of_roofline"] >= 0.60 and all(
            row.get(f"ratio_to_{b}", 0.0) < 1.0 for b in ("torch_loop", "grouped_mm")
        )
        rows.append(row)
    return {"matmul_flops_per_s": rate, "cases": rows}


def family_step(family: str, step):
    if family == "cpu":
        return step

    def run():
        with ops.kernel_family(family):
            step()

    return run


def plot(rows, copy_bw, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["h_in"], r["h_out"]) for r in rows})
    figure, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.6), squeeze=False)
    for axis, shape in zip(axes[0], shapes, strict=True):
        for name in rows[0]["timings"]:
            for popularity, marker in zip(POPULARITY, "os^", strict=True):
                picked = [
                    r
                    for r in rows
                    if (r["h_in"], r["h_out"]) == shape and r["popularity"] == popularity
                ]
                if not picked:
                    continue
                xs = [r["tokens"] * r["rank"] for r in picked]
                fractions = [
                    r["bytes"] / (r["timings"][name]["median_us"] * 1e-6) / copy_bw for r in picked
                ]
                axis.scatter(xs, fractions, marker=marker, s=14, label=f"{name} {popularity}")
        axis.set_xscale("log")
        axis.set_title(f"H_in {shape[0]} / H_out {shape[1]}")
        axis.set_xlabel("tokens x rank")
        axis.set_ylabel("fraction of copy bandwidth")
        axis.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(args) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    on_gpu = device.startswith("cuda")
    families = ["bgmv", "simple"] if on_gpu else ["cpu"]
    shapes = args.shapes or (DECODE_SHAPES[:2] if args.quick else DECODE_SHAPES)
    ranks = args.ranks or ([16, 64] if args.quick else RANKS)
    tokens = args.tokens or ([1, 16, 64] if args.quick else TOKENS)
    copy_bw = copy_bandwidth(device, args.repeats)
    launch_us = empty_launch_us(device, args.repeats)
    rows = []
    cases = [
        (shape, rank, count, popularity)
        for shape in shapes
        for rank in ranks
        for count in tokens
        for popularity in POPULARITY
        if not (count == 1 and popularity == "zipf")  # one token: zipf is "distinct"
    ]
    try:
        from tqdm import tqdm

        cases = tqdm(cases, desc="decode cases")
    except ImportError:
        pass
    for (h_in, h_out), rank, count, popularity in cases:
        rows.append(
            decode_case(
                h_in, h_out, rank, count, popularity, dtype, device, args.repeats, gen, families
            )
        )
    summary = []
    for row in rows:
        best = families[0]
        seconds = row["timings"][best]["median_us"] * 1e-6
        fraction = row["bytes"] / seconds / copy_bw
        bound_us = row["bytes"] / copy_bw * 1e6
        row["fraction_of_copy_bandwidth"] = fraction
        row["ratio_to_gather_bmm"] = (
            row["timings"][best]["median_us"] / row["timings"]["gather_bmm"]["median_us"]
        )
        if on_gpu:
            row["ratio_to_simple"] = (
                row["timings"][best]["median_us"] / row["timings"]["simple"]["median_us"]
            )
        if row["bytes"] >= LARGE_LAUNCH_BYTES:
            row["meets_target"] = fraction >= 0.80
        else:
            row["meets_target"] = row["timings"][best]["median_us"] <= 1.5 * (launch_us + bound_us)
        summary.append(row)
    return {
        "setup": {
            "device": device,
            "dtype": args.dtype,
            "families": families,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        },
        "copy_bandwidth_bytes_per_s": copy_bw,
        "empty_launch_us": launch_us,
        "decode": summary,
        "prefill": prefill_section(args, copy_bw) if on_gpu else PREFILL_SKIPPED,
    }


def _shape(text: str) -> tuple[int, int]:
    try:
        h_in, h_out = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not H_INxH_OUT, e.g. 4096x14336") from None
    return h_in, h_out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if adaptfuse.cuda_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument(
        "--per-call", action="store_true",
        help="time one eager call at a time (host included) instead of CUDA-graph replays",
    )
    parser.add_argument(
        "--shapes",
        type=_shape,
        nargs="+",
        default=None,
        metavar="H_INxH_OUT",
        help="replace the sweep's shapes, e.g. 4096x14336",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=None, help="replace the ranks")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="replace the T's")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not adaptfuse.cuda_available():
        raise SystemExit("bench_kernels: --device cuda needs a GPU and the CUDA build")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.repeats = args.repeats or (25 if on_gpu else 7)
    TIMER[0] = interleaved_medians if args.per_call else graph_medians
    result = run(args)
    result["setup"]["timing"] = "per call" if args.per_call or not on_gpu else "CUDA-graph replays"
    path = write_result(f"kernels_{args.dtype}", args.device, result, args.out_dir)
    with contextlib.suppress(ImportError):
        plot(result["decode"], result["copy_bandwidth_bytes_per_s"], path.replace(".json", ".png"))
    best = result["setup"]["families"][0]
    rows = [
        (
            f"{r['h_in']}/{r['h_out']}",
            r["rank"],
            r["tokens"],
            r["popularity"],
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['timings'][best]['median_us']:.1f}",
            f"{r['fraction_of_copy_bandwidth']:.2f}",
            f"{r['ratio_to_gather_bmm']:.2f}",
            "yes" if r["meets_target"] else "NO",
        )
        for r in result["decode"]
    ]
    header = [
        "H_in/H_out",
        "r",
        "T",
        "popularity",
        "MiB",
        f"{best} us",
        "bw frac",
        "/bmm",
        "target",
    ]
    print(table(rows, header))
    if isinstance(result["prefill"], str):
        print(result["prefill"])
    else:
        prefill_rows = [
            (
                f"{r['h_in']}/{r['h_out']}",
                r["rank"],
                r["tokens"],
                r["segments"],
                f"{r['timings']['sgmv']['median_us']:.1f}",
                f"{r['fraction_of_roofline']:.2f}",
                f"{r.get('ratio_to_grouped_mm', float('nan')):.2f}",
                f"{r['ratio_to_torch_loop']:.2f}",
                "yes" if r["meets_target"] else "NO",
            )
            for r in result["prefill"]["cases"]
        ]
        header = ["H_in/H_out", "r", "T", "segs", "sgmv us", "roofline", "/grouped", "/loop"]
        print(table(prefill_rows, [*header, "target"]))
    print(
        f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
        f"empty launch {result['empty_launch_us']:.1f} us; wrote {path}"
    )
    return result


if __name__ == "__main__":
    os.environ.setdefault("TQDM_MININTERVAL", "2")
    main()
