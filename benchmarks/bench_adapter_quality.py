"""Bottleneck against LoRA, the quality half: adapters of equal parameter budgets trained on
the same tasks with the same steps, data and learning-rate sweep, compared on held-out loss,
token accuracy and exact match. Which kind wins varies with the architecture and the domain:
run it on your own model and data before choosing.

Default (no downloads, 3-5 minutes on a 2-core CPU): a small random-weight Llama is built
from a config and pretrained here briefly on a synthetic language (a seeded Markov source
over 60 word tokens, half of its episodes "prompt SEP copy-of-prompt"). Four tasks it never
saw are then held out for the adapters, each "BOS x1..xL SEP y1..yK EOS" with L in 4..8
(fresh training examples every step; 200 fixed held-out examples per task):

    reverse   y is x reversed              permute   y is x mapped through a fixed permutation
    sort      y is x in ascending order    max       y is the largest token of x (one token)

On the frozen base, every (task, kind, learning rate, seed) gets its own adapter, and ALL of
them train in the same batch: each row names its adapter (adapter_names),
adaptfuse.per_adapter_loss gives each adapter its own mean token loss, and one backward and one
AdamW step (one param group per adapter, its own learning rate) update them all. --seeds runs
(2 by default) differ in initial weights and training examples; within a task and seed every
adapter sees the same examples in the same order. Kinds: LoRA on every linear layer (PEFT's
init, alpha = 2r) and AdapterHub's seq_bn at its defaults (relu, "bert" init, on every block's
output; double_seq_bn and par_bn with --kinds). A seq_bn of dim m = hidden / reduction_factor
sets the budget (2mH + m + H per block); LoRA gets the rank whose parameter count is closest
to it, double_seq_bn half the dim (two adapters per block). The sweep (3e-3, 1e-2, 3e-2 by
default) and the schedule (AdamW, 5% warmup, cosine) are the same for every kind.

Reported per task and kind: the best learning rate's final held-out loss (mean over completion
tokens), token accuracy (teacher-forced argmax) and exact match (every completion token right:
the same as greedy decoding), averaged over the seeds with their range, next to the frozen
base model. On tasks this small the seeds can disagree on which kind wins: read the ranges
before the means. Curves of all three over the steps (<json stem>_curves.png) and bars of the
final scores (_summary.png) are drawn, and everything goes to a JSON with setup, device and
versions.

    python benchmarks/bench_adapter_quality.py [--steps 400] [--lrs 3e-3 1e-2 3e-2] [--quick]
    python benchmarks/bench_adapter_quality.py --model PATH --data FILE.jsonl [--steps 200]

With --model (a local transformers causal-LM folder with its tokenizer) and --data (JSONL, one
{"prompt": ..., "completion": ...} per line), one task, the user's data split into training
and held-out examples, is compared on that model; nothing is pretrained. Memory grows with
adapters x --batch rows of full-vocabulary logits: lower --batch for large vocabularies.
`adaptfuse bench quality` runs it too (not part of `adaptfuse bench all`: minutes, not
seconds); --quick (tiny model, 2 tasks, 12 steps: seconds) checks the pipeline only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time

import torch
from common import table, write_result
from torch import nn

import adaptfuse
from adaptfuse.layers import layer_features

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_WORD = 4  # tokens FIRST_WORD..vocab-1 are the synthetic language's words
TASKS = ("reverse", "permute", "sort", "max")
BOTTLENECK_KINDS = ("seq_bn", "double_seq_bn", "par_bn")
KINDS = ("lora", *BOTTLENECK_KINDS)
# The insertion points each AdapterHub config acts at (DESIGN.md "Bottleneck adapters").
KIND_POINTS = {
    "seq_bn": ("block_out",),
    "double_seq_bn": ("attn_out", "mlp_out"),
    "par_bn": ("par_bn",),
}
IGNORE = -100

# ---- the synthetic language and the held-out tasks ----------------------------------------


class SyntheticLanguage:
    """A seeded order-1 Markov source over the word tokens: each word has 4 favoured successors
    (Dirichlet weights) and 10% of its mass spread over all words. Pretraining episodes are
    "BOS w1..wn EOS" sentences and, half of them, "BOS s SEP s EOS" copies (s a sentence or,
    half of the time, uniform words): the base then knows the SEP format and how to copy,
    never what the tasks ask."""

    def __init__(self, vocab: int, seed: int, lengths: tuple[int, int]):
        self.vocab, self.words = vocab, vocab - FIRST_WORD
        self.lengths = lengths
        gen = torch.Generator().manual_seed(seed)
        favoured = torch.stack(
            [torch.randperm(self.words, generator=gen)[:4] for _ in range(self.words)]
        )
        weights = torch.empty(self.words, 4).exponential_(generator=gen)  # Dirichlet(1, 1, 1, 1)
        weights /= weights.sum(1, keepdim=True)
        transition = torch.full((self.words, self.words), 0.1 / self.words)
        transition.scatter_add_(1, favoured, 0.9 * weights)
        self.transition = transition / transition.sum(1, keepdim=True)
        self.gen = torch.Generator().manual_seed(seed + 1)
        # permute's fixed mapping, drawn from its own seed (not part of the language).
        mapping = torch.Generator().manual_seed(seed + 2)
        self.permutation = torch.randperm(self.words, generator=mapping)

    def sentence(self, length: int) -> list[int]:
        word = int(torch.randint(self.words, (1,), generator=self.gen))
        out = [word]
        for _ in range(length - 1):
            word = int(torch.multinomial(self.transition[word], 1, generator=self.gen))
            out.append(word)
        return [FIRST_WORD + w for w in out]

    def uniform(self, length: int, gen: torch.Generator, distinct: bool = False) -> list[int]:
        if distinct:
            return (FIRST_WORD + torch.randperm(self.words, generator=gen)[:length]).tolist()
        return (FIRST_WORD + torch.randint(self.words, (length,), generator=gen)).tolist()

    def pretraining_episode(self, max_len: int) -> list[int]:
        low, high = self.lengths
        if torch.rand((), generator=self.gen) < 0.5:
            return [BOS, *self.sentence(max_len - 2), EOS]
        length = int(torch.randint(low, high + 1, (1,), generator=self.gen))
        if torch.rand((), generator=self.gen) < 0.5:
            words = self.sentence(length)
        else:
            words = self.uniform(length, self.gen)
        return [BOS, *words, SEP, *words, EOS]

    def task_example(self, task: str, gen: torch.Generator) -> tuple[list[int], list[int]]:
        """(prompt, completion) of a held-out task."""
        low, high = self.lengths
        length = int(torch.randint(low, high + 1, (1,), generator=gen))
        x = self.uniform(length, gen, distinct=task in ("sort", "max"))
        if task == "reverse":
            y = x[::-1]
        elif task == "permute":
            y = [FIRST_WORD + int(self.permutation[t - FIRST_WORD]) for t in x]
        elif task == "sort":
            y = sorted(x)
        elif task == "max":
            y = [max(x)]
        elif task == "copy":  # pretraining's own format: a check of the base, not a task
            y = list(x)
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        return [BOS, *x, SEP], [*y, EOS]


def synthetic_llama(args, vocab: int):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return transformers.LlamaForCausalLM(config)


def pretrain(model, language: SyntheticLanguage, args, device: str) -> dict:
    """Next-token training of the whole base on pretraining episodes (AdamW, warmup + cosine)."""
    max_len = 2 * language.lengths[1] + 3
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.pretrain_lr, weight_decay=0.01, foreach=True
    )
    schedule = warmup_cosine(optimizer, args.pretrain_steps)
    model.train()
    losses, started = [], time.perf_counter()
    for _ in range(args.pretrain_steps):
        episodes = [language.pretraining_episode(max_len) for _ in range(args.pretrain_batch)]
        # Prompt BOS, completion the rest: a loss on every token the model can predict.
        ids, mask, labels = pad_rows([(e[:1], e[1:]) for e in episodes])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        if args.progress and len(losses) % 100 == 0:
            print(f"pretraining step {len(losses)}: loss {loss.item():.3f}", flush=True)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": args.pretrain_steps,
        "batch": args.pretrain_batch,
        "lr": args.pretrain_lr,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "loss_every_10_steps": losses[::10],
        "seconds": time.perf_counter() - started,
    }


# ---- batches ------------------------------------------------------------------------------


def pad_rows(examples, pad_id: int = PAD):
    """input_ids, attention_mask and labels (transformers' convention: aligned with the inputs,
    IGNORE where no loss is taken: the prompt and the padding) of (prompt, completion) pairs,
    right-padded."""
    rows, targets = [], []
    for prompt, completion in examples:
        rows.append([*prompt, *completion])
        targets.append([IGNORE] * len(prompt) + list(completion))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(target)] = torch.tensor(target)
    return ids, mask, labels


def completion_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row: summed token loss, counted tokens, right tokens (teacher-forced argmax) over
    the completion, and whether all of them are right (what greedy decoding would give)."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    valid = targets != IGNORE
    loss = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    right = (logits.argmax(-1) == targets) & valid
    counted, right_count = valid.sum(1), right.sum(1)
    return {
        "loss": (loss * valid).sum(1),
        "tokens": counted,
        "right": right_count,
        "exact": right_count == counted,
    }


def per_adapter_train_loss(logits, labels, names) -> dict[str, float]:
    scores = completion_scores(logits.detach(), labels)
    out: dict[str, list[float]] = {}
    for row, name in enumerate(names):
        entry = out.setdefault(name, [0.0, 0])
        entry[0] += float(scores["loss"][row])
        entry[1] += int(scores["tokens"][row])
    return {name: total / max(count, 1) for name, (total, count) in out.items()}


@torch.no_grad()
def evaluate(model, entries, args, device: str, pad_id: int) -> dict:
    """Held-out loss, token accuracy and exact match per entry (key, adapter name or None for
    the frozen base, examples); the rows of all entries share the forwards."""
    model.eval()
    rows = [(key, name, example) for key, name, examples in entries for example in examples]
    totals: dict = {}
    for start in range(0, len(rows), args.eval_rows):
        chunk = rows[start : start + args.eval_rows]
        ids, mask, labels = pad_rows([example for _, _, example in chunk], pad_id)
        names = [name for _, name, _ in chunk]
        # No adapter_names for the base alone: the model may not be patched yet.
        routing = {"adapter_names": names} if any(names) else {}
        logits = model(ids.to(device), attention_mask=mask.to(device), **routing).logits
        scores = {k: v.cpu() for k, v in completion_scores(logits, labels.to(device)).items()}
        for row, (key, _, _) in enumerate(chunk):
            entry = totals.setdefault(key, [0.0, 0, 0, 0, 0])
            entry[0] += float(scores["loss"][row])
            entry[1] += int(scores["tokens"][row])
            entry[2] += int(scores["right"][row])
            entry[3] += int(scores["exact"][row])
            entry[4] += 1
    model.train()
    return {
        key: {
            "loss": loss / max(tokens, 1),
            "token_accuracy": right / max(tokens, 1),
            "exact_match": exact / max(count, 1),
        }
        for key, (loss, tokens, right, exact, count) in totals.items()
    }


def warmup_cosine(optimizer, steps: int):
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of each group's lr."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- equal parameter budgets -------------------------------------------------------------


def lora_parameters_per_rank(model) -> int:
    """LoRA parameters of rank 1 on every layer patch adapts by default (all linear layers but
    the output head): r * (H_in + H_out) per layer."""
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        features = layer_features(module)
        if module is not head and features is not None:
            total += sum(features)
    return total


def bottleneck_dims(hidden: int, reduction_factor: float, kinds) -> dict[str, int]:
    """Bottleneck dim of each bottleneck kind: hidden / reduction_factor (AdapterHub's rule),
    halved for double_seq_bn (two adapters per block) so that every kind has one budget."""
    dim = max(1, int(hidden // reduction_factor))
    return {k: max(1, dim // len(KIND_POINTS[k])) for k in kinds if k in BOTTLENECK_KINDS}


def reduction_factor_for(hidden: int, dim: int) -> float:
    """The reduction_factor whose hidden // reduction_factor is dim (hidden / dim, or a hair
    above dim where floating point would round that down)."""
    factor = hidden / dim
    return factor if int(hidden // factor) == dim else hidden / (dim + 0.5)


def plan_budgets(model, hidden: int, blocks: int, args) -> dict:
    """Per kind: dim or rank, and the parameter count they give."""
    dims = bottleneck_dims(hidden, args.reduction_factor, args.kinds)
    budget_dim = max(1, int(hidden // args.reduction_factor))
    budget = blocks * (2 * budget_dim * hidden + budget_dim + hidden)  # one seq_bn of that dim
    per_rank = lora_parameters_per_rank(model)
    rank = max(1, round(budget / per_rank))
    kinds = {}
    for kind in args.kinds:
        if kind == "lora":
            kinds[kind] = {"rank": rank, "lora_alpha": 2 * rank, "parameters": rank * per_rank}
        else:
            dim, points = dims[kind], len(KIND_POINTS[kind])
            kinds[kind] = {
                "dim": dim,
                "reduction_factor": reduction_factor_for(hidden, dim),
                "parameters": blocks * points * (2 * dim * hidden + dim + hidden),
            }
    return {"budget_parameters": budget, "kinds": kinds}


# ---- the comparison -----------------------------------------------------------------------


def compare(model, samplers: dict, held_out: dict, budgets: dict, args, device: str, pad_id: int):
    """Patches the frozen base, adds one adapter per (task, kind, lr, seed), trains all of them
    in one batch per step and evaluates them together; returns runs, base scores and timings.
    samplers[task](seed) gives that seed's draw(n) of training examples."""
    kinds = budgets["kinds"]
    lora_rank = kinds.get("lora", {}).get("rank", 1)
    bn_dim = max((k["dim"] for k in kinds.values() if "dim" in k), default=0)
    points = sorted({p for kind in kinds if kind in KIND_POINTS for p in KIND_POINTS[kind]})
    adapters = [
        (task, kind, lr, seed)
        for task in samplers
        for kind in kinds
        for lr in args.lrs
        for seed in range(args.seeds)
    ]
    patch_options = {"max_loras": len(adapters), "max_rank": lora_rank}
    if bn_dim:
        patch_options.update(max_bottleneck_dim=bn_dim, bottleneck_points=points)
    mgr = adaptfuse.patch(model, **patch_options)
    groups, runs = [], []
    rows_of = {(task, seed): [] for task in samplers for seed in range(args.seeds)}
    for task, kind, lr, seed in adapters:
        # No '.' in names: AdapterHub's tensor keys hold them between dots.
        name = f"{task}:{kind}:lr{lr:g}:seed{seed}".replace(".", "p")
        # Every learning rate of a (task, kind, seed) starts from the same initial weights.
        task_index, kind_index = list(samplers).index(task), list(kinds).index(kind)
        torch.manual_seed(args.seed * 100_003 + (task_index * 101 + kind_index) * 1009 + seed)
        if kind == "lora":
            mgr.add_adapter(name, r=lora_rank, lora_alpha=2 * lora_rank)
        else:
            mgr.add_bottleneck_adapter(
                name, config=kind, reduction_factor=kinds[kind]["reduction_factor"]
            )
        parameters = mgr.parameters(name)
        groups.append({"params": parameters, "lr": lr})
        rows_of[(task, seed)].append(name)
        curve = {key: [] for key in ("step", "loss", "token_accuracy", "exact_match", "train_loss")}
        runs.append(
            {
                "adapter": name,
                "task": task,
                "kind": kind,
                "lr": lr,
                "seed": seed,
                "parameters": sum(p.numel() for p in parameters),
                "curve": curve,
            }
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=True)
    schedule = warmup_cosine(optimizer, args.steps)
    by_name = {run["adapter"]: run for run in runs}
    draws = {(task, seed): samplers[task](seed) for task, seed in rows_of}
    timings = {"train_s": 0.0, "eval_s": 0.0}

    started = time.perf_counter()
    base_entries = [(task, None, held_out[task]) for task in samplers]
    base = evaluate(model, base_entries, args, device, pad_id)
    timings["eval_s"] += time.perf_counter() - started
    entries = [(run["adapter"], run["adapter"], held_out[run["task"]]) for run in runs]

    def record(step: int, train_losses: dict) -> None:
        begin = time.perf_counter()
        scores = evaluate(model, entries, args, device, pad_id)
        timings["eval_s"] += time.perf_counter() - begin
        for name, score in scores.items():
            curve = by_name[name]["curve"]
            curve["step"].append(step)
            for key in ("loss", "token_accuracy", "exact_match"):
                curve[key].append(score[key])
            window = train_losses.get(name, [])
            curve["train_loss"].append(sum(window) / len(window) if window else None)

    record(0, {})
    train_losses: dict[str, list[float]] = {}
    model.train()
    for step in range(1, args.steps + 1):
        begin = time.perf_counter()
        examples, names = [], []
        for key, draw in draws.items():
            batch = draw(args.batch)  # one draw per (task, seed): its adapters see the same rows
            for name in rows_of[key]:
                examples += batch
                names += [name] * len(batch)
        ids, mask, labels = pad_rows(examples, pad_id)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        logits = model(ids, attention_mask=mask, adapter_names=names).logits
        loss = adaptfuse.per_adapter_loss(logits, labels, names)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        for name, value in per_adapter_train_loss(logits, labels, names).items():
            train_losses.setdefault(name, []).append(value)
        timings["train_s"] += time.perf_counter() - begin
        if step % args.eval_every == 0 or step == args.steps:
            record(step, train_losses)
            train_losses = {}
            if args.progress:
                line = " ".join(f"{r['adapter']}={r['curve']['loss'][-1]:.3f}" for r in runs)
                print(f"step {step}: held-out loss {line}", flush=True)
    timings["train_step_ms"] = 1e3 * timings["train_s"] / max(1, args.steps)
    timings["rows_per_step"] = len(adapters) * args.batch
    adaptfuse.unpatch(model)
    return runs, base, timings


def _finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf  # a diverged run never wins


def best_per_task_kind(runs) -> dict:
    """Per task and kind: the learning rate with the lowest final held-out loss averaged over
    the seeds, with its final scores (mean, and each seed's under "seeds")."""
    finals: dict = {}
    for run in runs:
        run["final"] = {k: run["curve"][k][-1] for k in ("loss", "token_accuracy", "exact_match")}
        key = (run["task"], run["kind"], run["lr"])
        finals.setdefault(key, {"parameters": run["parameters"], "seeds": []})
        finals[key]["seeds"].append(run["final"])
    best: dict = {}
    for (task, kind, lr), entry in finals.items():
        seeds = entry["seeds"]
        mean = {k: sum(s[k] for s in seeds) / len(seeds) for k in seeds[0]}
        current = best.setdefault(task, {}).get(kind)
        if current is None or _finite(mean["loss"]) < _finite(current["loss"]):
            best[task][kind] = {"lr": lr, "parameters": entry["parameters"], **mean}
            best[task][kind]["seeds"] = seeds
    return best


# ---- the two setups -----------------------------------------------------------------------


def synthetic_setup(args, device: str):
    vocab = args.vocab
    language = SyntheticLanguage(vocab, args.seed, (args.min_len, args.max_len))
    model = synthetic_llama(args, vocab).to(device)
    pretraining = pretrain(model, language, args, device)
    # What the base learned: copying held-out prompts, pretraining's own format.
    copies = torch.Generator().manual_seed(args.seed * 100 + 99)
    examples = [language.task_example("copy", copies) for _ in range(args.eval_examples)]
    scores = evaluate(model, [("copy", None, examples)], args, device, PAD)
    pretraining["copy_held_out"] = scores["copy"]
    samplers, held_out = {}, {}
    for index, task in enumerate(args.tasks):
        eval_gen = torch.Generator().manual_seed(args.seed * 100 + 50 + index)
        held_out[task] = [language.task_example(task, eval_gen) for _ in range(args.eval_examples)]

        def sampler(seed: int, task=task, index=index):
            gen = torch.Generator().manual_seed(args.seed * 100 + index + 1000 * (seed + 1))
            return lambda n: [language.task_example(task, gen) for _ in range(n)]

        samplers[task] = sampler
    setup = {
        "mode": "synthetic",
        "model": {
            "architecture": "LlamaForCausalLM (random init, pretrained here)",
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": max(1, args.heads // 2),
            "vocab": vocab,
        },
        "language": "order-1 Markov source over the word tokens (4 favoured successors each, "
        "10% uniform); pretraining episodes: sentences, and prompt SEP copy EOS",
        "prompt_lengths": [args.min_len, args.max_len],
        "tasks": list(args.tasks),
    }
    return model, samplers, held_out, setup, pretraining, PAD


def user_setup(args, device: str):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    model.to(device, getattr(torch, args.dtype))  # adapters train in fp32 whatever the base's
    pairs = []
    with open(args.data) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
                raise SystemExit(
                    f'{args.data}:{number}: expected {{"prompt": str, "completion": str}}'
                )
            prompt = tokenizer(record["prompt"])["input_ids"]
            completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion = completion + [tokenizer.eos_token_id]
            completion = completion[: args.max_length - 1]
            prompt = prompt[-(args.max_length - len(completion)) :]  # keep the prompt's end
            pairs.append((prompt, completion))
    if len(pairs) < 4:
        raise SystemExit(f"{args.data}: needs at least 4 prompt/completion pairs, has {len(pairs)}")
    random.Random(args.seed).shuffle(pairs)
    count = min(args.eval_examples, max(1, int(len(pairs) * args.held_out_fraction)))
    held, train = pairs[:count], pairs[count:]

    def sampler(seed: int):
        """Epochs over the training examples, shuffled per seed."""
        order = random.Random(args.seed * 1000 + seed + 1)
        cursor = {"epoch": [], "position": 0}

        def draw(n: int):
            out = []
            for _ in range(n):
                if cursor["position"] >= len(cursor["epoch"]):
                    cursor["epoch"] = order.sample(train, len(train))
                    cursor["position"] = 0
                out.append(cursor["epoch"][cursor["position"]])
                cursor["position"] += 1
            return out

        return draw

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    config = model.config
    setup = {
        "mode": "model",
        "model": {
            "path": os.path.abspath(args.model),
            "architecture": type(model).__name__,
            "hidden": config.hidden_size,
            "layers": config.num_hidden_layers,
            "vocab": config.vocab_size,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        "data": {
            "path": os.path.abspath(args.data),
            "train_examples": len(train),
            "held_out_examples": len(held),
            "max_length": args.max_length,
        },
        "tasks": ["data"],
    }
    return model, {"data": sampler}, {"data": held}, setup, None, pad_id


def run(args) -> dict:
    device = args.device
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.model:
        model, samplers, held_out, setup, pretraining, pad_id = user_setup(args, device)
    else:
        model, samplers, held_out, setup, pretraining, pad_id = synthetic_setup(args, device)
    hidden, blocks = model.config.hidden_size, model.config.num_hidden_layers
    budgets = plan_budgets(model, hidden, blocks, args)
    runs, base, timings = compare(model, samplers, held_out, budgets, args, device, pad_id)
    best = best_per_task_kind(runs)
    timings["pretrain_s"] = pretraining["seconds"] if pretraining else 0.0
    timings["total_s"] = time.perf_counter() - started
    setup.update(
        {
            "kinds": budgets["kinds"],
            "budget_parameters": budgets["budget_parameters"],
            "reduction_factor": args.reduction_factor,
            "lora": "every linear layer but the output head, PEFT's init, lora_alpha = 2r",
            "bottleneck": "AdapterHub configs at their defaults (seq_bn: relu, block output)",
            "lrs": list(args.lrs),
            "schedule": "AdamW (no weight decay), 5% linear warmup, cosine to 10%",
            "steps": args.steps,
            "batch_per_adapter": args.batch,
            "adapters_in_the_batch": len(runs),
            "rows_per_step": timings["rows_per_step"],
            "seeds": args.seeds,
            "eval_every": args.eval_every,
            "eval_examples_per_task": {t: len(v) for t, v in held_out.items()},
            "seed": args.seed,
            "device": device,
            "dtype": "float32 adapters; base " + str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(),
            "quick": args.quick,
        }
    )
    return {
        "setup": setup,
        "pretraining": pretraining,
        "base": base,
        "best": best,
        "runs": runs,
        "timings": timings,
    }


# ---- plots ----------------------------------------------------------------------------------


def plot(result: dict, stem: str) -> list[str]:
    """<stem>_curves.png: held-out loss, token accuracy and exact match over the steps, per task
    (columns), every kind and learning rate (the best lr drawn bold), the base dotted;
    <stem>_summary.png: the best final scores per task and kind as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    def log_scale(axis) -> None:
        axis.set_yscale("log")
        # Plain numbers (0.5, not 5 x 10^-1); minor ticks labelled only on short ranges.
        axis.yaxis.set_major_formatter(LogFormatter())
        axis.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1.2, 0.6)))
        axis.tick_params(axis="y", which="minor", labelsize=6)

    tasks = list(result["best"])
    kinds = list(result["setup"]["kinds"])
    colors = {kind: f"C{i}" for i, kind in enumerate(kinds)}
    metrics = (("loss", "held-out loss"), ("token_accuracy", "token accuracy"))
    metrics += (("exact_match", "exact match"),)
    figure, axes = plt.subplots(
        len(metrics), len(tasks), figsize=(4 * len(tasks), 2.8 * len(metrics)), squeeze=False
    )
    for column, task in enumerate(tasks):
        for row, (key, label) in enumerate(metrics):
            axis = axes[row][column]
            seeds_of: dict = {}  # (kind, lr) -> the curves of its seeds
            for run in result["runs"]:
                if run["task"] == task:
                    seeds_of.setdefault((run["kind"], run["lr"]), []).append(run["curve"])
            for (kind, lr), curves in seeds_of.items():
                steps = curves[0]["step"]
                values = list(zip(*(c[key] for c in curves), strict=True))  # per step
                is_best = result["best"][task][kind]["lr"] == lr
                axis.plot(
                    steps,
                    [sum(v) / len(v) for v in values],
                    color=colors[kind],
                    linewidth=2.0 if is_best else 0.8,
                    linestyle="-" if is_best else "--",
                    alpha=1.0 if is_best else 0.6,
                    label=f"{kind} lr {lr:g}",
                )
                if is_best and len(curves) > 1:  # the spread over seeds
                    low, high = [min(v) for v in values], [max(v) for v in values]
                    axis.fill_between(steps, low, high, color=colors[kind], alpha=0.2)
            axis.axhline(result["base"][task][key], color="grey", linestyle=":", label="base")
            if key == "loss":
                log_scale(axis)
            else:
                axis.set_ylim(-0.02, 1.02)
            axis.set(xlabel="step", ylabel=label)
            if row == 0:
                axis.set_title(task)
        axes[0][column].legend(fontsize=6)
    setup = result["setup"]
    figure.suptitle(
        f"{' vs '.join(kinds)} at ~{setup['budget_parameters']} parameters, "
        f"{setup['steps']} steps, all {setup['adapters_in_the_batch']} adapters in one batch; "
        f"mean of {setup['seeds']} seeds (band: their range at the best lr)"
    )
    paths = [_save(figure, plt, f"{stem}_curves.png")]

    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    width = 0.8 / len(kinds)
    for axis, (key, label) in zip(axes[0], metrics, strict=True):
        for i, kind in enumerate(kinds):
            values = [result["best"][task][kind][key] for task in tasks]
            offsets = [x + (i - (len(kinds) - 1) / 2) * width for x in range(len(tasks))]
            seeds = [[s[key] for s in result["best"][task][kind]["seeds"]] for task in tasks]
            spread = [
                [v - min(s) for v, s in zip(values, seeds, strict=True)],
                [max(s) - v for v, s in zip(values, seeds, strict=True)],
            ]
            bars = axis.bar(
                offsets, values, width, yerr=spread, color=colors[kind], label=kind, capsize=2
            )
            for bar, value in zip(bars, values, strict=True):
                axis.annotate(
                    f"{value:.2f}" if key == "loss" else f"{value:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                )
        axis.scatter(
            range(len(tasks)),
            [result["base"][task][key] for task in tasks],
            color="grey",
            marker="_",
            s=400,
            label="base",
        )
        axis.set_xticks(range(len(tasks)))
        axis.set_xticklabels(tasks)
        axis.set(ylabel=f"best final {label}")
        if key == "loss":
            log_scale(axis)
        else:
            axis.set_ylim(0, 1.08)
        axis.legend(fontsize=7)
    figure.suptitle(
        "best learning rate per task and kind: final held-out scores, mean of "
        f"{setup['seeds']} seeds (bars: their range)"
    )
    paths.append(_save(figure, plt, f"{stem}_summary.png"))
    return paths


def _save(figure, plt, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---- command line -------------------------------------------------------------------------


QUICK = {
    "hidden": 32,
    "intermediate": 64,
    "layers": 2,
    "heads": 2,
    "vocab": 24,
    "min_len": 3,
    "max_len": 5,
    "pretrain_steps": 30,
    "pretrain_batch": 16,
    "tasks": ["reverse", "permute"],
    "lrs": [3e-3, 1e-2],
    "steps": 12,
    "batch": 4,
    "eval_every": 6,
    "eval_examples": 16,
}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["lora", "seq_bn"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", type=int, default=400, help="adapter training steps")
    parser.add_argument("--batch", type=int, default=6, help="rows per adapter per step")
    parser.add_argument(
        "--reduction-factor",
        type=float,
        default=None,
        help="hidden / bottleneck dim, AdapterHub's convention; sets the budget of every kind "
        "(default 4 on the synthetic model, 16 with --model)",
    )
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-examples", type=int, default=200, help="held-out, per task")
    parser.add_argument("--eval-rows", type=int, default=512, help="rows per evaluation forward")
    parser.add_argument("--seed", type=int, default=0, help="of the base, the data and the seeds")
    parser.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="training runs per (task, kind, lr), differing in adapter init and data order, "
        "all in the same batch; scores are their mean (default 2)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 on the synthetic model: its ops are too small to gain from "
        "more, and a second thread stalls whenever another process holds a core; torch's "
        "default with --model)",
    )
    synthetic = parser.add_argument_group("the synthetic setup (default)")
    synthetic.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    synthetic.add_argument("--hidden", type=int, default=128)
    synthetic.add_argument("--intermediate", type=int, default=256)
    synthetic.add_argument("--layers", type=int, default=3)
    synthetic.add_argument("--heads", type=int, default=4)
    synthetic.add_argument("--vocab", type=int, default=64, help="4 special tokens + words")
    synthetic.add_argument("--min-len", type=int, default=4, help="shortest task prompt")
    synthetic.add_argument("--max-len", type=int, default=8, help="longest task prompt")
    synthetic.add_argument("--pretrain-steps", type=int, default=500)
    synthetic.add_argument("--pretrain-batch", type=int, default=64)
    synthetic.add_argument("--pretrain-lr", type=float, default=3e-3)
    user = parser.add_argument_group("your model and data")
    user.add_argument("--model", metavar="PATH", help="a local transformers causal-LM folder")
    user.add_argument("--data", metavar="FILE", help="JSONL: {'prompt': ..., 'completion': ...}")
    user.add_argument("--held-out-fraction", type=float, default=0.1)
    user.add_argument("--max-length", type=int, default=256, help="tokens per example")
    user.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the model's"
    )
    parser.add_argument("--quick", action="store_true", help="tiny everything: a pipeline check")
    parser.add_argument("--progress", action="store_true", help="print held-out losses as it goes")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if bool(args.model) != bool(args.data):
        parser.error("--model and --data go together (the data is tokenized by the model's)")
    if args.quick:
        for key, value in QUICK.items():  # unless given (the model's sizes: not with --model)
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.reduction_factor is None:
        args.reduction_factor = 16.0 if args.model else 4.0
    if args.min_len < 1 or args.max_len < args.min_len:
        parser.error("need 1 <= --min-len <= --max-len")
    if args.vocab - FIRST_WORD < args.max_len:
        parser.error(f"--vocab must leave at least --max-len words after {FIRST_WORD} specials")

    threads = torch.get_num_threads()
    if args.threads or not args.model:
        torch.set_num_threads(args.threads or 1)
    try:
        return report(run(args), args)
    finally:
        torch.set_num_threads(threads)  # `adaptfuse bench` runs main() in its own process


def _seed_range(scores: dict, key: str) -> str:
    seeds = [s[key] for s in scores.get("seeds", [])]
    return f" [{min(seeds):.3f}, {max(seeds):.3f}]" if len(seeds) > 1 else ""


def report(result: dict, args) -> dict:
    """Prints the table, writes the JSON (device named with the threads used) and the plots."""
    rows = []
    for task, kinds in result["best"].items():
        base = result["base"][task]
        for kind, scores in [("base", base), *kinds.items()]:
            rows.append(
                (
                    task,
                    kind,
                    scores.get("parameters", ""),
                    f"{scores['lr']:g}" if "lr" in scores else "",
                    f"{scores['loss']:.4f}" + _seed_range(scores, "loss"),
                    f"{scores['token_accuracy']:.3f}",
                    f"{scores['exact_match']:.3f}",
                )
            )
    header = ["task", "kind", "params", "best lr", "held-out loss [seeds]", "token acc", "exact"]
    print(table(rows, header))
    timings = result["timings"]
    print(
        f"pretrain {timings['pretrain_s']:.1f} s, adapters {timings['train_s']:.1f} s "
        f"({timings['train_step_ms']:.0f} ms/step, {timings['rows_per_step']} rows), "
        f"eval {timings['eval_s']:.1f} s, total {timings['total_s']:.1f} s"
    )
    name = "synthetic_llama"
    if args.model:
        name = re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(os.path.abspath(args.model)))
    path = write_result(f"quality_{name}", args.device, result, args.out_dir)
    figures = []
    try:
        figures = plot(result, path[: -len(".json")])
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'adaptfuse[bench]')")
    if figures:
        with open(path) as f:
            document = json.load(f)
        document["figures"] = [os.path.basename(p) for p in figures]
        with open(path, "w") as f:
            json.dump(document, f, indent=2)
    print(f"wrote {path}")
    for figure in figures:
        print(f"      {figure}")
    return result


if __name__ == "__main__":
    main()
