"""The CPU ops have three implementations: AVX-512 kernels, AVX2 kernels (the same source
compiled for 8 lanes), and portable loops plus per-segment GEMMs everywhere else. The suite
runs the best vector kernels the machine has; this runs the op tests once more with the vector
kernels switched off, and once capped at AVX2 where the machine's best is AVX-512."""

import os
import subprocess
import sys

import pytest
import torch

import adaptfuse

MODULES = ["tests/test_ops.py", "tests/test_op_contract.py", "tests/test_bottleneck.py"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernels_under(setting: str) -> str:
    """What adaptfuse.cpu_kernels() says in a process started with ADAPTFUSE_CPU_SIMD=setting."""
    env = {**os.environ, "ADAPTFUSE_CPU_SIMD": setting}
    script = "import adaptfuse; print(adaptfuse.cpu_kernels())"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_cpu_kernel_choice():
    assert adaptfuse.cpu_kernels() in ("avx512", "avx2", "none")
    assert kernels_under("0") == "none"
    capped = kernels_under("avx2")
    assert capped == ("none" if adaptfuse.cpu_kernels() == "none" else "avx2")


@pytest.mark.parametrize("module", MODULES)
def test_portable_cpu_path(module):
    run_op_tests(module, "0")


@pytest.mark.parametrize("module", MODULES)
def test_avx2_cpu_path(module):
    if adaptfuse.cpu_kernels() != "avx512":
        pytest.skip("the default run already uses this machine's best kernels (AVX2 or none)")
    run_op_tests(module, "avx2")


def run_op_tests(module: str, setting: str) -> None:
    env = {**os.environ, "ADAPTFUSE_CPU_SIMD": setting}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-k", "cpu", "-p", "no:cacheprovider", module],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def blocked_layer(
    bias: bool, ranks=(8, 3, 0, 5), h_in=96, h_out=2 * 512 + 76, seed=0, kind="linear"
):
    """A LoraLayer over nn.Linear(h_in, h_out) (or GPT-2's Conv1D, always biased) with random
    adapters of the given ranks (0: the slot's adapter does not adapt this layer), frozen as
    patch leaves it."""
    from torch import nn

    from adaptfuse.layers import LoraLayer, conv1d_class

    gen = torch.Generator().manual_seed(seed)
    if kind == "conv1d":
        base = conv1d_class()(h_out, h_in)
        torch.nn.init.normal_(base.bias, std=0.1)  # transformers starts it at zero
    else:
        base = nn.Linear(h_in, h_out, bias=bias)
    base.requires_grad_(False)
    layer = LoraLayer(base, num_slots=len(ranks), max_rank=max(ranks))
    for slot, rank in enumerate(ranks):
        if rank:
            A = torch.randn(rank, h_in, generator=gen) * 0.1
            B = torch.randn(rank, h_out, generator=gen) * 0.1
            layer.write_slot(slot, A, B, 0.5 + slot)
    return layer


def run_layer(layer, x, token_slots, monkeypatch):
    """layer(x) under a plan for token_slots; returns (y, whether the blocked path ran)."""
    from conftest import record_blocked_layers

    from adaptfuse import layers

    ran = record_blocked_layers(monkeypatch)
    reset = layers.current_plan.set(layers.BatchPlans(token_slots, layer.lora_A.shape[0]))
    try:
        return layer(x), bool(ran)
    finally:
        layers.current_plan.reset(reset)


@pytest.mark.parametrize("kind", ["linear", "linear_bias", "conv1d"])
@pytest.mark.parametrize("popularity", ["segments", "some_none"])  # consecutive / gathered
@pytest.mark.parametrize("h_out", [2 * 512 + 76, 2 * 512 + 200])  # last block widened / not
def test_prefill_adds_adapters_block_by_block(kind, popularity, h_out, monkeypatch):
    """A CPU prefill computes the base output OUTPUT_BLOCK outputs at a time (a short
    remainder joins the last block) and adds the adapters to each block: the result against
    reference.py."""
    from conftest import assert_within_torch_error, token_slots_for

    from adaptfuse import layers, reference

    assert layers.output_blocks(h_out)[-1][1] - layers.output_blocks(h_out)[-1][0] >= 200
    layer = blocked_layer(kind != "linear", h_out=h_out, kind=kind.removesuffix("_bias"))
    num_tokens = layers.OUTPUT_BLOCK_MIN_TOKENS + 44
    gen = torch.Generator().manual_seed(1)
    token_slots = token_slots_for(popularity, num_tokens, 4, gen)
    x = torch.randn(4, num_tokens // 4, layer.in_features, generator=gen)
    with torch.no_grad():
        y, blocked = run_layer(layer, x, token_slots, monkeypatch)
    assert blocked and y.shape == (*x.shape[:-1], layer.out_features)
    tokens, weight, b = x.reshape(-1, layer.in_features), layer.weight_out_in(), None
    if kind != "linear":
        b = layer.base_layer.bias
    args = (layer.lora_A, layer.lora_ranks, layer.lora_scales, token_slots)
    outputs = []
    for dtype in (torch.float64, torch.float32):
        base = torch.nn.functional.linear(
            tokens.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)
        )
        v = reference.shrink(tokens, *args, dtype=dtype)
        outputs.append(
            reference.expand(base, v, [layer.lora_B], [0], layer.lora_ranks, token_slots, dtype)
        )
    assert_within_torch_error(y.reshape(num_tokens, -1), *outputs, torch.float32, "blocked")


@pytest.mark.parametrize("case", ["few_tokens", "grad", "hook", "bf16"])
def test_prefill_blocks_only_where_they_compute_the_same(case, monkeypatch):
    """The blocked path replaces the base layer's call only when that call is a plain fp32
    matmul: not for decode-sized batches, a forward that records gradients, a base layer with
    a hook (which must still run), or other dtypes."""
    from adaptfuse import layers

    layer = blocked_layer(bias=True)
    num_tokens = layers.OUTPUT_BLOCK_MIN_TOKENS + (-1 if case == "few_tokens" else 4)
    x = torch.randn(num_tokens, layer.in_features)
    token_slots = torch.arange(num_tokens, dtype=torch.int32) % 4
    hooked = []
    if case == "hook":
        layer.base_layer.register_forward_hook(lambda *args: hooked.append(True))
    if case == "grad":
        x.requires_grad_(True)
    if case == "bf16":
        layer.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    with torch.set_grad_enabled(case == "grad"):
        y, blocked = run_layer(layer, x, token_slots, monkeypatch)
    assert not blocked
    assert hooked == ([True] if case == "hook" else [])
    assert y.requires_grad == (case == "grad")
