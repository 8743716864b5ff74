"""`adaptfuse` command line.

    adaptfuse demo    many adapters in one batch, checked against PEFT and the reference

The demo builds a small random-weight Llama from a config (no downloads), creates three
adapters with PEFT, patches the model, and generates for a batch where every request names
its own adapter or none, checking each request against PEFT's mixed-adapter generate and
timing base / adaptfuse / PEFT on the batch. Then, under the hood: one layer's slot banks and
the ops (plan, shrink, expand) against the float64 reference, and a merge / unmerge of an
adapter into a weight, compared bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import adaptfuse
from adaptfuse import ops, reference


def model_demo(device: str) -> bool:
    import copy
    import statistics
    import tempfile

    import transformers

    try:
        import peft
    except ImportError:
        print("(peft is not installed: pip install 'adaptfuse[test]' to compare with PEFT)\n")
        return True
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
    base = transformers.LlamaForCausalLM(config).eval().to(device)
    directory = tempfile.mkdtemp(prefix="adaptfuse-demo-")
    specs = {
        "support-bot": dict(r=8, lora_alpha=16, target_modules="all-linear"),
        "legal": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "tenant-7": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
    }
    for name, options in specs.items():
        adapter = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **options)
        )
        adapter.save_pretrained(f"{directory}/{name}")
    reference_model = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), f"{directory}/support-bot", adapter_name="support-bot"
    )
    for name in list(specs)[1:]:
        reference_model.load_adapter(f"{directory}/{name}", adapter_name=name)
    reference_model.eval()

    model = copy.deepcopy(base)
    manager = adaptfuse.patch(model, max_loras=4, max_rank=16)  # the three lines users add
    for name in specs:
        manager.load_adapter(f"{directory}/{name}", adapter_name=name)

    names = ["support-bot", None, "legal", "tenant-7", "support-bot", None, "legal", "tenant-7"]
    prompts = torch.randint(
        3, 1000, (len(names), 12), generator=torch.Generator().manual_seed(1)
    ).to(device)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ours = model.generate(prompts, adapter_names=names, **settings)[:, prompts.shape[1] :]
        theirs = reference_model.generate(
            input_ids=prompts, adapter_names=[n or "__base__" for n in names], **settings
        )[:, prompts.shape[1] :]
    print(f"{'request':>7}  {'adapter':<12} {'first generated tokens':<34} matches PEFT")
    all_match = True
    for i, name in enumerate(names):
        match = torch.equal(ours[i], theirs[i])
        all_match &= match
        tokens = " ".join(str(t) for t in ours[i, :6].tolist())
        print(f"{i:>7}  {str(name):<12} {tokens:<34} {'yes' if match else 'NO'}")

    with torch.inference_mode():
        calls = {
            "base": lambda: base(prompts),
            "adaptfuse": lambda: model(prompts, adapter_names=names),
            "PEFT": lambda: reference_model(
                prompts, adapter_names=[n or "__base__" for n in names]
            ),
        }
        times = {name: [] for name in calls}
        for _ in range(7):  # interleaved, so that drift hits all three alike
            for name, call in calls.items():
                begin = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - begin)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"\none forward over the batch ({len(names)} x {prompts.shape[1]} tokens, median of 7): "
        + ", ".join(f"{n} {m:.1f} ms ({m / median['base']:.2f}x base)" for n, m in median.items())
    )

    # Bad input is refused naming the file and the option; nothing changes.
    bad = f"{directory}/dora"
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, use_dora=True)).save_pretrained(
        bad
    )
    try:
        manager.load_adapter(bad, adapter_name="dora")
    except adaptfuse.AdapterError as error:
        print(f"refused: {str(error).splitlines()[0]}")
    print(f"registered adapters still: {manager.adapters}\n")
    return all_match


def demo(args) -> int:
    device = args.device
    if device == "cuda" and not adaptfuse.cuda_available():
        print("demo: --device cuda needs a GPU and the CUDA build", file=sys.stderr)
        return 2
    print(
        f"adaptfuse {adaptfuse.__version__}: CUDA kernels built: {adaptfuse.cuda_built()}, "
        f"GPU usable: {adaptfuse.cuda_available()}; running on {device}\n"
    )
    models_match = model_demo(device)
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
    except ValueError as error:
        print(f"\nbad input refused: {str(error).splitlines()[0]}")
    return 0 if all_ok and identical and models_match else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="adaptfuse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser(
        "demo", help="a mixed-adapter batch checked against the reference"
    )
    demo_parser.add_argument("--device", default="cuda" if adaptfuse.cuda_available() else "cpu")
    demo_parser.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
