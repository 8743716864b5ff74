"""Reinforcement fine-tuning of 8 adapters at once on one small random-weight model (CPU, a few
minutes): every step samples completions for all adapters in one generate call, scores each
adapter with its own toy reward (the share of generated tokens from its own token set),
normalises advantages within each adapter's group, and updates all adapters with one
backward and one optimizer step. Prints and plots each adapter's mean reward per step, and
saves the adapters in PEFT format.

    python examples/rl_many_adapters.py [--steps 150] [--out rl-out]
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers

import adaptfuse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="completions per adapter per step")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-2)
    parser.add_argument("--out", default="rl-out")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    vocab = 64
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    mgr = adaptfuse.patch(model, max_loras=args.adapters, max_rank=8)
    names = [f"tenant-{k}" for k in range(args.adapters)]
    for name in names:
        mgr.add_adapter(name, r=8, lora_alpha=16)
    optimizer = torch.optim.AdamW(
        [{"params": mgr.parameters(n), "lr": args.lr} for n in names], weight_decay=0.0
    )
    # Adapter k is rewarded for tokens from its own slice of the vocabulary.
    token_sets = torch.arange(3, vocab).chunk(args.adapters)
    row_names = [n for n in names for _ in range(args.samples)]
    prompt = torch.full((len(row_names), 4), 2)
    history = []
    for step in range(args.steps):
        model.eval()
        with torch.no_grad():
            sequences = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                adapter_names=row_names,
                do_sample=True,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        completion = sequences[:, prompt.shape[1] :]
        rewards = torch.stack(
            [
                torch.isin(completion[i], token_sets[names.index(n)]).float().mean()
                for i, n in enumerate(row_names)
            ]
        )
        grouped = rewards.view(args.adapters, args.samples)
        advantages = (grouped - grouped.mean(1, keepdim=True)) / (
            grouped.std(1, keepdim=True) + 1e-4
        )
        model.train()
        logits = model(sequences, adapter_names=row_names).logits[:, prompt.shape[1] - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(2, completion[..., None])[..., 0]
        # Policy gradient, each adapter's own mean: one backward updates all of them.
        loss = -(advantages.view(-1, 1) * logprobs).mean(1).view(args.adapters, -1).mean(1).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(grouped.mean(1).tolist())
        print(
            f"step {step:3d}  mean reward per adapter: " + " ".join(f"{r:.2f}" for r in history[-1])
        )
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        mgr.save_adapter(name, os.path.join(args.out, name))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.6))
        for k, name in enumerate(names):
            axis.plot([h[k] for h in history], label=name)
        axis.set_xlabel("step")
        axis.set_ylabel("mean reward")
        axis.legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(os.path.join(args.out, "rewards.png"), dpi=110)
    except ImportError:
        pass
    first, last = torch.tensor(history[:5]).mean(0), torch.tensor(history[-5:]).mean(0)
    print(
        "reward, first 5 steps -> last 5 steps:",
        " ".join(f"{a:.2f}->{b:.2f}" for a, b in zip(first.tolist(), last.tolist(), strict=True)),
    )
    print(f"adapters saved under {args.out}/")


if __name__ == "__main__":
    main()
