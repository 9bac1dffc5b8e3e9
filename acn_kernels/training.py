"""Training an ACN language model fast: the early-exit loss, gate annealing and layer dropout, for the
package's GPT and (the first two) acnify'd Hugging Face causal LMs alike. The loss reads them
through the interface both offer: `exit_states(input_ids, **inputs)` gives the states after 0..L
depths (L+1, batch, positions, D), the running sums y_k of an ACN, and their Readout (the final norm
and head, long_connections.Readout).

early_exit_loss reads depths 1..L (the embeddings alone, depth 0, are no exit) through the shared
final norm and head with `depth_cross_entropy`, so no (exits, tokens, vocabulary) logits exist:

- weights "authors": exit k (1..L) weighted 2k / (L (L + 1)) (their `--ee_training`); "uniform": 1/L
  each; or a tensor of L weights;
- curriculum (LayerSkip's, arXiv 2404.16710): None, every exit each step; "rotational", at step t the
  exits k with k = t (mod ROTATION) and the final one; "gradual", the exits from the final one down,
  one more each L-th of training (step / total_steps, or `progress`). The final depth is always in, and
  the weights of the exits in are renormalized to sum to one (the final depth's share is at least its
  own weight). Table 6c's recipe trains with RECOMMENDED: uniform weights on the rotational curriculum.

GateAnnealing takes a hybrid from the pre-norm residual net (every short-path gate 1) to the ACN (every
gate 0) over the first part of training; as_acn then makes the model an ACN outright (connectivity
"acn", the same parameters, no gates), which saves and reloads as one. LayerDropout is LayerSkip's
layer dropout: block l skipped with probability p_max D(l) S(t), D(l) = 2^(l / (L - 1)) - 1 rising from
0 (first block) to 1 (last), S(t) = 2^t - 1, t the fraction of training done (LayerSkip's exponential
scales), the skipped compute saved; per sample in the residual and ffn twins (LayerSkip's), per batch in
every connectivity (stochastic depth's: the network as if the block were not there, which for an ACN
is its next block reading the last kept one's output, nothing added to the sum).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._validation import check_bool, check_choice, check_positive_int, check_real
from .long_connections import check_labels, fsdp_forward, long_connections_of
from .models.base import LAYER_DROPOUT_PER, LONG

WEIGHTS = ("authors", "uniform")
CURRICULA = ("rotational", "gradual")
ROTATION = 4  # LayerSkip's rotational curriculum: every 4th exit a step, in turn
RECOMMENDED = dict(weights="uniform", curriculum="rotational")  # table 6c's recipe (docs/training.md)


def exit_weights(depth: int, weights) -> torch.Tensor:
    """The weights of exits 1..L (float32, (L,)), none negative, their sum positive."""
    if isinstance(weights, torch.Tensor):
        if tuple(weights.shape) != (depth,) or not weights.is_floating_point():
            raise ValueError(f"weights must be 'authors', 'uniform' or a floating-point tensor of shape ({depth},) "
                             f"(exits 1..L), got {weights.dtype} of shape {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not bool(weights.sum() > 0):
            raise ValueError(f"weights must be finite, >= 0 and not all 0 (a loss of 0 trains nothing), got "
                             f"{weights.tolist()}")
        return weights.detach().float()
    check_choice("weights", weights, WEIGHTS)
    depths = torch.arange(1, depth + 1, dtype=torch.float32)
    return 2 * depths / (depth * (depth + 1)) if weights == "authors" else torch.full((depth,), 1.0 / depth)


def exits_in(depth: int, curriculum: str | None, step: int | None, total_steps: int | None = None,
             progress: float | None = None) -> list:
    """The exits (1..L) this step trains, the final one always among them; "gradual" follows the
    fraction of training done: progress, or step / total_steps."""
    if curriculum is None:
        return list(range(1, depth + 1))
    check_choice("curriculum", curriculum, CURRICULA)
    if curriculum == "rotational":
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0 with a curriculum, got {step!r}")
        chosen = [k for k in range(1, depth) if k % ROTATION == step % ROTATION]
    else:
        done = training_done(step, total_steps, progress)
        enabled = min(depth, 1 + int(done * depth))  # the final exit, then one more each L-th of training
        chosen = list(range(depth - enabled + 1, depth))
    return [*chosen, depth]


def training_done(step: int | None, total_steps: int | None, progress: float | None) -> float:
    """The fraction of training done, in [0, 1]: progress as given, or step / total_steps."""
    if progress is not None:
        check_real("progress", progress, "a real number in [0, 1] (the fraction of training done)", minimum=0)
        return min(float(progress), 1.0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0 with a curriculum, got {step!r}")
    check_positive_int("total_steps", total_steps)
    return min(step / total_steps, 1.0)


def early_exit_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, *, weights="authors",
                    curriculum: str | None = None, step: int | None = None, total_steps: int | None = None,
                    progress: float | None = None, statistics: bool = False, **inputs):
    """The weighted next-token loss of the exits at depths 1..L (see the module docstring). labels
    follow Hugging Face's convention: the input ids (-100 where nothing counts), shifted inside,
    as model(labels=) does. The "gradual" curriculum follows step / total_steps, or `progress` (the
    fraction of training done, for a budget of time rather than steps). `inputs` reach the model's
    forward (an attention_mask). With statistics=True: (loss, depths, ExitStatistics), the depths this
    step trains (the full depth always among them) and each one's accuracy, agreement with the full
    depth and entropy, from the same pass (no logits)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError("model must not be a DistributedDataParallel: it synchronizes gradients only through its "
                        "forward; wrap the loss instead: DistributedDataParallel(EarlyExitLoss(model)), got "
                        "DistributedDataParallel")
    if not callable(getattr(model, "exit_states", None)):
        raise TypeError(f"model must offer exit_states() (the package's GPT, an acnify'd Hugging Face causal LM), "
                        f"got {type(model).__name__}")
    check_labels(input_ids, labels)  # before the model runs
    check_bool("statistics", statistics)

    def exits_loss():
        states, readout = model.exit_states(input_ids, **inputs)
        depth = states.shape[0] - 1
        all_weights = exit_weights(depth, weights)
        chosen = exits_in(depth, curriculum, step, total_steps, progress)
        chosen_weights = all_weights[[k - 1 for k in chosen]]
        if not bool(chosen_weights.sum() > 0):
            raise ValueError(f"weights of the exits this step trains ({chosen}) must not all be 0, got "
                             f"{chosen_weights.tolist()}")
        chosen_weights = (chosen_weights / chosen_weights.sum()).to(states.device)
        loss, _, *stats = readout.losses(exits_of(states, chosen), input_ids, labels, chosen_weights, statistics)
        return loss, chosen, *stats
    loss, chosen, *stats = fsdp_forward(model, exits_loss)  # FSDP2: the embedding, norm and head gathered once
    return (loss, chosen, *stats) if statistics else loss


def exits_of(states: torch.Tensor, chosen: list) -> torch.Tensor:
    """The states at the chosen depths: a view where they follow one another (every depth, a curriculum's
    last ones), else a copy (by depths one at a time, which a DTensor takes too)."""
    if chosen == list(range(chosen[0], chosen[-1] + 1)):
        return states[chosen[0]:chosen[-1] + 1]
    return torch.stack([states[k] for k in chosen])


class EarlyExitLoss(torch.nn.Module):
    """early_exit_loss as a module's forward, `options` its keywords: forward(input_ids, labels, **more)
    gives the loss. For wrappers that synchronize through forward: DistributedDataParallel(EarlyExitLoss(
    model)) (FSDP2 needs no wrapper: early_exit_loss runs a sharded model's exit_states as its forward)."""

    def __init__(self, model: torch.nn.Module, **options):
        super().__init__()
        self.model, self.options = model, options

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **more):
        return early_exit_loss(self.model, input_ids, labels, **self.options, **more)


# ----------------------------------------------------------------------------- schedules

class StepSchedule:
    """What GateAnnealing and LayerDropout share: the fraction of training done, from `steps` optimizer
    steps of total_steps, or from a callable `progress` (for a budget of time: the fraction of it
    spent, 0 to 1); `apply()` sets the model for it, `step()` after each optimizer step; a state_dict to
    resume from."""
    steps = 0

    def __init__(self, total_steps: int | None, progress: Callable[[], float] | None):
        if (total_steps is None) == (progress is None):
            raise ValueError(f"give total_steps (the optimizer steps of training) or progress (a callable: the "
                             f"fraction of training done, 0 to 1), one of them, got total_steps={total_steps!r} "
                             f"and progress={progress!r}")
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
        elif not callable(progress):
            raise TypeError(f"progress must be a callable returning the fraction of training done, got "
                            f"{type(progress).__name__}")
        self.total_steps, self.progress = total_steps, progress

    def done(self) -> float:
        """The fraction of training done, in [0, 1]."""
        if self.progress is None:
            return min(self.steps / self.total_steps, 1.0)
        done = self.progress()
        check_real("progress()", done, "a real number (the fraction of training done, 0 to 1)")
        return min(max(float(done), 0.0), 1.0)

    def apply(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        self.steps += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        self.apply()


# ----------------------------------------------------------------------------- gate annealing

SHAPES = ("linear", "cosine")


class GateAnnealing(StepSchedule):
    """A hybrid's short-path gates set from 1 (the pre-norm residual net) to 0 (the ACN) over the first
    `fraction` of training (total_steps, or the fraction `progress()` says is done), then 0: `step()`
    after each optimizer step. shape "linear" (1 - t) or "cosine" ((1 + cos(pi t)) / 2: it leaves 1 and
    reaches 0 with zero slope). The gates are set, not learned: build the model with learn_gates=False
    (learned gates are overwritten each step)."""

    def __init__(self, model, total_steps: int | None = None, fraction: float = 0.3, shape: str = "linear",
                 progress: Callable[[], float] | None = None):
        super().__init__(total_steps, progress)
        check_real("fraction", fraction, "a real number in (0, 1] (the part of training that anneals)", minimum=0)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a real number in (0, 1] (the part of training that anneals), got "
                             f"{fraction!r}")
        check_choice("shape", shape, SHAPES)
        self.long_connections = long_connections_of(model)
        if self.long_connections.gates is None:
            what = "a hybrid whose gates are derived from the long weights" if self.long_connections.hybrid else \
                f"connectivity={model.connectivity!r}" if hasattr(model, "connectivity") else "an ACN"
            raise ValueError(f"GateAnnealing needs a hybrid with gates of its own (connectivity='hybrid', not "
                             f"gates_from_long_weights), got {what}")
        self.fraction, self.shape = fraction, shape
        self.apply()

    def gate(self, done: float) -> float:
        """The gates' value once `done` of training is done."""
        t = min(done / self.fraction, 1.0)
        return 1.0 - t if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))

    @torch.no_grad()
    def apply(self) -> None:
        for gate in self.long_connections.gates:
            gate.fill_(self.gate(self.done()))


def as_acn(model):
    """`model` (a hybrid whose gates are all 0: the ACN exactly, as GateAnnealing leaves it) made an
    ACN in place and returned: connectivity "acn", the same parameters without the gates, so that it
    saves and reloads as an ACN (an acnify'd model's config records it). An ACN comes back unchanged."""
    if not long_connections_of(model).hybrid:
        return model
    converted = getattr(model, "as_acn", None)
    if converted is None:
        raise TypeError(f"as_acn converts the package's models and acnify'd Hugging Face models, got "
                        f"{type(model).__name__}")
    return converted()


# ----------------------------------------------------------------------------- layer dropout

class LayerDropout(StepSchedule):
    """LayerSkip's layer dropout (see the module docstring) for a model of the package: sets each
    block's rate (model.set_layer_dropout); `step()` after each optimizer step. curriculum
    "exponential" scales the rates by S(t), t the fraction of training done (total_steps, or
    `progress()`); None keeps them at p_max D(l). per "sample" (LayerSkip's: residual and ffn models) or
    "batch" (every connectivity, as stochastic depth drops layers: the whole batch skips a block, as if
    it were not there; the only way for an ACN's long connections, whose fused boundaries run each depth
    for the whole batch). Its coins come from a generator of its own, seeded by `seed` and the step,
    never the global one: every rank skips the same blocks. Create it before training starts: it drops
    from the first step on."""

    def __init__(self, model, total_steps: int | None = None, p_max: float = 0.1,
                 curriculum: str | None = "exponential", per: str = "sample",
                 progress: Callable[[], float] | None = None, seed: int = 0):
        super().__init__(total_steps, progress)
        check_positive_int("seed", seed, minimum=0)
        check_real("p_max", p_max, "a real number in [0, 1] (the last block's rate)", minimum=0)
        if p_max > 1:
            raise ValueError(f"p_max must be a real number in [0, 1] (the last block's rate), got {p_max!r}")
        if curriculum is not None:
            check_choice("curriculum", curriculum, ("exponential",))
        check_choice("per", per, LAYER_DROPOUT_PER)
        if not callable(getattr(model, "set_layer_dropout", None)):
            raise TypeError(f"LayerDropout skips blocks of the package's models, got {type(model).__name__}")
        if per == "sample" and model.connectivity in LONG:
            raise ValueError(f"per='sample' skips blocks sample by sample, which residual and ffn chains can; an "
                             f"ACN's long connections skip a depth for the whole batch: per='batch' for "
                             f"connectivity={model.connectivity!r}")
        self.model, self.p_max, self.curriculum, self.per, self.seed = model, p_max, curriculum, per, seed
        self.coins = torch.Generator()
        self.apply()

    def rates(self, done: float) -> list:
        """Each block's rate once `done` of training is done."""
        depth = self.model.depth
        scale = 2 ** done - 1 if self.curriculum else 1.0
        return [self.p_max * scale * (2 ** (i / max(depth - 1, 1)) - 1) for i in range(depth)]

    def apply(self) -> None:
        """The rates for the fraction done, and the coins seeded by the seed and the step: the same blocks
        skipped on every rank (processes seeded apart included), and again on a resumed run."""
        self.coins.manual_seed((self.seed << 32) + self.steps)
        self.model.set_layer_dropout(self.rates(self.done()), self.per, self.coins)
