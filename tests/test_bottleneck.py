"""Bottleneck adapters (DESIGN.md, "Bottleneck adapters"): the shrink/expand ops with per-slot
biases and activations against adaptfuse.reference on every target; AdapterHub parity from the
fixtures that scripts/make_adapterhub_fixtures.sh builds with AdapterHub's own library; mixed
LoRA + bottleneck + None batches; refusals that leave everything as it was."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
import transformers
from conftest import TARGETS, assert_within_torch_error, bits, token_slots_for
from safetensors.torch import load_file, save_file
from test_patch import assert_same_state, save_adapters, state_bits, tiny_model

import adaptfuse
from adaptfuse import ops, reference

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub")
ACTIVATION_NAMES = ops.ACTIVATIONS[1:]  # the five an AdapterHub adapter may name


def random_bottleneck_banks(num_slots, max_dim, hidden, dims, dtype, gen):
    """Slot banks of bottleneck adapters as the layers hold them: dims[s] per slot (0: none),
    every activation among the slots, fp32 biases and scales."""
    down = (torch.randn(num_slots, max_dim, hidden, generator=gen) / hidden**0.5).to(dtype)
    up = (torch.randn(num_slots, max_dim, hidden, generator=gen) / max_dim**0.5).to(dtype)
    down_bias = torch.randn(num_slots, max_dim, generator=gen)
    up_bias = torch.randn(num_slots, hidden, generator=gen)
    ranks = torch.tensor(dims, dtype=torch.int32)
    scales = torch.rand(num_slots, generator=gen) + 0.5
    codes = [1 + s % len(ACTIVATION_NAMES) for s in range(num_slots)]
    activations = torch.tensor(codes, dtype=torch.int32)
    return down, up, down_bias, up_bias, ranks, scales, activations


# (dtype, hidden, max_dim, dims per slot, tokens, popularity): bottleneck dims 1..256, odd
# hidden sizes and ones past the BGMV split length (1024), a slot of dim 0 (a LoRA adapter's).
OP_CASES = [
    (torch.float32, 33, 8, [8, 1, 0, 5], 9, "uniform"),
    (torch.float32, 1030, 64, [64, 16, 3, 0], 6, "some_none"),
    (torch.bfloat16, 96, 256, [256, 0, 17, 64], 4, "distinct"),
    (torch.float16, 200, 32, [32, 7, 32, 1], 8, "segments"),
    (torch.float32, 64, 16, [16, 16, 16, 16], 0, "uniform"),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "case", OP_CASES, ids=[f"{c[0]}-H{c[1]}-m{c[2]}-T{c[4]}-{c[5]}" for c in OP_CASES]
)
def test_bottleneck_ops_match_reference(target, case):
    dtype, hidden, max_dim, dims, num_tokens, popularity = case
    gen = torch.Generator().manual_seed(hidden + max_dim)
    num_slots = len(dims)
    down, up, down_bias, up_bias, ranks, scales, activations = random_bottleneck_banks(
        num_slots, max_dim, hidden, dims, dtype, gen
    )
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    y = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    token_slots = token_slots_for(popularity, num_tokens, num_slots, gen)
    names = [ops.ACTIVATIONS[c] for c in activations.tolist()]
    device = target.device
    on = {
        k: t.to(device)
        for k, t in dict(
            x=x,
            y=y,
            down=down,
            up=up,
            down_bias=down_bias,
            up_bias=up_bias,
            ranks=ranks,
            scales=scales,
            activations=activations,
            token_slots=token_slots,
        ).items()
    }
    plan = ops.plan(on["token_slots"], num_slots, library=target.library)
    v = ops.shrink(
        on["x"],
        on["down"],
        on["ranks"],
        on["scales"],
        plan,
        bias=on["down_bias"],
        activations=on["activations"],
        library=target.library,
    )

    def reference_v(precision):
        v = torch.zeros(num_tokens, max_dim, dtype=torch.float64)
        for slot, name in enumerate(names):
            one = torch.where(token_slots == slot, token_slots, -1)
            v += reference.bottleneck_shrink(
                x, down, down_bias, ranks, scales, one, name, dtype=precision
            ).double()
        return v

    assert_within_torch_error(
        v,
        reference_v(torch.float64),
        reference_v(torch.float32),
        torch.float32,
        "bottleneck shrink",
    )
    slot_dim = torch.where(token_slots >= 0, ranks[token_slots.clamp(min=0).long()], 0)
    beyond = torch.arange(max_dim)[None, :] >= slot_dim[:, None]
    assert bool((v.cpu()[beyond] == 0).all()), "shrink: nonzero beyond a token's dim"

    out = on["y"].clone()
    ops.expand_(
        out, v, [on["up"]], [0], on["ranks"], plan, bias=on["up_bias"], library=target.library
    )

    def reference_y(precision):
        added = reference.expand(y, v.cpu(), [up], [0], ranks, token_slots, dtype=precision)
        return added + reference.bias_per_token(up_bias, ranks, token_slots, dtype=precision)

    assert_within_torch_error(
        out, reference_y(torch.float64), reference_y(dtype), dtype, "bottleneck expand_"
    )
    untouched = slot_dim == 0  # no slot, or a slot with no bottleneck here: no work, same bits
    assert torch.equal(bits(out.cpu()[untouched]), bits(y[untouched]))

    functional = ops.expand(
        v, [on["up"]], [0], hidden, on["ranks"], plan, bias=on["up_bias"], library=target.library
    )
    zero = torch.zeros_like(y, dtype=torch.float32)
    exact = reference.expand(zero, v.cpu(), [up], [0], ranks, token_slots)
    exact += reference.bias_per_token(up_bias, ranks, token_slots)
    plain = reference.expand(zero, v.cpu(), [up], [0], ranks, token_slots, dtype=torch.float32)
    plain += reference.bias_per_token(up_bias, ranks, token_slots, dtype=torch.float32)
    assert_within_torch_error(functional, exact, plain, torch.float32, "bottleneck expand")


@pytest.mark.parametrize("library", ["adaptfuse", "adaptfuse_emu"])
def test_bottleneck_ops_pass_opcheck(library):
    gen = torch.Generator().manual_seed(3)
    down, up, down_bias, up_bias, ranks, scales, activations = random_bottleneck_banks(
        3, 8, 40, [8, 0, 3], torch.float32, gen
    )
    x = torch.randn(6, 40, generator=gen)
    token_slots = torch.tensor([0, 2, -1, 0, 1, 2], dtype=torch.int32)
    plan = ops.plan(token_slots, 3, library=library)
    lib = getattr(torch.ops, library)
    v = ops.shrink(
        x, down, ranks, scales, plan, bias=down_bias, activations=activations, library=library
    )
    torch.library.opcheck(
        lib.shrink.default, (x, down, ranks, scales, *plan, False, down_bias, activations)
    )
    torch.library.opcheck(
        lib.expand_.default, (x.clone(), v, [up], [0], ranks, *plan, False, up_bias)
    )
    torch.library.opcheck(lib.expand.default, (v, [up], [0], 40, ranks, *plan, False, up_bias))


def test_bottleneck_op_gradients_match_reference():
    """The functional path a forward with gradients takes: d/dx, d/dA, d/dbias of shrink with
    activations, and d/dv, d/dB, d/dbias of expand, against float64 autograd of the reference."""
    gen = torch.Generator().manual_seed(5)
    down, up, down_bias, up_bias, ranks, scales, activations = random_bottleneck_banks(
        5, 6, 24, [6, 2, 0, 6, 4], torch.float32, gen
    )
    x = torch.randn(10, 24, generator=gen)
    token_slots = token_slots_for("some_none", 10, 5, gen)
    names = [ops.ACTIVATIONS[c] for c in activations.tolist()]
    plan = ops.plan(token_slots, 5)
    grad_out = torch.randn(10, 24, generator=gen)

    def run(precision, use_ops):
        leaves = [t.to(precision).requires_grad_() for t in (x, down, down_bias, up, up_bias)]
        lx, ldown, ldown_bias, lup, lup_bias = leaves
        if use_ops:
            v = ops.shrink(lx, ldown, ranks, scales, plan, bias=ldown_bias, activations=activations)
            out = ops.expand(v, [lup], [0], 24, ranks, plan, bias=lup_bias)
        else:
            v = sum(
                reference.bottleneck_shrink(
                    lx,
                    ldown,
                    ldown_bias,
                    ranks,
                    scales,
                    torch.where(token_slots == s, token_slots, -1),
                    name,
                    dtype=precision,
                )
                for s, name in enumerate(names)
            )
            zero = torch.zeros(10, 24, dtype=precision)
            out = reference.expand(zero, v, [lup], [0], ranks, token_slots, dtype=precision)
            out = out + reference.bias_per_token(lup_bias, ranks, token_slots, dtype=precision)
        out.backward(grad_out.to(precision))
        return [leaf.grad for leaf in leaves]

    exact = run(torch.float64, use_ops=False)
    plain = run(torch.float32, use_ops=False)
    ours = run(torch.float32, use_ops=True)
    for name, a, e, p in zip(
        ["x", "down", "down_bias", "up", "up_bias"], ours, exact, plain, strict=True
    ):
        assert_within_torch_error(a, e, p, torch.float32, f"gradient of {name}")


# ---- AdapterHub parity ------------------------------------------------------------------------


def fixture_model(arch: str):
    base = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(FIXTURES, arch, "base"), dtype=torch.float32
    )
    return base.eval(), load_file(os.path.join(FIXTURES, arch, "expected.safetensors"))


def adapter_names_of(expected) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in expected if k.endswith(".float64")})


def assert_matches_adapterhub(logits, expected, name, rows=slice(None)):
    """DESIGN.md's model-level rule with AdapterHub as the reference: AdapterHub run in float64
    is the truth, and our largest logit error is at most 2x AdapterHub's own float32 error
    plus 4 ulps."""
    truth = expected[f"{name}.float64"][rows]
    own = expected[f"{name}.float32"][rows]
    assert_within_torch_error(logits, truth, own, torch.float32, f"logits of {name}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapterhub_adapters_match_adapterhub(arch):
    model, expected = fixture_model(arch)
    manager = adaptfuse.patch(model, max_loras=4, max_bottleneck_dim=16)
    names = adapter_names_of(expected)
    for name in names:
        manager.load_adapter(os.path.join(FIXTURES, arch, name))
    input_ids = expected["input_ids"]
    with torch.no_grad():
        base = model(input_ids, adapter_names=[None] * 2).logits
        assert torch.allclose(base, expected["base.float32"], atol=1e-5)
        for name in names:
            logits = model(input_ids, adapter_names=[name] * 2).logits
            assert_matches_adapterhub(logits, expected, name)


def test_mixed_lora_bottleneck_and_none_rows_match_each_alone(tmp_path):
    """One batch, each row its own adapter (four AdapterHub bottleneck adapters, two PEFT LoRA
    adapters, None): every row matches AdapterHub / PEFT / the base model on that row alone."""
    peft = pytest.importorskip("peft")
    model, expected = fixture_model("llama")
    bottlenecks = adapter_names_of(expected)
    loras = save_adapters(
        model,
        "llama",
        str(tmp_path),
        configs={
            "llama": [
                dict(r=4, lora_alpha=8, target_modules="all-linear"),
                dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
            ]
        },
    )
    input_ids = expected["input_ids"]
    plans = [(name, row) for name in bottlenecks for row in (0, 1)]
    plans += [(lora, row) for lora in loras for row in (1, 0)] + [(None, 0), (None, 1)]
    batch = torch.stack([input_ids[row] for _, row in plans])
    names = [name for name, _ in plans]
    lora_expected = {}
    for lora, path in loras.items():
        with torch.no_grad():
            lora_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
            lora_model = lora_model.double()
            truth = lora_model(input_ids).logits
            own = lora_model.float()(input_ids).logits
            lora_expected[lora] = (truth, own)

    manager = adaptfuse.patch(
        model, max_loras=len(bottlenecks) + len(loras), max_rank=8, max_bottleneck_dim=16
    )
    for name in bottlenecks:
        manager.load_adapter(os.path.join(FIXTURES, "llama", name))
    for lora, path in loras.items():
        manager.load_adapter(path, adapter_name=lora)
    with torch.no_grad():
        logits = model(batch, adapter_names=names).logits
    for i, (name, row) in enumerate(plans):
        if name is None:
            assert torch.allclose(logits[i], expected["base.float32"][row], atol=1e-5)
        elif name in loras:
            truth, own = lora_expected[name]
            assert_within_torch_error(logits[i], truth[row], own[row], torch.float32, name)
        else:
            assert_matches_adapterhub(logits[i], expected, name, rows=row)


def write_bottleneck_folder(
    directory, blocks_path, num_blocks, hidden, reduction, options, gen, points=("output_adapters",)
):
    """An AdapterHub-format folder with random weights, as save_adapter would write it (bottleneck
    dim hidden // reduction, as AdapterHub computes it)."""
    dim = hidden // reduction
    os.makedirs(directory, exist_ok=True)
    config = {
        "mh_adapter": False,
        "output_adapter": True,
        "original_ln_before": True,
        "original_ln_after": True,
        "residual_before_ln": True,
        "is_parallel": False,
        "scaling": 1.0,
        "non_linearity": "relu",
        "reduction_factor": reduction,
        "ln_before": False,
        "ln_after": False,
        "use_gating": False,
        "leave_out": [],
        "phm_layer": False,
        "init_weights": "bert",
        "dropout": 0.0,
    }
    config.update(options)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(
            {"config": config, "hidden_size": hidden, "name": "x", "version": "adapters.1.3.0"}, f
        )
    tensors = {}
    for index in range(num_blocks):
        for location in points:
            key = f"{blocks_path}.{index}.{location}.adapters.x"
            tensors[f"{key}.adapter_down.0.weight"] = 0.3 * torch.randn(dim, hidden, generator=gen)
            tensors[f"{key}.adapter_down.0.bias"] = 0.3 * torch.randn(dim, generator=gen)
            tensors[f"{key}.adapter_up.weight"] = 0.3 * torch.randn(hidden, dim, generator=gen)
            tensors[f"{key}.adapter_up.bias"] = 0.3 * torch.randn(hidden, generator=gen)
    save_file(tensors, os.path.join(directory, "adapter.safetensors"))
    return tensors


def plain_bottleneck_model(model, tensors, blocks_path, options, precision):
    """A copy of `model` in `precision` with the adapter added by plain-torch forward hooks at
    the points DESIGN.md names (reference.bottleneck), for comparing whole rows."""
    plain = copy.deepcopy(model).to(precision)
    blocks = plain.get_submodule(blocks_path)
    act, scaling = options.get("non_linearity", "relu"), options.get("scaling", 1.0)

    def f(prefix):
        def apply(h):
            w = {k.rsplit(prefix + ".", 1)[1]: t for k, t in tensors.items() if prefix + "." in k}
            out = reference.bottleneck(
                h.reshape(-1, h.shape[-1]),
                w["adapter_down.0.weight"],
                w["adapter_down.0.bias"],
                w["adapter_up.weight"],
                w["adapter_up.bias"],
                act,
                scaling,
                dtype=precision,
            )
            return h + out.view(h.shape)

        return apply

    def on_first(fn):
        return lambda m, a, out: (fn(out[0]),) + out[1:] if isinstance(out, tuple) else fn(out)

    for index, block in enumerate(blocks):
        attention = getattr(block, "self_attn", None) or block.attn
        key = f"{blocks_path}.{index}"
        if options.get("mh_adapter"):
            attention.register_forward_hook(on_first(f(f"{key}.attention_adapters.adapters.x")))
            block.mlp.register_forward_hook(on_first(f(f"{key}.output_adapters.adapters.x")))
        else:
            block.register_forward_hook(on_first(f(f"{key}.output_adapters.adapters.x")))
    return plain


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3", "gpt2"])
@pytest.mark.parametrize("kind", ["seq_bn", "double_seq_bn"])
def test_bottleneck_rows_match_plain_torch_on_every_architecture(arch, kind, tmp_path):
    model = tiny_model(arch)
    blocks_path = "transformer.h" if arch == "gpt2" else "model.layers"
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(11)
    options = (
        dict(non_linearity="gelu_new", scaling=0.7)
        if kind == "seq_bn"
        else dict(mh_adapter=True, original_ln_before=False, non_linearity="swish")
    )
    points = (
        ("attention_adapters", "output_adapters")
        if kind == "double_seq_bn"
        else ("output_adapters",)
    )
    tensors = write_bottleneck_folder(
        tmp_path / kind, blocks_path, 2, hidden, 8, options, gen, points
    )
    exact_model = plain_bottleneck_model(model, tensors, blocks_path, options, torch.float64)
    plain_model = plain_bottleneck_model(model, tensors, blocks_path, options, torch.float32)
    input_ids = torch.randint(3, 90, (3, 5), generator=gen)
    with torch.no_grad():
        exact = exact_model(input_ids).logits
        plain = plain_model(input_ids).logits
        base = model(input_ids).logits
    manager = adaptfuse.patch(model, max_loras=2, max_bottleneck_dim=16)
    manager.load_adapter(str(tmp_path / kind), adapter_name="b")
    with torch.no_grad():
        logits = model(input_ids, adapter_names=["b", None, "b"]).logits
    for row in (0, 2):
        assert_within_torch_error(logits[row], exact[row], plain[row], torch.float32, arch)
    assert torch.equal(logits[1], base[1])


# ---- refusals -----------------------------------------------------------------------------------

GOOD_OPTIONS: dict = {}
BAD_BOTTLENECKS = {
    "ln_before": (dict(ln_before=True), "ln_before"),
    "gating": (dict(use_gating=True), "use_gating"),
    "phm": (dict(phm_layer=True), "phm_layer"),
    "learned scaling": (dict(scaling="learned"), "scaling"),
    "leaky relu": (dict(non_linearity="leakyrelu"), "non_linearity"),
    "residual after ln": (dict(residual_before_ln=False), "residual_before_ln"),
    "attention + block": (dict(mh_adapter=True), "mh_adapter"),
    "inverse adapter": (dict(inv_adapter="nice"), "inv_adapter"),
    "leave_out conflict": (dict(leave_out=[0]), "leave_out"),
}


@pytest.fixture
def patched_fixture_llama():
    model, expected = fixture_model("llama")
    manager = adaptfuse.patch(model, max_loras=3, max_bottleneck_dim=8)
    manager.load_adapter(os.path.join(FIXTURES, "llama", "seq_bn"), adapter_name="good")
    with torch.no_grad():
        model(expected["input_ids"], adapter_names=["good", None])
    return model, manager


def break_folder(kind: str, directory) -> str:
    """A copy of the llama seq_bn fixture broken one way; returns what the error must name."""
    source = os.path.join(FIXTURES, "llama", "seq_bn")
    shutil.copytree(source, directory)
    config_path = os.path.join(directory, "adapter_config.json")
    weights_path = os.path.join(directory, "adapter.safetensors")
    with open(config_path) as f:
        config = json.load(f)
    tensors = load_file(weights_path)
    key = "model.layers.0.output_adapters.adapters.seq_bn"
    if kind in BAD_BOTTLENECKS:
        options, named = BAD_BOTTLENECKS[kind]
        config["config"].update(options)
    elif kind == "pickle only":
        os.remove(weights_path)
        open(os.path.join(directory, "pytorch_adapter.bin"), "wb").close()
        return "never opened"
    elif kind == "dim above max":
        tensors = {k: torch.cat([t, t]) if "adapter_down" in k else t for k, t in tensors.items()}
        tensors[f"{key}.adapter_up.weight"] = torch.randn(32, 16)
        config["config"]["reduction_factor"] = 2
        named = "max_bottleneck_dim"
    elif kind == "dim not the reduction factor's":
        config["config"]["reduction_factor"] = 8
        named = "reduction_factor"
    elif kind == "wrong hidden":
        tensors[f"{key}.adapter_down.0.weight"] = torch.randn(8, 31)
        named = "do not fit hidden size"
    elif kind == "missing bias":
        del tensors[f"{key}.adapter_up.bias"]
        named = "up_bias"
    elif kind == "non-finite":
        tensors[f"{key}.adapter_up.bias"][3] = float("nan")
        named = "non-finite"
    elif kind == "stray tensor":
        tensors["model.layers.0.mlp.extra"] = torch.zeros(2)
        named = "unexpected tensor"
    elif kind == "block out of range":
        for part in (
            "adapter_down.0.weight",
            "adapter_down.0.bias",
            "adapter_up.weight",
            "adapter_up.bias",
        ):
            tensors[f"model.layers.5.output_adapters.adapters.seq_bn.{part}"] = tensors[
                f"{key}.{part}"
            ].clone()
        named = "block 5"
    else:
        raise ValueError(kind)
    with open(config_path, "w") as f:
        json.dump(config, f)
    save_file(tensors, weights_path)
    return named


BREAKS = [
    *BAD_BOTTLENECKS,
    "pickle only",
    "dim above max",
    "dim not the reduction factor's",
    "wrong hidden",
    "missing bias",
    "non-finite",
    "stray tensor",
    "block out of range",
]


@pytest.mark.parametrize("kind", BREAKS)
def test_bad_bottleneck_folders_are_refused_and_nothing_changes(
    kind, patched_fixture_llama, tmp_path
):
    model, manager = patched_fixture_llama
    named = break_folder(kind, tmp_path / "bad")
    before = state_bits(model, manager)
    with pytest.raises(ValueError, match=named) as error:
        manager.load_adapter(str(tmp_path / "bad"), adapter_name="bad")
    assert "bad" in str(error.value)  # names the folder
    assert_same_state(before, state_bits(model, manager))


def test_bottleneck_calls_that_are_refused_change_nothing(patched_fixture_llama, tmp_path):
    model, manager = patched_fixture_llama
    before = state_bits(model, manager)
    with pytest.raises(ValueError, match="nonlinearity cannot fold"):
        manager.merge("good")
    # A trainable load is validated like a served one before anything changes.
    with pytest.raises(ValueError, match="dim 16, above max_bottleneck_dim=8"):
        manager.load_adapter(os.path.join(FIXTURES, "llama", "par_bn"), "t", trainable=True)
    assert_same_state(before, state_bits(model, manager))
    plain, _ = fixture_model("llama")
    lora_only = adaptfuse.patch(plain)
    with pytest.raises(ValueError, match="max_bottleneck_dim"):
        lora_only.load_adapter(os.path.join(FIXTURES, "llama", "seq_bn"))
    with pytest.raises(ValueError, match="max_bottleneck_dim must be"):
        adaptfuse.patch(tiny_model("llama"), max_bottleneck_dim=257)


def test_unpatch_removes_the_bottleneck_points():
    model, expected = fixture_model("llama")
    names_before = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        base = model(expected["input_ids"]).logits
    manager = adaptfuse.patch(model, max_bottleneck_dim=8)
    manager.load_adapter(os.path.join(FIXTURES, "llama", "seq_bn"))
    adaptfuse.unpatch(model)
    assert [n for n, _ in model.named_modules()] == names_before
    with torch.no_grad():
        assert torch.equal(model(expected["input_ids"]).logits, base)


def test_one_slot_alternating_kinds_keeps_each_adapter_exact(tmp_path):
    """With a single slot, LoRA and bottleneck adapters evict each other in turn: a slot that
    held one kind must carry nothing of it once the other kind moves in."""
    model, expected = fixture_model("llama")
    lora = save_adapters(
        model, "llama", str(tmp_path), configs={"llama": [dict(r=4, lora_alpha=8)]}
    )["adapter0"]
    manager = adaptfuse.patch(model, max_loras=1, max_rank=4, max_bottleneck_dim=16)
    manager.load_adapter(lora, adapter_name="lora")
    for name in ("seq_bn", "par_bn"):
        manager.load_adapter(os.path.join(FIXTURES, "llama", name))
    input_ids = expected["input_ids"]
    with torch.no_grad():
        first = model(input_ids, adapter_names=["lora", "lora"]).logits
        for name in ("seq_bn", "lora", "par_bn", "lora", "seq_bn"):
            logits = model(input_ids, adapter_names=[name, name]).logits
            if name == "lora":
                assert torch.equal(logits, first)
            else:
                assert_matches_adapterhub(logits, expected, name)


def test_generate_with_mixed_bottleneck_rows_matches_each_row_alone():
    model, expected = fixture_model("llama")
    manager = adaptfuse.patch(model, max_loras=3, max_bottleneck_dim=16)
    for name in ("seq_bn", "double_seq_bn"):
        manager.load_adapter(os.path.join(FIXTURES, "llama", name))
    input_ids = expected["input_ids"][[0, 1, 0]]
    names = ["seq_bn", None, "double_seq_bn"]
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    together = model.generate(input_ids, adapter_names=names, **options)
    for row, name in enumerate(names):
        alone = model.generate(input_ids[row : row + 1], adapter_names=[name], **options)
        assert torch.equal(together[row], alone[0]), f"row {row} ({name})"
    assert not torch.equal(together[0], together[2])  # the adapters do change the output


def test_bottleneck_points_narrow_the_slots_and_refuse_other_points():
    model, expected = fixture_model("llama")
    everywhere = adaptfuse.patch(copy.deepcopy(model), max_loras=2, max_bottleneck_dim=8)
    manager = adaptfuse.patch(
        model, max_loras=2, max_bottleneck_dim=8, bottleneck_points=["block_out"]
    )
    assert manager.memory_bytes < everywhere.memory_bytes
    manager.load_adapter(os.path.join(FIXTURES, "llama", "seq_bn"))
    before = state_bits(model, manager)
    with pytest.raises(ValueError, match="bottleneck_points"):
        manager.load_adapter(os.path.join(FIXTURES, "llama", "double_seq_bn"))
    assert_same_state(before, state_bits(model, manager))
    with torch.no_grad():
        logits = model(expected["input_ids"], adapter_names=["seq_bn"] * 2).logits
    assert_matches_adapterhub(logits, expected, "seq_bn")
    with pytest.raises(ValueError, match="bottleneck_points must name"):
        adaptfuse.patch(tiny_model("llama"), max_bottleneck_dim=8, bottleneck_points=["attn"])


@pytest.mark.parametrize("family", ["simple", "sgmv"])
def test_bottleneck_launches_take_bgmv_whatever_family_is_selected(family):
    """The dispatcher runs bottleneck launches (a bias, activations) on BGMV, the family that
    has their epilogue, even where another family is selected."""
    gen = torch.Generator().manual_seed(9)
    down, up, down_bias, up_bias, ranks, scales, activations = random_bottleneck_banks(
        3, 16, 70, [16, 5, 0], torch.float32, gen
    )
    x = torch.randn(40, 70, generator=gen)  # enough tokens per slot for auto to pick SGMV
    token_slots = token_slots_for("segments", 40, 3, gen)
    library = "adaptfuse_emu"
    plan = ops.plan(token_slots, 3, library=library)

    def run():
        v = ops.shrink(
            x, down, ranks, scales, plan, bias=down_bias, activations=activations, library=library
        )
        y = torch.zeros(40, 70)
        ops.expand_(y, v, [up], [0], ranks, plan, bias=up_bias, library=library)
        return v, y

    with ops.kernel_family("bgmv", library=library):
        expected_v, expected_y = run()
    with ops.kernel_family(family, library=library):
        v, y = run()
    assert torch.equal(bits(v), bits(expected_v)) and torch.equal(bits(y), bits(expected_y))
