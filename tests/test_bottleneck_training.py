"""Training bottleneck adapters (DESIGN.md "Bottleneck adapters" with "Training many adapters at
once"): add_bottleneck_adapter / load_adapter(trainable=True), gradients and AdamW steps of
seq_bn, double_seq_bn and par_bn adapters in one mixed batch (with a LoRA adapter and None rows)
against a plain-torch model whose adapters are hooks over adaptfuse.reference.bottleneck, in
float64 (the truth) and float32 (torch's own error); save_adapter in AdapterHub's format, read
back by load_adapter; refusals that change nothing."""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from conftest import assert_within_torch_error, bits
from test_bottleneck import FIXTURES
from test_patch import assert_same_state, state_bits, tiny_model

import adaptfuse
from adaptfuse import reference

KINDS = {  # name -> (config, options)
    "s": ("seq_bn", dict(reduction_factor=8, non_linearity="gelu_new", scaling=0.7)),
    "d": ("double_seq_bn", dict(reduction_factor=12)),  # AdapterHub's swish
    "p": ("par_bn", dict(reduction_factor=6, init_weights="bert")),  # AdapterHub's scaling 4
}


def patched(arch="llama", max_loras=5, **kwargs):
    """(model, its manager, an unpatched copy of the model)."""
    torch.manual_seed(0)
    model = tiny_model(arch)
    base = copy.deepcopy(model)
    manager = adaptfuse.patch(
        model, max_loras=max_loras, max_rank=8, max_bottleneck_dim=16, **kwargs
    )
    return model, manager, base


def add_bottlenecks(manager, gen):
    """The three kinds, with every parameter drawn at a scale that moves the logits."""
    for name, (config, options) in KINDS.items():
        manager.add_bottleneck_adapter(name, config=config, **options)
        with torch.no_grad():
            for _, parameter in manager.named_parameters(name):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=gen))


def plain_model(base, manager, precision):
    """A copy of the unpatched model `base` in `precision` with leaf copies of every bottleneck
    adapter's parameters, applied by forward hooks at their points (plain torch); returns the
    model, its parameters by (adapter, key) and a setter of the adapter a forward uses."""
    blocks_path = manager.blocks_path
    plain = copy.deepcopy(base).to(precision)
    leaves = {
        (name, key): parameter.detach().to(precision).clone().requires_grad_()
        for name in KINDS
        for key, parameter in manager.named_parameters(name)
    }
    active = {"name": None}

    def f(index, location):
        def apply(h):
            name = active["name"]
            prefix = f"{blocks_path}.{index}.{location}.adapters.{name}."
            parts = {k[1][len(prefix) :]: t for k, t in leaves.items() if k[1].startswith(prefix)}
            if not parts:
                return torch.zeros_like(h)
            config, _ = KINDS[name]
            options = manager._trainable[name].options
            out = reference.bottleneck(
                h.reshape(-1, h.shape[-1]),
                parts["adapter_down.0.weight"],
                parts["adapter_down.0.bias"],
                parts["adapter_up.weight"],
                parts["adapter_up.bias"],
                options["non_linearity"],
                options["scaling"],
                dtype=precision,
            )
            return out.view(h.shape)

        return apply

    def on_output(fn, kinds):
        def hook(module, args, output):
            if KINDS.get(active["name"], (None,))[0] not in kinds:
                return output
            first = output[0] if isinstance(output, tuple) else output
            first = first + fn(first)
            return (first,) + tuple(output[1:]) if isinstance(output, tuple) else first

        return hook

    for index, block in enumerate(plain.get_submodule(blocks_path)):
        attention = getattr(block, "self_attn", None) or block.attn
        norm = getattr(block, "post_attention_layernorm", None) or block.ln_2
        attention.register_forward_hook(on_output(f(index, "attention_adapters"), ["double_seq_bn"]))
        block.mlp.register_forward_hook(on_output(f(index, "output_adapters"), ["double_seq_bn"]))
        block.register_forward_hook(on_output(f(index, "output_adapters"), ["seq_bn"]))
        stream = {}

        def keep(module, args, stream=stream):
            stream["residual"] = args[0]

        def parallel(module, args, output, stream=stream, fn=None):
            if KINDS.get(active["name"], (None,))[0] != "par_bn":
                return output
            return output + fn(stream["residual"])

        norm.register_forward_pre_hook(keep)
        block.mlp.register_forward_hook(
            functools.partial(parallel, fn=f(index, "output_adapters"))
        )
    return plain, leaves, active


def plain_gradients(base, manager, input_ids, names, precision):
    """Each adapter trained alone on its own rows (its mean token loss), in plain torch."""
    plain, leaves, active = plain_model(base, manager, precision)
    for name in KINDS:
        rows = [i for i, n in enumerate(names) if n == name]
        active["name"] = name
        logits = plain(input_ids[rows]).logits
        adaptfuse.per_adapter_loss(logits, input_ids[rows], [name] * len(rows)).backward()
    active["name"] = None
    return {key: leaf.grad for key, leaf in leaves.items()}, plain, leaves, active


NAMES = ["s", None, "d", "p", "l", "s", "p", "d"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_of_every_kind_in_one_mixed_batch_match_plain_torch(arch):
    model, manager, base = patched(arch)
    gen = torch.Generator().manual_seed(1)
    add_bottlenecks(manager, gen)
    manager.add_adapter("l", r=4)  # a trainable LoRA adapter in the same batch
    input_ids = torch.randint(3, 90, (len(NAMES), 6), generator=gen)
    exact, *_ = plain_gradients(base, manager, input_ids, NAMES, torch.float64)
    own, *_ = plain_gradients(base, manager, input_ids, NAMES, torch.float32)
    logits = model(input_ids, adapter_names=NAMES).logits
    adaptfuse.per_adapter_loss(logits, input_ids, NAMES).backward()
    for name in KINDS:
        for key, parameter in manager.named_parameters(name):
            assert parameter.dtype == torch.float32 and parameter.grad is not None, key
            assert_within_torch_error(
                parameter.grad, exact[(name, key)], own[(name, key)], torch.float32, key
            )
    assert all(p.grad is not None for p in manager.parameters("l"))
    with torch.no_grad():
        assert torch.equal(logits[1], base(input_ids).logits[1])


def test_adamw_steps_per_adapter_match_plain_torch():
    model, manager, base = patched()
    gen = torch.Generator().manual_seed(2)
    add_bottlenecks(manager, gen)
    rates = {"s": 1e-2, "d": 3e-3, "p": 5e-3}
    input_ids = torch.randint(3, 90, (len(NAMES), 5), generator=gen)
    names = [n if n != "l" else None for n in NAMES]
    references = {}
    for precision in (torch.float64, torch.float32):
        plain, leaves, active = plain_model(base, manager, precision)
        groups = [
            {"params": [t for (n, _), t in leaves.items() if n == name], "lr": lr}
            for name, lr in rates.items()
        ]
        optimizer = torch.optim.AdamW(groups)
        for _ in range(4):
            for name in KINDS:
                rows = [i for i, n in enumerate(names) if n == name]
                active["name"] = name
                logits = plain(input_ids[rows]).logits
                adaptfuse.per_adapter_loss(logits, input_ids[rows], [name] * len(rows)).backward()
            optimizer.step()
            optimizer.zero_grad()
        references[precision] = {key: leaf.detach() for key, leaf in leaves.items()}
    optimizer = torch.optim.AdamW(
        [{"params": manager.parameters(name), "lr": lr} for name, lr in rates.items()]
    )
    for _ in range(4):
        logits = model(input_ids, adapter_names=names).logits
        adaptfuse.per_adapter_loss(logits, input_ids, names).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name in KINDS:
        for key, parameter in manager.named_parameters(name):
            exact, own = references[torch.float64][(name, key)], references[torch.float32][(name, key)]
            assert_within_torch_error(parameter, exact, own, torch.float32, key)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_keeps_each_rows_bottleneck(reentrant):
    model, manager, base = patched()
    gen = torch.Generator().manual_seed(3)
    add_bottlenecks(manager, gen)
    input_ids = torch.randint(3, 90, (len(NAMES), 5), generator=gen)
    names = [n if n != "l" else None for n in NAMES]
    model.train()

    def gradients():
        logits = model(input_ids, adapter_names=names).logits
        adaptfuse.per_adapter_loss(logits, input_ids, names).backward()
        grads = {n: [p.grad.clone() for p in manager.parameters(n)] for n in KINDS}
        for n in KINDS:
            for p in manager.parameters(n):
                p.grad = None
        return grads

    without = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    with_checkpointing = gradients()
    for name in KINDS:
        for a, b in zip(without[name], with_checkpointing[name], strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bottleneck_training_in_a_bf16_model_keeps_fp32_parameters():
    model, manager, base = patched()
    model.to(torch.bfloat16)
    base.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    add_bottlenecks(manager, gen)
    input_ids = torch.randint(3, 90, (len(NAMES), 5), generator=gen)
    names = [n if n != "l" else None for n in NAMES]
    exact, *_ = plain_gradients(base, manager, input_ids, names, torch.float64)
    own, *_ = plain_gradients(base, manager, input_ids, names, torch.bfloat16)
    logits = model(input_ids, adapter_names=names).logits
    assert logits.dtype == torch.bfloat16
    adaptfuse.per_adapter_loss(logits, input_ids, names).backward()
    for name in KINDS:
        for key, parameter in manager.named_parameters(name):
            assert parameter.dtype == torch.float32
            assert_within_torch_error(
                parameter.grad, exact[(name, key)], own[(name, key)], torch.bfloat16, key
            )


def test_save_load_freeze_round_trip_in_adapterhubs_format(tmp_path):
    model, manager, base = patched(max_loras=6)
    gen = torch.Generator().manual_seed(5)
    add_bottlenecks(manager, gen)
    input_ids = torch.randint(3, 90, (4, 5), generator=gen)
    names = ["s", "d", "p", None]
    with torch.no_grad():
        trained = model(input_ids, adapter_names=names).logits
    saved = {}
    for name in KINDS:
        manager.save_adapter(name, str(tmp_path / name))
        saved[name] = {k: p.detach().clone() for k, p in manager.named_parameters(name)}
    # The folder is what AdapterHub's save_adapter writes: its config fields, its key names.
    with open(os.path.join(FIXTURES, "llama", "seq_bn", "adapter_config.json")) as f:
        adapterhub_config = json.load(f)
    with open(tmp_path / "s" / "adapter_config.json") as f:
        ours = json.load(f)
    assert set(ours) == set(adapterhub_config)
    assert set(ours["config"]) == set(adapterhub_config["config"])
    assert ours["config"]["original_ln_before"] and ours["config"]["reduction_factor"] == 8
    # Served from the saved folders (frozen copies) and after freeze(): the same logits.
    for name in KINDS:
        manager.load_adapter(str(tmp_path / name), adapter_name=f"{name}-served")
    with torch.no_grad():
        served = model(input_ids, adapter_names=[f"{n}-served" if n else None for n in names])
    assert torch.equal(served.logits, trained)
    for name in KINDS:
        manager.freeze(name)
    with torch.no_grad():
        assert torch.equal(model(input_ids, adapter_names=names).logits, trained)
    # Resumed training starts from the saved values, bit for bit.
    manager.load_adapter(str(tmp_path / "d"), adapter_name="d-again", trainable=True)
    for (key, parameter), value in zip(
        manager.named_parameters("d-again"), saved["d"].values(), strict=True
    ):
        assert key.replace("d-again", "d") in saved["d"]
        assert torch.equal(bits(parameter.detach()), bits(value))


def test_bottleneck_training_refusals_change_nothing(tmp_path):
    model, manager, base = patched(bottleneck_points=["block_out"])
    manager.add_bottleneck_adapter("t", config="seq_bn", reduction_factor=8)
    manager.add_adapter("l", r=2)
    bad_calls = [
        (lambda: manager.merge("t"), "freeze"),
        (lambda: manager.unload_adapter("t"), "freeze"),
        (lambda: manager.add_bottleneck_adapter("t"), "already loaded"),
        (lambda: manager.add_bottleneck_adapter("x", config="houlsby"), "config='houlsby'"),
        (lambda: manager.add_bottleneck_adapter("x", reduction_factor=1), "max_bottleneck_dim"),
        (lambda: manager.add_bottleneck_adapter("x", reduction_factor=0), "reduction_factor"),
        (lambda: manager.add_bottleneck_adapter("x", config="double_seq_bn"), "['block_out']"),
        (lambda: manager.add_bottleneck_adapter("x", non_linearity="softplus"), "softplus"),
        (lambda: manager.add_bottleneck_adapter("x", init_weights="lora"), "init_weights"),
        (lambda: manager.add_bottleneck_adapter("x", leave_out=[7]), "leave_out"),
        (lambda: manager.add_bottleneck_adapter("__base__"), "reserved"),
        (lambda: manager.add_bottleneck_adapter("x", non_linearity="identity"), "'identity'"),
        (lambda: manager.add_bottleneck_adapter("x", scaling=float("inf")), "finite"),
        (lambda: manager.add_bottleneck_adapter("v1.2"), "contains '.'"),
        (lambda: manager.add_bottleneck_adapter("x", leave_out=[0, 1]), "every block"),
    ]
    for call, message in bad_calls:
        before = state_bits(model, manager)
        with pytest.raises((ValueError, KeyError)) as error:
            call()
        assert message in str(error.value), (message, str(error.value))
        assert_same_state(before, state_bits(model, manager))
        assert manager.trainable_adapters == ["t", "l"]
    # Slots held by trainable adapters are never freed by waiting: a batch that needs them
    # is refused at once.
    manager.save_adapter("t", str(tmp_path / "t"))
    for extra in ("t2", "t3", "t4"):
        manager.add_bottleneck_adapter(extra, reduction_factor=8)
    manager.load_adapter(str(tmp_path / "t"), adapter_name="t-served")
    with pytest.raises(ValueError, match="only 0 of the max_loras=5 slots can hold them"):
        model(torch.randint(3, 90, (1, 4)), adapter_names=["t-served"])
    model_plain, manager_plain = tiny_model("llama"), None
    manager_plain = adaptfuse.patch(model_plain, max_loras=2)
    with pytest.raises(ValueError, match="max_bottleneck_dim"):
        manager_plain.add_bottleneck_adapter("x")


def test_leave_out_and_init_weights_follow_adapterhub():
    model, manager, base = patched()
    manager.add_bottleneck_adapter("m", config="par_bn", reduction_factor=8, leave_out=[1])
    manager.add_bottleneck_adapter("b", config="seq_bn", reduction_factor=8)  # bert init
    named_m = dict(manager.named_parameters("m"))
    assert all(".0.output_adapters" in key for key in named_m)
    hidden = model.config.hidden_size
    up = [p for k, p in named_m.items() if k.endswith("adapter_up.weight")]
    assert up[0].shape == (hidden, hidden // 8) and torch.count_nonzero(up[0]) == 0  # mam_adapter
    down_b = [p for k, p in manager.named_parameters("b") if k.endswith("adapter_down.0.weight")]
    assert all(abs(p.std().item() - 0.02) < 0.005 for p in down_b)
    # A zero up-projection (mam_adapter) leaves the model as it was at the start.
    input_ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        start = model(input_ids, adapter_names=["m", None]).logits
    with torch.no_grad():
        base = model(input_ids, adapter_names=[None, None]).logits
    assert torch.equal(start[0], base[0])


def test_a_trainable_add_failing_midway_leaves_no_layer_holding_it(monkeypatch, tmp_path):
    """Out of memory (here: injected) at a later layer: the layers already holding the new
    adapter let go of it, so nothing trainable is left behind in its slot."""
    from adaptfuse.layers import BottleneckLayer, LoraLayer

    model, manager, _ = patched(max_loras=2)
    for kind, add in (
        (BottleneckLayer, lambda: manager.add_bottleneck_adapter("t", reduction_factor=8)),
        (LoraLayer, lambda: manager.add_adapter("t", r=2)),
    ):
        attached, real = [0], kind.attach_trainable

        def failing(self, *args, real=real, attached=attached):
            attached[0] += 1
            if attached[0] == 2:
                raise MemoryError("injected")
            return real(self, *args)

        monkeypatch.setattr(kind, "attach_trainable", failing)
        with pytest.raises(MemoryError):
            add()
        monkeypatch.setattr(kind, "attach_trainable", real)
        assert manager.trainable_adapters == [] and "t" not in manager.adapters
        layers = [*manager.layers.values(), *manager.bottleneck_layers.values()]
        assert not any(layer.trainable for layer in layers)
    # The slot serves an adapter afterwards exactly as a fresh model would.
    manager.add_bottleneck_adapter("ok", reduction_factor=8)
    manager.save_adapter("ok", str(tmp_path / "ok"))
    manager.load_adapter(str(tmp_path / "ok"), adapter_name="served")
    ids = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        logits = model(ids, adapter_names=["served", "ok"]).logits
        alone = model(ids[1:], adapter_names=["ok"]).logits
    torch.testing.assert_close(logits[0], model(ids[:1], adapter_names=["ok"]).logits[0])
    torch.testing.assert_close(logits[1], alone[0])
