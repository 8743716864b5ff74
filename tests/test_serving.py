"""Serving under load: many registered adapters in few device slots (LRU eviction), a
thousand model-level merge/unmerge cycles, and threads serving while another loads,
unloads, merges and unmerges."""

from __future__ import annotations

import collections
import copy
import inspect
import random
import threading
import time

import pytest
import torch
from conftest import bits
from test_patch import (
    BASE_CONFIG,
    PREFIX,
    VOCAB,
    batch_with_padding,
    peft_model_with,
    save_adapters,
    tiny_model,
    write_adapter,
)

import adaptfuse

KV_OUT = 24  # tiny Llama: 2 KV heads of 12


def write_many_adapters(directory, count: int, seed: int = 0) -> dict[str, str]:
    """count small adapters on q_proj and v_proj of both layers, ranks 1..4."""
    gen = torch.Generator().manual_seed(seed)
    paths = {}
    for i in range(count):
        rank = 1 + i % 4
        tensors = {}
        for block in (0, 1):
            for projection, h_out in (("q_proj", 72), ("v_proj", KV_OUT)):
                key = f"{PREFIX}model.layers.{block}.self_attn.{projection}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 72, generator=gen) * 0.2
                tensors[f"{key}.lora_B.weight"] = torch.randn(h_out, rank, generator=gen) * 0.2
        config = {**BASE_CONFIG, "r": rank, "lora_alpha": 2 * rank}
        config["target_modules"] = ["q_proj", "v_proj"]
        paths[f"tenant-{i}"] = write_adapter(directory / f"tenant-{i}", config, tensors)
    return paths


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_model("llama")


def test_hundred_adapters_in_eight_slots(base, tmp_path):
    """100 registered adapters, 8 slots: random batches give the logits of a model where
    every adapter is resident, and each batch evicts exactly the least recently used
    adapters it does not need."""
    paths = write_many_adapters(tmp_path, 100)
    resident, few = copy.deepcopy(base), copy.deepcopy(base)
    all_slots = adaptfuse.patch(resident, max_loras=100, max_rank=4)
    eight = adaptfuse.patch(few, max_loras=8, max_rank=4)
    for name, path in paths.items():
        all_slots.load_adapter(path, adapter_name=name)
        eight.load_adapter(path, adapter_name=name)
    assert len(eight._slot_of) == 8 and len(eight.adapters) == 100
    rng = random.Random(1)
    names = list(paths)
    for step in range(12):
        # Odd steps draw from 30 adapters (hits and misses), even ones from all 100.
        chosen = rng.sample(names[:30] if step % 2 else names, rng.randint(1, 8))
        rows = [rng.choice([*chosen, None]) for _ in range(7)]
        wanted = list(dict.fromkeys(n for n in rows if n is not None))
        order = list(eight._slot_of)
        missing = [n for n in wanted if n not in order]
        free = 8 - len(order)
        expected_evicted = [n for n in order if n not in wanted][: max(0, len(missing) - free)]
        ids = torch.randint(3, VOCAB, (7, 5), generator=torch.Generator().manual_seed(step))
        with torch.no_grad():
            got = few(ids, adapter_names=rows).logits
            expected = resident(ids, adapter_names=rows).logits
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        after = list(eight._slot_of)
        assert not set(expected_evicted) & set(after), "evicted other than least recently used"
        assert set(order) - set(expected_evicted) <= set(after), "evicted too much"
        assert after[-len(wanted) :] == sorted(after[-len(wanted) :], key=wanted.index)


def test_thousand_model_merge_cycles_restore_every_weight(base, tmp_path):
    paths = save_adapters(base, "llama", tmp_path)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    specs = ["adapter0", {"adapter0": 0.5, "adapter1": -0.25}, "adapter1"]
    for cycle in range(1000):
        manager.merge(specs[cycle % len(specs)])
        manager.unmerge()
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name


def test_serving_threads_while_adapters_and_merges_change(base, tmp_path):
    """Four threads serve random forwards and greedy generates for a bounded time while a
    fifth loads and unloads an adapter (which some batches name) and merges and unmerges
    others. Every call either returns exactly what was computed beforehand for its batch
    (within fp32 rounding when it may have run on the merged weights of the one adapter it
    names), or is refused for a stated reason: a merge is in effect and the batch names
    another adapter, or the adapter it names is unloaded at that moment. Nothing deadlocks,
    and afterwards every weight is bit-identical."""
    paths = write_many_adapters(tmp_path, 6, seed=3)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=3, max_rank=4)
    for name in ("tenant-0", "tenant-1", "tenant-2", "tenant-3", "tenant-4"):
        manager.load_adapter(paths[name], adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    rng = random.Random(5)
    batches = []  # (rows, ids, expected logits, expected greedy tokens)

    def expect(rows, ids):
        with torch.no_grad():
            logits = model(ids, adapter_names=rows).logits
            tokens = model.generate(
                ids, adapter_names=rows, max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        batches.append((rows, ids, logits, tokens))

    for i in range(6):
        rows = [None] + [rng.choice(["tenant-0", "tenant-1", "tenant-2", "tenant-3"])] * 2
        rows.append(rng.choice(["tenant-4", None]))
        expect(rows, torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(i)))
    # Batches that name only the adapter merged on every other cycle: served by its LoRA
    # kernels or, while it is merged, by the merged weights.
    expect(["tenant-1"] * 3, torch.randint(3, VOCAB, (3, 5), generator=torch.Generator()))
    # A batch naming the adapter the fifth thread loads and unloads.
    manager.load_adapter(paths["tenant-5"], adapter_name="extra")
    expect(["extra", None, "tenant-0"], torch.randint(3, VOCAB, (3, 6)))
    manager.unload_adapter("extra")
    deadline = time.monotonic() + 3.0
    failures, served, refused = [], collections.Counter(), collections.Counter()
    lock = threading.Lock()

    def serve(seed):
        local = random.Random(seed)
        while time.monotonic() < deadline:
            rows, ids, logits, tokens = local.choice(batches)
            generate = local.random() < 0.3
            try:
                with torch.no_grad():
                    if generate:
                        got = model.generate(
                            ids, adapter_names=rows, max_new_tokens=3, do_sample=False,
                            pad_token_id=0,
                        )
                    else:
                        got = model(ids, adapter_names=rows).logits
            except (ValueError, KeyError) as error:
                reason = "merge" if "merge" in str(error) else "unloaded"
                if reason == "unloaded" and "extra" not in rows:
                    failures.append(repr(error))
                with lock:
                    refused[reason] += 1
                continue
            expected = tokens if generate else logits
            maybe_merged = set(rows) == {"tenant-1"}
            if maybe_merged and not generate:
                if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                    failures.append(f"{rows}: merged logits differ by {(got - expected).abs().max()}")
            elif not (maybe_merged and generate) and not torch.equal(got, expected):
                failures.append(f"{rows} (generate={generate}): result differs")
            with lock:
                served["generate" if generate else "forward"] += 1

    def change():
        specs = ["tenant-1", {"tenant-0": 0.5, "tenant-2": 0.5}]
        cycle = 0
        while time.monotonic() < deadline:
            manager.load_adapter(paths["tenant-5"], adapter_name="extra")
            time.sleep(0.005)
            manager.unload_adapter("extra")
            manager.merge(specs[cycle % 2])
            time.sleep(0.01)
            manager.unmerge()
            cycle += 1

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=change))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not failures, failures[:3]
    assert served["forward"] > 10 and served["generate"] > 0 and refused["merge"] > 0, (
        served,
        refused,
    )
    assert manager.merged is None and "extra" not in manager.adapters
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gpt2"])
def test_greedy_generate_matches_peft_on_every_architecture(arch, tmp_path):
    """Greedy tokens equal PEFT's mixed-adapter generate up to the first step where PEFT's
    top-2 logit margin is below numerical noise (DESIGN.md; Llama: test_patch)."""
    torch.manual_seed(0)
    base_model = tiny_model(arch)
    paths = save_adapters(base_model, arch, tmp_path)
    names = [list(paths)[0], None, list(paths)[-1], list(paths)[0]]
    ids, mask = batch_with_padding(len(names), 6, "left", seed=7)
    reference = peft_model_with(base_model, paths, torch.float32)
    model = copy.deepcopy(base_model)
    manager = adaptfuse.patch(model, max_loras=len(paths), max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[n or "__base__" for n in names],
            output_logits=True,
            return_dict_in_generate=True,
            **settings,
        )
        got = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
        base_only = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert got.shape == expected.sequences.shape
    prompt, compared = ids.shape[1], 0
    for row in range(len(names)):
        for step, logits in enumerate(expected.logits):
            top2 = logits[row].topk(2).values
            if top2[0] - top2[1] < 1e-4:  # a near-tie: either continuation is right
                break
            assert got[row, prompt + step] == expected.sequences[row, prompt + step], (row, step)
            compared += 1
    assert compared >= len(names) * 4  # the check was not vacuous
    assert not torch.equal(got, base_only)


@pytest.mark.parametrize(
    "options",
    [dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
    ids=["beams-3", "beams-2-return-2"],
)
def test_beams_and_returns_match_each_request_alone(base, tmp_path, options):
    """Beam search over a mixed batch gives each request what it gets alone with its
    adapter (names repeated per beam and per returned sequence)."""
    paths = save_adapters(base, "llama", tmp_path)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=len(paths), max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    names = ["adapter1", None, "adapter0"]
    ids = torch.randint(3, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **options)
    copies = options.get("num_return_sequences", 1)
    with torch.no_grad():
        together = model.generate(ids, adapter_names=names, **settings)
        for row, name in enumerate(names):
            alone = model.generate(ids[row : row + 1], adapter_names=[name], **settings)
            assert torch.equal(together[row * copies : (row + 1) * copies], alone), (row, name)


def test_serving_refusals_name_the_problem_and_change_nothing(base, tmp_path):
    """DESIGN.md's merge rules not covered elsewhere: unmerge with nothing merged, a merge of
    an unknown adapter, and a merged adapter that keeps its slot when others need one."""
    paths = write_many_adapters(tmp_path, 3)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=4)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no adapter is merged"):
        manager.unmerge()
    with pytest.raises(KeyError, match="unknown adapter name.*'nobody'"):
        manager.merge({"tenant-0": 0.5, "nobody": 0.5})
    assert manager.merged is None
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
    # tenant-0 merged: a trainable adapter needing a slot takes the other one's, never its.
    manager.merge("tenant-0")
    slot = manager._slot_of["tenant-0"]
    manager.add_adapter("trainee", r=2, target_modules=["q_proj"])
    assert manager._slot_of["tenant-0"] == slot
    with pytest.raises(ValueError, match="every slot is in use by a forward in flight or a merged"):
        manager.add_adapter("second-trainee", r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="'tenant-0' is merged"):
        model(torch.randint(3, VOCAB, (1, 4)), adapter_names=["tenant-2"])
    manager.freeze("trainee")
    manager.unload_adapter("trainee")
    manager.unmerge()
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name


def test_patched_forward_shows_generate_the_original_signature(base):
    """transformers' generate decides from forward's signature whether to pass position_ids
    (GPT-2 with left padding needs them), attention_mask and logits_to_keep."""
    model = copy.deepcopy(base)
    before = inspect.signature(model.forward)
    adaptfuse.patch(model, max_loras=1, max_rank=2)
    after = inspect.signature(model.forward)
    assert list(after.parameters) == [*before.parameters, "adapter_names"] or (
        "adapter_names" in after.parameters
        and set(after.parameters) - {"adapter_names"} == set(before.parameters)
    )
    assert {"position_ids", "attention_mask", "logits_to_keep"} <= set(after.parameters)
    adaptfuse.unpatch(model)
    assert inspect.signature(model.forward) == before


def test_merging_a_large_model_shows_progress(capsys):
    """Models with 64 or more adapted layers show a progress bar while merging."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=10,  # 70 adapted layers
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
    )
    model = transformers.LlamaForCausalLM(config)
    manager = adaptfuse.patch(model, max_loras=1, max_rank=2)
    assert len(manager.layers) >= 64
    manager.add_adapter("a", r=2)
    with torch.no_grad():
        for parameter in manager.parameters("a"):
            parameter.normal_(0.0, 0.1)  # B starts at zero: make the delta non-zero
    manager.freeze("a")
    original = {n: bits(p) for n, p in model.named_parameters()}
    manager.merge("a")
    assert "merging" in capsys.readouterr().err
    assert any(not torch.equal(bits(p), original[n]) for n, p in model.named_parameters())
    manager.unmerge()
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
