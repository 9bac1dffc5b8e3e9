"""What a language run measures on the held-out data: the loss and accuracy at every depth, the exact
answers (addition), the effective depth, the steps to the target loss and out of the unigram plateau,
the truncated model's generation speed and self-speculative decoding at every draft depth."""
from __future__ import annotations

import os

import torch

from ...depth import compress, depth_scores, generation_tokens_per_second, speculations
from ...models import GPT
from .rows import PLATEAU, PROMPT, ROWS, TARGET_LOSS, LanguageSettings
from .tasks import Task, as_labels, task_of
from .train import deterministic, trained


def exact_match(model: GPT, task: Task) -> list:
    """Percent of held-out additions whose whole answer every depth gets right (teacher-forced: the
    same as greedy decoding writing the answer)."""
    inputs, targets = task.validation
    with torch.no_grad():
        right = (model.probe(inputs).argmax(-1) == targets) | ~task.answers
    return (100.0 * right.all(-1).double().mean(-1)).tolist()


def evaluate(model: GPT, task: Task, settings: LanguageSettings) -> dict:
    inputs, targets = as_labels(*task.validation)
    model.eval()
    report = compress(model, inputs, targets, tolerance=1.0, metric="loss", repeats=settings.repeats, timing_batch=8)
    prompts = inputs[:8, :PROMPT]
    speeds = {k: generation_tokens_per_second(model.truncate(k) if k < model.depth else model, prompts,
                                              settings.new_tokens, settings.repeats)
              for k in sorted({0, report.depth, model.depth})}
    return dict(losses=report.scores, accuracies=depth_scores(model, inputs, targets, "accuracy"),
                exact=exact_match(model, task) if task.answers is not None else None, depth=report.depth,
                speeds=speeds)


def speculative_values(model: GPT, task: Task, settings: LanguageSettings) -> dict:
    """Self-speculative greedy decoding of the trained model from the timing prompts, every draft depth
    and length (depth.speculations, which checks every token against the plain generate's): per depth
    the acceptance rate at 4 drafts a round, and the fastest length's tokens/s over the plain cached
    generate's, measured in the same call."""
    prompts = task.validation[0][:8, :PROMPT]
    plain = generation_tokens_per_second(model, prompts, settings.new_tokens, settings.repeats)
    found = speculations(model, prompts, settings.new_tokens, settings.repeats, settings.draft_lengths)
    values = {}
    for k in range(1, model.depth):
        at_depth = [s for s in found if s.draft_depth == k]
        fastest = max(at_depth, key=lambda s: s.tokens_per_second)
        values[f"draft {k} accepted %"] = 100 * next(s.acceptance_rate for s in at_depth if s.draft_tokens == 4)
        values[f"draft {k} speedup"] = fastest.tokens_per_second / plain
        values[f"draft {k} length"] = fastest.draft_tokens
    return values


def steps_to_target(curve: list, target: float, steps: int) -> int:
    """The first evaluated step whose validation loss reached the target (one past the budget if none did)."""
    return next((step for step, loss in curve if loss <= target), steps + 1)


def plateau_exit(curve: list, task: Task, steps: int) -> int:
    """The first evaluated step whose validation loss is 10% below the unigram loss (one past the budget
    if it never left)."""
    return steps_to_target(curve, PLATEAU * task.unigram_loss, steps)


def generation_row(result: dict, depth: int) -> dict:
    """Tokens/s of the full and the truncated model, the ratio against L/k, and the per-token time that
    no truncation removes (the depth-0 model's)."""
    k, speeds = max(result["depth"], 1), result["speeds"]
    full, truncated = speeds[depth], speeds[result["depth"]]
    return {"tokens/s full": full, "tokens/s truncated": truncated, "speedup": truncated / full,
            "L/k": depth / k, "speedup / (L/k)": truncated / full / (depth / k),
            "overhead us/token": 1e6 / speeds[0], "full us/token": 1e6 / full}


def run_one(settings: LanguageSettings, task_name: str, row: str, seed: int, save_dir: str | None = None,
            steps: int | None = None) -> dict:
    """One row trained (for `steps`, the settings' by default) and evaluated: {metric: value}; its
    state_dict saved in save_dir, if given, as <task>-<row>-seed<seed>.pt."""
    task = task_of(settings, task_name)
    model, curve = trained(settings, task_name, row, seed, steps)
    if save_dir is not None:
        torch.save(model.state_dict(), os.path.join(save_dir, f"{task_name}-{row}-seed{seed}.pt"))
    with deterministic():
        result = evaluate(model, task, settings)
    steps = steps or settings.steps[task.name]
    values = {"best loss": min(result["losses"]), "full-depth loss": result["losses"][-1],
              "eff. depth": result["depth"], "eff./L": result["depth"] / settings.depth,
              "steps to target": steps_to_target(curve, TARGET_LOSS[task.name], steps),
              "plateau exit": plateau_exit(curve, task, steps), "accuracy %": result["accuracies"][-1]}
    if result["exact"] is not None:
        values["exact match %"] = result["exact"][-1]
        values.update({f"depth {k} exact %": exact for k, exact in enumerate(result["exact"])})
    values.update({f"depth {k} loss": loss for k, loss in enumerate(result["losses"])})
    if ROWS[row].gpt["connectivity"] != "residual":
        values.update(generation_row(result, settings.depth))
    values.update({f"loss at step {step}": loss for step, loss in curve})
    with deterministic():
        values.update(speculative_values(model, task, settings))
    if 1 <= result["depth"] < settings.depth:
        values["speedup at eff. depth"] = values[f"draft {result['depth']} speedup"]
    return values
