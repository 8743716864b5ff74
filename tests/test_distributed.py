"""adaptfuse on tensor-parallel models (transformers' tp_plan="auto" under torchrun, gloo on
CPU) against PEFT in a single process with the same PEFT-saved adapters.

Each test saves a random-weight model and its adapters, launches tests/tp_worker.py with
torchrun (2 or 4 processes), and compares what every rank saw with PEFT: mixed-batch logits
within DESIGN.md's model-level tolerance, greedy generation token by token, gradients through
frozen adapters, merge/unmerge cycles bit-exact on every shard, loads that fail on one rank
only leaving every rank unchanged, layers under plans adaptfuse does not adapt refused by
name, and trainable adapters whose per-rank gradients are the same parts of PEFT's. Sizes
are chosen so that some projections shard unevenly (the last rank holds fewer features) and
adapter ranks do not divide by the number of processes."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_within_torch_error, bits
from test_patch import VOCAB, batch_with_padding, peft_model_with, save_adapters

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("torch.distributed.tensor")

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
PREFIX = "base_model.model."

pytestmark = pytest.mark.skipif(
    not os.path.exists(TORCHRUN) or not torch.distributed.is_gloo_available(),
    reason="needs torchrun and the gloo backend",
)


def tensor_parallel_model(arch: str):
    """Random-weight models whose attention heads divide by the test's process count while
    their MLP widths do not (uneven shards)."""
    common = dict(
        vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0, eos_token_id=1, bos_token_id=2
    )
    if arch == "llama":  # 2 processes: 3 heads and 1 KV head each; MLP 101 = 51 + 50
        config = transformers.LlamaConfig(
            hidden_size=72,
            intermediate_size=101,
            num_attention_heads=6,
            num_key_value_heads=2,
            **common,
        )
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "llama-4way":  # 4 processes: MLP 90 = 23 + 23 + 23 + 21
        config = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=90,
            num_attention_heads=8,
            num_key_value_heads=4,
            **common,
        )
        return transformers.LlamaForCausalLM(config).eval()
    if arch == "qwen2":  # GQA, biases on q/k/v; MLP 77 = 39 + 38
        config = transformers.Qwen2Config(
            hidden_size=56,
            intermediate_size=77,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        return transformers.Qwen2ForCausalLM(config).eval()
    if arch == "phi3":  # fused qkv_proj / gate_up_proj: colwise_gather_output, rowwise_split_input
        config = transformers.Phi3Config(
            hidden_size=64,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=4,
            **common,
        )
        return transformers.Phi3ForCausalLM(config).eval()
    raise ValueError(arch)


# Ranks 3, 5, 7 and rank_pattern entries 1 and 5: none divides by 2 or 4. Scalings stay in
# PEFT's usual range (at most 5): a scaling of 16 on a random rank-1 o_proj made one token of
# the 4-process model so ill-conditioned that even single-process adaptfuse and PEFT's fp32
# run differed from the float64 truth by more than DESIGN.md's 2x of each other.
ADAPTERS = {
    "llama": [
        dict(r=3, lora_alpha=6, target_modules="all-linear"),
        dict(
            r=8,
            lora_alpha=16,
            target_modules="all-linear",
            rank_pattern={"down_proj": 5, "o_proj": 1},
            alpha_pattern={"gate_proj": 5, "o_proj": 2},
        ),
        dict(r=7, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], use_rslora=True),
    ],
    "qwen2": [
        dict(r=5, lora_alpha=10, target_modules="all-linear"),
        dict(r=2, lora_alpha=3, target_modules=["k_proj", "up_proj", "down_proj"]),
        dict(r=7, lora_alpha=7, target_modules="all-linear", exclude_modules=["gate_proj"]),
    ],
    "phi3": [
        dict(r=3, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]),
        dict(r=5, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        dict(r=4, lora_alpha=2, target_modules=["o_proj", "down_proj"]),
    ],
}
ADAPTERS["llama-4way"] = ADAPTERS["llama"]
NAMES = ["adapter0", None, "adapter2", "__base__", "adapter1", "adapter0"]


def build_case(arch: str, directory, checks: list[str], **extra) -> tuple[dict, dict]:
    """Saves the model, its adapters and the inputs; returns the worker's case and what
    the test needs on its side (the base model, adapter paths, inputs)."""
    torch.manual_seed(0)
    base = tensor_parallel_model(arch)
    model_dir = os.path.join(directory, "model")
    base.save_pretrained(model_dir)
    paths = save_adapters(base, arch, str(directory), configs=ADAPTERS)
    ids, mask = batch_with_padding(len(NAMES), 9, "left")
    gen_ids, gen_mask = batch_with_padding(3, 6, "left", seed=5)
    inputs = {
        "ids": ids,
        "mask": mask,
        "gen_ids": gen_ids,
        "gen_mask": gen_mask,
        "embeds": base.get_input_embeddings()(ids[:3]).detach(),
        "train_ids": ids[:5],
        "train_labels": torch.where(mask[:5].bool(), ids[:5], -100),
    }
    torch.save(inputs, os.path.join(directory, "inputs.pt"))
    case = {
        "model": model_dir,
        "adapters": paths,
        "inputs": os.path.join(directory, "inputs.pt"),
        "out": str(directory),
        "max_loras": 4,
        "max_rank": 8,
        "checks": checks,
        "names": NAMES,
        "grad_names": ["adapter1", None, "adapter2"],
        "gen_names": ["adapter1", None, "adapter2"],
        "max_new_tokens": 6,
        "merge_adapter": "adapter1",
        "cycles": 100,
        **extra,
    }
    return case, {"base": base, "paths": paths, "inputs": inputs}


def run_workers(case: dict, processes: int, directory) -> list[dict]:
    case_path = os.path.join(directory, "case.json")
    with open(case_path, "w") as f:
        json.dump(case, f)
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", WORKER, case_path]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (
        f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-12000:]}"
    )
    return [torch.load(os.path.join(directory, f"rank{r}.pt")) for r in range(processes)]


def assert_matches_peft(ours, truth, peft32, valid, what):
    """DESIGN.md's model-level tolerance: PEFT in float64 is the truth; our largest logit
    error is at most 2x PEFT's own float32 error plus 4 ulps of the largest logit."""
    peft_error = (peft32.double() - truth).abs()[valid].max().item()
    our_error = (ours.double() - truth).abs()[valid].max().item()
    ulps = 4 * torch.finfo(torch.float32).eps * truth.abs()[valid].max().item()
    assert our_error <= 2 * peft_error + ulps, (
        f"{what}: error {our_error:.3e} vs PEFT's {peft_error:.3e} (+ {ulps:.1e})"
    )


def check_logits(results, side):
    base, paths, inputs = side["base"], side["paths"], side["inputs"]
    ids, mask = inputs["ids"], inputs["mask"]
    peft_names = [n or "__base__" for n in NAMES]
    with torch.no_grad():
        truth = peft_model_with(base, paths, torch.float64)(
            ids, attention_mask=mask, adapter_names=peft_names
        ).logits
        peft32 = peft_model_with(base, paths, torch.float32)(
            ids, attention_mask=mask, adapter_names=peft_names
        ).logits
        base_truth = copy.deepcopy(base).double()(ids, attention_mask=mask).logits
        base32 = base(ids, attention_mask=mask).logits
    valid = mask.bool()
    for rank, result in enumerate(results):
        assert result["manager"] == "TensorParallelManager"
        adapted, plain = result["logits"]["adapted"], result["logits"]["plain"]
        adapted_calls, plain_calls = result["logits"]["all_reduces"]
        assert plain_calls > 0, "the base model's row-parallel all-reduces were not counted"
        assert adapted_calls == plain_calls, "the adapters added collectives to the forward"
        assert_matches_peft(adapted, truth, peft32, valid, f"rank {rank}, mixed batch")
        assert_matches_peft(plain, base_truth, base32, valid, f"rank {rank}, base model")
        # Rows without an adapter are the base model; the adapters change the others.
        for row, name in enumerate(NAMES):
            if name in (None, "__base__"):
                assert torch.equal(adapted[row], plain[row]), f"rank {rank}, row {row}"
            else:
                assert (adapted[row] - plain[row]).abs()[valid[row]].max() > 1e-3
        assert torch.equal(bits(adapted), bits(results[0]["logits"]["adapted"]))


def check_generate(results, side):
    """Greedy tokens equal PEFT's up to the first step where PEFT's top-2 logit margin is
    below numerical noise (after a near-tie either continuation is right)."""
    base, paths, inputs = side["base"], side["paths"], side["inputs"]
    names = ["adapter1", None, "adapter2"]
    reference = peft_model_with(base, paths, torch.float32)
    prompt = inputs["gen_ids"].shape[1]
    with torch.no_grad():
        expected = reference.generate(
            input_ids=inputs["gen_ids"],
            attention_mask=inputs["gen_mask"],
            adapter_names=[n or "__base__" for n in names],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    noise = 1e-4  # far above fp32 logit differences between TP and one process (~1e-6)
    for rank, result in enumerate(results):
        tokens = result["generate"]["tokens"]
        assert tokens.shape == expected.sequences.shape
        for row in range(tokens.shape[0]):
            for step, logits in enumerate(expected.logits):
                top2 = logits[row].topk(2).values
                if top2[0] - top2[1] < noise:
                    break
                position = prompt + step
                assert tokens[row, position] == expected.sequences[row, position], (
                    f"rank {rank}, row {row}, step {step}"
                )
    with torch.no_grad():
        base_only = base.generate(
            input_ids=inputs["gen_ids"],
            attention_mask=inputs["gen_mask"],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    assert not torch.equal(results[0]["generate"]["tokens"], base_only)


def check_grad(results, side):
    base, paths, inputs = side["base"], side["paths"], side["inputs"]
    reference = peft_model_with(base, paths, torch.float32)
    for p in reference.parameters():
        p.requires_grad_(False)
    embeds = inputs["embeds"].clone().requires_grad_(True)
    names = ["adapter1", "__base__", "adapter2"]
    reference(inputs_embeds=embeds, adapter_names=names).logits.float().pow(2).mean().backward()
    for rank, result in enumerate(results):
        grad = result["grad"]
        assert grad["parameters_without_grad"], f"rank {rank}: a parameter got a gradient"
        torch.testing.assert_close(
            grad["embeds_grad"],
            embeds.grad,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, rank=rank: f"rank {rank}: {m}",
        )


def check_merge(results, side, cycles=100):
    """Every cycle restores every shard bit for bit; the merged model serves what the
    adapter served; and each shard merges exactly like the same rows/columns of the whole
    weight merged in one process."""
    import adaptfuse

    whole = copy.deepcopy(side["base"])
    manager = adaptfuse.patch(whole, max_loras=4, max_rank=8)
    for name, path in side["paths"].items():
        manager.load_adapter(path, adapter_name=name)
    manager.merge("adapter1")
    for rank, result in enumerate(results):
        merge = result["merge"]
        assert merge["mismatches_per_cycle"] == [0] * cycles, f"rank {rank}"
        torch.testing.assert_close(merge["merged_logits"], merge["served"], rtol=1e-4, atol=1e-4)
        assert merge["layout"], "no layer is sharded"
        for path, (kind, start, stop) in merge["layout"].items():
            full = manager.layers[path].weight_out_in()
            expected = full[start:stop] if kind == "column" else full[:, start:stop]
            shard = merge["merged_shards"][path]
            assert torch.equal(bits(shard), bits(expected)), f"rank {rank}, {path}"


def corrupt_copies(paths: dict, directory, layers: dict) -> dict:
    """Copies of adapter1 with one non-finite value each, at a place only one rank reads:
    layers maps a label to (module path, "A" column or "B" row, index)."""
    from safetensors.torch import load_file, save_file

    source = paths["adapter1"]
    tensors = load_file(os.path.join(source, "adapter_model.safetensors"))
    with open(os.path.join(source, "adapter_config.json")) as f:
        config = json.load(f)
    corrupt = {}
    for label, (module, which, index) in layers.items():
        changed = {k: v.clone() for k, v in tensors.items()}
        if which == "A":
            changed[f"{PREFIX}{module}.lora_A.weight"][:, index] = float("nan")
        else:
            changed[f"{PREFIX}{module}.lora_B.weight"][index, :] = float("inf")
        target = os.path.join(directory, f"corrupt-{label}")
        os.makedirs(target)
        with open(os.path.join(target, "adapter_config.json"), "w") as f:
            json.dump(config, f)
        save_file(changed, os.path.join(target, "adapter_model.safetensors"))
        corrupt[label] = target
    return corrupt


def check_failed_loads(results, case):
    for label, failing_rank in case["corrupt_rank"].items():
        for rank, result in enumerate(results):
            outcome = result["failed_loads"][label]
            assert outcome["unchanged"] and outcome["same_logits"], f"{label}: rank {rank} changed"
            error = outcome["error"]
            assert error is not None, f"{label}: rank {rank} loaded a corrupt adapter"
            if rank == failing_rank:
                assert "non-finite" in error, error
            else:  # this rank's slices are clean: it refuses because the other rank failed
                assert "failed on another rank" in error and f"rank {failing_rank}:" in error
                assert "non-finite" in error, error


def part_of(tensor: torch.Tensor, key: str, layout: dict) -> torch.Tensor:
    """A rank's part of a whole PEFT tensor: rows of lora_B [H_out, r] for column-parallel
    layers, columns of lora_A [r, H_in] for row-parallel ones, else the whole tensor."""
    module = key[len(PREFIX) :].rsplit(".lora_", 1)[0]
    kind, start, stop = layout.get(module, (None, 0, 0))
    if kind == "column" and ".lora_B." in key:
        return tensor[start:stop]
    if kind == "row" and ".lora_A." in key:
        return tensor[:, start:stop]
    return tensor


def check_training(results, side, case):
    """Gradients of every rank's parts equal the same parts of PEFT's gradients training each
    adapter alone on its rows (DESIGN.md's tolerance rule per tensor); so do the parts after
    one AdamW step, and the saved adapter (gathered whole), which serves once frozen as PEFT
    serves it; a new adapter starts from the same draw as in one process with the first
    rank's seed."""
    from safetensors.torch import load_file
    from test_training import peft_alone

    import adaptfuse

    base, paths, inputs = side["base"], side["paths"], side["inputs"]
    names = case["train_names"]
    stepped = case["train_adapters"][0]
    saved = load_file(os.path.join(case["saved"], "adapter_model.safetensors"))
    for name in case["train_adapters"]:
        rows = [i for i, n in enumerate(names) if n == name]
        batch = (inputs["train_ids"][rows], inputs["train_labels"][rows])
        steps = 1 if name == stepped else 0
        exact, exact_step = peft_alone(base, paths[name], name, *batch, torch.float64, steps)
        plain, plain_step = peft_alone(base, paths[name], name, *batch, torch.float32, steps)
        for rank, result in enumerate(results):
            training = result["training"]
            layout = training["layout"]
            ours = training["gradients"][name]
            assert set(ours) == set(exact), f"rank {rank}: parameter names differ from PEFT's"
            for key, grad in ours.items():
                assert_within_torch_error(
                    grad,
                    part_of(exact[key], key, layout),
                    part_of(plain[key], key, layout),
                    torch.float32,
                    f"rank {rank}, {name} {key} grad",
                )
            if name != stepped:
                continue
            for key, param in training["after_step"].items():
                assert_within_torch_error(
                    param,
                    part_of(exact_step[key], key, layout),
                    part_of(plain_step[key], key, layout),
                    torch.float32,
                    f"rank {rank}, {name} {key} after a step",
                )
                assert torch.equal(part_of(saved[key], key, layout), param), f"saved {key}"
    # Frozen after its step, the adapter serves what PEFT serves from the saved folder.
    ids = inputs["ids"][: len(names)]
    with torch.no_grad():
        truth = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), case["saved"])(ids)
        peft32 = peft.PeftModel.from_pretrained(copy.deepcopy(base), case["saved"])(ids)
    everything = torch.ones(ids.shape, dtype=torch.bool)
    for rank, result in enumerate(results):
        frozen = result["training"]["frozen_logits"]
        assert_matches_peft(frozen, truth.logits, peft32.logits, everything, f"rank {rank}, frozen")
    torch.manual_seed(case["init_seed"])
    whole = copy.deepcopy(base)
    manager = adaptfuse.patch(whole, max_loras=4, max_rank=8)
    manager.add_adapter("fresh", r=3, lora_alpha=6)
    expected = dict(manager.named_parameters("fresh"))
    for rank, result in enumerate(results):
        fresh = result["training"]["fresh"]
        assert set(fresh) == set(expected)
        for key, param in fresh.items():
            part = part_of(expected[key].detach(), key, result["training"]["layout"])
            assert torch.equal(bits(param), bits(part)), f"rank {rank}, fresh {key}"


def bottleneck_case(directory) -> tuple[dict, dict]:
    """AdapterHub's fixture Llama (4 heads, 2 KV heads: TP=2 shards it) with its bottleneck
    adapters (every point: seq_bn's block_out, double_seq_bn's attn_out + mlp_out, par_bn)
    and one PEFT LoRA adapter; the mixed batch; a copy of seq_bn corrupt on rank 1 only."""
    from safetensors.torch import load_file, save_file
    from test_bottleneck import FIXTURES, adapter_names_of, fixture_model

    model, expected = fixture_model("llama")
    bottlenecks = adapter_names_of(expected)
    adapters = {name: os.path.join(FIXTURES, "llama", name) for name in bottlenecks}
    lora = save_adapters(
        model,
        "llama",
        str(directory),
        configs={"llama": [dict(r=3, lora_alpha=6, target_modules="all-linear")]},
        prefix="bn-lora",
    )
    adapters.update(lora)
    rows = [(name, i % 2) for i, name in enumerate(bottlenecks)]
    rows += [("bn-lora0", 1), (None, 0), ("bn-lora0", 0), (None, 1)]
    ids = torch.stack([expected["input_ids"][row] for _, row in rows])
    torch.save(ids, os.path.join(directory, "bottleneck-ids.pt"))
    corrupt = os.path.join(directory, "bottleneck-corrupt")
    shutil.copytree(adapters["seq_bn"], corrupt)
    tensors = load_file(os.path.join(corrupt, "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("adapter_up.bias"))
    tensors[key][0] = float("nan")
    save_file(tensors, os.path.join(corrupt, "adapter.safetensors"))
    train_names = ["s", None, "d", "p", "s", "p", "d"]
    train_ids = expected["input_ids"][[i % 2 for i in range(len(train_names))]]
    torch.save(train_ids, os.path.join(directory, "bottleneck-train-ids.pt"))
    spec = {
        "train_inputs": os.path.join(directory, "bottleneck-train-ids.pt"),
        "train_names": train_names,
        "saved": os.path.join(directory, "bottleneck-trained-d"),
        "model": os.path.join(FIXTURES, "llama", "base"),
        "adapters": adapters,
        "max_loras": len(adapters),
        "inputs": os.path.join(directory, "bottleneck-ids.pt"),
        "names": [name for name, _ in rows],
        "corrupt": corrupt,
        "clean": adapters["seq_bn"],
        "corrupt_rank": 1,
    }
    return spec, {"model": model, "expected": expected, "rows": rows, "lora": lora}


def check_bottleneck(results, side):
    """Bottleneck rows match AdapterHub's fixture logits, the LoRA rows PEFT's, the others
    the base model, within DESIGN.md's tolerance, bit-identical on every rank."""
    from test_bottleneck import assert_matches_adapterhub

    model, expected, rows = side["model"], side["expected"], side["rows"]
    with torch.no_grad():
        lora_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), side["lora"]["bn-lora0"])
        own = lora_model.eval()(expected["input_ids"]).logits
        truth = lora_model.double()(expected["input_ids"]).logits
    for rank, result in enumerate(results):
        bottleneck = result["bottleneck"]
        logits = bottleneck["logits"]
        for i, (name, row) in enumerate(rows):
            if name is None:
                assert torch.allclose(logits[i], expected["base.float32"][row], atol=1e-5)
            elif name == "bn-lora0":
                assert_within_torch_error(
                    logits[i], truth[row], own[row], torch.float32, f"rank {rank}, LoRA row {i}"
                )
            else:
                assert_matches_adapterhub(logits[i], expected, name, rows=row)
        assert torch.equal(bits(logits), bits(results[0]["bottleneck"]["logits"]))
        failed = bottleneck["failed_load"]
        assert failed["unchanged"] and failed["same_logits"], f"rank {rank} changed"
        assert failed["error"] is not None and "non-finite" in failed["error"], failed["error"]
        if rank != 1:
            assert "failed on another rank" in failed["error"] and "rank 1:" in failed["error"]
        refused = bottleneck["refused"]
        assert refused is not None and "bottleneck points" in refused, refused
        assert "post_attention_layernorm" in refused and "'sequence_parallel'" in refused
        assert bottleneck["lora_only_manager"] == "TensorParallelManager"


def check_bottleneck_training(results, side, spec):
    """Replicated trainable bottleneck adapters: every rank holds group rank 0's draw, and
    every rank's gradients match plain torch training each adapter alone in one process
    (DESIGN.md's rule: float64 truth, float32 plain torch); the saved folder holds them."""
    from test_bottleneck_training import KINDS, plain_gradients

    import adaptfuse

    base = side["model"]
    single = copy.deepcopy(base)
    manager = adaptfuse.patch(single, max_loras=4, max_rank=4, max_bottleneck_dim=16)
    first = results[0]["bottleneck"]["training"]["initial"]
    for name, (config, options) in KINDS.items():
        manager.add_bottleneck_adapter(name, config=config, **options)
        with torch.no_grad():
            for key, parameter in manager.named_parameters(name):
                parameter.copy_(first[name][key])
    ids, names = torch.load(spec["train_inputs"]), spec["train_names"]
    exact, *_ = plain_gradients(base, manager, ids, names, torch.float64)
    own, *_ = plain_gradients(base, manager, ids, names, torch.float32)
    for rank, result in enumerate(results):
        training = result["bottleneck"]["training"]
        for name in KINDS:
            for key, value in training["initial"][name].items():
                assert torch.equal(bits(value), bits(first[name][key])), f"rank {rank} {key}"
            for key, grad in training["gradients"][name].items():
                assert_within_torch_error(
                    grad, exact[(name, key)], own[(name, key)], torch.float32, f"rank {rank} {key}"
                )
    manager.load_adapter(spec["saved"], adapter_name="d-saved", trainable=True)
    saved = dict(manager.named_parameters("d-saved"))
    for key, value in first["d"].items():
        assert torch.equal(bits(saved[key.replace(".d.", ".d-saved.")]), bits(value)), key


def test_tensor_parallel_llama_two_processes(tmp_path):
    """The default-tier case: mixed batch, grad, greedy generate, 100 merge cycles, the
    model-level refusals and a merge failing on one rank only, loads that fail on one rank
    only, a layer under a plan adaptfuse does not adapt, training, and bottleneck adapters
    (served and trained)."""
    case, side = build_case(
        "llama",
        tmp_path,
        [
            "logits",
            "grad",
            "generate",
            "merge",
            "refusals",
            "failed_loads",
            "unsupported_plan",
            "training",
            "bottleneck",
        ],
        unsupported_layer="model.layers.*.mlp.up_proj",
        unsupported_plan="sequence_parallel",
        train_adapters=["adapter1", "adapter2"],
        train_names=["adapter1", "adapter2", None, "adapter1", "adapter2"],
        saved=str(tmp_path / "saved"),
        init_seed=1234,
    )
    # q_proj is column-parallel (rank 1 owns output rows 36..71 of 72); down_proj is
    # row-parallel (rank 0 owns input columns 0..50 of 101).
    case["corrupt"] = corrupt_copies(
        side["paths"],
        tmp_path,
        {
            "column-rows-of-rank1": ("model.layers.0.self_attn.q_proj", "B", 70),
            "row-columns-of-rank0": ("model.layers.1.mlp.down_proj", "A", 3),
        },
    )
    case["corrupt_rank"] = {"column-rows-of-rank1": 1, "row-columns-of-rank0": 0}
    case["bottleneck"], bottleneck_side = bottleneck_case(tmp_path)
    results = run_workers(case, 2, tmp_path)
    check_bottleneck(results, bottleneck_side)
    check_bottleneck_training(results, bottleneck_side, case["bottleneck"])
    check_logits(results, side)
    check_grad(results, side)
    check_generate(results, side)
    check_merge(results, side)
    check_failed_loads(results, case)
    check_training(results, side, case)
    for rank, result in enumerate(results):
        refusals = result["refusals"]
        assert "method 'ties'" in refusals["ties"] and "use method='linear'" in refusals["ties"]
        assert "lora_dropout=0.1" in refusals["dropout"]
        assert "is merged; call unmerge() first" in refusals["second"]
        expected = "injected failure on rank 1" if rank == 1 else "failed on another rank"
        assert refusals["one_rank"] is not None and expected in refusals["one_rank"], refusals
        assert refusals["merged_after"] is None and refusals["unchanged"], f"rank {rank}"
    for result in results:
        messages = result["unsupported_plan"]
        assert "model.layers.0.mlp.up_proj" in messages["explicit"]
        assert "'sequence_parallel'" in messages["explicit"]
        assert messages["left_alone"] == [
            "model.layers.0.mlp.up_proj",
            "model.layers.1.mlp.up_proj",
        ]
        assert "mlp.up_proj" in messages["load"] and "'sequence_parallel'" in messages["load"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_tensor_parallel_gqa_and_fused_projections(arch, tmp_path):
    """Qwen2 (GQA, q/k/v biases) and Phi-3 (fused qkv_proj and gate_up_proj, whose plans
    gather the column-parallel output and split the row-parallel input)."""
    case, side = build_case(arch, tmp_path, ["logits", "generate", "merge"])
    case["cycles"] = 10
    results = run_workers(case, 2, tmp_path)
    check_logits(results, side)
    check_generate(results, side)
    check_merge(results, side, cycles=10)


@pytest.mark.slow
def test_tensor_parallel_llama_four_processes(tmp_path):
    case, side = build_case("llama-4way", tmp_path, ["logits", "generate", "merge"])
    results = run_workers(case, 4, tmp_path)
    check_logits(results, side)
    check_generate(results, side)
    check_merge(results, side)
