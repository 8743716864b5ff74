"""`adaptfuse demo`: many adapters in one batch, checked against PEFT and the reference.

With no arguments it builds a small random-weight Llama from a config (no downloads) and
creates three adapters with PEFT; `--model PATH` / `--adapters DIR...` use a local Hugging
Face model folder and real PEFT adapters instead. Then, in order:

1. a batch where every request names its own adapter or none, through generate, each
   request checked token by token against PEFT's mixed-adapter generate, and one forward
   timed for the base model, adaptfuse and PEFT;
2. one adapter merged into the base weights, its forward run at base speed, then unmerged
   with every base weight compared bit for bit;
3. A/B routing with adaptfuse.routing.Split, and a rollback: the arm's adapter is unloaded
   and requests routed to it are refused;
4. an adapter with an unsupported option refused by name, nothing changed;
5. under the hood: one layer's slot banks and the ops against the float64 reference, and a
   merge / unmerge of a bf16 weight, bit for bit.

Every section prints what it checked; run_demo returns whether every check passed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch

import adaptfuse
from adaptfuse import ops, reference
from adaptfuse.routing import Split

BATCH = 8
PROMPT_TOKENS = 12
NEW_TOKENS = 8
TIMING_REPEATS = 7
# Requests of the demo batch by position: an adapter index (modulo the adapters served), or
# None for the base model.
REQUEST_PATTERN = [0, None, 1, 2, 0, None, 1, 2]
RANDOM_ADAPTERS = {
    "support-bot": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "legal": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "tenant-7": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
}
# The A/B experiment's name: with it, the demo batch holds one request of the 10% arm.
EXPERIMENT_SALT = "experiment-42"
PROMPTS = [
    "The support team answered the ticket by",
    "Summarise the contract clause about",
    "Our customer in Lyon asked whether",
    "Write a short reply to a user who",
]


def _step(message: str) -> None:
    """Progress of the slow steps, on stderr so that stdout stays the demo's report."""
    print(f"... {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class DemoSetup:
    """The demo's models: `base` (untouched), `model` (patched, its adapters in `manager`,
    served under `served`), PEFT's mixed-adapter model of the same adapters (None without
    peft), the adapter folders and the batch (input_ids [BATCH, T] and its mask)."""

    base: torch.nn.Module
    model: torch.nn.Module
    manager: adaptfuse.AdapterManager
    peft_model: Optional[torch.nn.Module]
    served: list[str]
    folders: dict[str, str]
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    tokenizer: object
    workdir: str

    def batch_names(self) -> list[Optional[str]]:
        return [None if i is None else self.served[i % len(self.served)] for i in REQUEST_PATTERN]

    def inputs(self) -> dict:
        if self.attention_mask is None:
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def describe_tokens(self, tokens: torch.Tensor) -> str:
        if self.tokenizer is not None:
            return repr(self.tokenizer.decode(tokens[:NEW_TOKENS]))[:34]
        return " ".join(str(t) for t in tokens[:6].tolist())


def _import_peft():
    try:
        import peft
    except ImportError:
        print("(peft is not installed: pip install 'adaptfuse[test]' to compare with PEFT)\n")
        return None
    return peft


def _random_setup(device: str, workdir: str, peft) -> tuple:
    """A small random-weight Llama and three random PEFT adapters (init_lora_weights=False,
    so that they change the output)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1000,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if peft is None:
        raise RuntimeError("the demo creates its adapters with PEFT: pip install peft")
    base = transformers.LlamaForCausalLM(config).eval().to(device)
    _step(f"creating {len(RANDOM_ADAPTERS)} random adapters with PEFT under {workdir}")
    folders = {}
    for name, options in RANDOM_ADAPTERS.items():
        adapter = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options)
        )
        folders[name] = os.path.join(workdir, name)
        adapter.save_pretrained(folders[name])
    return base, folders, None


def _local_setup(device: str, model_path: str, adapter_dirs: Sequence[str], workdir, peft):
    """A local Hugging Face model folder (its tokenizer when it has one) and PEFT adapter
    folders; without adapter folders, random adapters are created for the model."""
    import transformers

    _step(f"loading {model_path}")
    base = transformers.AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    base = base.eval().to(device)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except Exception:  # optional: without a usable tokenizer the demo shows token ids
        tokenizer = None
    if not adapter_dirs:
        if peft is None:
            raise RuntimeError("without --adapters the demo creates adapters with PEFT")
        _step("creating 3 random adapters with PEFT (all linear layers)")
        folders = {}
        for name, rank in (("random-a", 8), ("random-b", 16), ("random-c", 4)):
            torch.manual_seed(rank)
            adapter = peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(
                    r=rank,
                    lora_alpha=2 * rank,
                    target_modules="all-linear",
                    init_lora_weights=False,
                ),
            )
            folders[name] = os.path.join(workdir, name)
            adapter.save_pretrained(folders[name])
        return base, folders, tokenizer
    folders = {}
    for directory in adapter_dirs:
        name = os.path.basename(os.path.normpath(directory)) or "adapter"
        while name in folders:
            name += "'"
        folders[name] = directory
    return base, folders, tokenizer


def _batch(base, tokenizer, device: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # generate appends on the right
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        texts = [PROMPTS[i % len(PROMPTS)] for i in range(BATCH)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    vocab = base.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (BATCH, PROMPT_TOKENS), generator=gen)
    return ids.to(device), None


def _max_rank(folders: dict[str, str]) -> int:
    from adaptfuse.adapters import AdapterError, read_peft_folder

    ranks = [8]
    for folder in folders.values():
        try:
            modules = read_peft_folder(folder).modules.values()
        except AdapterError:
            continue  # load_adapter refuses it below, with the reason
        ranks += [pair["A"].shape[0] for pair in modules if "A" in pair and pair["A"].dim() == 2]
    return max(ranks)


def build(device: str, model_path: Optional[str], adapter_dirs: Sequence[str]) -> DemoSetup:
    """Builds or loads the base model, patches a copy, loads the adapters (refusals are
    printed and the demo goes on with the others) and, with peft, PEFT's model of them."""
    peft = _import_peft()
    workdir = tempfile.mkdtemp(prefix="adaptfuse-demo-")
    try:
        return _build(device, model_path, adapter_dirs, peft, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _build(device, model_path, adapter_dirs, peft, workdir) -> DemoSetup:
    if model_path is None:
        base, folders, tokenizer = _random_setup(device, workdir, peft)
    else:
        base, folders, tokenizer = _local_setup(device, model_path, adapter_dirs, workdir, peft)
    model = copy.deepcopy(base)
    # What users add: patch once, then one load_adapter per adapter.
    manager = adaptfuse.patch(model, max_loras=max(4, len(folders)), max_rank=_max_rank(folders))
    served = []
    for name, folder in folders.items():
        try:
            manager.load_adapter(folder, adapter_name=name)
            served.append(name)
        except adaptfuse.AdapterError as error:
            print(f"refused {folder}: {str(error).splitlines()[0]}")
    if not served:
        raise RuntimeError("no adapter could be loaded; `adaptfuse inspect DIR` says why")
    peft_model = None
    if peft is not None:
        _step("loading the same adapters into PEFT")
        peft_model = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), folders[served[0]], adapter_name=served[0]
        )
        for name in served[1:]:
            peft_model.load_adapter(folders[name], adapter_name=name)
        peft_model.eval()
    input_ids, attention_mask = _batch(base, tokenizer, device)
    return DemoSetup(
        base,
        model,
        manager,
        peft_model,
        served,
        folders,
        input_ids,
        attention_mask,
        tokenizer,
        workdir,
    )


def _generate(model, setup: DemoSetup, **names) -> torch.Tensor:
    pad = getattr(setup.tokenizer, "pad_token_id", None)
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = model.generate(
        **setup.inputs(), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad, **names
    )
    return out[:, setup.input_ids.shape[1] :]


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, run round-robin so that drift hits all alike."""
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            begin = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def serve_mixed_batch(setup: DemoSetup) -> bool:
    """Section 1: generate with one adapter (or none) per request, against PEFT; timing."""
    names = setup.batch_names()
    peft_names = [n or "__base__" for n in names]
    with torch.inference_mode():
        ours = _generate(setup.model, setup, adapter_names=names)
        theirs = None
        if setup.peft_model is not None:
            theirs = _generate(setup.peft_model, setup, adapter_names=peft_names)
    print(f"{'request':>7}  {'adapter':<14} {'first generated tokens':<34}  matches PEFT")
    all_match = True
    for i, name in enumerate(names):
        match = "n/a" if theirs is None else ("yes" if torch.equal(ours[i], theirs[i]) else "NO")
        all_match &= match != "NO"
        print(f"{i:>7}  {name!s:<14} {setup.describe_tokens(ours[i]):<34}  {match}")
    calls = {
        "base": lambda: setup.base(**setup.inputs()),
        "adaptfuse": lambda: setup.model(**setup.inputs(), adapter_names=names),
    }
    if setup.peft_model is not None:
        calls["PEFT"] = lambda: setup.peft_model(**setup.inputs(), adapter_names=peft_names)
    with torch.inference_mode():
        median = interleaved_ms(calls, TIMING_REPEATS)
    batch, tokens = setup.input_ids.shape
    print(
        f"\none forward over the batch ({batch} x {tokens} tokens, median of {TIMING_REPEATS}): "
        + ", ".join(f"{n} {m:.1f} ms ({m / median['base']:.2f}x base)" for n, m in median.items())
    )
    return all_match


def _weight_bits(manager) -> dict[str, torch.Tensor]:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return {
        path: layer.base_layer.weight.detach().view(view[layer.base_layer.weight.dtype]).clone()
        for path, layer in manager.layers.items()
    }


def merge_and_unmerge(setup: DemoSetup) -> bool:
    """Section 2: merge one adapter, serve it at base speed, unmerge bit for bit."""
    name = setup.served[0]
    manager, model = setup.manager, setup.model
    all_rows = [name] * setup.input_ids.shape[0]
    before = _weight_bits(manager)
    with torch.inference_mode():
        lora_logits = model(**setup.inputs(), adapter_names=all_rows).logits
        lora_ms = interleaved_ms(
            {"lora": lambda: model(**setup.inputs(), adapter_names=all_rows)}, TIMING_REPEATS
        )["lora"]
        begin = time.perf_counter()
        manager.merge(name)
        merge_ms = (time.perf_counter() - begin) * 1e3
        merged_logits = model(**setup.inputs()).logits
        median = interleaved_ms(
            {
                "base": lambda: setup.base(**setup.inputs()),
                "merged": lambda: model(**setup.inputs()),
            },
            TIMING_REPEATS,
        )
    error = (merged_logits.float() - lora_logits.float()).abs().max().item()
    scale = lora_logits.float().abs().max().item()
    tolerance = (1e-3 if lora_logits.dtype == torch.float32 else 3e-2) * scale
    close = error <= tolerance
    after_merge = _weight_bits(manager)
    changed = sum(not torch.equal(before[p], after_merge[p]) for p in before)
    print(
        f"\nmerge {name!r}: {changed} of {len(before)} adapted weights changed "
        f"in {merge_ms:.0f} ms; every request on {name!r}: LoRA kernels {lora_ms:.1f} ms, "
        f"merged {median['merged']:.1f} ms, base {median['base']:.1f} ms "
        f"({median['merged'] / median['base']:.2f}x base)"
    )
    print(
        f"merged logits vs the adapter served by the LoRA kernels: max |difference| {error:.2e} "
        f"(largest logit {scale:.1f}): {'yes' if close else 'NO'}, within rounding"
    )
    try:
        with torch.inference_mode():
            model(**setup.inputs(), adapter_names=[None] * len(all_rows))
        refused_while_merged = False
    except ValueError as refusal:
        print(f"while merged, a request for the base model is refused: {refusal}")
        refused_while_merged = True
    manager.unmerge()
    after = _weight_bits(manager)
    identical = sum(torch.equal(before[p], after[p]) for p in before)
    print(
        f"unmerge: {identical} of {len(before)} base weights bit-identical to before the merge: "
        f"{'yes' if identical == len(before) else 'NO'}"
    )
    return close and refused_while_merged and identical == len(before)


def route_and_roll_back(setup: DemoSetup) -> bool:
    """Section 3: a Split over user ids picks each request's adapter; rolling an arm back
    (unloading its adapter) gets requests for it refused by name."""
    first = setup.served[0]
    second = setup.served[1] if len(setup.served) > 1 else None
    split = Split({first: 0.9, second: 0.1}, salt=EXPERIMENT_SALT)
    users = [f"user-{i}" for i in range(10_000)]
    split.names(users)
    shares = ", ".join(f"{arm!s} {n} ({n / len(users):.1%})" for arm, n in split.counts.items())
    print(f"\nA/B routing: {split!r} over {len(users)} user ids: {shares}")
    split.reset_counts()
    picked = [f"user-{i}" for i in range(BATCH)]
    if all(split.arm_of(u) != second for u in picked):  # show both arms in the batch
        picked[-1] = next(u for u in users[BATCH:] if split.arm_of(u) == second)
    names = split.names(picked)
    with torch.inference_mode():
        tokens = _generate(setup.model, setup, adapter_names=names)
    for user, name, row in zip(picked, names, tokens, strict=True):
        print(f"  {user:<10} -> {name!s:<14} {setup.describe_tokens(row)}")
    print(f"  counts for this batch: {split.counts}; the same ids get the same arms in any process")
    if second is None:
        return True
    setup.manager.unload_adapter(second)
    try:
        with torch.inference_mode():
            _generate(setup.model, setup, adapter_names=names)
        refused = False
    except KeyError as refusal:
        refused = True
        print(f"rollback: unloaded {second!r}; a batch still routed to it is refused:")
        print(f"  {refusal.args[0]}")
    rolled_back = Split({first: 1.0}, salt=EXPERIMENT_SALT)
    with torch.inference_mode():
        _generate(setup.model, setup, adapter_names=rolled_back.names(picked))
    print(f"after the rollback {rolled_back!r} serves every request: {rolled_back.counts}")
    return refused


def refuse_unsupported(setup: DemoSetup) -> bool:
    """Section 4: a copy of a good adapter with use_dora=True is refused by name."""
    source = setup.folders[setup.served[0]]
    bad = os.path.join(setup.workdir, "dora")
    shutil.copytree(source, bad, dirs_exist_ok=True)
    config_path = os.path.join(bad, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "use_dora": True}, f)
    registered = setup.manager.adapters
    try:
        setup.manager.load_adapter(bad, adapter_name="dora")
        refused = False
    except adaptfuse.AdapterError as error:
        refused = True
        print(f"\nrefused: {str(error).splitlines()[0]}")
    unchanged = setup.manager.adapters == registered
    print(f"registered adapters still: {setup.manager.adapters}\n")
    return refused and unchanged


def ops_under_the_hood(device: str) -> bool:
    """Section 5: one layer's slot banks through plan / shrink / expand_ against the float64
    reference, and merge_ / unmerge_ of a bf16 weight, bit for bit."""
    print("Under the hood: one layer's slot banks, and the ops against the float64 reference\n")
    gen = torch.Generator().manual_seed(0)
    hidden_in, hidden_out, max_rank = 1024, 2816, 64
    adapters = {
        "support-bot": (16, 32.0),
        "legal": (64, 16.0),
        "tenant-7": (8, 16.0),
        "ab-arm-b": (4, 8.0),
    }
    names = list(adapters)
    num_slots = len(names)
    dtype = torch.float32

    # Slot banks of one adapted layer, rank-major, as patch() allocates them.
    A = torch.zeros(num_slots, max_rank, hidden_in, dtype=dtype)
    B = torch.zeros(num_slots, max_rank, hidden_out, dtype=dtype)
    ranks = torch.zeros(num_slots, dtype=torch.int32)
    scales = torch.zeros(num_slots)
    for slot, (rank, alpha) in enumerate(adapters.values()):
        A[slot, :rank] = torch.randn(rank, hidden_in, generator=gen) / hidden_in**0.5
        B[slot, :rank] = torch.randn(rank, hidden_out, generator=gen) * 0.1 / rank**0.5
        ranks[slot], scales[slot] = rank, alpha / rank
    A, B, ranks, scales = (t.to(device) for t in (A, B, ranks, scales))

    # A batch of 8 requests with prompts of different lengths; each names its adapter or None.
    requests = [
        ("support-bot", 5),
        (None, 3),
        ("legal", 7),
        ("tenant-7", 2),
        ("support-bot", 4),
        ("ab-arm-b", 6),
        (None, 1),
        ("legal", 3),
    ]
    token_slots = torch.cat(
        [
            torch.full((length,), names.index(name) if name else -1, dtype=torch.int32)
            for name, length in requests
        ]
    ).to(device)
    x = torch.randn(token_slots.numel(), hidden_in, generator=gen).to(device)
    base_out = torch.randn(token_slots.numel(), hidden_out, generator=gen).to(device)

    begin = time.perf_counter()
    plan = ops.plan(token_slots, num_slots)
    v = ops.shrink(x, A, ranks, scales, plan)
    y = ops.expand_(base_out.clone(), v, [B], [0], ranks, plan)
    elapsed_ms = (time.perf_counter() - begin) * 1e3

    exact = reference.expand(
        base_out, reference.shrink(x, A, ranks, scales, token_slots), [B], [0], ranks, token_slots
    )
    print(
        f"{'request':>7}  {'adapter':<12} {'rank':>4} {'tokens':>6}  "
        f"{'max |error| vs float64':>22}  ok"
    )
    start = 0
    all_ok = True
    for i, (name, length) in enumerate(requests):
        rows = slice(start, start + length)
        error = (y[rows].double().cpu() - exact[rows].cpu()).abs().max().item()
        bound = 1e-5 * max(1.0, exact[rows].abs().max().item())
        ok = error <= bound and (name is not None or torch.equal(y[rows], base_out[rows]))
        all_ok &= ok
        rank = adapters[name][0] if name else 0
        print(
            f"{i:>7}  {name!s:<12} {rank:>4} {length:>6}  {error:>22.2e}  {'yes' if ok else 'NO'}"
        )
        start += length
    print(
        f"\none pass over {len(requests)} requests, {num_slots} adapters of ranks "
        f"{sorted({r for r, _ in adapters.values()})}: {elapsed_ms:.2f} ms\n"
    )

    # Merge "legal" into a weight and unmerge it: the weight comes back bit for bit.
    W = (torch.randn(hidden_out, hidden_in, generator=gen) * 0.02).to(torch.bfloat16).to(device)
    original = W.clone()
    slot, rank = names.index("legal"), adapters["legal"][0]
    legal_A, legal_B = A[slot, :rank].to(W.dtype), B[slot, :rank].to(W.dtype)
    coefficient = float(scales[slot])
    record = ops.merge_(W, [legal_A], [legal_B], [coefficient])
    changed = (W != original).float().mean().item()
    ops.unmerge_(W, [legal_A], [legal_B], [coefficient], record)
    identical = torch.equal(W.view(torch.int16), original.view(torch.int16))
    print(
        f"merge 'legal' into a bf16 {hidden_out}x{hidden_in} weight: "
        f"{changed:.1%} of elements changed; "
        f"record {record.fraction_of(W):.1%} of W's bytes"
    )
    print(f"unmerge: weight bit-identical to the original: {'yes' if identical else 'NO'}")

    # Bad input is refused with a message that names the problem; nothing is written.
    try:
        ops.shrink(x, A, ranks.clone().fill_(max_rank + 1), scales, plan)
        refused = False
    except ValueError as error:
        refused = True
        print(f"\nbad input refused: {str(error).splitlines()[0]}")
    return all_ok and identical and refused


def run_demo(
    device: str, model_path: Optional[str] = None, adapter_dirs: Sequence[str] = ()
) -> bool:
    """Runs every section; True when every check passed."""
    print(
        f"adaptfuse {adaptfuse.__version__}: CUDA kernels built: {adaptfuse.cuda_built()}, "
        f"GPU usable: {adaptfuse.cuda_available()}; running on {device}\n"
    )
    setup = build(device, model_path, adapter_dirs)
    try:
        results = {
            "mixed batch matches PEFT": serve_mixed_batch(setup),
            "merge / unmerge": merge_and_unmerge(setup),
            "routing and rollback": route_and_roll_back(setup),
            "unsupported adapter refused": refuse_unsupported(setup),
            "ops against the reference": ops_under_the_hood(device),
        }
    finally:
        shutil.rmtree(setup.workdir, ignore_errors=True)
    failed = [name for name, ok in results.items() if not ok]
    print(f"\nchecks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return not failed


__all__ = ["run_demo"]
