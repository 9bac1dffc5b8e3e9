"""LongConnections: the ACN's running sum around any blocks, the one implementation of it.

    x_i   = blocks[i](input_norms[i](x_{i-1}))      (blocks[i](x_{i-1}) without input norms)
    y_k   = x_0 + x_1 + ... + x_k                   k = 0..L, the nested sub-networks
    out   = final_norm(y_L)                         (y_L itself without a final norm)

gates="learned" makes it the hybrid (H-ACN): a gated short path beside the long one,

    s_0   = x_0,   s_i = g_i * s_{i-1} + x_i        i = 1..L-1, the short path, g_i = gates[i-1]
    x_i   = blocks[i](input_norms[i](s_{i-1}))      each block reads the short state
    y_k   = b_0 x_0 + b_1 x_1 + ... + b_k x_k       b_i = long_weights[i-1] (1 unless long_weights=True),
                                                    b_0 = x0_weight (1 unless x0_weight=True)

with L-1 learnable scalar gates (the last block's output feeds only the sum): every gate 0 is the
ACN exactly, every gate 1 a residual chain whose outputs also feed the sum. The sums y_k are the same
nested sub-networks, so probe, truncate, compress, early exit and ShrinkOnCompression work unchanged.
The hybrid's form is one value, HybridOptions (its fields are keywords of LongConnections, the models
and acnify): gate_scope="block" gives each block one gate and one long weight, which all its units
share (the authors' H-ACN language model: one alpha per block, gate 1 - alpha on both of its short
paths); gates_from_long_weights=True ties the gates to the long weights (their Long_Short model: block
d's gate is 1 - the long weight of block d-1's output, 1 - b_0 for the first block), so it has no gates
of its own; skip_attention=True leaves the short path after each block's first unit (a decoder layer's
attention) whole, gate 1 (their LSN's --skipattn: only the MLP's short path gated). clamp_range=(low,
high) bounds every gate and weight: `clamp_scalars()`, which `clamp_after(optimizer)` runs after each
optimizer step (the authors clamp their alphas to [0, 1]). The scalars themselves are one
HybridScalars, which the owner of the long connections creates and registers (`gates.i`,
`long_weights.i`, `x0_weight.0`).

units_per_block=n groups n consecutive blocks into one block of the model (the AC-GPT's attention and
MLP branches, both added to the sum, are two units of one block): probe, truncate, set_active_depth
and early_exit then count depths of n units.

The chain is walked by one step (`step`: the boundary that adds the previous unit's output into the
sum and forms the next unit's input, then the unit), which the forward, `chain`, `run_units` (a
caller running some units apart from the others: speculative decoding's draft and verify pass) and
`early_exit` all take. On a fused backend each boundary is one `accumulate_norm` (y += x and the next
input norm in one pass; for the hybrid one `hybrid_accumulate_norm`, the short path too), the final
norm its normalize="sum" mode and `probe` one `probe_norm`; on backend="reference" every norm module
runs as it is (pure eager PyTorch). A block that needs its un-normalized input as well (the Mixer's
tail skip) defines `run_normed(x, h)`, h = input_norm(x); a block that can add its own output to the
running sum as it computes it (the MLP's GEMM epilogue) defines `run_accumulate(x, y, backend,
keep_output=True) -> (x_next, y + x_next)`, used on fused backends; the forward asks the last block for
y + x_L only (keep_output=False: x_next may be None, never written), since the final norm needs
nothing else.

layer_dropout (a rate per depth, training.LayerDropout's) skips, in training, each depth with its rate
for the whole batch (coins from `coins`, a generator of its own: LayerDropout's, the same on every rank): the chain walks the kept units only, as if the skipped ones were not there (the
next kept unit reads the last kept one's output, or its gated short state; nothing enters the sum).

Norms: nn.LayerNorm, nn.RMSNorm, and LayerNorm-like modules with `weight`, `bias` and `eps` over the
last dimension. The package's models and the models `acnify` converts keep their own module names:
they reference a LongConnections without registering it (`attach`), so state_dict keys do not change.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

try:
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a torch without distributed
    FSDPModule = register_fsdp_forward_method = DTensor = Replicate = None

from ._validation import check_bool, check_choice, check_positive_int, check_real
from .backend import BACKENDS, resolve_backend
from .ops import accumulate_norm, depth_cross_entropy, hybrid_accumulate_norm, probe_norm


# ----------------------------------------------------------------------------- norms

def norm_kind(module: nn.Module, name: str) -> str:
    """"layernorm" or "rmsnorm" for a norm the fused ops can run; otherwise a ValueError naming it.
    RMSNorms: nn.RMSNorm, and Llama's kind (`weight` and `variance_epsilon`, no bias)."""
    # Batch, instance and group norms have weight, bias and eps too, but normalize across other dims.
    other_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm))
    if isinstance(module, nn.RMSNorm) or (hasattr(module, "variance_epsilon") and hasattr(module, "weight")
                                          and getattr(module, "bias", None) is None):
        kind = "rmsnorm"
    elif isinstance(module, nn.LayerNorm) or (all(hasattr(module, a) for a in ("weight", "bias", "eps"))
                                              and not other_norm):
        kind = "layernorm"
    else:
        raise ValueError(f"{name} must be nn.LayerNorm, nn.RMSNorm or a LayerNorm with weight, bias and eps, "
                         f"got {type(module).__name__}")
    shape = getattr(module, "normalized_shape", None)
    if shape is not None and len(tuple(shape)) != 1:
        raise ValueError(f"{name} must normalize the last dimension only, got normalized_shape {tuple(shape)}")
    return kind


def norm_width(module: nn.Module) -> int | None:
    """The features a norm normalizes (its normalized_shape, or its weight's length), None if it does not say."""
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return tuple(shape)[-1]
    weight = getattr(module, "weight", None)
    return weight.shape[-1] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


def norm_parameters(module: nn.Module, x: torch.Tensor) -> tuple:
    """(weight, bias, eps) as the fused ops take them; a norm without affine parameters gets ones."""
    weight = module.weight if module.weight is not None else torch.ones(x.shape[-1], device=x.device)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    eps = eps if eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    return weight, getattr(module, "bias", None), eps


@dataclass
class Readout:
    """What reads a language model's state at any depth: its final norm and head, and the backend the
    model's ops run on (exit_states gives it beside the states)."""
    norm: nn.Module
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    backend: str = "auto"

    def losses(self, states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor | None = None, statistics: bool = False) -> tuple:
        """(loss, per_exit[, ExitStatistics]) of the states at E depths (E, batch, positions, D) of input_ids
        against labels (batch, positions) in Hugging Face's convention (the input ids, -100 where nothing
        counts; position t's state predicts label t + 1; check_labels): depth_cross_entropy on the model's
        backend, so no (E, tokens, vocabulary) logits exist; a "reference" model's on the chunked path
        (plain PyTorch too)."""
        check_labels(input_ids, labels, self.head_weight.shape[0])
        if DTensor is not None and isinstance(states, DTensor):  # a tensor-parallel model's, split on the tokens:
            states = states.redistribute(placements=[Replicate()] * states.device_mesh.ndim)  # each rank all
        weight, bias, eps = norm_parameters(self.norm, states)
        return depth_cross_entropy(states[:, :, :-1], labels[:, 1:].to(states.device), weight, bias, self.head_weight,
                                   weights=weights, head_bias=self.head_bias, norm=norm_kind(self.norm, "the final norm"),
                                   eps=eps, backend="chunked" if self.backend == "reference" else self.backend,
                                   statistics=statistics)

    def depth_losses(self, states: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                     statistics: bool = False):
        """What probe(output="loss") gives: every depth's mean loss (E,), or (losses, ExitStatistics)."""
        _, per_exit, *stats = self.losses(states, input_ids, labels, statistics=statistics)
        return (per_exit, *stats) if statistics else per_exit


IGNORE_INDEX = -100  # a label that counts in no loss, as in F.cross_entropy and Hugging Face's labels


def check_labels(input_ids: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
                 name: str = "labels", subject: str | None = None) -> None:
    """A causal LM's labels in Hugging Face's convention: the input ids themselves (IGNORE_INDEX where
    nothing counts), an integer tensor of input_ids' shape, within the vocabulary, which the losses
    shift inside (position t's logits against labels[t + 1]). Next tokens already shifted
    (labels[t] = input_ids[t + 1]) would score the model on copying its input: refused, never scored.
    `subject` names them in the messages (`name`, by default)."""
    subject = subject or name
    convention = f"Hugging Face's convention: the input ids, {IGNORE_INDEX} where nothing counts, shifted inside"
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool or labels.shape != input_ids.shape:
        got = f"dtype {labels.dtype} and shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) \
            else type(labels).__name__
        raise ValueError(f"{subject} must be the model's labels, of input_ids' shape {tuple(input_ids.shape)} and an integer "
                         f"dtype ({convention}), got {got}")
    labels = labels.to(input_ids.device)
    counted = labels != IGNORE_INDEX
    if vocab_size is not None and counted.any() and (labels[counted].min() < 0 or labels[counted].max() >= vocab_size):
        raise ValueError(f"{subject} must be in [0, {vocab_size}) (the vocabulary) or {IGNORE_INDEX}, got values in "
                         f"[{labels[counted].min().item()}, {labels[counted].max().item()}]")
    if bool((labels == input_ids)[counted].all()) or input_ids.shape[-1] < 2:
        return
    next_counted = counted[..., :-1]
    if next_counted.any() and bool((labels[..., :-1] == input_ids[..., 1:])[next_counted].all()):
        raise ValueError(f"{subject} must be the model's labels ({convention}), got the next tokens already shifted "
                         f"({name}[:, t] == input_ids[:, t + 1]): pass the input ids")


# ----------------------------------------------------------------------------- the hybrid's form and scalars

SCOPES = ("unit", "block")


def check_clamp_range(clamp_range) -> None:
    ok = clamp_range is None or (isinstance(clamp_range, (tuple, list)) and len(clamp_range) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and v == v for v in clamp_range)
        and clamp_range[0] <= clamp_range[1])
    if not ok:
        raise ValueError(f"clamp_range must be None or (low, high) with low <= high, got {clamp_range!r}")


@dataclass(frozen=True)
class HybridOptions:
    """The hybrid's form (see the module docstring), every field checked once, here."""
    gate_scope: str = "unit"              # "unit": a gate per unit boundary; "block": one per block
    gate_init: float = 0.5                # the gates' starting value
    learn_gates: bool = True              # trained (else set, as GateAnnealing sets them)
    long_weights: bool = False            # a weight per unit (or block) on its output in the sum
    x0_weight: bool = False               # a weight on x_0 in the sum
    gates_from_long_weights: bool = False  # each gate 1 - the long weight before it (Long_Short)
    long_weight_init: float = 1.0         # the long weights' (and x_0 weight's) starting value
    clamp_range: tuple | None = None      # (low, high) for every gate and weight (clamp_scalars)
    skip_attention: bool = False          # each block's first short path whole (the LSN)

    def __post_init__(self):
        scope = "block" if self.gate_scope == "depth" else self.gate_scope
        if self.gate_scope == "depth":
            warnings.warn("gate_scope='depth' is now called 'block'", FutureWarning, stacklevel=4)
        check_choice("gate_scope", scope, SCOPES)
        object.__setattr__(self, "gate_scope", scope)
        check_real("gate_init", self.gate_init, "a real number (the short path's starting weight)")
        check_real("long_weight_init", self.long_weight_init, "a real number (the long weights' starting value)")
        for name in ("learn_gates", "long_weights", "x0_weight", "gates_from_long_weights", "skip_attention"):
            check_bool(name, getattr(self, name))
        check_clamp_range(self.clamp_range)
        object.__setattr__(self, "clamp_range", None if self.clamp_range is None else tuple(self.clamp_range))
        if self.gates_from_long_weights and not (self.long_weights and self.x0_weight):
            raise ValueError("gates_from_long_weights=True needs long_weights=True and x0_weight=True (each gate is 1 - "
                             f"the weight before it), got long_weights={self.long_weights}, x0_weight={self.x0_weight}")

    @classmethod
    def of(cls, hybrid: bool, not_hybrid: str, **options) -> "HybridOptions | None":
        """The options given, checked; None without the hybrid, where an option that needs it is refused
        (`not_hybrid` says what made it not one, in the message)."""
        unknown = sorted(set(options) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown hybrid option {unknown[0]!r}: the options are "
                            f"{[field.name for field in dataclasses.fields(cls)]}")
        checked = cls(**options)
        if hybrid:
            return checked
        needing = ("long_weights", "x0_weight", "gates_from_long_weights", "clamp_range", "skip_attention")
        for name in needing:
            if getattr(checked, name) not in (False, None):
                raise ValueError(f"{name} needs the hybrid (the ACN's long path has unit weights and no short path), "
                                 f"got {not_hybrid}")
        return None

    def as_record(self) -> dict:
        """The fields as JSON keeps them (a Hugging Face config's record of the conversion)."""
        record = dataclasses.asdict(self)
        record["clamp_range"] = None if self.clamp_range is None else list(self.clamp_range)
        return record


class Scalars(nn.ParameterList):
    """The hybrid's gates, long weights or x_0 weight: one-element parameters (shape (1,): FSDP2 shards no
    0-dim parameter), read as 0-dim values (`value(i)`). A state_dict saved when they were 0-dim loads."""

    @staticmethod
    def of(count: int, init: float, trainable: bool) -> "Scalars":
        return Scalars(nn.Parameter(torch.full((1,), float(init)), requires_grad=trainable) for _ in range(count))

    def value(self, i: int) -> torch.Tensor:
        return self[i][0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for i in range(len(self)):
            saved = state_dict.get(f"{prefix}{i}")
            if isinstance(saved, torch.Tensor) and saved.dim() == 0:
                state_dict[f"{prefix}{i}"] = saved.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HybridScalars:
    """The hybrid's gates, long weights and x_0 weight (one-element parameters in Scalars lists, None where
    the form has none), built once by the owner of the long connections, which registers the lists under
    their names (`owned()`), and read by the chain: gate(i), term(i, x), short_state(i, s, x)."""

    NAMES = ("gates", "long_weights", "x0_weight")

    def __init__(self, options: HybridOptions, units: int, units_per_block: int, lists: dict | None = None):
        self.options, self.units, self.units_per_block = options, units, units_per_block
        if lists is None:
            counts = self.counts(units)
            lists = {"gates": None if options.gates_from_long_weights else
                     Scalars.of(counts["gates"], options.gate_init, options.learn_gates),
                     "long_weights": Scalars.of(counts["long_weights"], options.long_weight_init, True)
                     if options.long_weights else None,
                     "x0_weight": Scalars.of(1, options.long_weight_init, True) if options.x0_weight else None}
        self.gates, self.long_weights, self.x0_weight = (lists[name] for name in self.NAMES)

    @property
    def units_per_scalar(self) -> int:
        """Units per gate and per long weight."""
        return self.units_per_block if self.options.gate_scope == "block" else 1

    def counts(self, units: int) -> dict:
        """{name: count} of the gates and long weights that `units` units use: unit i's gate, on the short
        path after it, is gates[i // per] (the last unit has none), its long weight long_weights[i // per]."""
        per = self.units_per_scalar
        return {"gates": -(-(units - 1) // per) if units > 1 else 0, "long_weights": -(-units // per), "x0_weight": 1}

    def owned(self) -> dict:
        """{name: ParameterList} for the owner to register."""
        return {name: getattr(self, name) for name in self.NAMES if getattr(self, name) is not None}

    def all(self) -> list:
        return [p for parameters in self.owned().values() for p in parameters]

    def past(self, units: int) -> list:
        """The scalars that only the units from `units` on use (what keeping the first `units` drops)."""
        counts = self.counts(units)
        return [p for name, parameters in self.owned().items() for p in list(parameters)[counts[name]:]]

    def truncated(self, units: int) -> "HybridScalars":
        """The scalars of the first `units` units, shared."""
        counts = self.counts(units)
        return HybridScalars(self.options, units, self.units_per_block,
                             {name: None if getattr(self, name) is None else
                              Scalars(list(getattr(self, name))[:counts[name]]) for name in self.NAMES})

    @property
    def weighs_the_sum(self) -> bool:
        """Whether a term of the sum has a weight (then no block adds its output to y itself)."""
        return self.long_weights is not None or self.x0_weight is not None

    def gate(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """The gate on the short path after unit i (a constant 1 where that path is whole)."""
        if self.options.skip_attention and i % self.units_per_block == 0:
            return like.new_ones(())  # a DTensor where like is one (tensor parallelism)
        owner = i // self.units_per_scalar
        if self.gates is not None:
            return self.gates.value(owner)
        return 1 - (self.x0_weight.value(0) if owner == 0 else self.long_weights.value(owner - 1))

    def long_weight(self, i: int) -> torch.Tensor | None:
        return None if self.long_weights is None else self.long_weights.value(i // self.units_per_scalar)

    def term(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Unit i's output as the sum takes it (i = -1: x_0): times its weight, where it has one."""
        if i < 0:
            return x if self.x0_weight is None else self.x0_weight.value(0) * x
        return x if self.long_weights is None else self.long_weight(i) * x

    def short_state(self, i: int, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The input of unit i + 1 (before its norm) from unit i's input s and output x: gate * s + x."""
        return torch.addcmul(x, self.gate(i, x), s)

    def check_acn_exactly(self) -> None:
        """A ValueError unless these scalars make the ACN exactly: gates of their own, every one 0, and no
        long weights, x_0 weight or whole attention path (what as_acn can drop)."""
        extras = [name for name, used in (("long_weights", self.long_weights is not None),
                                          ("x0_weight", self.x0_weight is not None),
                                          ("gates_from_long_weights", self.gates is None),
                                          ("skip_attention", self.options.skip_attention)) if used]
        if extras:
            raise ValueError(f"as_acn needs a hybrid whose only scalars are its gates, got {', '.join(extras)}")
        open_gates = [round(g.item(), 6) for g in self.gates if g.item() != 0]
        if open_gates:
            raise ValueError(f"as_acn needs every gate 0 (the ACN exactly, where GateAnnealing ends), got "
                             f"{len(open_gates)} of {len(self.gates)} open: {open_gates[:4]}")

    @torch.no_grad()
    def clamp_(self) -> None:
        """Every gate, long weight and x_0 weight into clamp_range (nothing without one)."""
        if self.options.clamp_range is not None:
            for p in self.all():
                p.clamp_(*self.options.clamp_range)


# ----------------------------------------------------------------------------- the walk

class Walk(NamedTuple):
    """Where a walk of the chain stands after a unit: x its output (x_0 before the first unit, after =
    -1), s that unit's input before its norm (None before the first unit, or where x is already the next
    unit's input: a resolved state), y the sum so far, x_in_y whether y holds x's term already."""
    s: torch.Tensor | None
    x: torch.Tensor | None
    y: torch.Tensor | None
    after: int
    x_in_y: bool


def fsdp_forward(module: nn.Module, fn, *args):
    """fn(*args), run as a forward of `module` where FSDP2 shards it (one all-gather of its parameters
    before fn, its gradients reduced after the backward of what fn computed: register_fsdp_forward_method
    on a method that calls its first argument); elsewhere fn(*args) itself. FSDP2 warns of an output
    that is a view (a block's steps pass their input on as the next unit's state, and nothing changes
    it in place): not here."""
    if FSDPModule is None or not isinstance(module, FSDPModule):
        return fn(*args)
    if "acn_forward" not in vars(module):
        vars(module)["acn_forward"] = lambda run, *run_args: run(*run_args)
        register_fsdp_forward_method(module, "acn_forward")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        return module.acn_forward(fn, *args)


class Unseen:
    """A value FSDP2's hooks pass through as it is (they look into tuples, lists and dicts)."""

    def __init__(self, value):
        self.value = value


class Outputs(Unseen):
    """Where a walk records each unit's output (a list, or nowhere), unseen by FSDP2's hooks around a
    block's steps (they would rebuild the list)."""

    def record(self, index: int, x: torch.Tensor | None) -> None:
        if self.value is not None:
            self.value[index] = x


def unhooked(block: nn.Module):
    """How a step calls its block: the block, or where FSDP2 shards it its forward without module hooks
    (FSDP2's ran around the whole step: LongConnections.step_of)."""
    return block.forward if FSDPModule is not None and isinstance(block, FSDPModule) else block


def add(y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if y is None else y + x


def depth_terms(terms: list, units_per_block: int) -> torch.Tensor:
    """(L+1, ...): x_0 and each block's units summed, from every unit's term of the sum."""
    xs = torch.stack(terms)
    return xs if units_per_block == 1 else torch.cat([xs[:1], xs[1:].unflatten(0, (-1, units_per_block)).sum(1)])


def depth_sums(terms: list, units_per_block: int) -> torch.Tensor:
    """(L+1, ...): the sums y_0..y_L from every unit's term of the sum, added one unit after another as
    the walk adds them (a cumsum over their stack is several times slower on a CPU)."""
    sums, running = [terms[0]], terms[0]
    for i, term in enumerate(terms[1:], 1):
        running = running + term
        if i % units_per_block == 0:
            sums.append(running)
    return torch.stack(sums)


class LongConnections(nn.Module):
    """forward(x0, **block_kwargs) = final_norm(x_0 + ... + x_L); see the module docstring.
    gates: None (the ACN) or "learned" (the hybrid, of the HybridOptions given as keywords: its scalars
    built here, unless the owner passes its own as `scalars`)."""

    def __init__(self, blocks, input_norms=None, final_norm: nn.Module | None = None, backend: str = "auto",
                 gates: str | None = None, units_per_block: int = 1, scalars: HybridScalars | None = None,
                 owners: list | None = None, **hybrid_options):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        if gates not in (None, "learned"):
            raise ValueError(f"gates must be None (the ACN) or 'learned' (the hybrid), got {gates!r}")
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        check_positive_int("units_per_block", units_per_block)
        if len(self.blocks) % units_per_block:
            raise ValueError(f"blocks must be a whole number of blocks of units_per_block={units_per_block} units, "
                             f"got {len(self.blocks)}")
        self.units_per_block = units_per_block
        # the module holding each block's units and norms (what FSDP2 shards per block: step_of); the units
        # themselves where a block is one unit
        self.owners = list(owners) if owners is not None else list(self.blocks) if units_per_block == 1 else None
        if self.owners is not None and len(self.owners) * units_per_block != len(self.blocks):
            raise ValueError(f"owners must have one module per block ({len(self.blocks) // units_per_block}), got "
                             f"{len(self.owners)}")
        if scalars is None:
            options = HybridOptions.of(gates is not None, "gates=None", **hybrid_options)
            scalars = None if options is None else HybridScalars(options, len(self.blocks), units_per_block)
        elif hybrid_options:
            raise TypeError(f"the hybrid's options come with its scalars, got {sorted(hybrid_options)} as well")
        if scalars is not None and scalars.options.skip_attention and units_per_block < 2:
            raise ValueError(f"skip_attention needs blocks of several units (a decoder layer's attention, whose short "
                             f"path is whole, then its MLP), got units_per_block={units_per_block}")
        self.scalars = scalars
        register_scalars(self, scalars)  # its own parameters too (shared where the owner built them)
        if input_norms is not None:
            input_norms = input_norms if isinstance(input_norms, nn.ModuleList) else nn.ModuleList(input_norms)
            if len(input_norms) != len(self.blocks):
                raise ValueError(f"input_norms must have one norm per block ({len(self.blocks)}), "
                                 f"got {len(input_norms)}")
            self.norm_kinds = [norm_kind(n, f"input_norms[{i}]") for i, n in enumerate(input_norms)]
        self.input_norms = input_norms
        self.final_norm = final_norm
        self.final_kind = norm_kind(final_norm, "final_norm") if final_norm is not None else None
        self.backend = backend
        self.gradient_checkpointing = False
        self.layer_dropout: list | None = None  # per depth, set by training.LayerDropout
        self.coins = torch.Generator().manual_seed(0)  # its draws (LayerDropout's generator where it set them)
        self._active_depth = None

    # ------------------------------------------------------------------ shape

    @property
    def hybrid(self) -> bool:
        return self.scalars is not None

    @property
    def depth(self) -> int:
        """The number of depths that run (blocks of units_per_block units): all of them, or the active
        depth `set_active_depth` chose."""
        return len(self.blocks) // self.units_per_block if self._active_depth is None else self._active_depth

    @property
    def units(self) -> int:
        """The number of units that run."""
        return self.depth * self.units_per_block

    def set_active_depth(self, k: int) -> None:
        """Runs only the first k depths from now on (forward, probe, early_exit); the rest stay in place,
        so parameters and state_dict do not change. k = the full depth runs them all again."""
        full = len(self.blocks) // self.units_per_block
        check_depth(k, full)
        self._active_depth = None if k == full else k

    def fused(self, device: torch.device) -> bool:
        return resolve_backend(self.backend, device) != "reference"

    def become_acn(self) -> None:
        """This hybrid as the ACN, in place (its gates all 0: HybridScalars.check_acn_exactly first): every
        holder of these long connections sees it. The owner unregisters the gates."""
        self.scalars.check_acn_exactly()
        self.scalars = None
        register_scalars(self, None)

    # ------------------------------------------------------------------ the hybrid's scalars

    def clamp_scalars(self) -> None:
        """Every gate, long weight and x_0 weight into clamp_range (nothing without one)."""
        if self.scalars is not None:
            self.scalars.clamp_()

    def clamp_after(self, optimizer: torch.optim.Optimizer):
        """Runs clamp_scalars after each of optimizer's steps; returns the hook's handle (remove() ends it)."""
        return optimizer.register_step_post_hook(lambda *_: self.clamp_scalars())

    def term(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.scalars is None else self.scalars.term(i, x)

    def pending_term(self, walk: Walk) -> torch.Tensor | None:
        """The term of the walk's last output that its sum does not hold yet (None where it does)."""
        return None if walk.x_in_y else self.term(walk.after, walk.x)

    def next_input(self, walk: Walk) -> torch.Tensor:
        """The next unit's input (before its norm): the short state where the walk joins it, else x."""
        joins = self.hybrid and walk.s is not None and walk.after + 1 < len(self.blocks)
        return self.scalars.short_state(walk.after, walk.s, walk.x) if joins else walk.x

    # ------------------------------------------------------------------ one step

    def step(self, i: int, walk: Walk, fused: bool, block_kwargs: dict, last: bool = False,
             keep_output: bool = True) -> Walk:
        """The walk after unit i: the boundary (the last output's term into the sum, the short state, unit
        i's input norm: one fused op where the backend fuses) and the unit. Where `last` and not
        keep_output, a block that adds its own output to the sum may leave x None (only y_L is wanted)."""
        block = self.blocks[i]
        joins = self.hybrid and walk.s is not None
        weighs = self.scalars is not None and self.scalars.weighs_the_sum
        run_accumulate = getattr(block, "run_accumulate", None) if fused and not weighs else None
        if run_accumulate is not None:  # the block adds its output to y itself; where x_L is wanted, the last one's
            state = self.next_input(walk)  # goes to the final boundary
            y = walk.y if walk.x_in_y else add(walk.y, walk.x)
            if last and keep_output:
                return Walk(state, run_accumulate(state, None, self.backend)[0], y, i, False)
            x_next, y = run_accumulate(state, y, self.backend, keep_output=not last)
            return Walk(state, x_next, y, i, True)
        norm = None if self.input_norms is None else self.input_norms[i]
        weighted_x0 = walk.after == -1 and self.scalars is not None and self.scalars.x0_weight is not None
        if fused and norm is not None and joins:
            weight, bias, eps = norm_parameters(norm, walk.x)
            state, y, h = hybrid_accumulate_norm(walk.s, walk.x, walk.y, self.scalars.gate(walk.after, walk.x), weight,
                                                 bias, long_weight=self.scalars.long_weight(walk.after), eps=eps,
                                                 norm=self.norm_kinds[i], backend=self.backend)
        elif fused and norm is not None and not walk.x_in_y and not weighted_x0:
            weight, bias, eps = norm_parameters(norm, walk.x)
            state, (y, h) = walk.x, accumulate_norm(walk.x, walk.y, weight, bias, eps=eps, norm=self.norm_kinds[i],
                                                    backend=self.backend)
        else:
            state = self.next_input(walk)
            y = walk.y if walk.x_in_y else add(walk.y, self.pending_term(walk))
            h = state if norm is None else norm(state)
        x_next = unhooked(block)(h, **block_kwargs) if norm is None else self.run_normed(i, state, h, block_kwargs)
        return Walk(state, x_next, y, i, False)

    def steps_of(self, block: int):
        """What runs a block's units (run_steps): itself, or where FSDP2 shards the block's owner
        (fully_shard on each block, as every recipe applies it) the owner's forward method for FSDP2
        running the same steps: one all-gather of the block's parameters before its first boundary reads
        its input norm's, its gradients reduced only after that boundary's backward has added the norm's
        (the units' own forwards then run unhooked: unhooked)."""
        owner = None if self.owners is None else self.owners[block]
        return self.run_steps if owner is None else functools.partial(fsdp_forward, owner, self.run_steps)

    def run_steps(self, x: torch.Tensor, walk: "Unseen", units: list, fused: bool, block_kwargs: dict, last: int,
                  keep_last_output: bool, outputs: "Outputs") -> Walk:
        """The walk (its x apart) after `units` (each one's output into outputs, where it records), each step
        recomputed in backward under gradient checkpointing. Of the walk's tensors FSDP2's forward sees x
        alone, whose gradient is complete only after the block's first boundary (when FSDP2 reduces the
        block's gradients): where a tensor it takes gets no gradient (the sum, where only the exit states
        are read), it would give one of zeros, a plain tensor where the walk's are DTensors."""
        walk = walk.value._replace(x=x)
        for i in units:
            arguments = (i, walk, fused, block_kwargs, i == last, keep_last_output)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                walk = checkpoint(self.step, *arguments, use_reentrant=False)
            else:
                walk = self.step(*arguments)
            outputs.record(i + 1, walk.x)
        return walk

    def run_normed(self, i: int, x: torch.Tensor, h: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """Unit i's output from its input x and h = input_norms[i](x)."""
        run_normed = getattr(self.blocks[i], "run_normed", None)
        if run_normed is not None:
            return run_normed(x, h, **block_kwargs)
        return unhooked(self.blocks[i])(h, **block_kwargs)

    def walk(self, walk: Walk, units: list, block_kwargs: dict, keep_last_output: bool = True,
             outputs: list | None = None) -> Walk:
        """The walk after `units` (in order; each one's output into `outputs[unit + 1]` where given), each
        step recomputed in backward under gradient checkpointing."""
        fused = self.fused(walk.x.device)
        recorded = Outputs(outputs)
        for block, block_units in itertools.groupby(units, key=lambda i: i // self.units_per_block):
            walk = self.steps_of(block)(walk.x, Unseen(walk), list(block_units), fused, block_kwargs, units[-1],
                                        keep_last_output, recorded)  # units[-1]: the groups exist only where units do
        return walk

    # ------------------------------------------------------------------ the whole chain

    def check_x0(self, x0) -> None:
        """x0 a tensor whose last dimension is the width the norms normalize (the first input norm's, or
        the final norm's), named here rather than deep in a norm."""
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        named = [("input_norms[0]", self.input_norms[0])] if self.input_norms else []
        named += [("final_norm", self.final_norm)] if self.final_norm is not None else []
        for name, norm in named:
            width = norm_width(norm)
            if width is not None and (x0.dim() == 0 or x0.shape[-1] != width):
                raise ValueError(f"x0 must have {width} features in its last dimension ({name} normalizes {width}), "
                                 f"got shape {tuple(x0.shape)}")

    def kept_units(self) -> list:
        """The units this forward runs: every one, or in training with layer dropout rates, each depth
        skipped with its rate, all its units and the whole batch together (so every fused boundary
        stays one kernel), as if it were not there: the next kept unit reads the last kept one's state."""
        units = list(range(self.units))
        if not (self.training and self.layer_dropout and self.units):
            return units
        kept = (torch.rand(self.depth, generator=self.coins) >= torch.tensor(self.layer_dropout[:self.depth])).tolist()
        return [i for i in units if kept[i // self.units_per_block]]

    def chain(self, x0: torch.Tensor, **block_kwargs):
        """(y_{L-1}, the last term of the sum, [the terms of the sum]): the running sum before the last
        unit's output, that output (times its long weight), and x_0 with every unit's (ditto; zeros for
        a unit layer dropout skipped)."""
        self.check_x0(x0)
        outputs = [x0] + [None] * self.units
        walk = self.walk(Walk(None, x0, None, -1, False), self.kept_units(), block_kwargs, True, outputs)
        terms = [self.term(i - 1, x) if x is not None else torch.zeros_like(x0) for i, x in enumerate(outputs)]
        return walk.y, self.pending_term(walk), terms

    def sum_and_norm(self, y: torch.Tensor | None, x: torch.Tensor | None) -> tuple:
        """(y + x, final_norm(y + x)), the last boundary (y + x twice without a final norm); x None:
        y is the whole sum already."""
        if x is None:
            x, y = y, None
        norm = self.final_norm
        if norm is None:
            total = add(y, x)
            return total, total
        if self.fused(x.device):
            weight, bias, eps = norm_parameters(norm, x)
            return accumulate_norm(x, y, weight, bias, eps=eps, norm=self.final_kind, normalize="sum",
                                   backend=self.backend)
        total = add(y, x)
        return total, norm(total)

    def forward(self, x0: torch.Tensor, **block_kwargs) -> torch.Tensor:
        self.check_x0(x0)
        walk = self.walk(Walk(None, x0, None, -1, False), self.kept_units(), block_kwargs, keep_last_output=False)
        return self.sum_and_norm(walk.y, self.pending_term(walk))[1]

    # ------------------------------------------------------------------ units apart from the others

    def start_state(self, x0: torch.Tensor) -> tuple:
        """(s, y) before the first unit: its input x_0 and the sum b_0 x_0."""
        self.check_x0(x0)
        return x0, self.term(-1, x0)

    def run_units(self, first: int, stop: int, state: tuple, **block_kwargs) -> tuple:
        """(s, y) after units first..stop-1, from (s, y) after the units before: s is the next unit's
        input before its norm, y the sum so far. What a caller that runs the first units apart from the
        rest (speculative decoding's draft, then its verify pass) needs."""
        s, y = state
        walk = self.walk(Walk(None, s, y, first - 1, True), list(range(first, stop)), block_kwargs)
        return self.next_input(walk), self.sum_so_far(walk)

    def sum_so_far(self, walk: Walk) -> torch.Tensor:
        """The walk's sum with its last output's term in it."""
        return walk.y if walk.x_in_y else add(walk.y, self.pending_term(walk))

    # ------------------------------------------------------------------ every depth

    def probe_outputs(self, terms: list) -> torch.Tensor:
        """(L+1, ...): final_norm(y_k) for every depth, from the terms of the sum [x_0..x_L] (every
        unit's): one probe_norm of each depth's terms on a fused backend."""
        norm = self.final_norm
        if norm is not None and self.fused(terms[0].device):
            weight, bias, eps = norm_parameters(norm, terms[0])
            return probe_norm(depth_terms(terms, self.units_per_block), weight, bias, eps=eps, norm=self.final_kind,
                              backend=self.backend)
        sums = depth_sums(terms, self.units_per_block)
        return sums if norm is None else norm(sums)

    def probe(self, x0: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """(L+1, *x0.shape): the normalized partial sums of every depth k = 0..L."""
        return self.probe_outputs(self.chain(x0, **block_kwargs)[2])

    def early_exit(self, x0: torch.Tensor, head, threshold: float, **block_kwargs) -> tuple:
        """(logits, depth used per sample): each sample stops at the first depth k whose
        head(final_norm(y_k)) puts a softmax probability of at least `threshold` on one class (the
        deepest active depth otherwise); blocks run only for the samples still going. Each depth's
        y_k and final_norm(y_k) are one accumulate_norm(normalize="sum") on fused backends. Block
        kwargs are passed as given, so they must not have a batch dimension. The state of a depth:
        (the next unit's input, y_k, final_norm(y_k))."""
        def advance(k, state):
            units = list(range(k * self.units_per_block, (k + 1) * self.units_per_block))
            walk = self.walk(Walk(None, state[0], state[1], units[0] - 1, True), units, block_kwargs)
            return (self.next_input(walk), *self.sum_and_norm(walk.y, self.pending_term(walk)))

        self.check_x0(x0)
        return exit_early((x0, *self.sum_and_norm(None, self.term(-1, x0))), advance, lambda state: head(state[2]),
                          self.depth, threshold)

    def truncate(self, k: int) -> "LongConnections":
        """The first k depths (their blocks, norms, gates and long weights), sharing every parameter."""
        check_depth(k, self.depth)
        units = k * self.units_per_block
        parts = {"blocks": nn.ModuleList(list(self.blocks)[:units])}
        if self.input_norms is not None:
            parts["input_norms"] = nn.ModuleList(list(self.input_norms)[:units])
        scalars = None if self.scalars is None else self.scalars.truncated(units)
        parts.update({} if scalars is None else scalars.owned())
        shallow = shallow_copy(self, **parts)
        shallow.scalars, shallow._active_depth = scalars, None
        return shallow


def exit_early(state: tuple, advance, logits_of, depth: int, threshold: float) -> tuple:
    """Per-sample early exit over depths 0..depth. `state` holds batch-first tensors (the state at
    depth 0), advance(i, state) gives the state after block i + 1, logits_of(state) the logits. A sample
    leaves at the first depth whose top softmax probability reaches `threshold`; the rest go on, so a
    block computes only the samples still in. Returns (logits, depth used per sample)."""
    check_threshold(threshold)
    batch = state[0].shape[0]
    remaining = torch.arange(batch, device=state[0].device)
    used = torch.full((batch,), depth, dtype=torch.long, device=state[0].device)
    logits = None
    for k in range(depth + 1):
        current = logits_of(state)
        if logits is None:  # NaN-filled: a sample that never left would show
            logits = current.new_full((batch, *current.shape[1:]), float("nan"))
        leaving = (torch.ones_like(remaining, dtype=torch.bool) if k == depth
                   else torch.softmax(current.float(), -1).amax(-1) >= threshold)
        logits[remaining[leaving]] = current[leaving]
        used[remaining[leaving]] = k
        staying = ~leaving
        if not staying.any():
            break
        remaining = remaining[staying]
        state = advance(k, tuple(s[staying] for s in state))
    return logits, used


def check_threshold(threshold) -> None:
    check_real("threshold", threshold, "a real number (a softmax probability; 0 exits at depth 0, above 1 never "
                                       "early)")


def check_depth(k, depth: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= depth:
        raise ValueError(f"k must be an integer in [0, {depth}], got {k!r}")


def shallow_copy(module: nn.Module, **replaced: nn.Module) -> nn.Module:
    """A copy of `module` that shares every submodule and parameter but has its own module table,
    in which `replaced` modules stand in (how truncate keeps the first k blocks)."""
    shallow = copy.copy(module)
    shallow._modules = {**module._modules, **replaced}
    return shallow


def long_connections_of(model: nn.Module) -> LongConnections:
    """The one LongConnections of a package model, an acnify'd one (its owner holds them) or itself."""
    return owner_of(model)[1].long_connections if not isinstance(model, LongConnections) else model


def owner_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the module that holds `model`'s long connections (the model itself for the
    package's models, the base model or encoder for an acnify'd one); a TypeError naming the model
    where it has none."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(getattr(m, "long_connections", None), LongConnections)]
    if not found:
        raise TypeError(f"model must have long connections (a package model, an acnify'd one or LongConnections), "
                        f"got {type(model).__name__} without any")
    return found[0]


def depth_of(model: nn.Module) -> int:
    """The depths a model runs now (a shrunk ACN's active depth): its long connections'."""
    return long_connections_of(model).depth


def register_scalars(owner: nn.Module, scalars: HybridScalars | None) -> None:
    """The hybrid's gates, long weights and x_0 weight registered on `owner` (`gates.i`, `long_weights.i`,
    `x0_weight.0`), None where there are none (an ACN, or a form without them)."""
    owned = {} if scalars is None else scalars.owned()
    for name in HybridScalars.NAMES:
        setattr(owner, name, owned.get(name))


def build_long_connections(owner: nn.Module, blocks: list, input_norms: list | None, final_norm: nn.Module | None,
                           backend: str, hybrid: HybridOptions | None, units_per_block: int = 1,
                           owners: list | None = None) -> LongConnections:
    """Long connections for `owner` (an acnify'd model's module that held the blocks): the hybrid's
    scalars built once and registered on it, the long connections attached to it."""
    scalars = None if hybrid is None else HybridScalars(hybrid, len(blocks), units_per_block)
    register_scalars(owner, scalars)
    long_connections = LongConnections(blocks, input_norms, final_norm, backend, units_per_block=units_per_block,
                                       scalars=scalars, owners=owners)
    attach(owner, long_connections)
    return long_connections


def attach(owner: nn.Module, long_connections: LongConnections) -> None:
    """Gives `owner` its long connections without registering them as a submodule: they reference
    modules the owner already registers, so its state_dict keys stay as they are."""
    object.__setattr__(owner, "long_connections", long_connections)
