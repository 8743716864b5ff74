"""`adaptfuse` command line.

    adaptfuse demo      many adapters in one batch, checked against PEFT and the reference
    adaptfuse inspect   what a PEFT adapter folder holds, and whether adaptfuse can load it
    adaptfuse merge     a merged checkpoint: base model + weighted adapters, shard by shard
    adaptfuse bench     the benchmarks under benchmarks/: JSON, PNG plots and a summary

Exit status: 0 success; 1 the command ran and failed (a check did not pass, an adapter is
not loadable, a merge was refused); 2 bad usage (unknown option, missing path). Errors are
one line on stderr; --verbose adds the traceback and library warnings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141


class UsageError(Exception):
    """Bad arguments: exit status 2."""


def _existing_dir(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path}: not a directory")
    return path


def _default_device() -> str:
    import adaptfuse

    return "cuda" if adaptfuse.cuda_available() else "cpu"


def _check_device(device: str) -> None:
    import adaptfuse

    if device.startswith("cuda") and not adaptfuse.cuda_available():
        raise UsageError(f"--device {device} needs a GPU and adaptfuse's CUDA build")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UsageError(f"--device {device}: use cpu or cuda[:N]")


# ---- demo ----------------------------------------------------------------------------------


def demo(args) -> int:
    """`adaptfuse demo [--model PATH --adapters DIR...]`: the main job (adaptfuse.demo); returns the
    exit status."""
    from adaptfuse.demo import run_demo

    device = args.device or _default_device()
    _check_device(device)
    if args.adapters and args.model is None:
        raise UsageError("--adapters needs --model: the base model the adapters were trained on")
    if args.model is not None:
        _existing_dir(args.model, "--model")
    for directory in args.adapters or []:
        _existing_dir(directory, "--adapters")
    return EXIT_OK if run_demo(device, args.model, args.adapters or []) else EXIT_FAILED


# ---- inspect -------------------------------------------------------------------------------


def _size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 1024**2:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 1024**2:.1f} MiB"


def inspect_report(path: str) -> dict:
    """Everything `adaptfuse inspect` shows, as a JSON-ready dict: per module its shapes,
    rank and alpha (patterns applied), PEFT's scaling, parameters and bytes, and the verdict
    with every reason the folder cannot be loaded."""
    from adaptfuse.adapters import MAX_SUPPORTED_RANK, AdapterError, read_peft_folder

    try:
        folder = read_peft_folder(path)
    except AdapterError as error:
        return {"path": path, "loadable": False, "problems": [str(error)], "modules": []}
    config = folder.config
    modules = []
    for module, pair in sorted(folder.modules.items()):
        tensors = list(pair.values())
        row = {
            "module": module,
            "parameters": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
            "dtype": str(tensors[0].dtype).removeprefix("torch."),
            "problems": folder.layer_problems.get(module, []),
        }
        a, b = pair.get("A"), pair.get("B")
        if a is not None and b is not None and a.dim() == 2 and b.dim() == 2:
            row.update(h_in=a.shape[1], h_out=b.shape[0], rank=a.shape[0])
        if folder.settings_readable:
            row.update(
                config_rank=folder.rank(module),
                alpha=folder.alpha(module),
                scale=folder.scale(module),
            )
        modules.append(row)
    problems = folder.all_problems
    ranks = [m["rank"] for m in modules if "rank" in m]
    return {
        "path": path,
        "loadable": not problems,
        "problems": problems,
        "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path"),
        "config": {
            field: config.get(field)
            for field in (
                "r",
                "lora_alpha",
                "use_rslora",
                "target_modules",
                "rank_pattern",
                "alpha_pattern",
                "fan_in_fan_out",
            )
        },
        "modules": modules,
        "total_parameters": sum(m["parameters"] for m in modules),
        "total_bytes": sum(m["bytes"] for m in modules),
        "max_rank": max(ranks, default=None),
        "max_supported_rank": MAX_SUPPORTED_RANK,
    }


def _short(value) -> str:
    """A config value for one line: long module lists (PEFT saves "all-linear" as every
    module path) as their count and distinct layer names."""
    if isinstance(value, list) and len(value) > 4:
        names = sorted({str(v).rsplit(".", 1)[-1] for v in value})
        return f"{len(value)} modules ({', '.join(names)})"
    return repr(value)


def _print_inspect_report(report: dict) -> None:
    print(f"{report['path']}: {report.get('peft_type') or '?'} adapter", end="")
    print(f" of {report['base_model']}" if report.get("base_model") else "")
    if "config" in report:
        print("config: " + ", ".join(f"{k}={_short(v)}" for k, v in report["config"].items()))
    modules = report["modules"]
    if modules:
        width = max(len("module"), *(len(m["module"]) for m in modules))
        print(
            f"\n{'module':<{width}}  {'in -> out':>13}  {'rank':>4}  {'alpha':>7}  {'scale':>8}  "
            f"{'params':>9}  {'size':>9}  {'dtype':<8}  ok"
        )
        for m in modules:
            shape = f"{m['h_in']} -> {m['h_out']}" if "h_in" in m else "?"
            rank = m.get("rank", "?")
            alpha = f"{m['alpha']:g}" if "alpha" in m else "?"
            scale = f"{m['scale']:.4g}" if "scale" in m else "?"
            print(
                f"{m['module']:<{width}}  {shape:>13}  {rank!s:>4}  {alpha:>7}  {scale:>8}  "
                f"{m['parameters']:>9,}  {_size(m['bytes']):>9}  {m['dtype']:<8}  "
                f"{'no' if m['problems'] else 'yes'}"
            )
        print(
            f"\n{len(modules)} modules, {report['total_parameters']:,} parameters, "
            f"{_size(report['total_bytes'])}; serving it needs patch(max_rank >= "
            f"{report['max_rank']})"
        )
    if report["loadable"]:
        print(
            "verdict: adaptfuse can load this adapter (checked without a model: load_adapter "
            "also checks that every module exists in the model with these shapes)"
        )
    else:
        print("verdict: adaptfuse cannot load this adapter:")
        for problem in report["problems"]:
            print(f"  - {problem}")


def inspect(args) -> int:
    """`adaptfuse inspect PATH [--json]`: prints a PEFT folder's modules, ranks, alphas and
    scales and whether adaptfuse can load it; exit status 0 loadable, 1 not."""
    if not os.path.exists(args.path):
        raise UsageError(f"{args.path}: no such file or directory")
    report = inspect_report(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_inspect_report(report)
    return EXIT_OK if report["loadable"] else EXIT_FAILED


# ---- merge ---------------------------------------------------------------------------------


def merge(args) -> int:
    """`adaptfuse merge --base DIR --adapter DIR[:WEIGHT]... -o OUT`: writes the merged checkpoint
    shard by shard (adaptfuse.checkpoint); returns the exit status."""
    from adaptfuse.checkpoint import CheckpointError, merge_checkpoint, parse_adapter_argument

    _existing_dir(args.base, "--base")
    _check_device(args.device)
    adapters = []
    for text in args.adapter:
        try:
            path, weight = parse_adapter_argument(text)
        except CheckpointError as error:
            raise UsageError(str(error)) from None
        adapters.append((_existing_dir(path, "--adapter"), weight))
    result = merge_checkpoint(
        args.base, adapters, args.out, device=args.device, overwrite=args.force, progress=True
    )
    spec = ", ".join(f"{path} x {weight:g}" for path, weight in adapters)
    print(
        f"merged {spec} into {result.merged_layers} weights of {args.base} "
        f"({str(result.dtype).removeprefix('torch.')}, on {args.device})"
    )
    shards = len(result.shards)
    print(f"wrote {result.out_dir}: {shards} safetensors shard(s), the base's layout")
    print(f"copied: {', '.join(result.copied) or 'nothing'}")
    if result.skipped:
        print(f"left out: {', '.join(result.skipped)}")
    return EXIT_OK


# ---- bench ---------------------------------------------------------------------------------


def bench(args) -> int:
    """`adaptfuse bench [TARGET]`: runs the benchmark scripts of TARGET, writes their JSON and
    plots, prints a summary; returns the exit status."""
    from tqdm.auto import tqdm

    from adaptfuse import benchmarking

    device = args.device or _default_device()
    _check_device(device)
    names = list(benchmarking.BENCHMARKS) if args.which == "all" else [args.which]
    benchmarking.check_requirements(names, device)
    benchmarking.benchmarks_dir()
    out_dir = args.out or (
        benchmarking.QUICK_OUT_DIR
        if args.quick
        else os.path.join(benchmarking.benchmarks_dir(), "results")
    )
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    with tqdm(names, desc="benchmarks", unit="benchmark") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            run = benchmarking.run_benchmark(name, out_dir, device, args.quick)
            if args.verbose:
                tqdm.write(run.report)
            runs.append(run)
    rows = [(run.name, *row) for run in runs for row in run.summary]
    header = ("benchmark", "figure", "measured", "target")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if args.quick:
        print("(--quick: tiny shapes and 1-3 repeats; the figures check the pipeline only)")
    for run in runs:
        print(f"{run.name}: {run.json_path}")
        for figure in run.figures:
            print(f"{' ' * len(run.name)}  {figure}")
    return EXIT_OK


# ---- entry point ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --verbose works before or after the command; SUPPRESS keeps a subcommand's default from
    # overwriting a --verbose given before it.
    """The argparse parser of every command (each with --help)."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on error, print the traceback; show library warnings and the scripts' output",
    )
    parser = argparse.ArgumentParser(
        prog="adaptfuse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[verbose],
    )
    parser.set_defaults(verbose=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo_parser = commands.add_parser(
        "demo",
        parents=[verbose],
        help="a mixed-adapter batch checked against PEFT; merge, routing, refusals",
        description="A mixed-adapter batch through generate, checked request by request "
        "against PEFT and timed; a merge at base speed and a bit-exact unmerge; A/B routing "
        "with a rollback; refusals. Exit status 1 if any check fails. With --model, the "
        "model is held three times (base, PEFT, adaptfuse): use a small one.",
    )
    demo_parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when usable)"
    )
    demo_parser.add_argument(
        "--model", metavar="PATH", help="a local Hugging Face causal LM folder (no downloads)"
    )
    demo_parser.add_argument(
        "--adapters",
        nargs="+",
        metavar="DIR",
        help="PEFT LoRA folders for --model (default: random adapters made with PEFT)",
    )
    demo_parser.set_defaults(run=demo)

    inspect_parser = commands.add_parser(
        "inspect",
        parents=[verbose],
        help="a PEFT adapter folder's modules, ranks, sizes, and whether adaptfuse loads it",
        description="Reads a PEFT adapter folder without loading any model and prints, per "
        "module, its shapes, rank and alpha (rank_pattern / alpha_pattern applied), PEFT's "
        "scaling (rsLoRA included), parameters and size; then whether adaptfuse can load it "
        "and, if not, every reason. Exit status 0: loadable, 1: not loadable, 2: no such path.",
    )
    inspect_parser.add_argument("path", metavar="PATH", help="the adapter folder")
    inspect_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect_parser.set_defaults(run=inspect)

    merge_parser = commands.add_parser(
        "merge",
        parents=[verbose],
        help="write base + weighted adapters as a merged safetensors checkpoint",
        description="Writes a merged checkpoint: every adapted weight W becomes W + sum of "
        "weight x scaling x B^T A over the adapters, computed by the same op as the in-place "
        "mgr.merge({...}) and equal to it bit for bit on the same device. Shards are "
        "processed one at a time (peak memory near one shard); the output keeps the base's "
        "shard names and index, and config, tokenizer and other non-weight files are copied.",
    )
    merge_parser.add_argument(
        "--base", required=True, metavar="MODEL_DIR", help="transformers model folder"
    )
    merge_parser.add_argument(
        "--adapter",
        required=True,
        nargs="+",
        action="extend",
        metavar="DIR[:WEIGHT]",
        help="a PEFT LoRA folder and its merge weight (default 1); repeat or list several",
    )
    merge_parser.add_argument("-o", "--out", required=True, metavar="OUT_DIR")
    merge_parser.add_argument(
        "--device", default="cpu", help="where the merge op runs (cpu or cuda; default cpu)"
    )
    merge_parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    merge_parser.set_defaults(run=merge)

    bench_parser = commands.add_parser(
        "bench",
        parents=[verbose],
        help="run the benchmarks: JSON, PNG plots and a summary table",
        description="Runs benchmarks/bench_<name>.py of the source checkout (kernels: "
        "shrink + expand against the byte bound; merge: merge + unmerge and the exact-restore "
        "record; model: base vs PEFT vs adaptfuse on a random Llama; kinds: bottleneck vs "
        "LoRA cost; quality: bottleneck vs LoRA adapters trained on held-out synthetic tasks, "
        "minutes, so run only when named, never by all), writes each one's JSON (setup, "
        "device, versions, figures) and PNG plots, and prints a summary. CPU variants on a "
        "CPU, GPU variants with --device cuda.",
    )
    bench_parser.add_argument(
        "which",
        nargs="?",
        default="all",
        # benchmarking.CHOICES, spelled out here: importing adaptfuse would slow down --help
        choices=["kernels", "merge", "model", "kinds", "quality", "all"],
        help="which benchmark (default all: every one but quality)",
    )
    bench_parser.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda when usable)"
    )
    bench_parser.add_argument(
        "--out",
        metavar="DIR",
        help="where JSON and PNG go (default benchmarks/results/; with --quick a temp folder)",
    )
    bench_parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and 1-3 repeats: seconds, to check the pipeline (figures mean little)",
    )
    bench_parser.set_defaults(run=bench)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.contextmanager
def _library_chatter(shown: bool):
    """Hides library deprecation warnings and transformers' log lines unless --verbose, and
    puts everything back afterwards (main() may run inside a longer-lived process)."""
    if shown:
        yield
        return
    previous = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # read when transformers sets up logging
    logging = getattr(sys.modules.get("transformers"), "logging", None)
    level = logging.get_verbosity() if logging else None
    if logging:
        logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = previous
        if logging:
            logging.set_verbosity(level)


def main(argv=None) -> int:
    """Entry point of the `adaptfuse` command: 0 success, 1 failure (one line on stderr, the
    traceback with --verbose), 2 bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with status 2 on bad usage
    try:
        with _library_chatter(shown=args.verbose):
            return args.run(args)
    except KeyboardInterrupt:
        print(f"adaptfuse {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing to report; keep Python's exit-time flush
        # of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as error:
        if args.verbose:
            traceback.print_exc()
        status = EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILED
        print(f"adaptfuse {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
