"""The `adaptfuse` command line, run for real (subprocesses) on tiny random-weight models and
PEFT-saved adapters: printed contents, files written, exit codes, and the merged checkpoint
against the in-place merge bit for bit; and adaptfuse.routing.Split's proportions and its
stability across processes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_identical

import adaptfuse
from adaptfuse import cli
from adaptfuse.routing import Split

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_patch import BASE_CONFIG, good_tensors, save_adapters, tiny_model, write_adapter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYER = "model.layers.0.self_attn.q_proj"
PREFIX = "base_model.model."


def run_cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m adaptfuse.cli ARGS` from the repository root (this checkout's adaptfuse)."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "adaptfuse.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def assert_one_line_error(result, command: str, *fragments: str):
    """An error is one line on stderr naming the command, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("adaptfuse ")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"adaptfuse {command}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- fixtures: tiny saved models and adapters --------------------------------------------


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A random Llama saved in bf16 as several shards (with an index), three PEFT adapters
    (rank/alpha patterns, rsLoRA, exclude_modules), and non-weight files to copy."""
    directory = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    base = tiny_model("llama")
    adapters = save_adapters(base, "llama", directory)
    base_dir = directory / "base"
    base.to(torch.bfloat16).save_pretrained(base_dir, max_shard_size="60KB")
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (base_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    return base_dir, adapters


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """GPT-2 (Conv1D weights stored [H_in, H_out], square attn.c_proj) in one fp32 shard."""
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    base = tiny_model("gpt2")
    adapters = save_adapters(base, "gpt2", directory)
    base.save_pretrained(directory / "base")
    return directory / "base", adapters


# ---- --help, usage errors, exit codes ------------------------------------------------------


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], "adaptfuse inspect"),
        (["demo"], "--adapters"),
        (["inspect"], "Exit status 0: loadable"),
        (["merge"], "DIR[:WEIGHT]"),
        (["bench"], "{kernels,merge,model,kinds,quality,all}"),
    ],
)
def test_help_of_every_command(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert expected in " ".join(capsys.readouterr().out.split())


def test_missing_path_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("inspect", missing)
    assert result.returncode == 2
    assert_one_line_error(result, "inspect", str(missing), "no such file or directory")


def test_usage_errors_in_process(tmp_path, capsys):
    """The other refusals of bad arguments, without a subprocess each."""
    missing = str(tmp_path / "nowhere")
    cases = [
        (["merge", "--base", missing, "--adapter", str(tmp_path), "-o", "x"], f"--base {missing}"),
        (["merge", "--base", str(tmp_path), "--adapter", missing, "-o", "x"], "no such file"),
        (["demo", "--adapters", str(tmp_path)], "--adapters needs --model"),
        (["demo", "--model", str(tmp_path / "no-model")], "no such file or directory"),
        (["demo", "--device", "tpu"], "use cpu or cuda"),
        (
            ["merge", "--base", str(tmp_path), "--adapter", f"{tmp_path}:inf", "-o", "x"],
            "not finite",
        ),
        (["bench", "merge", "--device", "mps"], "use cpu or cuda"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, (argv, error)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


# ---- inspect ------------------------------------------------------------------------------


def test_inspect_good_adapter(llama_checkpoint):
    """adapter1: r=8, alpha 16, rank_pattern down_proj 2, alpha_pattern gate_proj 5;
    adapter2: rsLoRA r=16, alpha 8, k_proj excluded."""
    _, adapters = llama_checkpoint
    result = run_cli("inspect", adapters["adapter1"], "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loadable"] and report["problems"] == []
    modules = {m["module"]: m for m in report["modules"]}
    assert len(modules) == 14  # 2 layers x 7 projections
    down = modules["model.layers.1.mlp.down_proj"]
    gate = modules["model.layers.0.mlp.gate_proj"]
    q = modules["model.layers.0.self_attn.q_proj"]
    assert (down["rank"], down["alpha"], down["scale"]) == (2, 16, 8.0)
    assert (gate["rank"], gate["alpha"], gate["scale"]) == (8, 5, 5 / 8)
    assert (q["h_in"], q["h_out"], q["rank"], q["scale"]) == (72, 72, 8, 2.0)
    assert gate["parameters"] == 8 * (72 + 100) and gate["bytes"] == 4 * gate["parameters"]
    assert report["total_parameters"] == sum(m["parameters"] for m in report["modules"])
    assert report["max_rank"] == 8

    result = run_cli("inspect", adapters["adapter2"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    v_proj = next(line for line in lines if line.startswith("model.layers.1.self_attn.v_proj"))
    assert v_proj.split()[1:8] == ["72", "->", "24", "16", "8", "2", "1,536"]  # 8 / sqrt(16)
    assert not any(line.startswith("model.") and "k_proj" in line for line in lines)
    assert "12 modules" in result.stdout and "patch(max_rank >= 16)" in result.stdout
    assert "verdict: adaptfuse can load this adapter" in result.stdout


def bad_adapter(kind: str, directory: Path) -> tuple[Path, str]:
    """An adapter folder with one problem, and the words inspect must give as its reason."""
    path = directory / kind
    tensors = good_tensors()
    config = dict(BASE_CONFIG)
    if kind == "dora":
        config["use_dora"] = True
        tensors[f"{PREFIX}{LAYER}.lora_magnitude_vector"] = torch.ones(72)
        reason = "option use_dora=True is not supported"
    elif kind == "bias":
        config["bias"] = "lora_only"
        reason = "option bias='lora_only' is not supported (only 'none')"
    elif kind == "not_lora":
        config["peft_type"] = "IA3"
        reason = "peft_type 'IA3' is not LORA"
    elif kind == "pickle_only":
        os.makedirs(path)
        (path / "adapter_config.json").write_text(json.dumps(config))
        (path / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
        return path, "adapter_model.bin: pickle files are never opened"
    elif kind == "missing_b":
        del tensors[f"{PREFIX}{LAYER}.lora_B.weight"]
        reason = f"layer {LAYER} has lora_A but not both lora_A and lora_B"
    elif kind == "rank_mismatch":
        tensors[f"{PREFIX}{LAYER}.lora_B.weight"] = torch.randn(72, 3)
        reason = f"layer {LAYER}: lora_A (4, 72) and lora_B (72, 3) do not agree on a rank"
    elif kind == "rank_over_512":
        config["r"] = 520
        tensors = good_tensors(rank=520)
        reason = f"layer {LAYER} has rank 520; adaptfuse supports ranks 1..512"
    elif kind == "rank_not_config":
        config["rank_pattern"] = {"q_proj": 2}
        reason = f"layer {LAYER} has rank 4 but adapter_config.json gives it rank 2"
    elif kind == "non_finite":
        tensors[f"{PREFIX}{LAYER}.lora_A.weight"][1, 2] = float("inf")
        reason = f"layer {LAYER} holds non-finite values"
    else:
        raise ValueError(kind)
    write_adapter(path, config, tensors)
    return path, reason


BAD_KINDS = [
    "dora",
    "bias",
    "not_lora",
    "pickle_only",
    "missing_b",
    "rank_mismatch",
    "rank_over_512",
    "rank_not_config",
    "non_finite",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_inspect_names_why_an_adapter_is_refused(kind, tmp_path, capsys):
    """In process (one subprocess below covers the real run): exit status 1 and the reason,
    which is also load_adapter's reason on a patched model."""
    path, reason = bad_adapter(kind, tmp_path)
    assert cli.main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "verdict: adaptfuse cannot load this adapter:" in out
    assert reason in out, out
    model = tiny_model("llama")
    manager = adaptfuse.patch(model, max_loras=1, max_rank=8)
    with pytest.raises(adaptfuse.AdapterError) as error:
        manager.load_adapter(str(path))
    assert reason.split(": ")[-1] in str(error.value)


def test_inspect_lists_every_problem_in_a_subprocess(tmp_path):
    path = tmp_path / "several"
    tensors = good_tensors()
    tensors[f"{PREFIX}{LAYER}.lora_A.weight"][0, 0] = float("nan")
    tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 72)
    write_adapter(path, {**BASE_CONFIG, "use_dora": True, "lora_bias": True}, tensors)
    result = run_cli("inspect", path)
    assert result.returncode == 1, result.stderr
    problems = [line for line in result.stdout.splitlines() if line.startswith("  - ")]
    assert len(problems) == 4, result.stdout
    for reason in (
        "use_dora=True",
        "lora_bias=True",
        f"layer {LAYER} holds non-finite values",
        "layer model.layers.1.self_attn.q_proj has lora_A but not both",
    ):
        assert sum(reason in p for p in problems) == 1, (reason, problems)


# ---- merge --------------------------------------------------------------------------------


def in_place_merge(base_dir, adapters: dict[str, str], weights: dict[str, float]) -> dict:
    """The base loaded with transformers (its checkpoint's dtype), patched, the adapters loaded
    and merged in place with mgr.merge({...}): parameter name -> merged tensor."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    manager = adaptfuse.patch(model, max_loras=len(adapters), max_rank=64)
    for name, path in adapters.items():
        manager.load_adapter(path, adapter_name=name)
    manager.merge(weights)
    return {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_checkpoint_equals_in_place_merge_bit_for_bit(
    arch, llama_checkpoint, gpt2_checkpoint, tmp_path
):
    from safetensors import safe_open

    base_dir, adapters = llama_checkpoint if arch == "llama" else gpt2_checkpoint
    weights = dict(zip(adapters, [0.7, -0.3, 1.0], strict=False))
    out = tmp_path / "merged"
    specs = [f"{adapters[name]}:{weight}" for name, weight in weights.items()]
    result = run_cli("merge", "--base", base_dir, "--adapter", *specs, "-o", out)
    assert result.returncode == 0, result.stderr

    expected = in_place_merge(base_dir, adapters, weights)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    base_parameters = dict(base.named_parameters())
    changed = 0
    for name, parameter in merged.named_parameters():
        assert parameter.dtype == base_parameters[name].dtype
        assert_bit_identical(parameter, expected[name], name)
        changed += not torch.equal(parameter, base_parameters[name])
    adapted = {"llama": 14, "gpt2": 8}[arch]  # layers any of the adapters adapts
    assert changed == adapted
    assert f"into {adapted} weights" in result.stdout

    # The base's layout: the same shard files holding the same keys, the index, the config.
    shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    for shard in shards:
        with safe_open(base_dir / shard, "pt") as a, safe_open(out / shard, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys()) and a.metadata() == b.metadata()
    copied = {p.name for p in base_dir.iterdir()} - set(shards) - {"pytorch_model.bin"}
    for name in copied:
        assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    assert {p.name for p in out.iterdir()} == copied | set(shards) | {"adaptfuse_merge.json"}
    if arch == "llama":
        assert len(shards) > 1 and "model.safetensors.index.json" in copied
        assert "left out: pytorch_model.bin" in result.stdout
    provenance = json.loads((out / "adaptfuse_merge.json").read_text())
    assert [a["weight"] for a in provenance["adapters"]] == list(weights.values())


def test_merge_refusals(llama_checkpoint, tmp_path):
    base_dir, adapters = llama_checkpoint
    dora, _ = bad_adapter("dora", tmp_path)
    out = tmp_path / "merged"
    result = run_cli(
        "merge", "--base", base_dir, "--adapter", adapters["adapter0"], dora, "-o", out
    )
    assert result.returncode == 1
    assert_one_line_error(result, "merge", "use_dora=True is not supported")
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))  # nothing half-written

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("merge", "--base", base_dir, "--adapter", adapters["adapter0"], "-o", out)
    assert result.returncode == 1
    assert_one_line_error(result, "merge", "exists and is not empty (--force replaces it)")
    assert (out / "keep.txt").read_text() == "mine"

    result = run_cli(
        "merge", "--base", base_dir, "--adapter", adapters["adapter0"], "-o", out, "--force"
    )
    assert result.returncode == 1
    assert_one_line_error(result, "merge", "--force replaces only a folder written by adaptfuse")
    assert (out / "keep.txt").read_text() == "mine"

    # --force replaces an earlier merge's output (in process: the same code path).
    from adaptfuse.checkpoint import CheckpointError, merge_checkpoint

    again = tmp_path / "again"
    merge_checkpoint(base_dir, [(adapters["adapter0"], 1.0)], again, progress=False)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        merge_checkpoint(base_dir, [(adapters["adapter1"], 1.0)], again, progress=False)
    merge_checkpoint(base_dir, [(adapters["adapter1"], 1.0)], again, overwrite=True, progress=False)
    provenance = json.loads((again / "adaptfuse_merge.json").read_text())
    assert provenance["adapters"][0]["path"] == os.path.abspath(adapters["adapter1"])

    result = run_cli(
        "merge", "--verbose", "--base", base_dir, "--adapter", dora, "-o", tmp_path / "other"
    )
    assert result.returncode == 1 and "Traceback" in result.stderr  # --verbose shows it


# ---- bench --------------------------------------------------------------------------------


def test_bench_quick_writes_json_plots_and_summary(tmp_path):
    pytest.importorskip("matplotlib")  # the bench extra
    Image = pytest.importorskip("PIL.Image")

    results = REPO / "benchmarks" / "results"
    committed = sorted(results.iterdir()) if results.exists() else []
    out = tmp_path / "bench"
    result = run_cli("bench", "all", "--quick", "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "benchmarks: 100%" in result.stderr  # the progress bar
    header = next(line for line in result.stdout.splitlines() if line.startswith("benchmark "))
    assert header.split() == ["benchmark", "figure", "measured", "target"]
    for name, figure in (
        ("kernels", "median fraction of copy bandwidth"),
        ("merge", "record / W bytes"),
        ("model", "prefill: adaptfuse / base"),
        ("kinds", "prefill: bottleneck dim 16"),
    ):
        assert any(line.startswith(name) and figure in line for line in result.stdout.splitlines())
        (json_path,) = out.glob(f"*_{name}_*.json")
        document = json.loads(json_path.read_text())
        assert {"setup", "device", "versions", "figures"} <= document.keys()
        assert document["versions"]["adaptfuse"] == adaptfuse.__version__
        assert document["cli"]["quick"] is True and document["figures"]
        for figure_name in document["figures"]:
            with Image.open(out / figure_name) as image:
                image.verify()
                assert image.format == "PNG" and min(image.size) > 100
    # --out was honoured: the committed results are untouched.
    assert (sorted(results.iterdir()) if results.exists() else []) == committed


# ---- demo ---------------------------------------------------------------------------------


def test_demo_runs_every_section():
    result = run_cli("demo", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    rows = [line.split() for line in out.splitlines() if line[:7].strip().isdigit()][:8]
    assert [row[1] for row in rows] == ["support-bot", "None", "legal", "tenant-7"] * 2
    assert all(row[-1] == "yes" for row in rows)  # every request matches PEFT
    # The speed line: base, adaptfuse and PEFT timed side by side, each as a ratio to base.
    speed = re.search(
        r"one forward over the batch .*: base ([\d.]+) ms \(1\.00x base\), "
        r"adaptfuse ([\d.]+) ms \(([\d.]+)x base\), PEFT ([\d.]+) ms \(([\d.]+)x base\)",
        out,
    )
    assert speed is not None, out[-2000:]
    base_ms, ours_ms, ours_ratio, peft_ms, peft_ratio = map(float, speed.groups())
    assert base_ms > 0 and ours_ms > 0 and peft_ms > 0
    for ratio, ms in ((ours_ratio, ours_ms), (peft_ratio, peft_ms)):
        assert abs(ratio - ms / base_ms) <= 0.03 * ratio  # the printed ms are rounded to 0.1
    assert re.search(r"merged [\d.]+ ms, base [\d.]+ ms \([\d.]+x base\)", out)
    assert "unmerge: 28 of 28 base weights bit-identical to before the merge: yes" in out
    assert "while merged, a request for the base model is refused" in out
    assert "A/B routing: Split({'support-bot': 0.9, 'legal': 0.1}" in out
    assert (
        "a batch still routed to it is refused" in out
        and "unknown adapter name(s) ['legal']" in out
    )
    assert "option use_dora=True is not supported" in out
    assert "checks: all passed" in out


@pytest.mark.slow
def test_demo_with_a_local_model_and_adapters(llama_checkpoint, tmp_path):
    """--model / --adapters: a bf16 model folder and real PEFT folders, one of them refused."""
    base_dir, adapters = llama_checkpoint
    dora, _ = bad_adapter("dora", tmp_path)
    result = run_cli("demo", "--model", base_dir, "--adapters", *adapters.values(), dora)
    out = result.stdout
    assert f"refused {dora}: " in out and "use_dora=True" in out
    for name in ("llama-adapter0", "llama-adapter1", "llama-adapter2"):
        assert name in out
    assert "base weights bit-identical to before the merge: yes" in out
    assert "checks:" in out and result.returncode in (0, 1)
    # bf16 greedy tokens may part from PEFT's (fp32 LoRA weights) where logits nearly tie;
    # every other check must pass.
    failed = out.split("checks: ")[-1]
    assert failed.strip() in ("all passed", "FAILED: mixed batch matches PEFT"), failed


# ---- routing ------------------------------------------------------------------------------


def expected_arm(key: str, salt: str, arms: dict) -> str:
    """The documented scheme, computed independently: SHA-256(salt, 0, key), first 8 bytes
    big-endian as a point in [0, 1), slices of [0, 1) in the order of the arms."""
    digest = hashlib.sha256(salt.encode() + b"\x00" + key.encode()).digest()
    point = int.from_bytes(digest[:8], "big")
    cumulative = 0.0
    for name, weight in arms.items():
        cumulative += weight
        if point < cumulative * 2**64:
            return name
    return name


def test_split_proportions_within_binomial_bounds():
    arms = {"v1": 0.6, None: 0.25, "v2": 0.1, "v3": 0.05}
    split = Split(arms, salt="proportions")
    keys = [f"request-{i}" for i in range(10_000)]
    names = split.names(keys)
    assert len(names) == len(keys) and set(names) <= set(arms)
    counts = split.counts
    assert sum(counts.values()) == len(keys)
    for arm, weight in arms.items():
        # A count is Binomial(n, p) if SHA-256 behaves as a random function: 5 standard
        # deviations leave a chance of about 6e-7 per arm to fail for no fault.
        sigma = (len(keys) * weight * (1 - weight)) ** 0.5
        assert abs(counts[arm] - len(keys) * weight) <= 5 * sigma, (arm, counts)
    assert names[:200] == [expected_arm(k, "proportions", arms) for k in keys[:200]]


def test_split_is_stable_across_processes():
    """Python's hash() is salted per process; the split must not be."""
    arms = {"v1": 0.9, "v2": 0.1}
    keys = [f"user-{i}" for i in range(2000)] + list(range(50))
    here = Split(arms, salt="exp").names(keys)
    program = (
        "import json, sys; from adaptfuse.routing import Split; "
        f"keys = [f'user-{{i}}' for i in range(2000)] + list(range(50)); "
        f"print(json.dumps(Split({arms!r}, salt='exp').names(keys)))"
    )
    other = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )
    assert json.loads(other.stdout) == here
    assert Split(arms, salt="exp").names(keys) == here  # and within one process
    assert Split(arms, salt="exp").names([7]) == Split(arms, salt="exp").names(["7"])


def test_split_moving_weight_moves_only_the_keys_that_must_move():
    keys = [f"user-{i}" for i in range(5000)]
    before = Split({"v1": 0.9, "v2": 0.1}).names(keys)
    after = Split({"v1": 0.8, "v2": 0.2}).names(keys)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert moved and all(pair == ("v1", "v2") for pair in moved)
    other_experiment = Split({"v1": 0.9, "v2": 0.1}, salt="another").names(keys)
    assert other_experiment != before  # salts give independent assignments


def test_split_counts_and_serving(tmp_path):
    split = Split({"a": 0.5, "b": 0.5, "off": 0.0})
    assert split.arm_of("k") in ("a", "b") and split.counts == {"a": 0, "b": 0, "off": 0}
    names = split.names(["k1", "k2", "k3"]) + [split.assign("k4")]
    assert sum(split.counts.values()) == 4 and "off" not in names
    split.reset_counts()
    assert split.counts == {"a": 0, "b": 0, "off": 0}

    # The names go straight into adapter_names.
    torch.manual_seed(0)
    base = tiny_model("llama")
    directory = save_adapters(base, "llama", tmp_path)["adapter0"]
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=8)
    manager.load_adapter(directory, adapter_name="a")
    routed = Split({"a": 0.5, None: 0.5}, salt="serve")
    ids = torch.randint(3, 90, (6, 5), generator=torch.Generator().manual_seed(0))
    names = routed.names([f"user-{i}" for i in range(6)])
    with torch.no_grad():
        logits = model(ids, adapter_names=names).logits
        plain = model(ids).logits
    for row, name in enumerate(names):
        assert torch.equal(logits[row], plain[row]) == (name is None)


@pytest.mark.parametrize(
    "arms, error, message",
    [
        ({}, ValueError, "non-empty"),
        ({"a": 0.5}, ValueError, "sum to 0.5, not 1"),
        ({"a": 0.6, "b": 0.6}, ValueError, "sum to 1.2"),
        ({"a": -0.1, "b": 1.1}, ValueError, "weight of arm 'a' is -0.1"),
        ({"a": float("nan"), "b": 1.0}, ValueError, "weight of arm 'a' is nan"),
        ({"a": "0.5", "b": 0.5}, TypeError, "must be a number"),
        ({"a": True}, TypeError, "must be a number"),
        ({"": 1.0}, ValueError, "non-empty str"),
        ({3: 1.0}, ValueError, "got 3"),
    ],
)
def test_split_refuses_bad_weights(arms, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        Split(arms)


def test_split_refuses_unstable_keys():
    split = Split({"a": 1.0})
    for key in (1.5, None, ("tuple",), True):
        with pytest.raises(TypeError, match="routing keys must be str, int or bytes"):
            split.arm_of(key)
