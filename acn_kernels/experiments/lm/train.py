"""Training a row of the language tables: the recipe's AdamW, schedule and clipping, and the row's
method (gate annealing, the early-exit loss in place of the plain one, layer dropout), on one thread
with deterministic algorithms, so that a run's seed fixes its numbers."""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...depth import IGNORE_INDEX
from ...models import GPT
from ...training import GateAnnealing, LayerDropout, as_acn, early_exit_loss
from .. import text
from .rows import ANNEAL_SHAPE, PROMPT, RECIPES, ROWS, WARMUP_FRACTION, LanguageSettings, Recipe, Row
from .tasks import Task, as_labels, task_of

THREADS = 1  # per run: the same reductions, in the same order, on every run


def build(settings: LanguageSettings, row: str, task: Task) -> GPT:
    """The GPT of a row (ROWS) as the recipe builds it, with positions for the generation timing's prompt
    and new tokens too."""
    max_len = max(task.max_len, PROMPT + settings.new_tokens)
    return GPT(text.VOCAB, max_len, settings.dim, settings.depth, settings.heads, backend=settings.backend,
               **RECIPES[settings.recipe].model, **ROWS[row].gpt)


def validation_loss(model: GPT, validation: tuple) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(validation[0])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), validation[1].flatten(), ignore_index=IGNORE_INDEX)
    model.train()
    return loss.item()


def parameter_groups(model: nn.Module, recipe: Recipe) -> list:
    """AdamW's groups: with decay_linear_only, weight decay on the nn.Linear weights alone (the LM head
    tied to the token embedding counts as the embedding, as in the authors' code); else on everything."""
    if not recipe.decay_linear_only:
        return [{"params": list(model.parameters())}]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    decayed = [p for p in model.parameters() if id(p) in linear]
    return [{"params": decayed}, {"params": [p for p in model.parameters() if id(p) not in linear],
                                  "weight_decay": 0.0}]


def schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, steps: int):
    if recipe.one_cycle:  # warmup from lr/100 (div_factor), then cosine down to lr/10 (lr/100 / final_div_factor)
        # at least 2 warmup steps: OneCycleLR divides by (warmup steps - 1), which a 20-step budget makes 0
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps,
                                                   pct_start=max(WARMUP_FRACTION, 2 / steps), anneal_strategy="cos",
                                                   cycle_momentum=False, div_factor=100.0, final_div_factor=0.1)
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / steps))))


@contextlib.contextmanager
def deterministic(threads: int = THREADS):
    """One run's numerics fixed: `threads` threads and torch's deterministic algorithms, restored after."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


class Trainer:
    """One row's training: the recipe's AdamW, schedule and clipping (the hybrid's gates clamped after
    each step where it has a clamp range), and the row's method: gate annealing, the early-exit loss in
    place of the plain one, layer dropout. `step` runs one step; `finish` makes an annealed model the
    ACN it has become (as_acn)."""

    def __init__(self, model: GPT, settings: LanguageSettings, method: Row, steps: int):
        recipe = RECIPES[settings.recipe]
        self.model, self.method, self.steps, self.clip = model, method, steps, recipe.clip
        self.optimizer = torch.optim.AdamW(parameter_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                                           weight_decay=recipe.weight_decay)
        self.schedules = [schedule(self.optimizer, recipe, steps)]
        if model.connectivity == "hybrid":
            model.clamp_after(self.optimizer)
        if method.anneal is not None:
            self.schedules.append(GateAnnealing(model, steps, fraction=method.anneal, shape=ANNEAL_SHAPE))
        if method.layer_dropout is not None:
            self.schedules.append(LayerDropout(model, steps, p_max=method.layer_dropout, per=method.layer_dropout_per))
        model.train()

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> torch.Tensor:
        if self.method.exit_loss is None:
            return F.cross_entropy(self.model(inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        options = dict(self.method.exit_loss)
        if "curriculum" in options:
            options.update(step=step, total_steps=self.steps)
        return early_exit_loss(self.model, *as_labels(inputs, targets), **options)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        loss = self.loss(inputs, targets, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        for scheduled in self.schedules:
            scheduled.step()

    def finish(self) -> GPT:
        if self.method.anneal is not None:
            as_acn(self.model)
        self.model.set_layer_dropout(None)
        return self.model


def train(model: GPT, task: Task, settings: LanguageSettings, seed: int, method: Row, steps: int) -> list:
    """The row's training (Trainer) for `steps` steps; returns [(step, validation loss)] every eval_every
    steps, the model left as its method leaves it (an annealed one an ACN)."""
    trainer, generator, curve = Trainer(model, settings, method, steps), torch.Generator().manual_seed(seed), []
    for step in range(1, steps + 1):
        trainer.step(*task.batches(generator), step)
        if step % settings.eval_every == 0 or step == steps:
            curve.append((step, validation_loss(model, task.validation)))
    trainer.finish()
    return curve


def trained(settings: LanguageSettings, task_name: str, row: str, seed: int, steps: int | None = None) -> tuple:
    """(model, validation curve) of one row (ROWS), trained deterministically (see the module
    docstring) for `steps` steps (the settings' by default)."""
    task = task_of(settings, task_name)
    with deterministic():
        torch.manual_seed(seed)
        model = build(settings, row, task)
        return model, train(model, task, settings, seed, ROWS[row], steps or settings.steps[task_name])


class ModelsDirError(ValueError):
    """A --lm-models folder without the model asked for, or with one of other settings."""


def loaded_or_trained(settings: LanguageSettings, task_name: str, row: str, seed: int,
                      models_dir: str | None) -> GPT:
    """The row's model that `paper --lm-models DIR` saved (<task>-<row>-seed<n>.pt), or, without a DIR, one
    trained here as table 6 trains it."""
    if models_dir is None:
        return trained(settings, task_name, row, seed)[0]
    path = saved_model_path(models_dir, task_name, row, seed)
    model = build(settings, row, task_of(settings, task_name))
    try:
        model.load_state_dict(torch.load(path, map_location="cpu"))
    except RuntimeError as error:
        raise ModelsDirError(f"--lm-models: {path} holds a model of other settings than these ({settings.depth} blocks "
                         f"of dim {settings.dim}; paper --quick saves the --quick ones): {error}") from None
    return model


def saved_model_path(models_dir: str, task_name: str, row: str, seed: int) -> str:
    path = os.path.join(models_dir, f"{task_name}-{row}-seed{seed}.pt")
    if not os.path.exists(path):
        raise ModelsDirError(f"--lm-models: {path} is missing (paper --lm-models {models_dir} saves it)")
    return path
