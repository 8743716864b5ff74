"""torch.compile over patched layers and models (CPU): the ops' fake impls let Dynamo trace
the LoRA path in one graph, and the batch's adapter assignment travels as tensors (the plan)
and slot contents, so neither new assignments nor loading and unloading adapters recompile."""

from __future__ import annotations

import copy

import pytest
import torch
from test_patch import VOCAB, save_adapters, tiny_model

import adaptfuse
from adaptfuse.layers import current_plan


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", tmp_path_factory.mktemp("compile"))
    return base, paths


def patched(served):
    base, paths = served
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    return model, manager


def layer_output(manager, layer, x, names):
    plans, pinned = manager.plan_for(names, x.shape[0], x.shape[1])
    token = current_plan.set(plans)
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        current_plan.reset(token)
        manager.release(pinned)


def test_compiled_layer_is_one_graph_and_never_recompiles(served):
    _, paths = served
    model, manager = patched(served)
    layer = next(iter(manager.layers.values()))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, layer.in_features)
    assignments = [
        ["adapter0", "adapter1"],
        ["adapter1", "adapter0"],
        [None, "adapter1"],
        ["adapter0", None],
        [None, None],
    ]
    torch._dynamo.reset()
    first = layer_output(manager, compiled, x, assignments[0])  # compiles once
    torch.testing.assert_close(first, layer_output(manager, layer, x, assignments[0]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for names in assignments[1:]:
            got = layer_output(manager, compiled, x, names)
            torch.testing.assert_close(got, layer_output(manager, layer, x, names))
        # Unload and load into the freed slot: new slot contents, the same graph.
        manager.unload_adapter("adapter0")
        manager.load_adapter(paths["adapter1"], adapter_name="copy-of-1")
        names = ["copy-of-1", "adapter1"]
        same_rows = x[:1].repeat(2, 1, 1)
        got = layer_output(manager, compiled, same_rows, names)
        torch.testing.assert_close(got, layer_output(manager, layer, same_rows, names))
        torch.testing.assert_close(got[0], got[1])  # the same adapter's weights in both rows


def test_compiled_model_matches_eager_across_assignments(served):
    """The decoder compiled as users compile it (the patched wrapper sets the plan, the
    compiled module reads it): logits equal eager's for every assignment, no recompiles."""
    model, manager = patched(served)
    ids = torch.randint(3, VOCAB, (2, 6))
    eager = {}
    assignments = [["adapter0", "adapter1"], [None, "adapter0"], ["adapter1", "adapter1"]]
    with torch.no_grad():
        for names in assignments:
            eager[tuple(names)] = model(ids, adapter_names=names).logits
    torch._dynamo.reset()
    model.model = torch.compile(model.model)
    with torch.no_grad():
        got = model(ids, adapter_names=assignments[0]).logits
        torch.testing.assert_close(got, eager[tuple(assignments[0])], rtol=1e-5, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for names in assignments[1:]:
                got = model(ids, adapter_names=names).logits
                torch.testing.assert_close(got, eager[tuple(names)], rtol=1e-5, atol=1e-5)


def test_layer_compiled_while_empty_serves_adapters_loaded_later(served):
    """A graph traced while no slot holds an adapter still has the LoRA path: adapters loaded
    afterwards are served by it, with no recompile."""
    base, paths = served
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    layer = next(iter(manager.layers.values()))
    assert layer.active_slots == 0
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 5, layer.in_features)
    torch._dynamo.reset()
    empty = layer_output(manager, compiled, x, [None, None])
    torch.testing.assert_close(empty, layer_output(manager, layer, x, [None, None]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        manager.load_adapter(paths["adapter0"], adapter_name="late")
        got = layer_output(manager, compiled, x, ["late", None])
        eager = layer_output(manager, layer, x, ["late", None])
        torch.testing.assert_close(got, eager)
        assert not torch.allclose(got[0], empty[0])  # the adapter is applied
        torch.testing.assert_close(got[1], empty[1])
