"""One process of a tensor-parallel test: tests/test_distributed.py launches it under
`torchrun --nproc_per_node=N tp_worker.py case.json`. It loads the saved random model with
transformers' tp_plan="auto" (gloo on CPU), patches it, loads the PEFT adapters, runs the
checks the case names and writes what it saw to <out>/rank<R>.pt; the test compares that
with PEFT run in a single process."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers

import adaptfuse


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def load_tensor_parallel(case: dict, **options):
    options.setdefault("tp_plan", "auto")
    return transformers.AutoModelForCausalLM.from_pretrained(
        case["model"], dtype=torch.float32, **options
    ).eval()


def slot_state(manager) -> dict:
    """Everything a load may change on this rank: registered names, slot table (LRU order),
    and every layer's slot banks as bit patterns."""
    banks = {}
    for path, layer in manager.layers.items():
        for name in ("lora_A", "lora_B", "lora_ranks", "lora_scale_bits"):
            banks[f"{path}.{name}"] = bits(getattr(layer, name)).clone()
    return {"adapters": manager.adapters, "slots": list(manager._slot_of.items()), "banks": banks}


def same_state(before: dict, after: dict) -> bool:
    return (
        before["adapters"] == after["adapters"]
        and before["slots"] == after["slots"]
        and all(torch.equal(before["banks"][k], after["banks"][k]) for k in before["banks"])
    )


def check_logits(model, manager, inputs, case):
    """Mixed-batch and base logits, and how many all-reduces each forward made: the
    adapters must add none (each rank builds the same plan from the same names)."""
    original = dist.all_reduce
    calls = {"adapted": 0, "plain": 0}

    def forward_counting_all_reduces(which, **kwargs):
        # transformers' row-parallel layers call torch.distributed.all_reduce by attribute
        def all_reduce(*args, **options):
            calls[which] += 1
            return original(*args, **options)

        dist.all_reduce = all_reduce
        try:
            return model(inputs["ids"], attention_mask=inputs["mask"], **kwargs).logits
        finally:
            dist.all_reduce = original

    with torch.no_grad():
        adapted = forward_counting_all_reduces("adapted", adapter_names=case["names"])
        plain = forward_counting_all_reduces("plain")
    return {
        "adapted": adapted,
        "plain": plain,
        "all_reduces": (calls["adapted"], calls["plain"]),
    }


def check_grad(model, manager, inputs, case):
    """A forward with autograd through frozen adapters: the input gets the adapters' part of
    its gradient (transformers' DTensor path, not its inference path), the model none."""
    embeds = inputs["embeds"].clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds, adapter_names=case["grad_names"]).logits
    logits.float().pow(2).mean().backward()
    return {
        "embeds_grad": embeds.grad,
        "parameters_without_grad": all(p.grad is None for p in model.parameters()),
    }


def check_generate(model, manager, inputs, case):
    with torch.no_grad():
        tokens = model.generate(
            input_ids=inputs["gen_ids"],
            attention_mask=inputs["gen_mask"],
            adapter_names=case["gen_names"],
            max_new_tokens=case["max_new_tokens"],
            do_sample=False,
            pad_token_id=0,
        )
    return {"tokens": tokens}


def check_merge(model, manager, inputs, case):
    """Serves an adapter, merges it into this rank's shards, serves the merged model, then
    runs `cycles` merge/unmerge cycles (single and weighted merges alternating) and counts
    the elements of every shard whose bits did not come back after each cycle."""
    merged_name = case["merge_adapter"]
    ids = inputs["ids"]
    names = [merged_name] * ids.shape[0]
    shards = {path: layer.weight_out_in() for path, layer in manager.layers.items()}
    original = {path: bits(w).clone() for path, w in shards.items()}
    with torch.no_grad():
        served = model(ids, adapter_names=names).logits
        manager.merge(merged_name)
        merged_shards = {path: w.clone() for path, w in shards.items()}
        merged_logits = model(ids).logits
        manager.unmerge()
    weighted = dict(zip(manager.adapters, (0.5, -0.25, 1.5), strict=False))
    mismatches = []
    for cycle in range(case["cycles"]):
        manager.merge(merged_name if cycle % 2 == 0 else weighted)
        manager.unmerge()
        mismatches.append(sum(int((bits(w) != original[path]).sum()) for path, w in shards.items()))
    layout = {
        path: (layer.tensor_parallel.kind, layer.tensor_parallel.start, layer.tensor_parallel.stop)
        for path, layer in manager.layers.items()
        if layer.tensor_parallel is not None
    }
    return {
        "served": served,
        "merged_logits": merged_logits,
        "merged_shards": merged_shards,
        "layout": layout,
        "mismatches_per_cycle": mismatches,
    }


def check_refusals(model, manager, inputs, case):
    """DESIGN.md's model-level rules under tensor parallelism, on every rank: merge methods
    that trim a whole delta refused, lora_dropout refused, a second merge refused while
    merged, and a merge that fails on one rank only (injected at that rank's third layer)
    leaving every rank unmerged with its shards bit-identical."""
    import adaptfuse.manager as manager_module

    shards = {path: layer.weight_out_in() for path, layer in manager.layers.items()}
    original = {path: bits(w).clone() for path, w in shards.items()}
    name = case["merge_adapter"]
    messages = {}

    def attempt(key, call):
        try:
            call()
            messages[key] = None
        except Exception as exception:  # the test reads the type and message
            messages[key] = f"{type(exception).__name__}: {exception}"

    attempt("ties", lambda: manager.merge({name: 1.0}, method="ties", density=0.5))
    attempt("dropout", lambda: manager.add_adapter("dropping", r=2, lora_dropout=0.1))
    manager.merge(name)
    attempt("second", lambda: manager.merge(name))
    manager.unmerge()
    real_merge_layer, merged_layers = manager_module.merge_layer, [0]

    def failing_on_rank_one(*args, **kwargs):
        merged_layers[0] += 1
        if dist.get_rank() == 1 and merged_layers[0] == 3:
            raise RuntimeError("injected failure on rank 1")
        return real_merge_layer(*args, **kwargs)

    manager_module.merge_layer = failing_on_rank_one
    try:
        attempt("one_rank", lambda: manager.merge(name))
    finally:
        manager_module.merge_layer = real_merge_layer
    messages["merged_after"] = manager.merged
    messages["unchanged"] = all(torch.equal(bits(w), original[p]) for p, w in shards.items())
    return messages


def check_failed_loads(model, manager, inputs, case):
    """Loads adapters that are corrupt only where some ranks read: every rank must refuse,
    and every rank's adapters, slots and logits must stay exactly as they were."""
    outcomes = {}
    for label, path in case["corrupt"].items():
        before = slot_state(manager)
        with torch.no_grad():
            logits_before = model(inputs["ids"], adapter_names=case["names"]).logits
        try:
            manager.load_adapter(path, adapter_name=f"corrupt-{label}")
            error = None
        except Exception as exception:  # the test reads the type and message
            error = f"{type(exception).__name__}: {exception}"
        with torch.no_grad():
            logits_after = model(inputs["ids"], adapter_names=case["names"]).logits
        outcomes[label] = {
            "error": error,
            "unchanged": same_state(before, slot_state(manager)),
            "same_logits": torch.equal(bits(logits_before), bits(logits_after)),
        }
    return outcomes


def check_unsupported_plan(model, manager, inputs, case):
    """A layer under a plan adaptfuse does not adapt: refused by name when targeted
    explicitly, left alone by all-linear, and an adapter that targets it is refused."""
    from transformers.distributed.configuration_utils import DistributedConfig

    plan = {case["unsupported_layer"]: case["unsupported_plan"]}
    other = load_tensor_parallel(
        case, tp_plan=None, distributed_config=DistributedConfig(tp_plan=plan)
    )
    messages = {}
    try:
        adaptfuse.patch(other, target_modules=[case["unsupported_layer"].rsplit(".", 1)[-1]])
        messages["explicit"] = None
    except ValueError as error:
        messages["explicit"] = str(error)
    other_manager = adaptfuse.patch(other)
    messages["left_alone"] = sorted(other_manager.unsupported_layers)
    try:
        other_manager.load_adapter(case["adapters"][case["merge_adapter"]], adapter_name="x")
        messages["load"] = None
    except adaptfuse.AdapterError as error:
        messages["load"] = str(error)
    return messages


def check_training(model, manager, inputs, case):
    """Trainable adapters resumed from PEFT folders, trained on a mixed batch: every rank's
    parameter parts and their gradients, the parts after one AdamW step, that adapter saved
    (gathered whole); and a new adapter's initial parts, drawn from a seed that differs per
    rank on purpose (the ranks must still agree on one draw). The stepped adapter, frozen,
    then serves."""
    layout = {
        path: (layer.tensor_parallel.kind, layer.tensor_parallel.start, layer.tensor_parallel.stop)
        for path, layer in manager.layers.items()
        if layer.tensor_parallel is not None
    }
    trained = {}
    for name in case["train_adapters"]:
        trained[name] = manager.load_adapter(
            case["adapters"][name], adapter_name=f"train-{name}", trainable=True
        )
    names = [None if n is None else f"train-{n}" for n in case["train_names"]]
    model.train()
    logits = model(inputs["train_ids"], adapter_names=names).logits
    adaptfuse.per_adapter_loss(logits, inputs["train_labels"], names).backward()
    gradients = {
        name: {k: p.grad.clone() for k, p in manager.named_parameters(own)}
        for name, own in trained.items()
    }
    stepped = case["train_adapters"][0]
    optimizer = torch.optim.AdamW(manager.parameters(trained[stepped]), lr=1e-3)
    optimizer.step()
    after_step = {k: p.detach().clone() for k, p in manager.named_parameters(trained[stepped])}
    manager.save_adapter(trained[stepped], case["saved"])
    model.eval()
    manager.freeze(trained[stepped])
    with torch.no_grad():
        frozen = model(inputs["ids"][: len(names)], adapter_names=[trained[stepped]] * len(names))
    frozen = frozen.logits
    torch.manual_seed(case["init_seed"] + dist.get_rank())
    manager.add_adapter("fresh", r=3, lora_alpha=6)
    fresh = {k: p.detach().clone() for k, p in manager.named_parameters("fresh")}
    return {
        "layout": layout,
        "gradients": gradients,
        "after_step": after_step,
        "frozen_logits": frozen,
        "fresh": fresh,
    }


def check_bottleneck(model, manager, inputs, case):
    """Replicated bottleneck adapters beside LoRA on another model (AdapterHub's fixture base,
    loaded with tp_plan="auto"): a mixed batch of bottleneck, LoRA and no-adapter rows; a
    bottleneck load that fails on one rank only (that rank's copy of the folder is corrupt)
    and leaves every rank as it was; and a plan whose sequence-parallel norm would hand the
    points a shard of the hidden states, refused by name."""
    from transformers.distributed.configuration_utils import DistributedConfig

    spec = case["bottleneck"]
    fixture = load_tensor_parallel({"model": spec["model"]})
    bn_manager = adaptfuse.patch(
        fixture, max_loras=spec["max_loras"], max_rank=8, max_bottleneck_dim=16
    )
    for name, path in spec["adapters"].items():
        bn_manager.load_adapter(path, adapter_name=name)
    ids = torch.load(spec["inputs"])
    with torch.no_grad():
        logits = fixture(ids, adapter_names=spec["names"]).logits

    def state():
        return (
            list(bn_manager.adapters),
            dict(bn_manager._slot_of),
            {n: bits(b).clone() for n, b in fixture.named_buffers()},
        )

    before = state()
    try:
        bad = spec["corrupt"] if dist.get_rank() == spec["corrupt_rank"] else spec["clean"]
        bn_manager.load_adapter(bad, adapter_name="bad")
        error = None
    except Exception as exception:  # the test reads the type and message
        error = f"{type(exception).__name__}: {exception}"
    after = state()
    with torch.no_grad():
        logits_after = fixture(ids, adapter_names=spec["names"]).logits
    unchanged = (
        before[:2] == after[:2]
        and before[2].keys() == after[2].keys()
        and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    )
    # Training replicated bottleneck adapters: every rank draws with its own seed here, and
    # must start from group rank 0's draw all the same.
    from test_bottleneck_training import KINDS

    torch.manual_seed(100 + dist.get_rank())
    for name, (config, options) in KINDS.items():
        bn_manager.add_bottleneck_adapter(name, config=config, **options)
    initial = {
        name: {k: p.detach().clone() for k, p in bn_manager.named_parameters(name)}
        for name in KINDS
    }
    train_ids = torch.load(spec["train_inputs"])
    logits_train = fixture(train_ids, adapter_names=spec["train_names"]).logits
    adaptfuse.per_adapter_loss(logits_train, train_ids, spec["train_names"]).backward()
    gradients = {
        name: {k: p.grad.clone() for k, p in bn_manager.named_parameters(name)} for name in KINDS
    }
    bn_manager.save_adapter("d", spec["saved"])
    plan = {
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.post_attention_layernorm": "sequence_parallel",
    }
    other = load_tensor_parallel(
        {"model": spec["model"]}, tp_plan=None, distributed_config=DistributedConfig(tp_plan=plan)
    )
    try:
        adaptfuse.patch(other, max_bottleneck_dim=16)
        refused = None
    except ValueError as exception:
        refused = str(exception)
    lora_only = adaptfuse.patch(other)  # the refusal left the model as it was
    return {
        "logits": logits,
        "failed_load": {
            "error": error,
            "unchanged": unchanged,
            "same_logits": torch.equal(bits(logits), bits(logits_after)),
        },
        "refused": refused,
        "lora_only_manager": type(lora_only).__name__,
        "training": {"initial": initial, "gradients": gradients},
    }


CHECKS = {
    "logits": check_logits,
    "grad": check_grad,
    "generate": check_generate,
    "merge": check_merge,
    "failed_loads": check_failed_loads,
    "refusals": check_refusals,
    "unsupported_plan": check_unsupported_plan,
    "training": check_training,
    "bottleneck": check_bottleneck,
}


def main(case_path: str) -> None:
    with open(case_path) as f:
        case = json.load(f)
    torch.manual_seed(0)
    model = load_tensor_parallel(case)
    rank = dist.get_rank()
    manager = adaptfuse.patch(model, max_loras=case["max_loras"], max_rank=case["max_rank"])
    for name, path in case["adapters"].items():
        manager.load_adapter(path, adapter_name=name)
    inputs = torch.load(case["inputs"])
    results = {"manager": type(manager).__name__}
    for check in case["checks"]:
        results[check] = CHECKS[check](model, manager, inputs, case)
    torch.save(results, os.path.join(case["out"], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
