"""Serving under load: many registered adapters in few device slots (LRU eviction), a
thousand model-level merge/unmerge cycles, and threads serving while another loads,
unloads, merges and unmerges."""

from __future__ import annotations

import copy
import random
import threading
import time

import pytest
import torch
from conftest import bits
from test_patch import BASE_CONFIG, PREFIX, VOCAB, save_adapters, tiny_model, write_adapter

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
        chosen = rng.sample(names[:30], rng.randint(1, 8))  # reuse some: hits and misses
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
    """Four threads serve random batches for a bounded time while a fifth loads and
    unloads an adapter and merges and unmerges others. Every forward either returns exactly
    the logits computed beforehand for its batch, or (while a merge is in effect) is refused
    because it names an adapter other than the merged one; nothing deadlocks, and afterwards
    every weight is bit-identical."""
    paths = write_many_adapters(tmp_path, 6, seed=3)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=3, max_rank=4)
    for name in ("tenant-0", "tenant-1", "tenant-2", "tenant-3", "tenant-4"):
        manager.load_adapter(paths[name], adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    rng = random.Random(5)
    batches = []
    for i in range(6):  # every batch has a base row: refused while anything is merged
        rows = [None] + [rng.choice(["tenant-0", "tenant-1", "tenant-2", "tenant-3"])] * 2
        rows.append(rng.choice(["tenant-4", None]))
        ids = torch.randint(3, VOCAB, (4, 6), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            batches.append((rows, ids, model(ids, adapter_names=rows).logits))
    deadline = time.monotonic() + 3.0
    failures, served, refused = [], [0], [0]
    lock = threading.Lock()

    def serve(seed):
        local = random.Random(seed)
        while time.monotonic() < deadline:
            rows, ids, expected = local.choice(batches)
            try:
                with torch.no_grad():
                    got = model(ids, adapter_names=rows).logits
            except ValueError as error:
                if "merge" not in str(error):
                    failures.append(repr(error))
                with lock:
                    refused[0] += 1
                continue
            if not torch.equal(got, expected):
                failures.append(f"{rows}: logits differ by {(got - expected).abs().max()}")
            with lock:
                served[0] += 1

    def change():
        specs = ["tenant-1", {"tenant-0": 0.5, "tenant-2": 0.5}]
        cycle = 0
        while time.monotonic() < deadline:
            manager.load_adapter(paths["tenant-5"], adapter_name="extra")
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
    assert served[0] > 10 and refused[0] > 0
    assert manager.merged is None and "extra" not in manager.adapters
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
