"""The language-model table of `python -m acn_kernels paper`: AC-GPT and its twins on offline data.

For each data set (the byte-level grammar corpus, n-digit addition with the answer reversed; text.py)
and each twin (acn, residual, ffn, hybrid), a GPT trained with AdamW (warmup and cosine decay), then
on held-out data:
- the next-token loss and accuracy at every depth (`probe`: the logits after 0..L blocks); for
  addition the targets are the answer's tokens, and the exact match of the whole answer is scored too;
- the effective depth: the smallest depth within 1% of the best loss (`compress`, metric="loss");
- the training steps until the validation loss first reaches a target;
- greedy generation tokens/s (KV cache on) of the model truncated to its effective depth k against the
  full one: the target is at least 0.5 x L/k, and the depth-0 model's own time per token (embedding,
  final norm, head, sampling and the Python loop: what no truncation removes) says what keeps it from L/k.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..depth import IGNORE_INDEX, compress, depth_scores, generation_tokens_per_second
from ..models import GPT
from . import text
from .report import per_seed, plot_lines, print_table, verdict, write_csv

TWINS = ("acn", "residual", "ffn", "hybrid")
PROMPT = 8  # tokens of each held-out sequence that the generation timing starts from
LEARNING_RATE, WARMUP_FRACTION, WEIGHT_DECAY = 3e-3, 0.05, 0.1
# validation loss (nats per target token) the steps-to-target column waits for
TARGET_LOSS = {"corpus": 2.5, "addition": 0.5}


@dataclass(frozen=True)
class LanguageSettings:
    seeds: int
    depth: int
    dim: int
    heads: int
    steps: dict           # training steps per data set
    batch: int
    context: int          # corpus window
    digits: int           # addition operands: 1 to `digits` digits
    eval_every: int
    new_tokens: int       # generated per prompt when timing


# Sized for this project's 2-core CPU machine (about 15 minutes in all): 2-digit addition needs about
# 1000 steps of 32 before its answers come right, the corpus a few hundred before a model gets past
# the unigram level.
FULL = LanguageSettings(seeds=2, depth=8, dim=64, heads=4, steps={"corpus": 600, "addition": 1500}, batch=32,
                        context=64, digits=2, eval_every=50, new_tokens=32)
QUICK = LanguageSettings(seeds=1, depth=4, dim=64, heads=4, steps={"corpus": 40, "addition": 40}, batch=16,
                         context=32, digits=2, eval_every=10, new_tokens=8)


@dataclass
class Task:
    """A data set as the trainer sees it: batches of (inputs, targets), and the held-out ones."""
    name: str
    max_len: int
    batches: object                 # generator -> (inputs, targets)
    validation: tuple               # (inputs, targets)
    answers: torch.Tensor | None    # addition: the answer mask of the validation targets


def corpus_task(settings: LanguageSettings) -> Task:
    split = text.load_corpus()
    held_out = text.windows(split.validation, settings.context, 128, torch.Generator().manual_seed(12345))

    def batches(generator):
        rows = text.windows(split.train, settings.context, settings.batch, generator)
        return rows[:, :-1], rows[:, 1:]
    return Task("corpus", settings.context, batches, (held_out[:, :-1], held_out[:, 1:]), None)


def addition_task(settings: LanguageSettings) -> Task:
    length = 3 * settings.digits + 4  # a+b=, the sum's digits and one more, and the newline
    train = text.encode_additions(text.addition_examples(20000, settings.digits, seed=1), length)
    held_out = text.encode_additions(text.addition_examples(512, settings.digits, seed=2), length)

    def answer_targets(data):
        targets = data.tokens[:, 1:].clone()
        targets[~data.answer] = IGNORE_INDEX  # trained and scored on the answer alone
        return data.tokens[:, :-1], targets

    inputs, targets = answer_targets(train)

    def batches(generator):
        rows = torch.randint(0, len(inputs), (settings.batch,), generator=generator)
        return inputs[rows], targets[rows]
    return Task("addition", length, batches, answer_targets(held_out), held_out.answer)


def build(settings: LanguageSettings, twin: str, task: Task) -> GPT:
    """The task's GPT, with positions for the generation timing's prompt and new tokens too."""
    max_len = max(task.max_len, PROMPT + settings.new_tokens)
    return GPT(text.VOCAB, max_len, settings.dim, settings.depth, settings.heads, connectivity=twin)


def validation_loss(model: GPT, validation: tuple) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(validation[0])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), validation[1].flatten(), ignore_index=IGNORE_INDEX)
    model.train()
    return loss.item()


def train(model: GPT, task: Task, settings: LanguageSettings, seed: int) -> list:
    """AdamW with warmup and cosine decay; returns [(step, validation loss)] every eval_every steps."""
    steps = settings.steps[task.name]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    warmup = max(1, int(WARMUP_FRACTION * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / steps))))
    generator, curve = torch.Generator().manual_seed(seed), []
    model.train()
    for step in range(1, steps + 1):
        inputs, targets = task.batches(generator)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % settings.eval_every == 0 or step == steps:
            curve.append((step, validation_loss(model, task.validation)))
    return curve


def exact_match(model: GPT, task: Task) -> list:
    """Percent of held-out additions whose whole answer every depth gets right (teacher-forced: the
    same as greedy decoding writing the answer)."""
    inputs, targets = task.validation
    with torch.no_grad():
        right = (model.probe(inputs).argmax(-1) == targets) | ~task.answers
    return (100.0 * right.all(-1).double().mean(-1)).tolist()


def evaluate(model: GPT, task: Task, settings: LanguageSettings) -> dict:
    inputs, targets = task.validation
    model.eval()
    report = compress(model, inputs, targets, tolerance=1.0, metric="loss", repeats=3, timing_batch=8)
    prompts = inputs[:8, :PROMPT]
    speeds = {k: generation_tokens_per_second(model.truncate(k) if k < model.depth else model, prompts,
                                              settings.new_tokens) for k in sorted({0, report.depth, model.depth})}
    return dict(losses=report.scores, accuracies=depth_scores(model, inputs, targets, "accuracy"),
                exact=exact_match(model, task) if task.answers is not None else None, depth=report.depth,
                speeds=speeds)


def steps_to_target(curve: list, target: float, steps: int) -> int:
    """The first evaluated step whose validation loss reached the target (one past the budget if none did)."""
    return next((step for step, loss in curve if loss <= target), steps + 1)


def generation_row(result: dict, depth: int) -> dict:
    """Tokens/s of the full and the truncated model, the ratio against L/k, and the per-token time that
    no truncation removes (the depth-0 model's)."""
    k, speeds = max(result["depth"], 1), result["speeds"]
    full, truncated = speeds[depth], speeds[result["depth"]]
    return {"tokens/s full": full, "tokens/s truncated": truncated, "speedup": truncated / full,
            "L/k": depth / k, "speedup / (L/k)": truncated / full / (depth / k),
            "overhead us/token": 1e6 / speeds[0], "full us/token": 1e6 / full}


def run_language(settings: LanguageSettings, out: str, tqdm) -> None:
    """Trains every twin on both data sets and prints table 6, its target line and its verdict."""
    tasks = [corpus_task(settings), addition_task(settings)]
    jobs = [(task, seed, twin) for task in tasks for seed in range(settings.seeds) for twin in TWINS]
    rows, depth_rows, records = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list)), []
    generation, exact_rows = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    with tqdm(jobs, desc="language models", unit="run") as progress:
        for task, seed, twin in progress:
            progress.set_postfix_str(f"{task.name} {twin} seed {seed}")
            torch.manual_seed(seed)
            model = build(settings, twin, task)
            curve = train(model, task, settings, seed)
            result = evaluate(model, task, settings)
            key = f"{task.name} gpt {twin}"
            values = {"best loss": min(result["losses"]), "full-depth loss": result["losses"][-1],
                      "eff. depth": result["depth"], "eff./L": result["depth"] / settings.depth,
                      "steps to target": steps_to_target(curve, TARGET_LOSS[task.name], settings.steps[task.name]),
                      "accuracy %": result["accuracies"][-1]}
            if result["exact"] is not None:
                values["exact match %"] = result["exact"][-1]
                for k, exact in enumerate(result["exact"]):
                    exact_rows[key][f"depth {k} %"].append(exact)
                    values[f"depth {k} exact %"] = exact
            for k, loss in enumerate(result["losses"]):
                depth_rows[key][f"depth {k} loss"].append(loss)
                values[f"depth {k} loss"] = loss
            if twin in ("acn", "hybrid"):
                for metric, value in generation_row(result, settings.depth).items():
                    generation[key][metric].append(value)
                    values[metric] = value
            for metric, value in values.items():
                rows[key][metric].append(value)
                records.append(dict(dataset=task.name, model="gpt", twin=twin, seed=seed, metric=metric, value=value))
    targets = ", ".join(f"{name} {loss:g}" for name, loss in TARGET_LOSS.items())
    steps = ", ".join(f"{name} {count}" for name, count in settings.steps.items())
    print_table(f"6. Language models: GPT, {settings.depth} blocks of dim {settings.dim}, steps of {settings.batch} "
                f"({steps}); held-out next-token loss (nats; addition: the answer's tokens), effective depth "
                f"(within 1% of the best loss), steps to a validation loss of {targets}, mean ± std over seeds",
                ["best loss", "full-depth loss", "eff. depth", "steps to target", "accuracy %", "exact match %"], rows,
                digits=2)
    print_table("    the loss at every depth (the logits after k blocks, both branches of each added)",
                [f"depth {k} loss" for k in range(settings.depth + 1)], depth_rows, digits=2)
    print_table("    addition: the exact match of the whole answer at every depth (%)",
                [f"depth {k} %" for k in range(settings.depth + 1)], exact_rows)
    print_table("    greedy generation (KV cache on, 8 prompts, CPU) of the model truncated to its effective depth k "
                "against the full one; us/token: per generated token of the 8; overhead: the depth-0 model's",
                list(GENERATION_COLUMNS),
                generation, digits=2)
    ratios = [statistics.fmean(values["speedup / (L/k)"]) for values in generation.values()]
    print(f"target: the truncated model generates >= 0.5 x L/k times the full one's tokens/s: worst "
          f"{min(ratios):.2f} x L/k ({'met' if min(ratios) >= 0.5 else 'not met'}); what keeps it from L/k is the "
          "per-token time that no block count changes (the overhead column)")
    print(verdict(per_seed(rows, " residual", ["eff./L"]), per_seed(rows, " acn", ["eff./L"]), True,
                  "Auto-compression in language models (the authors' AC-GPT): the ACN reaches its loss with fewer "
                  "blocks",
                  "effective depth / L, residual against acn:"))
    write_csv(f"{out}/language.csv", records)
    plot_lines(f"{out}/language.png", depth_rows, lambda values: [
        (k, statistics.fmean(values[f"depth {k} loss"])) for k in range(settings.depth + 1)],
        "depth k (blocks used)", "held-out loss (nats)")


GENERATION_COLUMNS = ("tokens/s full", "tokens/s truncated", "speedup", "L/k", "speedup / (L/k)", "overhead us/token",
                      "full us/token")
