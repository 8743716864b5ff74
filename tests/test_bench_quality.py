"""benchmarks/bench_adapter_quality.py (bottleneck against LoRA, trained on held-out tasks), run
for real in subprocesses with --quick: through `adaptfuse bench quality` on the synthetic
setup, and on a local model folder and JSONL data. The figures of a --quick run mean nothing;
what is checked is the pipeline: every adapter trained in one batch, equal budgets, the JSON
(setup, device, versions, per task and kind results, curves, figures) and the PNGs."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the bench extra
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_adapter_quality.py"
METRICS = ("loss", "token_accuracy", "exact_match")


def run(*args, timeout=240) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def check_document(out: Path, tasks: list[str], kinds: list[str], lrs: int, seeds=2) -> dict:
    from PIL import Image

    (json_path,) = out.glob("*_quality_*.json")
    document = json.loads(json_path.read_text())
    assert {"setup", "device", "versions", "figures", "best", "base", "runs"} <= document.keys()
    setup = document["setup"]
    assert setup["tasks"] == tasks and list(setup["kinds"]) == kinds
    # Every (task, kind, lr, seed) adapter, all of them in one batch.
    count = len(tasks) * len(kinds) * lrs * seeds
    assert setup["adapters_in_the_batch"] == len(document["runs"]) == count
    assert setup["rows_per_step"] == count * setup["batch_per_adapter"]
    budgets = [k["parameters"] for k in setup["kinds"].values()]
    assert max(budgets) <= 1.5 * min(budgets), setup["kinds"]
    for run_ in document["runs"]:
        curve = run_["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == setup["steps"]
        assert run_["parameters"] == setup["kinds"][run_["kind"]]["parameters"]
    for task in tasks:
        assert set(document["best"][task]) == set(kinds)
        for scores in [document["base"][task], *document["best"][task].values()]:
            assert math.isfinite(scores["loss"]) and scores["loss"] > 0
            assert 0 <= scores["token_accuracy"] <= 1 and 0 <= scores["exact_match"] <= 1
        for kind, best in document["best"][task].items():
            # Trained adapters beat the frozen base on held-out loss, even in a few steps.
            assert best["loss"] < document["base"][task]["loss"], (task, kind)
            assert len(best["seeds"]) == seeds
            assert best["loss"] == pytest.approx(sum(s["loss"] for s in best["seeds"]) / seeds)
    assert sorted(document["figures"]) == sorted(
        json_path.stem + suffix for suffix in ("_curves.png", "_summary.png")
    )
    for name in document["figures"]:
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    return document


def test_bench_quality_quick_through_the_cli(tmp_path):
    out = tmp_path / "bench"
    result = run(
        "-m", "adaptfuse.cli", "bench", "quality", "--quick", "--device", "cpu", "--out", out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for task in ("reverse", "permute"):
        summary = f"{task}: held-out loss / exact match"
        assert any(line.startswith("quality") and summary in line for line in lines)
    document = check_document(out, ["reverse", "permute"], ["lora", "seq_bn"], lrs=2)
    assert document["setup"]["mode"] == "synthetic" and document["pretraining"]["steps"] > 0
    assert document["cli"] == {
        "command": "adaptfuse bench quality",
        "quick": True,
        "argv": ["--device", "cpu", "--quick", "--out-dir", str(out)],
    }


def test_bench_quality_on_a_local_model_and_jsonl_data(tmp_path):
    """--model / --data: a saved tiny Llama with a word-level tokenizer, reversal data."""
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    words = [f"w{i}" for i in range(12)]
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", "=", *words])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model_dir = tmp_path / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gen = torch.Generator().manual_seed(1)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for _ in range(60):
            prompt = [words[int(i)] for i in torch.randint(len(words), (3,), generator=gen)]
            line = {"prompt": " ".join(prompt) + " =", "completion": " ".join(prompt[::-1])}
            f.write(json.dumps(line) + "\n")
    out = tmp_path / "out"
    options = "--quick --kinds lora seq_bn par_bn --reduction-factor 4 --threads 1".split()
    result = run(SCRIPT, "--model", model_dir, "--data", data, *options, "--out-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    document = check_document(out, ["data"], ["lora", "seq_bn", "par_bn"], lrs=2)
    setup = document["setup"]
    assert setup["mode"] == "model" and document["pretraining"] is None
    assert setup["data"]["held_out_examples"] == 6 and setup["data"]["train_examples"] == 54
    assert setup["kinds"]["seq_bn"]["dim"] == 8 and setup["kinds"]["lora"]["rank"] >= 1


def test_bench_usage_errors():
    result = run(SCRIPT, "--data", "x.jsonl")
    assert result.returncode == 2 and "--model and --data go together" in result.stderr


def test_quality_is_a_bench_target_outside_all():
    from adaptfuse import benchmarking, cli

    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    bench = commands.choices["bench"]
    (which,) = [action for action in bench._actions if action.dest == "which"]
    assert tuple(which.choices) == benchmarking.CHOICES
    assert "quality" in benchmarking.CHOICES and "quality" not in benchmarking.BENCHMARKS
