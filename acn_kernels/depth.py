"""Using only the depth an ACN uses, for anything with `probe` (logits of every depth,
(L+1, batch, classes)): the package's models and `acnify`'d ones.

- `compress` turns "the first k blocks are enough" into a smaller, faster model (`truncate(k)`).
- `ShrinkOnCompression` does it while training: once the probes agree on a depth for a while, the
  model runs only that many blocks (plus a margin) for the rest of the training.
- `early_exit_sweep` scores `model.early_exit` (per-sample exit at inference) over thresholds.
"""
from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_choice, check_positive_int, check_real
from .long_connections import IGNORE_INDEX, LongConnections, depth_of, fsdp_forward, long_connections_of
from .long_connections import check_labels as check_lm_labels
from .reference import ExitStatistics
from .speculative import speculative_generate, synchronize

log = logging.getLogger(__name__)


METRICS = ("accuracy", "loss", "squared_error")  # the last for regression targets (ShrinkOnCompression's)


@dataclass
class Compression:
    """What `compress` measured and the model it kept."""
    scores: list              # depth 0..L on the held-out data given: accuracy (%) or mean cross-entropy
    depth: int                # the smallest depth within `tolerance` of the best
    tolerance: float          # points of accuracy, or percent of the best loss
    model: nn.Module          # the truncated model (shares its parameters with the full one)
    parameters: tuple         # (full, truncated)
    latency_ms: tuple         # (full, truncated): median of repeated forwards of one batch, model's device
    metric: str = "accuracy"
    tokens_per_second: tuple | None = None  # (full, truncated): greedy generation with the KV cache
    speculation: "Speculation | None" = None  # the fastest self-speculative decoding of the full model
    statistics: ExitStatistics | None = None  # metric "loss" on a causal LM: every depth's, from depth_scores

    @property
    def speedup(self) -> float:
        return self.latency_ms[0] / self.latency_ms[1]

    def __str__(self) -> str:
        score = (f"{self.scores[self.depth]:.1f}% (best {max(self.scores):.1f}%, tolerance {self.tolerance:g} pt)"
                 if self.metric == "accuracy" else
                 f"loss {self.scores[self.depth]:.4f} (best {min(self.scores):.4f}, tolerance {self.tolerance:g}%)")
        if self.statistics is not None:
            score += (f", its argmax the full depth's on {100 * self.statistics.agreement[self.depth]:.1f}% of "
                      f"tokens")
        if self.depth == len(self.scores) - 1:  # the model itself: a second timing of it is only noise
            text = (f"depth {self.depth} of {self.depth}: {score}; unchanged (the model's own depth): parameters "
                    f"{self.parameters[0]:,}, latency {self.latency_ms[0]:.3f} ms")
            if self.tokens_per_second is not None:
                text += f", generation {self.tokens_per_second[0]:,.0f} tokens/s"
        else:
            text = (f"depth {self.depth} of {len(self.scores) - 1}: {score}; parameters {self.parameters[0]:,} -> "
                    f"{self.parameters[1]:,}; latency {self.latency_ms[0]:.3f} -> {self.latency_ms[1]:.3f} ms "
                    f"({self.speedup:.2f}x)")
            if self.tokens_per_second is not None:
                full, truncated = self.tokens_per_second
                text += f"; generation {full:,.0f} -> {truncated:,.0f} tokens/s ({truncated / full:.2f}x)"
        if self.speculation is not None:  # measured with the generation speeds
            plain = self.tokens_per_second[0]
            text += f"; lossless: {self.speculation} ({self.speculation.tokens_per_second / plain:.2f}x)"
        return text


@dataclass
class Speculation:
    """Self-speculative decoding at one draft depth and length: greedy tokens/s and acceptance rate."""
    draft_depth: int
    draft_tokens: int
    tokens_per_second: float
    acceptance_rate: float

    def __str__(self) -> str:
        return (f"speculative decoding, draft depth {self.draft_depth}, {self.draft_tokens} drafts a round: "
                f"{self.tokens_per_second:,.0f} tokens/s, {100 * self.acceptance_rate:.0f}% accepted")


DRAFT_LENGTHS = (2, 4, 8)


def speculations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, repeats: int = 3,
                 lengths: tuple = DRAFT_LENGTHS) -> list:
    """Greedy self-speculative decoding of `model` at every draft depth 1..L-1 and each draft length:
    its tokens/s (median of `repeats` runs) and acceptance rate, checked token for token against the
    plain cached generate."""
    plain = greedy(model, prompts, new_tokens)
    found = []
    for depth in range(1, depth_of(model)):
        for length in lengths:
            runs = [speculative_generate(model, prompts, new_tokens, draft_depth=depth, draft_tokens=length)
                    for _ in range(repeats)]
            if not all(torch.equal(tokens, plain) for tokens, _ in runs):
                raise AssertionError(f"speculative tokens differ from generate's at draft depth {depth}, length "
                                     f"{length}")
            found.append(Speculation(depth, length, statistics.median(s.tokens_per_second for _, s in runs),
                                     runs[0][1].acceptance_rate))
    return found


def batch_of(inputs) -> int:
    """The batch size of a model's inputs: a tensor, or a dict of keyword inputs (a Hugging Face model's
    input_ids, attention_mask, ...) whose tensors all have it first."""
    if isinstance(inputs, Mapping):
        sizes = {name: len(value) for name, value in inputs.items() if isinstance(value, torch.Tensor)}
        if not sizes or len(set(sizes.values())) != 1:
            raise ValueError(f"inputs must be a tensor or a dict of tensors of one batch size, got sizes {sizes}")
        return next(iter(sizes.values()))
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor or a dict of tensors (keyword inputs), got {type(inputs).__name__}")
    return len(inputs)


def batch_rows(inputs, rows: slice):
    """The rows of a tensor, or of each tensor of a dict of keyword inputs."""
    if isinstance(inputs, Mapping):
        return {name: value[rows] if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
    return inputs[rows]


def call_with(fn, inputs):
    """fn(inputs), or fn(**inputs) for keyword inputs."""
    return fn(**inputs) if isinstance(inputs, Mapping) else fn(inputs)


def check_probe_data(inputs, targets: torch.Tensor, names: str = "inputs and targets") -> None:
    batch = batch_of(inputs)
    if batch != len(targets) or len(targets) == 0:
        raise ValueError(f"{names} must be non-empty and of one length, got {batch} and {len(targets)}")


def check_class_targets(targets: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of class indices, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")


def check_targets_in_range(targets: torch.Tensor, classes: int) -> None:
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (valid.min() < 0 or valid.max() >= classes):
        raise ValueError(f"targets must be class indices in [0, {classes}) (the model's outputs) or {IGNORE_INDEX}, "
                         f"got values in [{valid.min().item()}, {valid.max().item()}]")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` predicts the next token at every position (the package's GPT, an acnify'd causal
    LM: the models that draft for themselves), so that its targets are labels, shifted inside."""
    return callable(getattr(model, "speculator", None))


def check_labels(model: nn.Module, inputs, labels: torch.Tensor) -> None:
    """A causal LM's targets are Hugging Face's labels (long_connections.check_labels: the input ids,
    shifted inside; next tokens already shifted are refused). Any other model's targets pass."""
    if is_causal_lm(model):
        ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        check_lm_labels(ids, labels, name="targets", subject="targets of a causal language model")


def hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Where the logits' top class is the target, among the targets that count (not IGNORE_INDEX)."""
    return (logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)


def aligned(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(logits, targets) position for position: a causal LM's logits at t against its labels at t + 1
    (logits (..., batch, positions, vocab), labels (batch, positions)); any other model's as given."""
    if not is_causal_lm(model):
        return logits, targets
    return logits[..., :-1, :], targets[:, 1:]


def depth_scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, metric: str = "accuracy",
                 batch_size: int = 512, statistics: bool = False):
    """Every depth's score (model.probe's outputs, (L+1, batch, ..., classes)) on `targets` (batch, ...):
    the percent right, the mean cross-entropy, or the mean squared error of regression outputs; class
    targets equal to IGNORE_INDEX count in neither. A causal language model's targets are its labels
    (batch, positions), Hugging Face's convention: the input ids, shifted inside (check_labels); its
    losses come from probe(output="loss"), and with statistics=True (scores, ExitStatistics): every
    depth's accuracy, agreement with the full depth's argmax and entropy over the same tokens."""
    check_choice("metric", metric, METRICS)
    check_labels(model, inputs, targets)
    loss_pass = metric == "loss" and is_causal_lm(model)
    if statistics and not loss_pass:
        raise ValueError(f"statistics=True needs metric='loss' on a causal language model, got metric={metric!r} "
                         f"on {type(model).__name__}")
    total, count, stats_total = None, 0, 0
    with torch.no_grad():  # not inference_mode, whose tensors refuse a DTensor's views (tensor parallelism)
        for start in range(0, len(targets), batch_size):
            rows, chunk = batch_rows(inputs, slice(start, start + batch_size)), targets[start:start + batch_size]
            if loss_pass:  # every depth's loss without its logits
                counted = int((chunk[:, 1:] != IGNORE_INDEX).sum())
                losses = call_with(functools.partial(model.probe, labels=chunk, output="loss", statistics=statistics),
                                   rows)
                if statistics:
                    losses, stats = losses
                    stats_total = torch.stack(list(stats), 1).double() * counted + stats_total
                total = losses.double() * counted + (0 if total is None else total)
                count += counted
                continue
            outputs = call_with(model.probe, rows)
            if metric == "squared_error":
                errors = (outputs.double() - chunk.to(outputs.device).double()) ** 2
                total = errors.flatten(1).sum(-1) + (0 if total is None else total)
                count += errors[0].numel()
                continue
            logits, chunk = aligned(model, outputs, chunk.to(outputs.device))
            check_targets_in_range(chunk, logits.shape[-1])
            valid = chunk != IGNORE_INDEX
            if metric == "accuracy":
                per_depth = hits(logits, chunk).flatten(1).sum(-1).double()
            else:
                per_depth = torch.stack([F.cross_entropy(depth_logits.flatten(0, -2).double(), chunk.flatten(),
                                                         ignore_index=IGNORE_INDEX, reduction="sum")
                                         for depth_logits in logits])
            total = per_depth if total is None else total + per_depth
            count += int(valid.sum())
    scores = ((100.0 if metric == "accuracy" else 1.0) * total / max(count, 1)).tolist()
    if not statistics:
        return scores
    return scores, ExitStatistics(*(stats_total / max(count, 1)).t().tolist())


def depth_scores_across_ranks(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                              metric: str = "accuracy") -> list:
    """depth_scores in eval mode, the model probed as one forward of it where FSDP2 shards it; across
    processes (torch.distributed initialized) each rank scores its own data and every rank gets the mean
    over the ranks."""
    was_training = model.training
    model.eval()
    try:
        scores = fsdp_forward(model, depth_scores, model, inputs, targets, metric)
    finally:
        model.train(was_training)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    summed = torch.tensor(scores, dtype=torch.float64)
    torch.distributed.all_reduce(summed)
    return (summed / torch.distributed.get_world_size()).tolist()


def depth_accuracies(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 512) -> list:
    """Percent of `targets` that each depth's logits (model.probe) get right."""
    return depth_scores(model, inputs, targets, "accuracy", batch_size)


def check_tolerance(tolerance) -> None:
    check_real("tolerance", tolerance, "a number >= 0 (points of accuracy, or percent of the best loss)", minimum=0)


def within(score: float, reference: float, tolerance: float, metric: str) -> bool:
    """Whether `score` is no worse than `reference` by more than the tolerance: points of accuracy, or
    percent of the reference for a loss or squared error."""
    if metric == "accuracy":
        return score >= reference - tolerance
    return score <= reference * (1 + tolerance / 100)


def smallest_depth_within(scores: list, tolerance: float, metric: str = "accuracy",
                          reference: float | None = None) -> int:
    """The smallest depth whose score is within `tolerance` of `reference` (by default the best: the
    highest accuracy, the lowest loss)."""
    if reference is None:
        reference = max(scores) if metric == "accuracy" else min(scores)
    return next(k for k, score in enumerate(scores) if within(score, reference, tolerance, metric))


def effective_depth(model: nn.Module, inputs, targets: torch.Tensor, tolerance: float = 1.0,
                    metric: str = "loss") -> int:
    """The smallest depth within `tolerance` of the best (percent of the lowest loss, or points of
    accuracy), from every depth's score alone (depth_scores; a causal LM's losses through
    depth_cross_entropy, its layers run once): compress's depth without its timings. A causal LM's
    targets are its labels (the input ids, shifted inside)."""
    check_tolerance(tolerance)
    check_choice("metric", metric, ("accuracy", "loss"))
    check_probe_data(inputs, targets)
    was_training = model.training
    model.eval()
    try:
        return smallest_depth_within(depth_scores(model, inputs, targets, metric), tolerance, metric)
    finally:
        model.train(was_training)


def latency_ms(model: nn.Module, inputs, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward, in milliseconds (synchronized on a GPU)."""
    return median_ms(lambda: call_with(model, inputs), next(model.parameters()).device, repeats, warmup)


def median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def greedy(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The prompts and `new_tokens` greedy tokens of the model's cached `generate` (the package's GPT,
    or a Hugging Face model, which its end-of-sequence token does not stop here, as it does not stop
    speculative_generate)."""
    if getattr(model, "generation_config", None) is None:
        return model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None)


def generation_tokens_per_second(model: nn.Module, prompts: torch.Tensor, new_tokens: int, repeats: int = 3) -> float:
    """New tokens per second of greedy generation with the KV cache (`greedy`; median of `repeats` runs)."""
    ms = median_ms(lambda: greedy(model, prompts, new_tokens), next(model.parameters()).device, repeats, 1)
    return prompts.shape[0] * new_tokens / (ms / 1000)


def compress(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, tolerance: float = 1.0,
             repeats: int = 20, timing_batch: int = 64, metric: str = "accuracy",
             generate_tokens: int | None = None) -> Compression:
    """Scores every depth of `model` on held-out (inputs, targets), keeps the smallest depth within
    `tolerance` of the best (points of accuracy, or percent of the lowest loss with metric="loss"),
    and measures parameters and latency of both models (the median of `repeats` forwards of the
    first `timing_batch` inputs). The model must offer probe and truncate. `inputs` is a tensor, or a
    dict of the model's keyword inputs (a Hugging Face model's input_ids and attention_mask). A causal
    language model's targets are its labels, as `model(labels=)` takes them: the input ids (IGNORE_INDEX
    where nothing counts), shifted inside; next tokens already shifted are refused. With
    generate_tokens (and a model that has generate), the generation speed of both, with the KV cache, from the first 8 tokens of each of
    the timing batch's sequences, and for a model that drafts for itself (the package's GPT, an
    acnify'd causal LM) the draft depth and length of the fastest self-speculative decoding, which keeps
    every token."""
    for method in ("probe", "truncate"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model must have {method}() (the package's models, LongConnections-based or "
                            f"acnify'd ones), got {type(model).__name__}")
    check_tolerance(tolerance)
    check_probe_data(inputs, targets)
    check_class_targets(targets)
    check_positive_int("repeats", repeats)
    check_positive_int("timing_batch", timing_batch)
    if generate_tokens is not None:
        check_positive_int("generate_tokens", generate_tokens)
        if not callable(getattr(model, "generate", None)):
            raise TypeError(f"generate_tokens needs a model with generate(), got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        scores, exit_statistics = depth_scores(model, inputs, targets, metric, statistics=True) \
            if metric == "loss" and is_causal_lm(model) else (depth_scores(model, inputs, targets, metric), None)
        depth = smallest_depth_within(scores, tolerance, metric)
        truncated = model.truncate(depth)
        parameters = tuple(sum(p.numel() for p in m.parameters()) for m in (model, truncated))
        latency = tuple(latency_ms(m, batch_rows(inputs, slice(timing_batch)), repeats) for m in (model, truncated))
        tokens = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
        prompts = tokens[:timing_batch, :8]
        speeds = None if generate_tokens is None else tuple(
            generation_tokens_per_second(m, prompts, generate_tokens) for m in (model, truncated))
        speculation = None
        if generate_tokens is not None and callable(getattr(model, "speculator", None)) and len(scores) > 2:
            speculation = max(speculations(model, prompts, generate_tokens), key=lambda s: s.tokens_per_second)
    finally:
        model.train(was_training)
    return Compression(scores, depth, tolerance, truncated, parameters, latency, metric, speeds, speculation,
                       exit_statistics)


# ----------------------------------------------------------------------------- shrinking while training

@dataclass
class Shrink:
    """One shrink: at optimizer step `step` the active depth went from `previous` to `depth`."""
    step: int
    previous: int
    depth: int
    scores: list              # the probe that decided it: accuracy (%) or loss per depth 0..previous


def shrinkable(model: nn.Module) -> LongConnections:
    """The long connections that run `model`'s blocks, where its depths are nested sub-networks (an ACN
    or a hybrid; a residual or ffn twin's are not)."""
    connectivity = getattr(model, "connectivity", "acn")
    if connectivity not in ("acn", "hybrid"):
        raise ValueError(f"only an ACN (or a hybrid) can shrink: the depths of a {connectivity} model are not nested "
                         f"sub-networks, got connectivity={connectivity!r}")
    return long_connections_of(model)


class ShrinkOnCompression:
    """Drops the depth an ACN has stopped using, while it trains. Call `step()` after each optimizer
    step; every `every` steps it scores every active depth on the held-out (probe_inputs,
    probe_targets): accuracy (%) for integer class targets, mean squared error otherwise. A probe's
    candidate is the smallest depth within `tolerance` of the deepest active depth (points of
    accuracy; percent of the deepest's loss for regression targets).

    It shrinks to k + margin blocks, k the largest candidate of the last `patience` probes, once
    those probes agree that the model has settled and that depth is spare:
    - the deepest depth's score did not beat its best before them by more than `tolerance` (early in
      training the scores still climb);
    - every candidate was at least 1 (at chance every depth ties and depth 0 would win);
    - k + margin is shallower than the active depth.
    From then on the forward runs the first k + margin blocks and stops the sum there (final norm
    and head as before), the dropped blocks' parameters get requires_grad=False and no gradient
    (optimizers skip them), and the state_dict still loads into the full model. It never grows back;
    the next shrink waits for `patience` + 1 probes of the new depth.

    `history` holds every probe as (step, scores, candidate), `shrinks` every Shrink; each shrink is
    logged on the "acn_kernels.depth" logger. `block_steps` counts the blocks computed per step, summed."""

    def __init__(self, model: nn.Module, probe_inputs: torch.Tensor, probe_targets: torch.Tensor, every: int = 50,
                 tolerance: float = 0.5, patience: int = 3, margin: int = 1):
        if not callable(getattr(model, "probe", None)):
            raise TypeError(f"model must have probe() (the package's ACN models, acnify'd ones), "
                            f"got {type(model).__name__}")
        self.long_connections = shrinkable(model)
        check_probe_data(probe_inputs, probe_targets, "probe_inputs and probe_targets")
        check_labels(model, probe_inputs, probe_targets)
        check_positive_int("every", every)
        check_positive_int("patience", patience)
        check_tolerance(tolerance)
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an integer >= 0 (blocks kept past the candidate), got {margin!r}")
        self.model, self.inputs, self.targets = model, probe_inputs, probe_targets
        self.every, self.tolerance, self.patience, self.margin = every, tolerance, patience, margin
        self.classification = not (probe_targets.is_floating_point() or probe_targets.is_complex())
        self.steps, self.block_steps, self.first_probe = 0, 0, 0  # first_probe: history index since the last shrink
        self.history: list = []
        self.shrinks: list = []

    @property
    def depth(self) -> int:
        """The active depth: the number of blocks the model runs now."""
        return self.long_connections.depth

    @property
    def metric(self) -> str:
        return "accuracy" if self.classification else "squared_error"

    def scores(self) -> list:
        """Accuracy (%) or mean squared error of every active depth on the probe data, the mean over the
        ranks across processes (depth_scores_across_ranks): every rank shrinks at the same step to the
        same depth."""
        return depth_scores_across_ranks(self.model, self.inputs, self.targets, self.metric)

    def within(self, score: float, reference: float) -> bool:
        return within(score, reference, self.tolerance, self.metric)

    def step(self) -> Shrink | None:
        """Call after each optimizer step; returns the Shrink when this step shrank the model."""
        self.steps += 1
        self.block_steps += self.depth
        if self.steps % self.every:
            return None
        scores = self.scores()
        candidate = smallest_depth_within(scores, self.tolerance, self.metric, reference=scores[-1])
        self.history.append((self.steps, scores, candidate))
        since_shrink = self.history[self.first_probe:]
        if len(since_shrink) <= self.patience:
            return None
        window, before = since_shrink[-self.patience:], since_shrink[:-self.patience]
        best_before = (max if self.classification else min)(deepest for _, (*_, deepest), _ in before)
        settled = all(self.within(best_before, deepest) for _, (*_, deepest), _ in window)
        candidates = [c for _, _, c in window]
        target = max(candidates) + self.margin
        if not settled or min(candidates) < 1 or target >= self.depth:
            return None
        shrink = Shrink(self.steps, self.depth, target, scores)
        self.first_probe = len(self.history)
        self.drop_blocks_past(target)
        self.shrinks.append(shrink)
        log.info("step %d: active depth %d -> %d (probe scores by depth: %s)", shrink.step, shrink.previous,
                 shrink.depth, ", ".join(f"{s:.3g}" for s in scores))
        return shrink

    def drop_blocks_past(self, depth: int) -> None:
        long = self.long_connections
        start, end = depth * long.units_per_block, long.units  # the units of the dropped depths
        dropped = [p for block in list(long.blocks)[start:end] for p in block.parameters()]
        if long.input_norms is not None:
            dropped += [p for norm in list(long.input_norms)[start:end] for p in norm.parameters()]
        dropped += [] if long.scalars is None else long.scalars.past(start)
        for parameter in dropped:
            parameter.requires_grad_(False)
            parameter.grad = None
        long.set_active_depth(depth)


# ----------------------------------------------------------------------------- early exit

def early_exit_sweep(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, thresholds) -> list:
    """For each threshold, `model.early_exit` on (inputs, targets): accuracy (%), the average depth
    used per sample and the fraction of block FLOPs saved against the full depth (blocks of one
    model all cost the same)."""
    check_probe_data(inputs, targets)
    if not callable(getattr(model, "early_exit", None)):
        raise TypeError(f"model must have early_exit() (the package's models), got {type(model).__name__}")
    check_labels(model, inputs, targets)
    full = depth_of(model)  # the active depth of a shrunk ACN
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.inference_mode():
            for threshold in thresholds:
                logits, used = model.early_exit(inputs, threshold)
                logits, labels = aligned(model, logits, targets.to(logits.device))
                right = hits(logits, labels).sum().item() / max(int((labels != IGNORE_INDEX).sum()), 1)
                depth = used.double().mean().item()
                rows.append(dict(threshold=threshold, accuracy=100.0 * right, depth=depth,
                                 saved=1.0 - depth / max(full, 1)))
    finally:
        model.train(was_training)
    return rows
