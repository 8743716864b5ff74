"""Timing and result-writing helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    return f"{model} x{os.cpu_count()} threads={torch.get_num_threads()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} threads={torch.get_num_threads()}"


def versions() -> dict:
    import adaptfuse

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "adaptfuse": adaptfuse.__version__,
        "adaptfuse_cuda_built": adaptfuse.cuda_built(),
        "adaptfuse_cpu_kernels": adaptfuse.cpu_kernels(),
    }
    for name in ("transformers", "peft"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            pass
    return found


def random_llama(
    hidden: int,
    intermediate: int,
    layers: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    heads: int = 16,
    kv_heads: int = 8,
    vocab: int = 32000,
):
    """The benchmarks' random-weight Llama (DESIGN.md's CPU shape family by default: 16
    heads, 8 KV heads, vocab 32000), seeded, built directly on `device` in `dtype` (an 8B
    model initialised on the host would take minutes)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        pad_token_id=0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes read plus bytes written per second of a large device-to-device copy."""
    size = (512 << 20) if device.startswith("cuda") else (64 << 20)
    source = torch.empty(size, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    timing = interleaved_medians({"copy": lambda: target.copy_(source)}, repeats, device)
    return 2 * size / (timing["copy"]["median_us"] * 1e-6)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 3
) -> dict[str, dict]:
    """Runs the candidates round-robin, reversing the order every other round (A B C C B A
    ...), so that drifts in clock speed or load, and whatever one candidate leaves in the
    caches for the next, hit all of them alike; reports median, spread and the samples in
    microseconds."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(repeats):
        names = list(candidates) if round_index % 2 == 0 else list(candidates)[::-1]
        for name in names:
            fn = candidates[name]
            if device.startswith("cuda"):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) * 1e3)
            else:
                begin = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - begin) * 1e6)
    return {
        name: {
            "median_us": statistics.median(values),
            "min_us": min(values),
            "max_us": max(values),
            "repeats": len(values),
            "samples_us": values,
        }
        for name, values in samples.items()
    }


def ratio_interval(
    samples: Sequence[float], base_samples: Sequence[float], resamples: int = 2000
) -> tuple[float, float]:
    """95% bootstrap interval of median(samples) / median(base_samples), resampling the
    interleaved rounds together (each round timed both). On a noisy machine a ratio of
    medians moves by several percent between runs; this says by how much."""
    rng = random.Random(0)
    rounds = min(len(samples), len(base_samples))
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(rounds) for _ in range(rounds)]
        ratios.append(
            statistics.median(samples[i] for i in picks)
            / statistics.median(base_samples[i] for i in picks)
        )
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def graph_medians(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    device: str,
    calls: int = 20,
    warmup: int = 3,
) -> dict[str, dict]:
    """interleaved_medians of CUDA-graph replays of `calls` back-to-back calls each, reported
    per call: launch gaps and host overhead stay out of kernel timings (METHOD.md). A
    candidate whose capture fails is timed per call; each result says how ("timing")."""
    if not device.startswith("cuda"):
        timings = interleaved_medians(candidates, repeats, device, warmup)
        for timing in timings.values():
            timing["timing"] = "per call"
        return timings
    from adaptfuse import graphs

    runnable, calls_per_sample = {}, {}
    for name, fn in candidates.items():
        try:
            runnable[name] = graphs.capture(fn, warmup, calls).replay
            calls_per_sample[name] = calls
        except Exception:  # noqa: BLE001 - e.g. a host sync inside: timed per call instead
            torch.cuda.synchronize()
            runnable[name], calls_per_sample[name] = fn, 1
    timings = interleaved_medians(runnable, repeats, device, warmup=1)
    for name, timing in timings.items():
        count = calls_per_sample[name]
        for key in ("median_us", "min_us", "max_us"):
            timing[key] /= count
        timing["timing"] = f"graph of {count} calls" if count > 1 else "per call"
    return timings


def write_result(kind: str, device: str, payload: dict, out_dir: str | None = None) -> str:
    """benchmarks/results/<date>_<device>_<kind>.json with setup, device and versions."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    name = device_name(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name.split(" x")[0]).strip("-").lower()[:40]
    date = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"{date}_{slug}_{kind}.json")
    document = {"benchmark": kind, "date": date, "device": name, "versions": versions(), **payload}
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
    return path


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
