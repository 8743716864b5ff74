"""Static assignments: the adapters of a step captured into a CUDA graph travel in one fixed
device buffer (mgr.static_assignment), so assigning other adapters, loading and unloading
never invalidate the graph. On the CPU: the same logits as a list of names, and the
refusals; on CUDA: a captured decode step replayed across assignments and adapter loads."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import bits
from test_patch import VOCAB, save_adapters, tiny_model

import adaptfuse
from adaptfuse import graphs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", tmp_path_factory.mktemp("graphs"))
    return base, paths


def patched(served, device="cpu", max_loras=2):
    base, paths = served
    model = copy.deepcopy(base).to(device)
    manager = adaptfuse.patch(model, max_loras=max_loras, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    return model, manager


ASSIGNMENTS = [["adapter0", "adapter1", None], [None, "adapter0", "adapter0"], ["adapter2"] * 3]


def test_static_assignment_gives_the_logits_of_the_names(served):
    model, manager = patched(served, max_loras=3)
    ids = torch.randint(3, VOCAB, (3, 5))
    assignment = manager.static_assignment(3, 5)
    with torch.no_grad():
        for names in ASSIGNMENTS:
            assignment.assign(names)
            got = model(ids, adapter_names=assignment).logits
            want = model(ids, adapter_names=names).logits
            assert torch.equal(bits(got), bits(want)), names
            assert assignment.names == names


def test_static_decode_step_matches_the_dynamic_cache(served):
    """The step a graph records (static KV cache, cache_position) computes what an ordinary
    decode step with adapter_names computes."""
    model, manager = patched(served, max_loras=3)
    ids = torch.randint(3, VOCAB, (3, 6))
    next_ids = torch.randint(3, VOCAB, (3, 1))
    names = ASSIGNMENTS[0]
    assignment = manager.static_assignment(3)
    assignment.assign(names)
    with torch.no_grad():
        cache = model(ids, adapter_names=names, use_cache=True).past_key_values
        want = model(next_ids, past_key_values=cache, adapter_names=names).logits
        static = transformers.StaticCache(config=model.config, max_cache_len=7)
        model(ids, past_key_values=static, cache_position=torch.arange(6), adapter_names=names)
        got = model(
            next_ids, past_key_values=static, cache_position=torch.tensor([6]),
            adapter_names=assignment,
        ).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, other attention masks


def test_assigned_adapters_keep_their_slots_and_refusals_change_nothing(served):
    model, manager = patched(served, max_loras=2)
    assignment = manager.static_assignment(2)
    assignment.assign(["adapter0", "adapter1"])
    slots = bits(assignment.token_slots).clone()
    ids = torch.randint(3, VOCAB, (2, 1))
    with pytest.raises(ValueError, match="assigned to a static assignment"):
        manager.unload_adapter("adapter0")
    # Both slots are pinned: a forward needing a third adapter cannot evict them.
    with pytest.raises(ValueError, match="slot"):
        model(ids, adapter_names=["adapter2", None])
    with pytest.raises(ValueError, match="list of 2 adapter names"):
        assignment.assign(["adapter0"])
    with pytest.raises(KeyError, match="unknown adapter"):
        assignment.assign(["adapter0", "nope"])
    with pytest.raises(ValueError, match=r"inputs \[2, 1\] but the forward got \[2, 3\]"):
        model(torch.randint(3, VOCAB, (2, 3)), adapter_names=assignment)
    assert torch.equal(bits(assignment.token_slots), slots)
    assert assignment.names == ["adapter0", "adapter1"]
    assignment.close()
    assert assignment.token_slots.tolist() == [-1, -1]
    manager.unload_adapter("adapter0")  # no longer assigned
    assert "adapter0" not in manager.adapters


def test_a_static_assignment_serves_only_its_own_model(served):
    model, manager = patched(served)
    _, other = patched(served)
    assignment = other.static_assignment(2)
    with pytest.raises(ValueError, match="another patched model"):
        model(torch.randint(3, VOCAB, (2, 1)), adapter_names=assignment)


@pytest.mark.cuda
@pytest.mark.skipif(not adaptfuse.cuda_available(), reason="needs a GPU and the CUDA build")
def test_captured_decode_step_follows_assignments_and_loads(served, tmp_path):
    """One graph, captured once: replays after assign(), after loading a new adapter into the
    slot another one left, and with every row on the base model give the eager logits."""
    base, paths = served
    model, manager = patched(served, device="cuda", max_loras=3)
    ids = torch.randint(3, VOCAB, (3, 6), device="cuda")
    next_ids = torch.randint(3, VOCAB, (3, 1), device="cuda")
    assignment = manager.static_assignment(3)
    assignment.assign(ASSIGNMENTS[0])
    static = transformers.StaticCache(config=model.config, max_cache_len=7)
    outputs = {}
    position = torch.tensor([6], device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=static, cache_position=torch.arange(6, device="cuda"),
              adapter_names=[None] * 3)

        def step():
            graphs.rewind_static_cache(static, 6)  # every replay writes position 6 again
            outputs["logits"] = model(
                next_ids, past_key_values=static, cache_position=position,
                adapter_names=assignment,
            ).logits

        graph = graphs.capture(step, warmups=2)

        def eager(names):
            cache = model(ids, adapter_names=[None] * 3, use_cache=True).past_key_values
            return model(next_ids, past_key_values=cache, adapter_names=names).logits

        plans = [*ASSIGNMENTS, [None] * 3]
        for names in plans:
            assignment.assign(names)
            graph.replay()
            # The prompt's KV is the base model's in both (the prefill named no adapter).
            torch.testing.assert_close(outputs["logits"], eager(names), rtol=1e-5, atol=1e-5)
        assignment.assign(["adapter2", None, None])
        manager.unload_adapter("adapter0")
        manager.load_adapter(paths["adapter0"], adapter_name="late")
        assignment.assign(["late", "adapter2", None])
        graph.replay()
        torch.testing.assert_close(
            outputs["logits"], eager(["late", "adapter2", None]), rtol=1e-5, atol=1e-5
        )
        assert not torch.allclose(outputs["logits"][0], eager([None] * 3)[0])
