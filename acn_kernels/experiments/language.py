"""The language-model table of `python -m acn_kernels paper`: AC-GPT and its twins on offline data.

For each data set (the byte-level grammar corpus, n-digit addition with the answer reversed; text.py)
and each twin (acn; the authors' H-ACN hybrid; the package's own hybrid; residual), a GPT trained
with one recipe for every twin, then on held-out data:
- the next-token loss and accuracy at every depth (`probe`: the logits after 0..L blocks); for
  addition the targets are the answer's tokens, and the exact match of the whole answer is scored too;
- the effective depth: the smallest depth within 1% of the best loss (`compress`, metric="loss");
- the training steps until the validation loss first reaches a target, and the step at which it
  first leaves the unigram plateau (10% below the loss of the training targets' unigram
  distribution: what a model that ignores the context reaches, where an ACN can sit for long);
- greedy generation tokens/s (KV cache on) of the model truncated to its effective depth k against the
  full one: the target is at least 0.5 x L/k, and the depth-0 model's own time per token (embedding,
  final norm, head, sampling and the Python loop: what no truncation removes) says what keeps it from L/k.

The recipe, by default the authors' (ACN-NOTES section 2b, read from their language_modeling/
configs): AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.01 on the linear weights only, OneCycle
(5% warmup from lr/100, cosine down to lr/10), gradient clipping at 1.0, no biases, the scaled output
projections, rotary positions; their H-ACN's gates start at 0 (alpha 1), one per block, clamped to
[0, 1] after every step. What differs from theirs: float32 (they train bf16 on GPUs), no dropout (the
package's GPT has none), and the scale. `recipe="package"` (`paper --lm-recipe package`) is the one
this table used before: lr 3e-3, betas (0.9, 0.999), weight decay 0.1 on every parameter, warmup
then cosine to 0, no clipping, biases, learned positions.

Table 6c trains the rows of METHODS (training.py's methods on the twins) the same way, at the same
steps, at the same training time (each row's time per step measured with the rows' steps interleaved
in one process; a row within TIME_TOLERANCE of the acn's keeps its steps) and LONGER x the steps for
acn, residual and the two best ACN rows; the equal-time budgets follow the measured times, so they are
the one part of a rerun that can differ.

Each run is deterministic on a machine: its seed fixes the initialization and the batches, and it runs
on one thread with torch.use_deterministic_algorithms, so two runs of the same command give the same
table. Across machines the float rounding of the CPU's kernels (their vector width, the BLAS build)
can differ, and an ACN on a plateau amplifies it: the step at which it leaves may move.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import multiprocessing
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..depth import DRAFT_LENGTHS, IGNORE_INDEX, compress, depth_scores, generation_tokens_per_second, speculations
from ..models import GPT
from ..training import GateAnnealing, LayerDropout, as_acn, early_exit_loss
from . import text
from .report import per_seed, plot_lines, print_table, verdict, write_csv

TWINS = {  # row -> the GPT's connectivity options
    "acn": dict(connectivity="acn"),
    "hybrid": dict(connectivity="hybrid", gate_scope="block", gate_init=0.0, clamp_range=(0.0, 1.0)),  # the H-ACN
    "hybrid-unit": dict(connectivity="hybrid"),  # the package's: a gate per branch boundary, at 0.5, unclamped
    "residual": dict(connectivity="residual"),
    # the authors' LSN as their OWT2 scripts run it: Long_Short, alphas 0.8 trainable, --skipattn
    "lsn": dict(connectivity="hybrid", gate_scope="block", long_weights=True, x0_weight=True,
                gates_from_long_weights=True, long_weight_init=0.8, skip_attention=True),
    # a hybrid whose gates GateAnnealing sets (1: the pre-norm residual GPT, to 0: the ACN, then as_acn)
    "annealed": dict(connectivity="hybrid", gate_scope="block", learn_gates=False, gate_init=1.0),
}


@dataclass(frozen=True)
class Method:
    """How a row of table 6c trains: its GPT (a twin of TWINS) and what its steps add to the recipe."""
    twin: str
    anneal: float | None = None         # GateAnnealing over this fraction of the steps, then as_acn
    exit_loss: dict | None = None       # early_exit_loss's options, the loss in place of the plain one
    layer_dropout: float | None = None  # LayerDropout's p_max (LayerSkip's 0.1)
    layer_dropout_per: str = "sample"   # LayerSkip's; "batch" for the long connections


ANNEAL_FRACTION, ANNEAL_SHAPE = 0.3, "cosine"
METHODS = {  # the rows of table 6c
    "acn": Method("acn"),
    "residual": Method("residual"),
    "lsn": Method("lsn"),
    "anneal": Method("annealed", anneal=ANNEAL_FRACTION),
    "acn+ee": Method("acn", exit_loss=dict(weights="authors")),
    "anneal+ee": Method("annealed", anneal=ANNEAL_FRACTION, exit_loss=dict(weights="authors")),
    "residual+layerskip": Method("residual", exit_loss=dict(weights="uniform", curriculum="rotational"),
                                 layer_dropout=0.1),
    "residual+ee": Method("residual", exit_loss=dict(weights="uniform")),
    "lsn+ee": Method("lsn", exit_loss=dict(weights="authors")),  # found here: the LSN's depth and shallow exits
    "anneal+layerskip": Method("annealed", anneal=ANNEAL_FRACTION,  # LayerSkip's recipe on the annealed ACN
                               exit_loss=dict(weights="uniform", curriculum="rotational"), layer_dropout=0.1,
                               layer_dropout_per="batch"),
}
TABLE6_ROWS = ("acn", "hybrid", "hybrid-unit", "residual")  # the twins as the recipe trains them
ROWS = {**{twin: Method(twin) for twin in TABLE6_ROWS}, **METHODS}
LONGER = 3  # the longer run: this many times the steps, for acn, the residual twins and the two best rows
PROMPT = 8  # tokens of each held-out sequence that the generation timing starts from
# validation loss (nats per target token) the steps-to-target column waits for
TARGET_LOSS = {"corpus": 2.5, "addition": 0.5}
PLATEAU = 0.9  # leaving the unigram plateau: a validation loss 10% below the unigram loss
THREADS = 1  # per run: the same reductions, in the same order, on every run


@dataclass(frozen=True)
class Recipe:
    name: str
    lr: float
    betas: tuple
    weight_decay: float
    decay_linear_only: bool   # weight decay on nn.Linear weights alone (not norms, embeddings, gates)
    one_cycle: bool           # OneCycle from lr/100 to lr/10; else warmup then cosine to 0
    clip: float | None        # gradient-norm clipping
    model: dict = field(default_factory=dict)  # GPT options


RECIPES = {
    "authors": Recipe("authors", 1e-3, (0.9, 0.95), 0.01, True, True, 1.0,
                      dict(bias=False, scaled_output_init=True, positions="rotary")),
    "package": Recipe("package", 3e-3, (0.9, 0.999), 0.1, False, False, None, dict(positions="learned")),
}
RECIPE_NAMES = {"authors": "the authors' recipe", "package": "the package's earlier recipe"}
WARMUP_FRACTION = 0.05


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
    recipe: str = "authors"
    backend: str = "auto"  # the GPTs' (auto: the fused kernels on a GPU, the reference on a CPU)
    draft_lengths: tuple = DRAFT_LENGTHS  # self-speculative decoding's drafts a round (table 6b: the fastest)
    repeats: int = 3      # timed runs of each generation (the median counts)


# Sized for this project's 2-core CPU machine: 2-digit addition needs about 1000 steps of 32 before its
# answers come right, the corpus a few hundred before a model gets past the unigram level.
FULL = LanguageSettings(seeds=4, depth=8, dim=64, heads=4, steps={"corpus": 600, "addition": 1500}, batch=32,
                        context=64, digits=2, eval_every=50, new_tokens=32)
# --quick proves every path runs: one draft length (table 6b's 4 drafts a round), each timing run once.
QUICK = LanguageSettings(seeds=1, depth=4, dim=64, heads=4, steps={"corpus": 40, "addition": 40}, batch=16,
                         context=32, digits=2, eval_every=10, new_tokens=8, draft_lengths=(4,), repeats=1)


@dataclass
class Task:
    """A data set as the trainer sees it: batches of (inputs, targets), and the held-out ones."""
    name: str
    max_len: int
    batches: object                 # generator -> (inputs, targets)
    validation: tuple               # (inputs, targets)
    answers: torch.Tensor | None    # addition: the answer mask of the validation targets
    unigram_loss: float = 0.0       # the validation loss of the training targets' unigram distribution


def unigram_loss(train_targets: torch.Tensor, validation_targets: torch.Tensor) -> float:
    """Cross-entropy of the held-out targets under the training targets' token frequencies (add-one
    smoothed): the loss of a model that ignores its context."""
    counts = torch.bincount(train_targets[train_targets != IGNORE_INDEX].flatten(), minlength=text.VOCAB) + 1.0
    log_p = (counts / counts.sum()).log()
    held_out = validation_targets[validation_targets != IGNORE_INDEX]
    return -log_p[held_out].mean().item()


def corpus_task(settings: LanguageSettings) -> Task:
    split = text.load_corpus()
    held_out = text.windows(split.validation, settings.context, 128, torch.Generator().manual_seed(12345))

    def batches(generator):
        rows = text.windows(split.train, settings.context, settings.batch, generator)
        return rows[:, :-1], rows[:, 1:]
    # max_len: the whole window (context inputs and the last target), as compress takes it (as_labels)
    return Task("corpus", settings.context + 1, batches, (held_out[:, :-1], held_out[:, 1:]), None,
                unigram_loss(split.train, held_out[:, 1:]))


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
    validation = answer_targets(held_out)
    return Task("addition", length, batches, validation, held_out.answer, unigram_loss(targets, validation[1]))


def build(settings: LanguageSettings, row: str, task: Task) -> GPT:
    """The GPT of a row (ROWS) as the recipe builds it, with positions for the generation timing's prompt
    and new tokens too."""
    max_len = max(task.max_len, PROMPT + settings.new_tokens)
    return GPT(text.VOCAB, max_len, settings.dim, settings.depth, settings.heads, backend=settings.backend,
               **RECIPES[settings.recipe].model, **TWINS[ROWS[row].twin])


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

    def __init__(self, model: GPT, settings: LanguageSettings, method: Method, steps: int):
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


def train(model: GPT, task: Task, settings: LanguageSettings, seed: int, method: Method, steps: int) -> list:
    """The row's training (Trainer) for `steps` steps; returns [(step, validation loss)] every eval_every
    steps, the model left as its method leaves it (an annealed one an ACN)."""
    trainer, generator, curve = Trainer(model, settings, method, steps), torch.Generator().manual_seed(seed), []
    for step in range(1, steps + 1):
        trainer.step(*task.batches(generator), step)
        if step % settings.eval_every == 0 or step == steps:
            curve.append((step, validation_loss(model, task.validation)))
    trainer.finish()
    return curve


def exact_match(model: GPT, task: Task) -> list:
    """Percent of held-out additions whose whole answer every depth gets right (teacher-forced: the
    same as greedy decoding writing the answer)."""
    inputs, targets = task.validation
    with torch.no_grad():
        right = (model.probe(inputs).argmax(-1) == targets) | ~task.answers
    return (100.0 * right.all(-1).double().mean(-1)).tolist()


def as_labels(inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(input ids, labels) in Hugging Face's convention, which compress and depth_scores take, for
    next-token (inputs, targets): one more position (the last target; any token where it is ignored),
    the targets as the labels one position later."""
    last = targets[:, -1:].clamp(min=0)
    return torch.cat([inputs, last], 1), torch.cat([torch.full_like(last, IGNORE_INDEX), targets], 1)


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


TASKS: dict = {}  # (settings, name) -> Task: each data set built once per process


def task_of(settings: LanguageSettings, name: str) -> Task:
    key = (repr(settings), name)
    if key not in TASKS:
        TASKS[key] = {"corpus": corpus_task, "addition": addition_task}[name](settings)
    return TASKS[key]


def trained(settings: LanguageSettings, task_name: str, row: str, seed: int, steps: int | None = None) -> tuple:
    """(model, validation curve) of one row (ROWS), trained deterministically (see the module
    docstring) for `steps` steps (the settings' by default)."""
    task = task_of(settings, task_name)
    with deterministic():
        torch.manual_seed(seed)
        model = build(settings, row, task)
        return model, train(model, task, settings, seed, ROWS[row], steps or settings.steps[task_name])


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
    if ROWS[row].twin != "residual":
        values.update(generation_row(result, settings.depth))
    values.update({f"loss at step {step}": loss for step, loss in curve})
    with deterministic():
        values.update(speculative_values(model, task, settings))
    if 1 <= result["depth"] < settings.depth:
        values["speedup at eff. depth"] = values[f"draft {result['depth']} speedup"]
    return values


def run_jobs(settings: LanguageSettings, jobs: list, workers: int, tqdm, save_dir: str | None = None) -> list:
    """run_one of every (task, seed, row, steps), in order (steps None: the settings'; only those runs
    are saved in save_dir); with workers > 1 in that many processes (each run is one thread, so the
    results do not change; the timing columns see the other runs)."""
    def arguments(task_name, seed, row, steps):
        return settings, task_name, row, seed, save_dir if steps is None else None, steps
    if workers == 1:
        results = []
        with tqdm(jobs, desc="language models", unit="run") as progress:
            for job in progress:
                progress.set_postfix_str(f"{job[0]} {job[2]} seed {job[1]}" + (f" {job[3]} steps" if job[3] else ""))
                results.append(run_one(*arguments(*job)))
        return results
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads inherited mid-flight
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run_one, *arguments(*job)) for job in jobs]
        for _ in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="language models",
                      unit="run"):
            pass
        return [future.result() for future in futures]


TIMING_ROUNDS = 12  # interleaved steps of every row; the first two of each are warmup


def step_times(settings: LanguageSettings, task_name: str, rows: tuple) -> dict:
    """{row: seconds per training step}, the rows' steps interleaved in this process (one thread, as
    the runs train) so that a shared machine slows them alike: the median of TIMING_ROUNDS - 2."""
    task = task_of(settings, task_name)
    inputs, targets = task.batches(torch.Generator().manual_seed(0))
    seconds = defaultdict(list)
    with deterministic():
        trainers = {}
        for row in rows:
            torch.manual_seed(0)
            trainers[row] = Trainer(build(settings, row, task), settings, ROWS[row], settings.steps[task_name])
        for round_ in range(TIMING_ROUNDS):
            for row, trainer in trainers.items():
                began = time.perf_counter()
                trainer.step(inputs, targets, round_ + 1)
                seconds[row].append(time.perf_counter() - began)
    return {row: statistics.median(times[2:]) for row, times in seconds.items()}


TIME_TOLERANCE = 0.03  # rows within 3% of the acn's time per step (about the timing's noise) keep its steps


def equal_time_steps(settings: LanguageSettings, times: dict) -> dict:
    """{(task, row): steps} of the same training time as the acn's settings.steps: fewer for a row
    that costs more a step (none listed where they are the same steps, within TIME_TOLERANCE)."""
    budget = {}
    for (task_name, row), seconds in times.items():
        ratio = times[(task_name, "acn")] / seconds
        if abs(ratio - 1) > TIME_TOLERANCE:
            budget[(task_name, row)] = round(settings.steps[task_name] * ratio)
    return budget


def run_language(settings: LanguageSettings, out: str, tqdm, workers: int = 1, save_dir: str | None = None) -> None:
    """Trains every row on both data sets and prints table 6 (the twins), 6b (speculative decoding) and
    6c (training an ACN fast: the methods at the same steps, at the same training time, and LONGER x the
    steps for acn, residual, the residual with a loss at every depth (the baseline for shallow readouts) and
    the two best methods), their targets and verdicts."""
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
    tasks, seeds = ("corpus", "addition"), range(settings.seeds)
    rows, records = defaultdict(lambda: defaultdict(list)), []

    def run(jobs: list, suffix) -> None:
        for (task_name, seed, row, steps), result in zip(jobs, run_jobs(settings, jobs, workers, tqdm, save_dir)):
            key = f"{task_name} gpt {row}{suffix(task_name, row)}"
            for metric, value in result.items():
                rows[key][metric].append(value)
                records.append(dict(dataset=task_name, model="gpt", twin=key.split(" gpt ")[1], seed=seed,
                                    metric=metric, value=value))
    run([(t, seed, row, None) for t in tasks for seed in seeds for row in ROWS], lambda *_: "")
    times = {(t, row): seconds for t in tasks for row, seconds in step_times(settings, t, tuple(METHODS)).items()}
    for (task_name, row), seconds in times.items():
        rows[f"{task_name} gpt {row}"]["ms/step"] = [1e3 * seconds] * settings.seeds
    budget = equal_time_steps(settings, times)
    run([(t, seed, row, budget[(t, row)]) for (t, row) in budget for seed in seeds], lambda *_: " @time")
    longer = [(t, row) for t in tasks for row in ("acn", "residual", "residual+ee", *best_methods(rows, t, budget))]
    run([(t, seed, row, LONGER * settings.steps[t]) for t, row in longer for seed in seeds],
        lambda *_: f" x{LONGER}")
    print_language_tables(settings, {k: v for k, v in rows.items() if k.split(" gpt ")[1] in TABLE6_ROWS})
    print_training_tables(settings, rows, budget)
    write_csv(f"{out}/language.csv", records)
    plot_lines(f"{out}/language.png", {k: v for k, v in rows.items() if k.split(" gpt ")[1] in TABLE6_ROWS},
               lambda values: [(k, statistics.fmean(values[f"depth {k} loss"])) for k in range(settings.depth + 1)],
               "depth k (blocks used)", "held-out loss (nats)")


ACN_AT_INFERENCE = ("lsn", "anneal", "acn+ee", "anneal+ee", "lsn+ee", "anneal+layerskip")  # ACNs at inference, or LSNs


def best_methods(rows: dict, task_name: str, budget: dict) -> list:
    """The two ACN methods with the lowest full-depth loss at the same training time on a data set."""
    def loss(row):
        key = f"{task_name} gpt {row}" + (" @time" if (task_name, row) in budget else "")
        return statistics.fmean(rows[key]["full-depth loss"])
    return sorted(ACN_AT_INFERENCE, key=loss)[:2]


def subset(rows: dict, columns: list) -> dict:
    """The rows that have all of `columns`."""
    return {key: values for key, values in rows.items() if all(c in values for c in columns)}


def print_language_tables(settings: LanguageSettings, rows: dict) -> None:
    recipe = RECIPES[settings.recipe]
    targets = ", ".join(f"{name} {loss:g}" for name, loss in TARGET_LOSS.items())
    steps = ", ".join(f"{name} {count}" for name, count in settings.steps.items())
    print_table(f"6. Language models: GPT, {settings.depth} blocks of dim {settings.dim}, steps of {settings.batch} "
                f"({steps}), {RECIPE_NAMES[recipe.name]} for every twin (hybrid: the authors' H-ACN, hybrid-unit: the "
                f"package's); held-out next-token loss (nats; addition: the answer's tokens), effective depth "
                f"(within 1% of the best loss), steps to a validation loss of {targets}, the step at which the loss "
                f"left the unigram plateau, mean ± std over {settings.seeds} seeds",
                ["best loss", "full-depth loss", "eff. depth", "steps to target", "plateau exit", "accuracy %",
                 "exact match %"], rows, digits=2)
    print_table("    the loss at every depth (the logits after k blocks, both branches of each added)",
                [f"depth {k} loss" for k in range(settings.depth + 1)], rows, digits=2)
    exact = [f"depth {k} exact %" for k in range(settings.depth + 1)]
    print_table("    addition: the exact match of the whole answer at every depth (%)", exact, subset(rows, exact))
    print_plateau_exits(rows)
    generation = subset(rows, list(GENERATION_COLUMNS))
    print_table("    greedy generation (KV cache on, 8 prompts, CPU) of the model truncated to its effective depth k "
                "against the full one; us/token: per generated token of the 8; overhead: the depth-0 model's",
                list(GENERATION_COLUMNS), generation, digits=2)
    ratios = [statistics.fmean(values["speedup / (L/k)"]) for values in generation.values()]
    print(f"target: the truncated model generates >= 0.5 x L/k times the full one's tokens/s: worst "
          f"{min(ratios):.2f} x L/k ({'met' if min(ratios) >= 0.5 else 'not met'}); what keeps it from L/k is the "
          "per-token time that no block count changes (the overhead column)")
    print(verdict(per_seed(rows, " residual", ["eff./L"]), per_seed(rows, " acn", ["eff./L"]), True,
                  "Auto-compression in language models (the authors' AC-GPT): the ACN reaches its loss with fewer "
                  "blocks", "effective depth / L, residual against acn:"))
    print_speculative_table(settings, rows)
    for twin in ("acn", "hybrid"):
        print(verdict(per_seed(rows, f" {twin}", ["steps to target"]), per_seed(rows, " residual", ["steps to target"]),
                      True, f"The poster's limitation: the {twin} trains slower than the residual twin",
                      f"steps to the target loss, {twin} against residual:"))
        print(verdict(per_seed(rows, f" {twin}", ["full-depth loss"]), per_seed(rows, " residual", ["full-depth loss"]),
                      True, f"... and ends worse: the {twin}'s held-out loss after the same steps is higher",
                      f"held-out loss at the end, {twin} against residual:"))


def print_speculative_table(settings: LanguageSettings, rows: dict) -> None:
    """Table 6b: self-speculative decoding at every draft depth, its verdict and its target."""
    depths = range(1, settings.depth)
    print_table("6b. Self-speculative decoding (greedy, KV caches, 8 prompts, CPU): the first k blocks draft, the "
                "full model verifies; tokens identical to the plain cached generate's on every row (checked). "
                "Acceptance rate (%) at 4 drafts a round, per draft depth k",
                [f"draft {k} accepted %" for k in depths], rows)
    lengths = " and ".join(", ".join(map(str, settings.draft_lengths)).rsplit(", ", 1))
    print_table(f"    tokens/s over the plain cached generate's, the fastest of {lengths} drafts a round, per draft "
                "depth k (measured in the same call)", [f"draft {k} speedup" for k in depths], rows, digits=2)
    accepted = lambda suffix: per_seed(rows, suffix, [f"draft {k} accepted %" for k in depths])  # noqa: E731
    print(verdict(accepted(" acn"), accepted(" residual"), True,
                  "An ACN's own shallow depths draft with a higher acceptance than the residual twin's at the same "
                  "depth (whose intermediate readouts are not trained to be read)",
                  "acceptance rate over the draft depths (%), acn against residual:"))
    at_depth = {key: values for key, values in rows.items() if key.startswith("addition") and key.endswith(" acn")}
    for key, values in at_depth.items():
        speedups = values.get("speedup at eff. depth", [])
        worst = min(speedups) if speedups else float("nan")
        print(f"target: the trained AC-GPT on addition, drafting at its effective depth, generates >= 1.5x the plain "
              f"cached generate's tokens/s: {len(speedups)} of {len(values['eff. depth'])} seeds have an effective "
              f"depth below L, worst {worst:.2f}x ({'met' if speedups and worst >= 1.5 else 'not met'})")


TRAINING_COLUMNS = ["full-depth loss", "loss at L/4", "loss at L/2", "loss at 3L/4", "eff. depth", "steps to target",
                    "plateau exit", "ms/step", "draft L/2 accepted %", "draft L/2 speedup"]


def with_training_columns(settings: LanguageSettings, values: dict) -> dict:
    """The row's values with table 6c's derived columns: the losses at L/4, L/2, 3L/4 and the draft at L/2."""
    depth = settings.depth
    named = {"loss at L/4": f"depth {depth // 4} loss", "loss at L/2": f"depth {depth // 2} loss",
             "loss at 3L/4": f"depth {3 * depth // 4} loss", "draft L/2 accepted %": f"draft {depth // 2} accepted %",
             "draft L/2 speedup": f"draft {depth // 2} speedup"}
    return {**values, **{name: values[source] for name, source in named.items() if source in values}}


def print_training_tables(settings: LanguageSettings, rows: dict, budget: dict) -> None:
    """Table 6c: the training methods at the same steps, at the same training time and LONGER x the
    steps, per data set; then the targets, met or missed by how much."""
    for task_name in ("corpus", "addition"):
        def at(row, suffix=""):
            key = f"{task_name} gpt {row}{suffix}"
            return with_training_columns(settings, rows[key]) if key in rows else None
        same_steps = {row: at(row) for row in METHODS}
        same_time = {row + (" @time" if (task_name, row) in budget else ""): at(row, " @time") or at(row)
                     for row in METHODS}
        for row, values in same_time.items():
            values["steps"] = [budget.get((task_name, row.split(" ")[0]), settings.steps[task_name])] * settings.seeds
        longer = {row: values for row in METHODS if (values := at(row, f" x{LONGER}")) is not None}
        print_table(f"6c. Training an ACN LM fast, {task_name}: the methods at the same {settings.steps[task_name]} "
                    f"steps (held-out loss at full depth and at depths L/4, L/2, 3L/4; ms/step measured with the "
                    f"rows' steps interleaved in one process; self-speculative decoding drafting at L/2)",
                    TRAINING_COLUMNS, same_steps, digits=2)
        print_table(f"    the same training time as the acn's {settings.steps[task_name]} steps (a row that costs more "
                    f"a step gets fewer)", TRAINING_COLUMNS + ["steps"], same_time, digits=2)
        print_table(f"    {LONGER}x the steps", TRAINING_COLUMNS, longer, digits=2)
        print_training_targets(settings, task_name, same_time)


def print_training_targets(settings: LanguageSettings, task_name: str, same_time: dict) -> None:
    """The issue's three targets at the same training time, for every pure-ACN-at-inference row."""
    by_row = {label.split(" ")[0]: values for label, values in same_time.items()}
    mean = lambda row, column: statistics.fmean(by_row[row][column])  # noqa: E731
    residual, ee, layerskip = mean("residual", "full-depth loss"), mean("residual+ee", "loss at L/2"), \
        mean("residual+layerskip", "draft L/2 speedup")
    for row in ACN_AT_INFERENCE:
        loss, depth = mean(row, "full-depth loss"), mean(row, "eff. depth")
        excess = loss / residual - 1
        first = excess <= 0.10 and depth <= 0.75 * settings.depth
        half, speedup = mean(row, "loss at L/2"), mean(row, "draft L/2 speedup")
        print(f"target ({task_name}, {row}, same time): full-depth loss within 10% of the residual's with an "
              f"effective depth <= 0.75 L: {loss:.3f} against {residual:.3f} ({excess:+.0%}), depth {depth:.1f} of "
              f"{settings.depth}: {'met' if first else 'not met'}; loss at L/2 <= the residual + every-depth "
              f"loss's: {half:.3f} against {ee:.3f}: {'met' if half <= ee else f'not met by {half - ee:.3f}'}; "
              f"speculative at L/2 >= 1.5x and ahead of residual + LayerSkip's {layerskip:.2f}x: {speedup:.2f}x: "
              f"{'met' if speedup >= 1.5 and speedup > layerskip else 'not met'}")


class ModelsDirError(ValueError):
    """A --lm-models folder without the model asked for, or with one of other settings."""


def loaded_or_trained(settings: LanguageSettings, task_name: str, twin: str, seed: int,
                      models_dir: str | None) -> GPT:
    """The twin that `paper --lm-models DIR` saved (<task>-<twin>-seed<n>.pt), or, without a DIR, one
    trained here as table 6 trains it."""
    if models_dir is None:
        return trained(settings, task_name, twin, seed)[0]
    path = saved_model_path(models_dir, task_name, twin, seed)
    model = build(settings, twin, task_of(settings, task_name))
    try:
        model.load_state_dict(torch.load(path, map_location="cpu"))
    except RuntimeError as error:
        raise ModelsDirError(f"--lm-models: {path} holds a model of other settings than these ({settings.depth} blocks "
                         f"of dim {settings.dim}; paper --quick saves the --quick ones): {error}") from None
    return model


def saved_model_path(models_dir: str, task_name: str, twin: str, seed: int) -> str:
    path = os.path.join(models_dir, f"{task_name}-{twin}-seed{seed}.pt")
    if not os.path.exists(path):
        raise ModelsDirError(f"--lm-models: {path} is missing (paper --lm-models {models_dir} saves it)")
    return path


def print_plateau_exits(rows: dict) -> None:
    """The step at which each seed's loss left the unigram plateau (one past the budget: never)."""
    print("\n    the step at which the validation loss left the unigram plateau (10% below the unigram loss), per seed")
    for key, values in rows.items():
        print(f"{key:<28}  " + "  ".join(f"{int(step):>5}" for step in values["plateau exit"]))


GENERATION_COLUMNS = ("tokens/s full", "tokens/s truncated", "speedup", "L/k", "speedup / (L/k)", "overhead us/token",
                      "full us/token")
