"""Tensor-parallel benchmark: the same mixed-adapter batch on one process (TP=1) and on
`--tp` processes (transformers' tp_plan="auto" under torchrun; gloo on CPU, NCCL on GPUs),
the base model and adaptfuse side by side in each run.

Default shape (DESIGN.md's CPU targets): hidden 1024, intermediate 2816, 8 layers, 16 heads,
8 KV heads, vocab 32000, fp32; 16 sequences of 64-token prompts, 8 adapters of rank 16 on all
7 projections, two sequences per adapter. Prefill of the prompts, and one decode step with a
64-token KV cache. TP=1 runs one process with --threads threads; TP=N runs N processes with
--threads / N threads each, so both use the same cores.

Under TP, the row-parallel layers (o_proj, down_proj) need the ranks' partial shrink results
summed. Two ways are timed side by side (--row-reduce both):
- "in-allreduce" (what adaptfuse does): each rank adds the expand of its partial v to its
  partial base output before the all-reduce the base layer does anyway;
- "intermediate": the base layer runs as it is (its all-reduce included), then one more
  all-reduce sums the fp32 v [tokens, max_rank] and every rank expands the full v.
  This variant exists only here, to measure the choice.

    python benchmarks/bench_tp.py [--tp 2] [--layers 8] [--repeats 9] [--row-reduce both]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import types

import torch
from common import interleaved_medians, random_llama, table, write_result

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_model_and_adapters(args, directory: str) -> dict[str, str]:
    """A random Llama saved as a checkpoint (tp_plan loads from disk) and `args.adapters`
    random PEFT-format LoRA adapters (rank args.rank on all 7 projections)."""
    from safetensors.torch import save_file

    model = random_llama(args.hidden, args.intermediate, args.layers)
    model.save_pretrained(os.path.join(directory, "model"))
    shapes = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJECTIONS
    }
    del model
    gen = torch.Generator().manual_seed(2)
    paths = {}
    for i in range(args.adapters):
        tensors = {}
        for name, (h_in, h_out) in shapes.items():
            key = f"base_model.model.{name}"
            a = torch.randn(args.rank, h_in, generator=gen) / h_in**0.5
            tensors[f"{key}.lora_A.weight"] = a
            tensors[f"{key}.lora_B.weight"] = torch.randn(h_out, args.rank, generator=gen) * 0.01
        path = os.path.join(directory, f"tenant-{i}")
        os.makedirs(path)
        config = {
            "peft_type": "LORA",
            "r": args.rank,
            "lora_alpha": 2 * args.rank,
            "target_modules": PROJECTIONS,
        }
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        paths[f"tenant-{i}"] = path
    return paths


def _reduce_intermediate_forward(layer, x, *args, **kwargs):
    """The measured alternative for a row-parallel layer: base layer (with its all-reduce),
    then an all-reduce of the partial fp32 v, then the expand of the full v on every rank."""
    import torch.distributed as dist

    from adaptfuse import ops
    from adaptfuse.layers import current_plan

    y = layer.base_layer(x, *args, **kwargs)
    plans = current_plan.get()
    if plans is None or layer.active_slots == 0:
        return y
    plan = plans.on(x.device)
    tokens = x.reshape(-1, layer.in_features)
    v = ops.shrink(tokens, layer.lora_A, layer.lora_ranks, layer.lora_scales, plan)
    dist.all_reduce(v, group=layer.tensor_parallel.group)
    ops.expand_(y.view(-1, layer.out_features), v, [layer.lora_B], [0], layer.lora_ranks, plan)
    return y


@contextlib.contextmanager
def reduce_intermediate(manager):
    from adaptfuse.distributed import ROW

    rows = [
        layer
        for layer in manager.layers.values()
        if layer.tensor_parallel is not None and layer.tensor_parallel.kind == ROW
    ]
    for layer in rows:
        layer.forward = types.MethodType(_reduce_intermediate_forward, layer)
    try:
        yield
    finally:
        for layer in rows:
            del layer.forward


def worker(args) -> None:
    """One process of a TP=N run (under torchrun), or the whole TP=1 run."""
    import transformers

    import adaptfuse

    with open(os.path.join(args.workdir, "paths.json")) as f:
        paths = json.load(f)
    tensor_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    torch.set_num_threads(args.threads_per_process)
    options = {"tp_plan": "auto"} if tensor_parallel else {}
    model_dir = os.path.join(args.workdir, "model")
    base = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **options
    ).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **options
    ).eval()
    manager = adaptfuse.patch(ours, max_loras=args.adapters, max_rank=args.rank)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    names = list(paths)
    per_adapter = args.batch // args.adapters
    adapter_names = [names[i // per_adapter] for i in range(args.batch)]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (args.batch, args.prompt), generator=gen)
    next_ids = torch.randint(3, 32000, (args.batch, 1), generator=gen)

    variants = {"adaptfuse": contextlib.nullcontext}
    if tensor_parallel and args.row_reduce == "both":
        variants["adaptfuse-intermediate-allreduce"] = lambda: reduce_intermediate(manager)

    def adapted(call, variant):
        def run():
            with variants[variant]():
                return call()

        return run

    results = {}
    with torch.inference_mode():
        prefill = {"base": lambda: base(ids)}
        for variant in variants:
            prefill[variant] = adapted(lambda: ours(ids, adapter_names=adapter_names), variant)
        results["prefill"] = interleaved_medians(prefill, args.repeats, "cpu", warmup=1)
        caches = {"base": base(ids, use_cache=True).past_key_values}
        for variant in variants:
            caches[variant] = ours(ids, adapter_names=adapter_names, use_cache=True).past_key_values

        def step(model, cache, **kwargs):
            out = model(next_ids, past_key_values=cache, **kwargs)
            cache.crop(-1)  # every run sees the same 64-token cache
            return out

        decode = {"base": lambda: step(base, caches["base"])}
        for variant in variants:
            decode[variant] = adapted(
                lambda v=variant: step(ours, caches[v], adapter_names=adapter_names), variant
            )
        results["decode_step"] = interleaved_medians(decode, args.repeats * 3, "cpu", warmup=2)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        with open(args.result_file, "w") as f:
            json.dump(results, f)


def launch(args, tp: int, workdir: str) -> dict:
    result_file = os.path.join(workdir, f"tp{tp}.json")
    command = [
        __file__,
        "--worker",
        "--workdir",
        workdir,
        "--result-file",
        result_file,
        "--threads-per-process",
        str(max(1, args.threads // tp)),
    ]
    for option in ("layers", "hidden", "intermediate", "batch", "prompt", "adapters", "rank"):
        command += [f"--{option}", str(getattr(args, option))]
    command += ["--repeats", str(args.repeats), "--row-reduce", args.row_reduce]
    if tp == 1:
        command = [sys.executable, *command]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        command = [torchrun, "--standalone", f"--nproc_per_node={tp}", *command]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // tp)))
    subprocess.run(command, check=True, env=env)
    with open(result_file) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--row-reduce", choices=["both", "in-allreduce"], default="both")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--threads-per-process", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory(prefix="adaptfuse-bench-tp-") as workdir:
        paths = save_model_and_adapters(args, workdir)
        with open(os.path.join(workdir, "paths.json"), "w") as f:
            json.dump(paths, f)
        runs = {"tp1": launch(args, 1, workdir), f"tp{args.tp}": launch(args, args.tp, workdir)}
    ratios = {
        run: {
            phase: {n: t["median_us"] / timings["base"]["median_us"] for n, t in timings.items()}
            for phase, timings in phases.items()
        }
        for run, phases in runs.items()
    }
    rows = []
    for run, phases in runs.items():
        for phase, timings in phases.items():
            for name, t in timings.items():
                ratio = ratios[run][phase][name]
                rows.append((run, phase, name, f"{t['median_us'] / 1e3:.1f}", f"{ratio:.3f}"))
    print(table(rows, ["run", "phase", "candidate", "median ms", "x base of the run"]))
    result = {
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
            "tp": args.tp,
            "threads_total": args.threads,
            "backend": "gloo",
            "device": "cpu",
        },
        "timings": runs,
        "ratios_to_base": ratios,
        "targets": {"prefill": 1.03, "decode_step": 1.15},
    }
    print(f"wrote {write_result(f'tp{args.tp}_llama_fp32', 'cpu', result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
