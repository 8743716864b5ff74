"""`adaptfuse bench`: runs the scripts under benchmarks/ (a source checkout's), adds plots,
and summarises what they measured.

Each script writes its JSON (setup, device, versions, figures) itself; this module runs it
in-process with the arguments of the chosen mode, draws its plots with matplotlib next to
the JSON, records the plots' file names in the JSON under "figures", and returns the
numbers worth a summary line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

BENCHMARKS = ("kernels", "merge", "model", "kinds")
# Run only when named: minutes of training even on the CPU defaults (`all` stays the quick
# measurements; `adaptfuse bench quality` trains and compares adapters).
ON_REQUEST = ("quality",)
CHOICES = (*BENCHMARKS, *ON_REQUEST, "all")
# bench_<file>.py of each benchmark whose script is named otherwise.
SCRIPT_FILES = {"kinds": "adapter_kinds", "quality": "adapter_quality"}
QUICK_OUT_DIR = os.path.join(tempfile.gettempdir(), "adaptfuse-bench-quick")


class BenchmarkError(RuntimeError):
    """A benchmark that could not run; the message says which and why."""


@dataclasses.dataclass
class BenchmarkRun:
    """One benchmark's outcome: the JSON it wrote, the plots drawn from it, the summary rows
    (figure, value, target) and the script's own printed report."""

    name: str
    json_path: str
    figures: list[str]
    summary: list[tuple[str, str, str]]
    report: str


def benchmarks_dir() -> str:
    """benchmarks/ of the source checkout adaptfuse runs from (the scripts are not part of an
    installed wheel)."""
    directory = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"
    )
    if not os.path.isfile(os.path.join(directory, "common.py")):
        raise BenchmarkError(
            f"no benchmark scripts at {directory}: `adaptfuse bench` runs from a source "
            "checkout (pip install -e .)"
        )
    return directory


def script_arguments(name: str, device: str, quick: bool) -> list[str]:
    """Command-line arguments of benchmarks/bench_<name>.py for a mode. quick: tiny shapes
    and one or two repeats, seconds in all (checks the pipeline; the figures mean little).
    Otherwise each script's defaults, with the CPU kernel sweep cut to its --quick shapes
    (the full sweep is the GPU's)."""
    on_gpu = device.startswith("cuda")
    arguments = {
        "kernels": ["--device", device],
        "merge": ["--device", device],
        "model": ["--device", device],
        "kinds": [],  # CPU only: the bottleneck-vs-LoRA cost on DESIGN.md's CPU model
        "quality": ["--device", device],
    }[name]
    if quick:
        arguments += {
            "kernels": ["--shapes", "256x512", "--ranks", "4", "16", "--tokens", "1", "8"]
            + ["--repeats", "2"],
            "merge": ["--part", "record", "--shape", "256", "256", "--repeats", "1"],
            "model": ["--hidden", "128", "--intermediate", "256", "--layers", "2"]
            + ["--batch", "4", "--prompt", "8", "--adapters", "2", "--rank", "4"]
            + ["--repeats", "3"],
            "kinds": ["--dims", "16", "--layers", "2", "--hidden", "128", "--intermediate"]
            + ["256", "--batch", "4", "--prompt", "8", "--adapters", "2", "--repeats", "2"],
            "quality": ["--quick"],
        }[name]
    elif name == "kernels" and not on_gpu:
        arguments.append("--quick")
    return arguments


def _load_script(name: str):
    directory = benchmarks_dir()
    if directory not in sys.path:  # the scripts import their helpers as `common`
        sys.path.insert(0, directory)
    path = os.path.join(directory, f"bench_{SCRIPT_FILES.get(name, name)}.py")
    spec = importlib.util.spec_from_file_location(f"adaptfuse_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_requirements(names: Sequence[str], device: str) -> None:
    """Refuses up front what would fail halfway: a missing extra or device."""
    import adaptfuse

    missing = []
    for package, needed_by in (("matplotlib", names), ("peft", [n for n in names if n == "model"])):
        if needed_by and importlib.util.find_spec(package) is None:
            missing.append(package)
    if missing:
        raise BenchmarkError(
            f"bench needs {' and '.join(missing)}: pip install 'adaptfuse[bench,test]'"
        )
    if device.startswith("cuda") and not adaptfuse.cuda_available():
        raise BenchmarkError("--device cuda needs a GPU and adaptfuse's CUDA build")


def run_benchmark(name: str, out_dir: str, device: str, quick: bool) -> BenchmarkRun:
    """Runs benchmarks/bench_<name>.py in this process, writing under out_dir; draws its plots
    and adds their names to its JSON under "figures"."""
    module = _load_script(name)
    arguments = script_arguments(name, device, quick) + ["--out-dir", out_dir]
    started = time.time()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            result = module.main(arguments)
    except SystemExit as error:  # argparse, or a script's own refusal
        raise BenchmarkError(f"bench {name}: {error.code}") from None
    json_path = _written_json(out_dir, name, started)
    with open(json_path) as f:
        document = json.load(f)
    stem = json_path[: -len(".json")]
    PLOTS[name](result, stem)
    # The plots drawn here and any the script drew itself, all named after the JSON.
    figures = sorted(glob.glob(glob.escape(stem) + "*.png"))
    document["figures"] = [os.path.basename(p) for p in figures]
    document["cli"] = {"command": f"adaptfuse bench {name}", "quick": quick, "argv": arguments}
    with open(json_path, "w") as f:
        json.dump(document, f, indent=2)
    return BenchmarkRun(name, json_path, figures, SUMMARIES[name](result), printed.getvalue())


def _written_json(out_dir: str, name: str, since: float) -> str:
    fresh = [
        p
        for p in glob.glob(os.path.join(out_dir, f"*_{name}_*.json"))
        if os.path.getmtime(p) >= since - 1
    ]
    if not fresh:
        raise BenchmarkError(f"bench {name}: the script wrote no JSON under {out_dir}")
    return max(fresh, key=os.path.getmtime)


# ---- plots (matplotlib, Agg: no display needed) ------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(result: dict, stem: str) -> list[str]:
    """Per shape: latency against tokens per adapter popularity (at one rank), and the
    fraction of copy bandwidth against rank (at the most tokens)."""
    from matplotlib.ticker import NullLocator

    plt = _pyplot()
    rows = result["decode"]
    best = result["setup"]["families"][0]
    copy_bw = result["copy_bandwidth_bytes_per_s"]
    shapes = sorted({(r["h_in"], r["h_out"]) for r in rows})
    ranks = sorted({r["rank"] for r in rows})
    rank = 16 if 16 in ranks else ranks[0]
    most_tokens = max(r["tokens"] for r in rows)
    token_counts = sorted({r["tokens"] for r in rows})
    popularities = list(dict.fromkeys(r["popularity"] for r in rows))
    figure, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 7), squeeze=False)
    for column, shape in enumerate(shapes):
        latency, bandwidth = axes[0][column], axes[1][column]
        for i, popularity in enumerate(popularities):
            color = f"C{i}"
            picked = [
                r
                for r in rows
                if (r["h_in"], r["h_out"]) == shape and r["popularity"] == popularity
            ]
            by_tokens = sorted((r for r in picked if r["rank"] == rank), key=lambda r: r["tokens"])
            tokens = [r["tokens"] for r in by_tokens]
            for candidate, style in ((best, "-o"), ("gather_bmm", "--x")):
                latency.plot(
                    tokens,
                    [r["timings"][candidate]["median_us"] for r in by_tokens],
                    style,
                    color=color,
                    label=f"{candidate}, {popularity}",
                )
            by_rank = sorted(
                (r for r in picked if r["tokens"] == most_tokens), key=lambda r: r["rank"]
            )
            bandwidth.plot(
                [r["rank"] for r in by_rank],
                [r["bytes"] / (r["timings"][best]["median_us"] * 1e-6) / copy_bw for r in by_rank],
                "-o",
                color=color,
                label=popularity,
            )
        for axis, ticks in ((latency, token_counts), (bandwidth, ranks)):
            axis.set_xscale("log", base=2)
            axis.set_xticks(ticks, [str(t) for t in ticks])
            axis.xaxis.set_minor_locator(NullLocator())
        latency.set(
            yscale="log",
            xlabel="tokens",
            ylabel="median latency (us)",
            title=f"H_in {shape[0]} / H_out {shape[1]}, rank {rank}",
        )
        bandwidth.set(
            xlabel="rank",
            ylabel="fraction of copy bandwidth",
            title=f"{best}, {most_tokens} tokens",
        )
        bandwidth.axhline(0.8, color="grey", linewidth=0.8, linestyle="--")
        latency.legend(fontsize=6)
        bandwidth.legend(fontsize=7)
    figure.suptitle(f"shrink + expand, {result['setup']['dtype']} on {result['setup']['device']}")
    return [_save(figure, plt, f"{stem}_latency-bandwidth.png")]


def plot_merge(result: dict, stem: str) -> list[str]:
    """The exact-restore record against the size of the delta, and merge + unmerge time
    (the script plots its adapter-swap part itself)."""
    if "points" not in result:
        return []
    plt = _pyplot()
    points = result["points"]
    labels = [str(p["mean_abs_delta_over_w"]) for p in points]
    positions = range(len(points))
    figure, (share, timing) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    share.bar(
        [x - width / 2 for x in positions],
        [100 * p["mismatching_fraction"] for p in points],
        width,
        label="elements needing an entry",
    )
    share.bar(
        [x + width / 2 for x in positions],
        [100 * p["record_fraction_of_w_bytes"] for p in points],
        width,
        label="record size / W bytes",
    )
    share.axhline(
        100 * result["target_record_fraction_at_5pct"],
        color="grey",
        linestyle="--",
        label="target for the record at 5% entries",
    )
    share.set(
        xticks=list(positions),
        xticklabels=labels,
        xlabel="mean |delta| / mean |W|",
        ylabel="%",
        title="unmerge record",
    )
    share.legend(fontsize=7)
    timing.bar(list(positions), [p["merge_plus_unmerge_us"] / 1e3 for p in points])
    timing.set(
        xticks=list(positions),
        xticklabels=labels,
        xlabel="mean |delta| / mean |W|",
        ylabel="ms",
        title="merge + unmerge",
    )
    setup = result["setup"]
    figure.suptitle(
        f"{setup['dtype']} {setup['shape'][0]}x{setup['shape'][1]}, r {setup['rank']}, "
        f"{setup['device']}"
    )
    return [_save(figure, plt, f"{stem}_record.png")]


def plot_model(result: dict, stem: str) -> list[str]:
    """base / PEFT / adaptfuse bars per phase, labelled with the ratio to the base model."""
    plt = _pyplot()
    phases = list(result["timings"])
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.8), squeeze=False)
    for axis, phase in zip(axes[0], phases, strict=True):
        timings = result["timings"][phase]
        names = list(timings)
        values = [timings[n]["median_us"] / 1e3 for n in names]
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        for bar, name in zip(bars, names, strict=True):
            ratio = result["ratios_to_base"][phase][name]
            axis.annotate(
                f"{ratio:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        target = result["targets"].get(phase)
        if target is not None:
            axis.axhline(
                target * timings["base"]["median_us"] / 1e3,
                color="grey",
                linestyle="--",
                linewidth=0.8,
            )
        axis.set(ylabel="median ms", title=f"{phase} (target <= {target}x base)")
    setup = result["setup"]
    figure.suptitle(
        f"Llama {setup['hidden']}/{setup['intermediate']}, {setup['layers']} layers, "
        f"{setup['batch']} x {setup['prompt']} tokens, {setup['adapters']} adapters "
        f"r {setup['rank']}, {setup['device']}"
    )
    return [_save(figure, plt, f"{stem}.png")]


def _save(figure, plt, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_kinds(result: dict, stem: str) -> list[str]:
    """Bottleneck and LoRA (equal parameter budgets) as ratios to the base model, per
    bottleneck dim, for prefill and one decode step."""
    plt = _pyplot()
    points = result["points"]
    phases = list(points[0]["ratios_to_base"])
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.6), squeeze=False)
    positions = range(len(points))
    for axis, phase in zip(axes[0], phases, strict=True):
        for offset, kind in ((-0.2, "bottleneck"), (0.2, "lora")):
            values = [p["ratios_to_base"][phase][kind] for p in points]
            axis.bar([x + offset for x in positions], values, width=0.4, label=kind)
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xticks(list(positions))
        axis.set_xticklabels([f"dim {p['dim']} / r {p['lora_rank']}" for p in points])
        axis.set(ylabel="x base model", title=phase)
        axis.legend()
    figure.suptitle("bottleneck vs LoRA of equal parameters, mixed batch")
    return [_save(figure, plt, f"{stem}.png")]


def plot_quality(result: dict, stem: str) -> list[str]:
    """Nothing more: the script draws its curves and summary itself (<stem>_curves.png,
    <stem>_summary.png), so that a run without the CLI has them too."""
    return []


PLOTS = {
    "kernels": plot_kernels,
    "merge": plot_merge,
    "model": plot_model,
    "kinds": plot_kinds,
    "quality": plot_quality,
}


# ---- summaries: (figure, value, target) rows ----------------------------------------------


def summarize_kernels(result: dict) -> list[tuple[str, str, str]]:
    """Summary rows (name, figure) of a kernels benchmark JSON."""
    rows = result["decode"]
    best = result["setup"]["families"][0]
    fractions = sorted(r["fraction_of_copy_bandwidth"] for r in rows)
    met = sum(r["meets_target"] for r in rows)
    return [
        ("copy bandwidth", f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", ""),
        (
            f"{best}: median fraction of copy bandwidth",
            f"{fractions[len(fractions) // 2]:.2f} (best {fractions[-1]:.2f})",
            ">= 0.80 at >= 4 MB",
        ),
        (f"{best}: cases meeting the target", f"{met} of {len(rows)}", "all"),
    ]


def summarize_merge(result: dict) -> list[tuple[str, str, str]]:
    """Summary rows (name, figure) of a merge benchmark JSON."""
    rows = [
        (
            f"|delta|/|W| {p['mean_abs_delta_over_w']}: record / W bytes",
            f"{p['record_fraction_of_w_bytes']:.1%} ({p['mismatching_fraction']:.1%} entries, "
            f"merge+unmerge {p['merge_plus_unmerge_us'] / 1e3:.1f} ms)",
            f"<= {result['target_record_fraction_at_5pct']:.0%} at 5% entries",
        )
        for p in result.get("points", [])
    ]
    swap = result.get("swap")
    if swap and "adaptfuse_swap_us" in swap:
        rows.append(
            (
                f"swap, {swap.get('preset')} preset: fraction of byte bound",
                f"{swap['adaptfuse_fraction_of_byte_bound']:.2f} "
                f"({swap['adaptfuse_swap_us'] / 1e3:.1f} ms, "
                f"PEFT {swap['peft_swap_us'] / 1e3:.1f} ms)",
                f">= {swap.get('target_fraction_of_byte_bound', 0.7)}",
            )
        )
    return rows


def summarize_model(result: dict) -> list[tuple[str, str, str]]:
    """Summary rows (name, figure) of a model benchmark JSON."""
    rows = []
    for phase, ratios in result["ratios_to_base"].items():
        base_ms = result["timings"][phase]["base"]["median_us"] / 1e3
        rows.append(
            (
                f"{phase}: adaptfuse / base",
                f"{ratios['adaptfuse']:.3f}x (base {base_ms:.1f} ms, PEFT {ratios['peft']:.2f}x)",
                f"<= {result['targets'][phase]}x",
            )
        )
    return rows


def summarize_kinds(result: dict) -> list[tuple[str, str, str]]:
    """Summary rows (name, figure) of a bottleneck-vs-LoRA cost benchmark JSON."""
    rows = []
    for point in result["points"]:
        for phase, ratios in point["ratios_to_base"].items():
            target = result["targets"]["bottleneck_dim_64"][phase] if point["dim"] == 64 else ""
            rows.append(
                (
                    f"{phase}: bottleneck dim {point['dim']} / LoRA r {point['lora_rank']}",
                    f"{ratios['bottleneck']:.3f}x / {ratios['lora']:.3f}x base",
                    f"<= {target}x (bottleneck)" if target else "",
                )
            )
    return rows


def summarize_quality(result: dict) -> list[tuple[str, str, str]]:
    """Per task: each kind's best final held-out loss (its range over the seeds) and exact
    match, the base's beside."""
    rows = []
    for task, kinds in result["best"].items():
        base = result["base"][task]
        parts = []
        for kind, best in kinds.items():
            losses = [seed["loss"] for seed in best.get("seeds", [])]
            spread = f" [{min(losses):.2f}-{max(losses):.2f}]" if len(losses) > 1 else ""
            parts.append(f"{kind} {best['loss']:.3f}{spread} / {best['exact_match']:.0%}")
        measured = ", ".join(parts)
        rows.append(
            (
                f"{task}: held-out loss / exact match",
                f"{measured} (base {base['loss']:.3f} / {base['exact_match']:.0%})",
                "",
            )
        )
    timings = result["timings"]
    rows.append(
        (
            "adapters trained in one batch",
            f"{result['setup']['adapters_in_the_batch']} "
            f"({timings['train_step_ms']:.0f} ms per step, total {timings['total_s']:.0f} s)",
            "",
        )
    )
    return rows


SUMMARIES = {
    "kernels": summarize_kernels,
    "merge": summarize_merge,
    "model": summarize_model,
    "kinds": summarize_kinds,
    "quality": summarize_quality,
}

__all__ = [
    "BENCHMARKS",
    "CHOICES",
    "ON_REQUEST",
    "BenchmarkError",
    "BenchmarkRun",
    "benchmarks_dir",
    "check_requirements",
    "run_benchmark",
    "script_arguments",
]
