"""adaptfuse.patch on random-weight transformers models against PEFT's mixed-adapter batch,
with adapters created and saved by PEFT (init_lora_weights=False, so they change the output),
and every bad input refused with the whole state left bit-identical."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import bits, record_blocked_layers

import adaptfuse

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def tiny_model(arch: str):
    """Small random-weight causal LMs from configs (no downloads); odd hidden sizes where the
    architecture allows them."""
    common = dict(
        vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0, eos_token_id=1, bos_token_id=2
    )
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=72,
            intermediate_size=100,
            num_attention_heads=6,
            num_key_value_heads=2,
            **common,
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch == "mistral":
        config = transformers.MistralConfig(
            hidden_size=64,
            intermediate_size=90,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        model = transformers.MistralForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(
            hidden_size=56,
            intermediate_size=77,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
        model = transformers.Qwen2ForCausalLM(config)
    elif arch == "phi3":
        config = transformers.Phi3Config(
            hidden_size=64,
            intermediate_size=88,
            num_attention_heads=4,
            num_key_value_heads=4,
            **common,
        )
        model = transformers.Phi3ForCausalLM(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=48,
            n_layer=2,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(arch)
    return model.eval()


# Per architecture: three adapters with different ranks and options (rank/alpha patterns,
# rsLoRA, exclude_modules, fused projections), saved with PEFT.
ADAPTER_CONFIGS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=8,
            lora_alpha=16,
            target_modules="all-linear",
            rank_pattern={"down_proj": 2},
            alpha_pattern={"gate_proj": 5},
        ),
        dict(
            r=16,
            lora_alpha=8,
            target_modules="all-linear",
            use_rslora=True,
            exclude_modules=["k_proj"],
        ),
    ],
    "mistral": [
        dict(r=4, lora_alpha=4, target_modules="all-linear"),
        dict(r=8, lora_alpha=32, target_modules=["o_proj"]),
    ],
    "qwen2": [
        dict(r=6, lora_alpha=12, target_modules="all-linear"),
        dict(r=2, lora_alpha=3, target_modules=["up_proj"]),
    ],
    "phi3": [
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj"]),
        dict(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    ],
    "gpt2": [
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        dict(r=8, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ],
}


def save_adapters(base, arch, directory, configs=None, prefix="adapter", seed=100):
    """Saves one PEFT adapter (random, init_lora_weights=False) per config of the
    architecture; returns {f"{prefix}{i}": folder}."""
    paths = {}
    for i, options in enumerate((configs or ADAPTER_CONFIGS)[arch]):
        torch.manual_seed(seed + i)
        peft_model = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options)
        )
        path = os.path.join(directory, f"{arch}-{prefix}{i}")
        peft_model.save_pretrained(path)
        paths[f"{prefix}{i}"] = path
    return paths


def peft_model_with(base, paths, dtype):
    names = list(paths)
    model = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), paths[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model.to(dtype).eval()


def batch_with_padding(batch: int, length: int, side: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch, 2):  # every other row shorter
        pad = 1 + row % (length - 2)
        if side == "left":
            ids[row, :pad], mask[row, :pad] = 0, 0
        else:
            ids[row, -pad:], mask[row, -pad:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")


@pytest.mark.parametrize("arch", list(ADAPTER_CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_mixed_batch_matches_peft(arch, padding, workdir):
    check_mixed_batch_against_peft(arch, padding, workdir)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # biased q/k/v; Conv1D
def test_cpu_prefill_in_output_blocks_matches_peft(arch, workdir, monkeypatch):
    """The CPU prefill path that computes each layer's base output block by block and adds
    the adapters to each block (layers.OUTPUT_BLOCK), brought down to these small shapes."""
    from adaptfuse import layers

    monkeypatch.setattr(layers, "OUTPUT_BLOCK", 16)
    monkeypatch.setattr(layers, "OUTPUT_BLOCK_MIN_TOKENS", 8)
    blocked = record_blocked_layers(monkeypatch)
    # Blocks this narrow take MKL's small-matrix path, which rounds differently from the whole
    # matmul: rows without an adapter are then within tolerance of the base model (checked
    # with the rest), not its bits (see layers.output_blocks).
    check_mixed_batch_against_peft(arch, "left", workdir, base_rows_bit_exact=False)
    assert blocked and max(blocked) > 16, "the blocked path did not run"


def check_mixed_batch_against_peft(arch, padding, workdir, base_rows_bit_exact=True):
    """Logits of a mixed batch (adapters, None, "__base__", padding) against PeftModel's mixed
    batch within DESIGN.md's tolerance; rows without an adapter are the base model's bits."""
    torch.manual_seed(0)
    base = tiny_model(arch)
    paths = save_adapters(base, arch, workdir)
    names = list(paths)
    adapter_names = [names[0], None, names[-1], "__base__", names[1 % len(names)], names[0]]
    ids, mask = batch_with_padding(len(adapter_names), 9, padding)
    peft_names = [n if n else "__base__" for n in adapter_names]
    with torch.no_grad():
        truth = peft_model_with(base, paths, torch.float64)(
            ids, attention_mask=mask, adapter_names=peft_names
        ).logits
        peft32 = peft_model_with(base, paths, torch.float32)(
            ids, attention_mask=mask, adapter_names=peft_names
        ).logits
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=4, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, adapter_names=adapter_names).logits
        plain = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    peft_error = (peft32.double() - truth).abs()[valid].max().item()
    our_error = (ours.double() - truth).abs()[valid].max().item()
    ulps = 4 * torch.finfo(torch.float32).eps * truth.abs()[valid].max().item()
    assert our_error <= 2 * peft_error + ulps, (
        f"{arch}: error {our_error:.3e} vs PEFT's {peft_error:.3e}"
    )
    # adapter_names really changes the output, and rows without an adapter are the base model.
    assert (ours - plain).abs()[0][valid[0]].max() > 1e-3
    if base_rows_bit_exact:
        assert torch.equal(ours[1], plain[1]) and torch.equal(ours[3], plain[3])


@pytest.mark.cuda
@pytest.mark.skipif(not adaptfuse.cuda_available(), reason="needs a GPU and the CUDA build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(ADAPTER_CONFIGS))
def test_mixed_batch_matches_peft_on_cuda(arch, dtype, workdir):
    """The CUDA kernels inside a whole model: a padded mixed batch against PEFT's mixed batch
    on the same GPU in the same dtype, both measured against PEFT in float64 on the CPU."""
    torch.manual_seed(0)
    base = tiny_model(arch)
    paths = save_adapters(base, arch, workdir)
    names = list(paths)
    adapter_names = [names[0], None, names[-1], "__base__", names[1 % len(names)], names[0]]
    ids, mask = batch_with_padding(len(adapter_names), 9, "left")
    peft_names = [n if n else "__base__" for n in adapter_names]
    with torch.no_grad():
        truth = peft_model_with(base, paths, torch.float64)(
            ids, attention_mask=mask, adapter_names=peft_names
        ).logits
        theirs = peft_model_with(base, paths, dtype).cuda()(
            ids.cuda(), attention_mask=mask.cuda(), adapter_names=peft_names
        ).logits.cpu()
    model = copy.deepcopy(base).to("cuda", dtype)
    manager = adaptfuse.patch(model, max_loras=4, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    with torch.no_grad():
        ours = model(ids.cuda(), attention_mask=mask.cuda(), adapter_names=adapter_names).logits
    valid = mask.bool()
    peft_error = (theirs.double() - truth).abs()[valid].max().item()
    our_error = (ours.cpu().double() - truth).abs()[valid].max().item()
    ulps = 4 * torch.finfo(dtype).eps * truth.abs()[valid].max().item()
    assert our_error <= 2 * peft_error + ulps, (
        f"{arch} {dtype}: error {our_error:.3e} vs PEFT's {peft_error:.3e}"
    )


def test_decode_with_kv_cache_matches_peft(workdir):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    names = ["adapter2", None, "adapter0"]
    peft_names = [n or "__base__" for n in names]
    ids, mask = batch_with_padding(3, 6, "left", seed=3)
    next_ids = torch.tensor([[5], [7], [9]])
    next_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    reference = peft_model_with(base, paths, torch.float32)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=3, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    with torch.no_grad():
        ref_cache = reference(
            ids, attention_mask=mask, adapter_names=peft_names, use_cache=True
        ).past_key_values
        ref_step = reference(
            next_ids, attention_mask=next_mask, past_key_values=ref_cache, adapter_names=peft_names
        ).logits
        cache = model(ids, attention_mask=mask, adapter_names=names, use_cache=True).past_key_values
        step = model(
            next_ids, attention_mask=next_mask, past_key_values=cache, adapter_names=names
        ).logits
    torch.testing.assert_close(step, ref_step, rtol=1e-5, atol=1e-5)


def state_bits(model, manager):
    """Everything a failed call must leave alone: every parameter and buffer (slot banks
    included) as bit patterns, the registered names and the slot table."""
    tensors = {f"param:{n}": bits(p) for n, p in model.named_parameters()}
    tensors.update({f"buffer:{n}": bits(b) for n, b in model.named_buffers()})
    return tensors, list(manager.adapters), dict(manager._slot_of)


def assert_same_state(before, after):
    tensors_before, names_before, slots_before = before
    tensors_after, names_after, slots_after = after
    assert names_before == names_after and slots_before == slots_after
    assert tensors_before.keys() == tensors_after.keys()
    for key in tensors_before:
        assert torch.equal(tensors_before[key], tensors_after[key]), f"{key} changed"


def write_adapter(directory, config: dict, tensors: dict):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    return str(directory)


@pytest.fixture
def patched_llama(workdir):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=8)
    manager.load_adapter(paths["adapter0"], adapter_name="good")
    return model, manager, paths


LAYER = "model.layers.0.self_attn.q_proj"
PREFIX = "base_model.model."


def good_tensors(rank=4, h_in=72, h_out=72):
    return {
        f"{PREFIX}{LAYER}.lora_A.weight": torch.randn(rank, h_in),
        f"{PREFIX}{LAYER}.lora_B.weight": torch.randn(h_out, rank),
    }


BASE_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
    "bias": "none",
}


def bad_adapter(kind: str, directory) -> tuple[str, str]:
    """Writes one kind of bad adapter; returns (path, the message the error must contain)."""
    path = os.path.join(directory, kind)
    if kind == "no_config":
        os.makedirs(path)
        return path, "no adapter_config.json"
    if kind == "pickle_only":
        os.makedirs(path)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(BASE_CONFIG, f)
        with open(os.path.join(path, "adapter_model.bin"), "wb") as f:
            f.write(b"\x80\x04 not to be unpickled")
        return path, "pickle files are never opened"
    if kind == "corrupt":
        write_adapter(path, BASE_CONFIG, good_tensors())
        weights = os.path.join(path, "adapter_model.safetensors")
        data = open(weights, "rb").read()
        with open(weights, "wb") as f:
            f.write(data[: len(data) // 2])  # truncated
        return path, "not a readable safetensors file"
    if kind == "wrong_shape":
        return write_adapter(
            path, BASE_CONFIG, good_tensors(h_in=70)
        ), f"layer {LAYER}: lora_A (4, 70)"
    if kind == "non_finite":
        tensors = good_tensors()
        tensors[f"{PREFIX}{LAYER}.lora_B.weight"][3, 1] = float("nan")
        return write_adapter(path, BASE_CONFIG, tensors), "non-finite values"
    if kind == "missing_module":
        tensors = {k.replace("q_proj", "q_proj_missing"): v for k, v in good_tensors().items()}
        return write_adapter(path, BASE_CONFIG, tensors), "does not adapt"
    if kind == "rank_above_max":
        return write_adapter(
            path, {**BASE_CONFIG, "r": 12}, good_tensors(rank=12)
        ), "above max_rank=8"
    if kind == "dora":
        return write_adapter(
            path, {**BASE_CONFIG, "use_dora": True}, good_tensors()
        ), "use_dora=True"
    if kind == "modules_to_save":
        return write_adapter(
            path, {**BASE_CONFIG, "modules_to_save": ["lm_head"]}, good_tensors()
        ), "modules_to_save"
    if kind == "lora_bias":
        return write_adapter(
            path, {**BASE_CONFIG, "lora_bias": True}, good_tensors()
        ), "lora_bias=True"
    if kind == "bias_all":
        return write_adapter(path, {**BASE_CONFIG, "bias": "all"}, good_tensors()), "bias='all'"
    if kind == "unknown_option":
        return write_adapter(
            path, {**BASE_CONFIG, "use_fancy_thing": 3}, good_tensors()
        ), "use_fancy_thing=3"
    if kind == "half_pair":
        tensors = good_tensors()
        del tensors[f"{PREFIX}{LAYER}.lora_B.weight"]
        return write_adapter(path, BASE_CONFIG, tensors), "not both lora_A and lora_B"
    # A load that fails midway: the first layers are fine, a later one is not.
    tensors = {
        f"{PREFIX}model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.randn(*shape)
        for i in range(2)
        for ab, shape in (("A", (4, 72)), ("B", (72, 4)))
    }
    tensors[f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"] = torch.randn(72, 3)
    return write_adapter(path, BASE_CONFIG, tensors), "model.layers.1.self_attn.q_proj"


BAD_KINDS = [
    "no_config",
    "pickle_only",
    "corrupt",
    "wrong_shape",
    "non_finite",
    "missing_module",
    "rank_above_max",
    "dora",
    "modules_to_save",
    "lora_bias",
    "bias_all",
    "unknown_option",
    "half_pair",
    "fails_midway",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_adapters_are_refused_and_nothing_changes(kind, patched_llama, tmp_path):
    model, manager, _ = patched_llama
    path, message = bad_adapter(kind, tmp_path)
    before = state_bits(model, manager)
    with pytest.raises(
        adaptfuse.AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        manager.load_adapter(path, adapter_name="bad")
    assert_same_state(before, state_bits(model, manager))


def test_bad_calls_are_refused_and_nothing_changes(patched_llama):
    model, manager, paths = patched_llama
    ids = torch.randint(3, VOCAB, (2, 5))
    before = state_bits(model, manager)
    with pytest.raises(ValueError, match="already loaded"):
        manager.load_adapter(paths["adapter1"], adapter_name="good")
    with pytest.raises(KeyError, match="unknown adapter name"):
        with torch.no_grad():
            model(ids, adapter_names=["good", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2"):
        with torch.no_grad():
            model(ids, adapter_names=["good", None, None])
    with pytest.raises(ValueError, match="reserved"):
        manager.load_adapter(paths["adapter1"], adapter_name="__base__")
    assert_same_state(before, state_bits(model, manager))


def test_slots_evict_least_recently_used(patched_llama):
    model, manager, paths = patched_llama  # max_loras=2, "good" is loaded
    manager.load_adapter(paths["adapter1"], adapter_name="second")
    manager.load_adapter(
        paths["adapter0"], adapter_name="third"
    )  # registered, waits in host memory
    assert manager.adapters == ["good", "second", "third"]
    ids = torch.randint(3, VOCAB, (3, 4))
    with torch.no_grad():
        alone = {n: model(ids[:1], adapter_names=[n]).logits for n in ("good", "second", "third")}
        both = model(ids[:2], adapter_names=["third", "second"]).logits
        with pytest.raises(
            ValueError, match="3 distinct adapters but patch\\(\\) allocated max_loras=2"
        ):
            model(ids, adapter_names=["good", "second", "third"])
    torch.testing.assert_close(both[:1], model(ids[:1], adapter_names=["third"]).logits)
    torch.testing.assert_close(alone["third"], model(ids[:1], adapter_names=["third"]).logits)
    manager.unload_adapter("third")
    assert "third" not in manager.adapters


def test_unpatch_restores_the_model(workdir):
    torch.manual_seed(0)
    base = tiny_model("gpt2")
    model = copy.deepcopy(base)
    model.transformer.wte.weight.requires_grad_(True)
    original = {n: bits(p) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    manager = adaptfuse.patch(model, max_loras=2, max_rank=8)
    assert manager.memory_bytes > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert not any("lora_" in k for k in model.state_dict())  # slot buffers are not persistent
    manager.load_adapter(save_adapters(base, "gpt2", workdir)["adapter0"], adapter_name="a")
    adaptfuse.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not patched"):
        adaptfuse.unpatch(model)


def test_patch_refuses_what_does_not_fit():
    model = tiny_model("llama")
    with pytest.raises(MemoryError, match="the adapter slots need .* MiB"):
        adaptfuse.patch(model, max_loras=100000, max_rank=512)
    assert not any(isinstance(m, adaptfuse.layers.LoraLayer) for m in model.modules())
    with pytest.raises(ValueError, match="no layer of the model matches"):
        adaptfuse.patch(model, target_modules=["nothing_like_this"])
    manager = adaptfuse.patch(model, target_modules=["q_proj", "v_proj"])
    assert sorted({name.rsplit(".", 1)[1] for name in manager.layers}) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="already patched"):
        adaptfuse.patch(model)


def test_model_to_dtype_keeps_fp32_scales(workdir):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    manager.load_adapter(paths["adapter2"], adapter_name="rs")  # rsLoRA: scale 8 / sqrt(16)
    model.to(torch.bfloat16)
    layer = next(iter(manager.layers.values()))
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_scales.dtype == torch.float32
    assert layer.lora_scales.max().item() == 2.0
    manager.load_adapter(paths["adapter0"], adapter_name="late")  # loaded after the cast
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        logits = model(ids, adapter_names=["rs", "late"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_concurrent_forwards_keep_their_adapters(workdir):
    """max_loras=1 and two threads that each serve another adapter: a forward in flight pins
    its slot, the other waits, and every result equals the one computed alone."""
    import threading

    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=1, max_rank=16)
    manager.load_adapter(paths["adapter1"], adapter_name="one")
    manager.load_adapter(paths["adapter2"], adapter_name="two")
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = {n: model(ids, adapter_names=[n, None]).logits for n in ("one", "two")}
    failures = []

    def serve(name):
        with torch.no_grad():
            for _ in range(6):
                got = model(ids, adapter_names=[name, None]).logits
                if not torch.equal(got, expected[name]):
                    failures.append(name)

    threads = [threading.Thread(target=serve, args=(n,)) for n in ("one", "two", "one")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_patch_is_all_or_nothing(monkeypatch):
    model = tiny_model("llama")
    real_init = adaptfuse.layers.LoraLayer.__init__
    calls = []

    def failing_init(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("out of memory (simulated)")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(adaptfuse.layers.LoraLayer, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="simulated"):
        adaptfuse.patch(model)
    monkeypatch.undo()
    assert not any(isinstance(m, adaptfuse.layers.LoraLayer) for m in model.modules())
    adaptfuse.patch(model)  # and it can be patched afterwards


def test_unpatch_restores_an_instance_forward():
    model = tiny_model("llama")
    class_forward = type(model).forward
    calls = []

    def hooked_forward(*args, **kwargs):  # what accelerate's device hooks put on the instance
        calls.append(1)
        return class_forward(model, *args, **kwargs)

    model.forward = hooked_forward
    adaptfuse.patch(model)
    adaptfuse.unpatch(model)
    assert model.forward is hooked_forward
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 3)))
    assert calls


def test_inputs_embeds_with_positional_none(patched_llama):
    model, _, _ = patched_llama
    ids = torch.randint(3, VOCAB, (2, 4))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        by_embeds = model(None, inputs_embeds=embeds, adapter_names=["good", None]).logits
        by_ids = model(ids, adapter_names=["good", None]).logits
    torch.testing.assert_close(by_embeds, by_ids)


def test_adapter_values_too_large_for_fp16(tmp_path):
    model = tiny_model("llama").to(torch.float16)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=8)
    tensors = good_tensors()
    tensors[f"{PREFIX}{LAYER}.lora_A.weight"][0, 0] = 1e6
    path = write_adapter(tmp_path / "huge", BASE_CONFIG, tensors)
    with pytest.raises(adaptfuse.AdapterError, match="too large for the model's torch.float16"):
        manager.load_adapter(path, adapter_name="huge")
    assert manager.adapters == []


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(num_beams=2, num_return_sequences=2),
        dict(num_beams=3),
        dict(do_sample=True, top_k=20, temperature=1.3, num_return_sequences=2),
    ],
    ids=["greedy", "beams-2-return-2", "beams-3", "sampling"],
)
def test_generate_matches_peft(options, workdir):
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    names = ["adapter1", None, "adapter2"]
    ids, mask = batch_with_padding(3, 6, "left", seed=5)
    reference = peft_model_with(base, paths, torch.float32)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=3, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    # Sampling: both draw from the same seeded generator; a draw lands within the logits'
    # tolerance of a bucket edge with probability ~1e-6 per token.
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **options}
    with torch.no_grad():
        peft_names = [n or "__base__" for n in names]
        if options.get("do_sample"):  # PEFT expands names for beams only
            copies = options.get("num_return_sequences", 1)
            peft_names = [n for n in peft_names for _ in range(copies)]
        torch.manual_seed(11)
        expected = reference.generate(
            input_ids=ids, attention_mask=mask, adapter_names=peft_names, **settings
        )
        torch.manual_seed(11)
        got = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
        torch.manual_seed(11)
        base_only = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)
    assert not torch.equal(got, base_only)  # the adapters change what is generated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_merge_serves_and_unmerges_bit_exactly(arch, workdir):
    torch.manual_seed(0)
    base = tiny_model(arch)
    paths = save_adapters(base, arch, workdir)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    original = {n.replace(".base_layer", ""): bits(p) for n, p in model.named_parameters()}
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        served = model(ids, adapter_names=["adapter1", "adapter1"]).logits
        for _cycle in range(3):
            manager.merge("adapter1")
            merged_plain = model(ids).logits
            merged_named = model(ids, adapter_names=["adapter1", "adapter1"]).logits
            with pytest.raises(ValueError, match="'adapter1' is merged"):
                model(ids, adapter_names=["adapter1", None])
            with pytest.raises(ValueError, match="'adapter1' is merged; call unmerge"):
                manager.merge("adapter0")
            with pytest.raises(ValueError, match="merged into the base weights"):
                manager.unload_adapter("adapter1")
            with pytest.raises(RuntimeError, match="call unmerge\\(\\) before moving"):
                model.to(torch.float64)
            manager.unmerge()
            for name, p in model.named_parameters():
                assert torch.equal(bits(p), original[name.replace(".base_layer", "")]), name
    torch.testing.assert_close(merged_plain, served, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged_named, merged_plain, rtol=0, atol=0)
    # A weighted merge of two adapters, then unpatch while merged: unmerged first.
    manager.merge({"adapter0": 0.5, "adapter1": 0.25})
    with pytest.raises(ValueError, match="weighted merge"):
        with torch.no_grad():
            model(ids, adapter_names=["adapter0", "adapter0"])
    adaptfuse.unpatch(model)
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name


def test_failed_merge_restores_every_layer(tmp_path):
    """An adapter whose delta overflows fp16 in its last layer: the layers merged before it
    are restored bit for bit and nothing is merged."""
    model = tiny_model("llama").to(torch.float16)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=8)
    tensors = {}
    for i in range(2):
        layer = f"{PREFIX}model.layers.{i}.self_attn.q_proj"
        tensors[f"{layer}.lora_A.weight"] = torch.full((4, 72), 0.01 if i == 0 else 1.0)
        tensors[f"{layer}.lora_B.weight"] = torch.full((72, 4), 0.01 if i == 0 else 60000.0)
    path = write_adapter(tmp_path / "overflow", {**BASE_CONFIG, "lora_alpha": 4}, tensors)
    manager.load_adapter(path, adapter_name="overflow")
    original = {n: bits(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        manager.merge("overflow")
    assert manager.merged is None
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name


def test_grad_through_frozen_adapters_matches_peft(workdir):
    """A forward with gradients through served (frozen) adapters is an ordinary forward: the
    activations get the adapters' part of their gradient, the adapters none."""
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    names = ["adapter1", None, "adapter2"]
    ids = torch.randint(3, VOCAB, (3, 6))
    reference = peft_model_with(base, paths, torch.float32)
    for p in reference.parameters():
        p.requires_grad_(False)
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=3, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    grads = []
    for candidate, candidate_names in (
        (reference, [n or "__base__" for n in names]),
        (model, names),
    ):
        embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = candidate(inputs_embeds=embeds, adapter_names=candidate_names).logits
        logits.float().pow(2).mean().backward()
        grads.append(embeds.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    embeds = base.get_input_embeddings()(ids).detach().requires_grad_(True)
    base(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
    assert (grads[1] - embeds.grad)[0].abs().max() > 1e-6  # the adapters' part is there


def test_batch_invariant_patch_reaches_every_layer(workdir):
    """patch(..., batch_invariant=True) hands the flag to every op call of every layer; the
    CPU ops are deterministic and ignore it (DESIGN.md), so the logits equal the default's."""
    torch.manual_seed(0)
    base = tiny_model("llama")
    paths = save_adapters(base, "llama", workdir)
    ids = torch.randint(3, VOCAB, (2, 6))
    logits = {}
    for invariant in (False, True):
        model = copy.deepcopy(base)
        manager = adaptfuse.patch(model, max_loras=2, max_rank=16, batch_invariant=invariant)
        assert all(layer.batch_invariant is invariant for layer in manager.layers.values())
        for name, path in paths.items():
            manager.load_adapter(path, adapter_name=name)
        with torch.no_grad():
            logits[invariant] = model(ids, adapter_names=["adapter0", "adapter1"]).logits
    assert torch.equal(bits(logits[True]), bits(logits[False]))
