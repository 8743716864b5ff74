"""Merges beyond one adapter: full deltas folded by merge_ (op level, every backend), the
staging redo of the one-pass kernel, TIES/DARE against peft.utils.merge_utils, and the
model-level methods restoring every weight bit for bit."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TARGETS, assert_bit_identical, bits, correctly_rounded
from test_merge import random_adapters
from test_patch import VOCAB, save_adapters, tiny_model

import adaptfuse
from adaptfuse import ops, reference
from adaptfuse.merge import MERGE_METHODS, MergeOptions, combine_deltas, full_delta

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_delta_is_rounded_once_into_w(target, dtype):
    """W + D with D fp32 and W of a similar scale: the float64 sum is exact, so rounding it to
    W's dtype is the one correctly rounded result; merge_ must produce exactly those bits, and
    with low-rank terms on top the fixed order is D first, then the terms."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(3)
    shape = (130, 517)  # two record tiles, odd sizes
    W = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    D = (torch.randn(shape, generator=gen) * 0.01).float()
    expected = correctly_rounded(W.double() + D.double(), dtype)
    merged = W.clone().to(device)
    record = ops.merge_(merged, [], [], [], delta=D.to(device), library=library)
    assert_bit_identical(merged.cpu(), expected, "W + full delta")
    ops.unmerge_(merged, [], [], [], record, delta=D.to(device), library=library)
    assert_bit_identical(merged.cpu(), W, "W after unmerging a full delta")

    # Full delta plus low-rank terms: against the float64 reference within the fp32 delta's
    # own error, and restored exactly.
    A, B = random_adapters(shape, [8], dtype, device, gen, scale=0.2)
    merged = W.clone().to(device)
    record = ops.merge_(merged, A, B, [0.5], delta=D.to(device), library=library)
    exact = W.double() + D.double() + reference.merge_delta(A, B, [0.5]).cpu()
    ulp = torch.finfo(dtype).eps * exact.abs() + torch.finfo(dtype).smallest_normal
    # fp32 sums of 9 addends of |x| <= ~0.3: a few fp32 ulps of that, far below W's ulp.
    assert bool(((merged.cpu().double() - exact).abs() <= ulp + 1e-6).all())
    ops.unmerge_(merged, A, B, [0.5], record, delta=D.to(device), library=library)
    assert_bit_identical(merged.cpu(), W, "W after unmerging delta + terms")


@pytest.mark.parametrize("target", TARGETS)
def test_full_delta_is_checked(target):
    device, library = target.device, target.library
    W = torch.zeros(4, 6, device=device)
    with pytest.raises(ValueError, match=r"'delta' has shape \[5, 6\].*H_out"):
        ops.merge_(W, [], [], [], delta=torch.zeros(5, 6, device=device), library=library)
    with pytest.raises((TypeError, ValueError), match="delta"):
        ops.merge_(W, [], [], [], delta=torch.zeros(4, 6, device=device).half(), library=library)
    with pytest.raises(ValueError, match="must hold 1 to"):
        ops.merge_(W, [], [], [], library=library)
    assert torch.equal(W, torch.zeros(4, 6, device=device))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_larger_than_the_staging_is_redone(target, dtype):
    """Tiny weights and a delta thousands of times larger: nearly every element misses its
    bits on the way back and many need escapes, more than the one-pass kernel stages per tile
    (a quarter of it). The kernel stops, the glue restores and redoes with whole-tile staging;
    the result must equal the CPU op's merged bits and record, and unmerge exactly."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(11)
    shape = (257, 300)  # two record tiles
    W = (torch.randn(shape, generator=gen) * 1e-4).to(dtype)
    D = (torch.randn(shape, generator=gen) * 3.0).float()
    on_cpu = W.clone()
    cpu_record = ops.merge_(on_cpu, [], [], [], delta=D)
    assert cpu_record.num_entries > 0.25 * W.numel()  # the case under test
    on_target = W.to(device)
    record = ops.merge_(on_target, [], [], [], delta=D.to(device), library=library)
    assert_bit_identical(on_target.cpu(), on_cpu, "merged W, target against CPU op")
    for name, mine, theirs in zip(
        ("tile_counts", "offsets", "corrections", "escape_bits"),
        dataclasses.astuple(record),
        dataclasses.astuple(cpu_record),
        strict=True,
    ):
        assert torch.equal(mine.cpu(), theirs), f"record field {name} differs"
    ops.unmerge_(on_target, [], [], [], record, delta=D.to(device), library=library)
    assert_bit_identical(on_target.cpu(), W, "W after unmerge")


@pytest.mark.parametrize("target", TARGETS)
def test_overflowing_full_delta_is_refused_and_w_restored(target):
    """One element overflows fp16 at the end of the second tile: the one-pass kernel has
    already merged everything else; the layer must come back bit for bit."""
    device, library = target.device, target.library
    gen = torch.Generator().manual_seed(2)
    W = (torch.randn(300, 257, generator=gen) * 0.02).half().to(device)
    D = torch.randn(300, 257, generator=gen) * 0.01
    D[-1, -1] = 1e6
    before = W.clone()
    with pytest.raises(ValueError, match="non-finite"):
        ops.merge_(W, [], [], [], delta=D.to(device), library=library)
    assert_bit_identical(W, before, "W after a refused merge")


def peft_combination(method, deltas, weights, density, majority_sign):
    from peft.utils import merge_utils

    w = torch.tensor(weights, dtype=torch.float32)
    if method == "linear":
        return merge_utils.task_arithmetic(deltas, w)
    if method == "magnitude_prune":
        return merge_utils.magnitude_prune(deltas, w, density)
    if method == "dare_linear":
        return merge_utils.dare_linear(deltas, w, density)
    function = {"ties": merge_utils.ties, "dare_ties": merge_utils.dare_ties}[method]
    return function(deltas, w, density, majority_sign_method=majority_sign)


@pytest.mark.parametrize("method", MERGE_METHODS)
@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_combinations_match_peft_merge_utils(method, majority_sign, density):
    """The same deltas, weights and density (and, for DARE, masks from a generator seeded as
    PEFT's global one) give PEFT's result bit for bit: the same operations in the same order."""
    if method == "linear" and (density != 1.0 or majority_sign != "total"):
        pytest.skip("linear takes neither density nor a sign rule")
    gen = torch.Generator().manual_seed(5)
    deltas = [torch.randn(40, 56, generator=gen) * s for s in (0.01, 0.03, 0.02)]
    deltas[1][:3] = deltas[0][:3]  # equal magnitudes across adapters: ties in the trimming
    weights = [0.6, -0.3, 0.9]
    options = MergeOptions(method, None if method == "linear" else density, majority_sign, 7)
    torch.manual_seed(1234)
    expected = peft_combination(method, deltas, weights, density, majority_sign)
    got = combine_deltas(deltas, weights, options, torch.Generator().manual_seed(1234))
    assert_bit_identical(got, expected, f"{method} against peft.utils.merge_utils")
    if method in ("ties", "dare_ties", "magnitude_prune") and density < 1.0:
        assert (got == 0).float().mean() > 0.2  # trimming really happened


def test_full_delta_matches_the_product():
    gen = torch.Generator().manual_seed(8)
    A, B = random_adapters((33, 21), [5], torch.float32, "cpu", gen, scale=0.3)
    delta = full_delta(A[0], B[0], 0.75)
    exact = reference.merge_delta(A, B, [0.75])
    torch.testing.assert_close(delta.double(), exact, rtol=0, atol=5 * 2**-24 * 0.75)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="ties"),  # no density
        dict(method="dare_linear", density=0.0),
        dict(method="ties", density=1.5),
        dict(method="linear", density=0.5),
        dict(method="ties", density=0.5, majority_sign="mean"),
        dict(method="svd"),
    ],
    ids=["no-density", "zero-density", "density-above-1", "linear-density", "sign", "unknown"],
)
def test_bad_merge_options_are_refused(options):
    with pytest.raises(ValueError, match="density|majority_sign|unknown merge method"):
        MergeOptions(**options)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_model("llama")
    directory = tmp_path_factory.mktemp("merge-methods")
    return base, save_adapters(base, "llama", directory)


def served_layers(manager):
    return {path: layer.weight_out_in() for path, layer in manager.layers.items()}


@pytest.mark.parametrize(
    "method, density", [("ties", 0.5), ("dare_ties", 0.6), ("dare_linear", 0.7)]
)
def test_model_merge_methods_match_peft_and_restore_bits(method, density, adapters_dir):
    """A TIES/DARE merge of two adapters over every layer: each layer equals W plus PEFT's
    combination of the float64 deltas, within the fp32 delta error, and 20 merge/unmerge
    cycles (the same seed each time) leave every weight bit-identical. DARE's masks depend on
    the seed alone."""
    from peft.utils import merge_utils

    base, paths = adapters_dir
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    base_weights = {p: w.clone() for p, w in served_layers(manager).items()}
    weights = {"adapter0": 0.7, "adapter1": 0.5}
    manager.merge(weights, method=method, density=density, seed=3)
    first = {p: bits(w) for p, w in served_layers(manager).items()}
    if method == "ties":  # deterministic: check each layer against PEFT on the same deltas
        for path, merged in served_layers(manager).items():
            names = [n for n in weights if path in manager._registry[n].layers]
            deltas = [
                full_delta(
                    manager._registry[n].layers[path].A,
                    manager._registry[n].layers[path].B,
                    manager._registry[n].layers[path].scale,
                )
                for n in names
            ]
            expected = merge_utils.ties(deltas, torch.tensor([weights[n] for n in names]), density)
            assert_bit_identical(
                merged, (base_weights[path].double() + expected.double()).float(), path
            )
    for _ in range(20):
        manager.unmerge()
        for name, p in model.named_parameters():
            assert torch.equal(bits(p), original[name]), name
        manager.merge(weights, method=method, density=density, seed=3)
        for path, w in served_layers(manager).items():
            assert torch.equal(bits(w), first[path]), f"{path}: another merge gave other bits"
    manager.unmerge()
    if method.startswith("dare"):
        manager.merge(weights, method=method, density=density, seed=4)
        assert any(not torch.equal(bits(w), first[p]) for p, w in served_layers(manager).items()), (
            "another seed must draw other masks"
        )
        manager.unmerge()
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        model(ids, adapter_names=["adapter0"])  # serving works again after the cycles


def test_bad_merge_calls_change_nothing(adapters_dir):
    base, paths = adapters_dir
    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=2, max_rank=16)
    for name, path in paths.items():
        manager.load_adapter(path, adapter_name=name)
    original = {n: bits(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="needs a density"):
        manager.merge({"adapter0": 1.0, "adapter1": 1.0}, method="ties")
    with pytest.raises(ValueError, match="unknown merge method"):
        manager.merge("adapter0", method="svd")
    assert manager.merged is None
    for name, p in model.named_parameters():
        assert torch.equal(bits(p), original[name]), name
