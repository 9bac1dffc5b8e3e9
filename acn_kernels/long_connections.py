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
gate_scope="depth" gives each depth one gate and one long weight, which all its units share (the
authors' H-ACN language model: one alpha per block, gate 1 - alpha on both of its short paths);
gates_from_long_weights=True ties the gates to the long weights (their Long_Short model: depth d's
gate is 1 - the long weight of depth d-1's output, 1 - b_0 for the first depth), so it registers no
gates of its own; skip_attention=True leaves the short path after each depth's first unit (a decoder
layer's attention) whole, gate 1 (their LSN's --skipattn: only the MLP's short path gated).
clamp_range=(low, high) bounds every gate and weight: `clamp_scalars()`, which
`clamp_after(optimizer)` runs after each optimizer step (the authors clamp their alphas to [0, 1]).

layer_dropout (a rate per depth, training.LayerDropout's) skips, in training, each depth with its rate
for the whole batch: the chain walks the kept units only, as if the skipped ones were not there (the
next kept unit reads the last kept one's output, or its gated short state; nothing enters the sum).

units_per_depth=n groups n consecutive blocks into one depth (the AC-GPT's attention and MLP branches,
both added to the sum, are two units of one block): probe, truncate, set_active_depth and early_exit
then count depths of n units.

On a fused backend each block boundary is one `accumulate_norm` (y += x_{i-1} and the next input
norm in one pass; for the hybrid one `hybrid_accumulate_norm`, the short path too), the final norm
its normalize="sum" mode and `probe` one `probe_norm`; on
backend="reference" every norm module runs as it is (pure eager PyTorch). A block that needs its
un-normalized input as well (the Mixer's tail skip) defines `run_normed(x, h)`, h = input_norm(x);
a block that can add its own output to the running sum as it computes it (the MLP's GEMM epilogue)
defines `run_accumulate(x, y, backend, keep_output=True) -> (x_next, y + x_next)`, used on fused
backends; the forward asks the last block for y + x_L only (keep_output=False: x_next may be None,
never written), since the final norm needs nothing else.

Norms: nn.LayerNorm, nn.RMSNorm, and LayerNorm-like modules with `weight`, `bias` and `eps` over the
last dimension. The package's models and the models `acnify` converts keep their own module names:
they reference a LongConnections without registering it (`attach`), so state_dict keys do not change.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._validation import check_bool, check_choice, check_positive_int, check_real
from .backend import BACKENDS, resolve_backend
from .ops import accumulate_norm, depth_cross_entropy, hybrid_accumulate_norm, probe_norm


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

    def losses(self, states: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> tuple:
        """(loss, per_exit) of the states at E depths (E, batch, positions, D) against labels (batch,
        positions) in Hugging Face's convention (the input ids, -100 where nothing counts; position t's
        state predicts label t + 1): depth_cross_entropy, so no (E, tokens, vocabulary) logits exist; a
        "reference" model's in plain PyTorch (its chunked path)."""
        weight, bias, eps = norm_parameters(self.norm, states)
        return depth_cross_entropy(states[:, :, :-1], labels[:, 1:].to(states.device), weight, bias, self.head_weight,
                                   weights=weights, head_bias=self.head_bias, norm=norm_kind(self.norm, "the final norm"),
                                   eps=eps, backend="chunked" if self.backend == "reference" else "auto")


def scalar_parameters(name: str, given, count: int, init: float, trainable: bool) -> nn.ParameterList:
    """`count` 0-dim parameters: new ones at `init` when `given` is "learned" (or True), else the
    sequence given (shared with its owner: a truncated view, a model that registers them itself)."""
    if given in ("learned", True):
        return nn.ParameterList(nn.Parameter(torch.tensor(float(init)), requires_grad=trainable) for _ in range(count))
    if isinstance(given, str):
        raise ValueError(f"{name} must be 'learned' or {count} 0-dim tensors, got {given!r}")
    given = list(given)
    if len(given) != count or any(not isinstance(p, torch.Tensor) or p.dim() != 0 for p in given):
        raise ValueError(f"{name} must be 'learned' or {count} 0-dim tensors, got {len(given)} of shapes "
                         f"{[tuple(getattr(p, 'shape', ())) for p in given]}")
    return nn.ParameterList(given)


SCOPES = ("unit", "depth")


def scalar_counts(units: int, per: int) -> dict:
    """{name: count} of the gates and long weights that `units` units use, one per `per` units (1: a
    gate and a long weight per unit; units_per_depth: per depth): unit i's gate, on the short path
    after it, is gates[i // per] (the last unit has none), its long weight long_weights[i // per]."""
    return {"gates": -(-(units - 1) // per) if units > 1 else 0, "long_weights": -(-units // per)}


def check_clamp_range(clamp_range) -> None:
    ok = clamp_range is None or (isinstance(clamp_range, (tuple, list)) and len(clamp_range) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and v == v for v in clamp_range)
        and clamp_range[0] <= clamp_range[1])
    if not ok:
        raise ValueError(f"clamp_range must be None or (low, high) with low <= high, got {clamp_range!r}")


class LongConnections(nn.Module):
    """forward(x0, **block_kwargs) = final_norm(x_0 + ... + x_L); see the module docstring.
    gates: None (the ACN), "learned" (the hybrid: L-1 scalar gates at gate_init, or one per depth with
    gate_scope="depth", trained unless learn_gates=False) or that many 0-dim parameters to share;
    long_weights: False, True (one scalar per unit, or per depth, at long_weight_init, trained) or
    that many 0-dim parameters to share; x0_weight: False, True or one 0-dim parameter, likewise."""

    def __init__(self, blocks, input_norms=None, final_norm: nn.Module | None = None, backend: str = "auto",
                 gates=None, gate_init: float = 0.5, learn_gates: bool = True, long_weights=False,
                 units_per_depth: int = 1, gate_scope: str = "unit", x0_weight=False,
                 gates_from_long_weights: bool = False, long_weight_init: float = 1.0, clamp_range=None,
                 skip_attention: bool = False):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        check_positive_int("units_per_depth", units_per_depth)
        if len(self.blocks) % units_per_depth:
            raise ValueError(f"blocks must be a whole number of depths of units_per_depth={units_per_depth} blocks, "
                             f"got {len(self.blocks)}")
        self.units_per_depth = units_per_depth
        check_hybrid_options(gates is not None, gate_scope=gate_scope, gate_init=gate_init, learn_gates=learn_gates,
                             long_weights=long_weights is not False, x0_weight=x0_weight is not False,
                             gates_from_long_weights=gates_from_long_weights, long_weight_init=long_weight_init,
                             clamp_range=clamp_range, skip_attention=skip_attention)
        if skip_attention and units_per_depth < 2:
            raise ValueError(f"skip_attention needs depths of several units (a decoder layer's attention, whose "
                             f"short path is whole, then its MLP), got units_per_depth={units_per_depth}")
        self.skip_attention = skip_attention
        self._hybrid, self.gate_scope, self.gates_from_long_weights = gates is not None, gate_scope, gates_from_long_weights
        self.clamp_range = clamp_range
        counts = scalar_counts(len(self.blocks), self.units_per_scalar)
        self.gates = None if gates is None or gates_from_long_weights else scalar_parameters(
            "gates", gates, counts["gates"], gate_init, learn_gates)
        self.long_weights = None if long_weights is False else scalar_parameters(
            "long_weights", long_weights, counts["long_weights"], long_weight_init, True)
        self.x0_weight = None if x0_weight is False else scalar_parameters("x0_weight", x0_weight, 1,
                                                                         long_weight_init, True)
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
        self._active_depth = None

    @property
    def depth(self) -> int:
        """The number of depths that run (blocks, or groups of units_per_depth blocks): all of them, or
        the active depth `set_active_depth` chose."""
        return len(self.blocks) // self.units_per_depth if self._active_depth is None else self._active_depth

    @property
    def units(self) -> int:
        """The number of blocks that run."""
        return self.depth * self.units_per_depth

    def set_active_depth(self, k: int) -> None:
        """Runs only the first k depths from now on (forward, probe, early_exit); the rest stay in place,
        so parameters and state_dict do not change. k = the full depth runs them all again."""
        full = len(self.blocks) // self.units_per_depth
        check_depth(k, full)
        self._active_depth = None if k == full else k

    def fused(self, device: torch.device) -> bool:
        return resolve_backend(self.backend, device) != "reference"

    # ------------------------------------------------------------------ the chain

    @property
    def hybrid(self) -> bool:
        return self._hybrid

    @property
    def units_per_scalar(self) -> int:
        """Units per gate and per long weight."""
        return self.units_per_depth if self.gate_scope == "depth" else 1

    @property
    def _weights_sum(self) -> bool:
        """Whether any term of the sum has a weight (then no block adds its output to y itself)."""
        return self.long_weights is not None or self.x0_weight is not None

    def _gate(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """The gate on the short path after block i (a constant 1 where that path is whole)."""
        if self.skip_attention and i % self.units_per_depth == 0:
            return torch.ones((), dtype=like.dtype, device=like.device)
        owner = i // self.units_per_scalar
        if not self.gates_from_long_weights:
            return self.gates[owner]
        return 1 - (self.x0_weight[0] if owner == 0 else self.long_weights[owner - 1])

    def _long_weight(self, i: int) -> torch.Tensor | None:
        return None if self.long_weights is None else self.long_weights[i // self.units_per_scalar]

    def _term(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's output as the sum takes it: times its long weight, where there are long weights."""
        return x if self.long_weights is None else self._long_weight(i) * x

    def _x0_term(self, x0: torch.Tensor) -> torch.Tensor:
        return x0 if self.x0_weight is None else self.x0_weight[0] * x0

    def _short_state(self, i: int, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The input of block i + 1 (before its norm) from block i's input s and output x: x itself for
        the ACN, gate * s + x for the hybrid."""
        return x if not self.hybrid else torch.addcmul(x, self._gate(i, x), s)

    def scalars(self) -> list:
        """The hybrid's registered scalars: its gates, long weights and x_0 weight."""
        return [p for parameters in registered_scalars(self).values() for p in parameters]

    def scalars_past(self, units: int) -> list:
        """The scalars that only the units from `units` on use (what truncating to them drops)."""
        counts = scalar_counts(units, self.units_per_scalar)
        return [p for name, count in counts.items() if getattr(self, name) is not None
                for p in list(getattr(self, name))[count:]]

    def check_acn_exactly(self) -> None:
        """A ValueError unless this hybrid computes the ACN exactly: gates of its own, every one 0, and
        no long weights, x_0 weight or whole attention path (what as_acn can drop)."""
        extras = [name for name, used in (("long_weights", self.long_weights is not None),
                                          ("x0_weight", self.x0_weight is not None),
                                          ("gates_from_long_weights", self.gates is None),
                                          ("skip_attention", self.skip_attention)) if used]
        if extras:
            raise ValueError(f"as_acn needs a hybrid whose only scalars are its gates, got {', '.join(extras)}")
        open_gates = [round(g.item(), 6) for g in self.gates if g.item() != 0]
        if open_gates:
            raise ValueError(f"as_acn needs every gate 0 (the ACN exactly, where GateAnnealing ends), got "
                             f"{len(open_gates)} of {len(self.gates)} open: {open_gates[:4]}")

    @torch.no_grad()
    def clamp_scalars(self) -> None:
        """Every gate, long weight and x_0 weight into clamp_range (nothing without one)."""
        if self.clamp_range is not None:
            for p in self.scalars():
                p.clamp_(*self.clamp_range)

    def clamp_after(self, optimizer: torch.optim.Optimizer):
        """Runs clamp_scalars after each of optimizer's steps; returns the hook's handle (remove() ends it)."""
        return optimizer.register_step_post_hook(lambda *_: self.clamp_scalars())

    def _step(self, i: int, previous: int, last: bool, s: torch.Tensor | None, x: torch.Tensor,
              y: torch.Tensor | None, x_in_y: bool, fused: bool, block_kwargs: dict, keep_last_output: bool = True):
        """(s_i, y, x_{i+1}, whether y holds x_{i+1}) for block i, given x (x_0, previous = -1, or the output
        of block `previous`: i - 1 unless layer dropout skipped the blocks between), the input s of block
        `previous` (None for x_0), the sum y and whether y holds x already. s_i is block i's input before its
        norm: x for the ACN, gates[previous] * s + x for the hybrid. Without keep_last_output, the last
        block's x_{i+1} may come back None, added into y."""
        block = self.blocks[i]
        joins_short_path = self.hybrid and s is not None
        run_accumulate = getattr(block, "run_accumulate", None) if fused and not self._weights_sum else None
        if run_accumulate is not None:  # the block adds its output to y itself, but where x_L is
            state = self._short_state(previous, s, x) if joins_short_path else x  # wanted, the last one's goes
            y = y if x_in_y else self._add(y, x)                                # to the final boundary
            if last and keep_last_output:
                return state, y, run_accumulate(state, None, self.backend)[0], False
            x_next, y = run_accumulate(state, y, self.backend, keep_output=not last)
            return state, y, x_next, True
        norm = None if self.input_norms is None else self.input_norms[i]
        weighted_x0 = previous == -1 and self.x0_weight is not None  # b_0 x_0 into the sum, x_0 itself onward
        if fused and norm is not None and joins_short_path:
            weight, bias, eps = norm_parameters(norm, x)
            state, y, h = hybrid_accumulate_norm(s, x, y, self._gate(previous, x), weight, bias,
                                                 long_weight=self._long_weight(previous), eps=eps,
                                                 norm=self.norm_kinds[i], backend=self.backend)
        elif fused and norm is not None and not x_in_y and not weighted_x0:
            weight, bias, eps = norm_parameters(norm, x)
            state, (y, h) = x, accumulate_norm(x, y, weight, bias, eps=eps, norm=self.norm_kinds[i],
                                               backend=self.backend)
        else:
            state = self._short_state(previous, s, x) if joins_short_path else x
            term = self._term(previous, x) if joins_short_path else self._x0_term(x) if previous == -1 else x
            y = y if x_in_y else self._add(y, term)
            h = state if norm is None else norm(state)
        x_next = block(h, **block_kwargs) if norm is None else self._run_normed(i, state, h, block_kwargs)
        return state, y, x_next, False

    def _run_normed(self, i: int, x: torch.Tensor, h: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """x_{i+1} from x_i and h = input_norms[i](x_i)."""
        run_normed = getattr(self.blocks[i], "run_normed", None)
        return run_normed(x, h, **block_kwargs) if run_normed is not None else self.blocks[i](h, **block_kwargs)

    def _next_output(self, i: int, x: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
        """x_{i+1} from x_i alone, its input norm run as the module (what early_exit needs)."""
        if self.input_norms is None:
            return self.blocks[i](x, **block_kwargs)
        return self._run_normed(i, x, self.input_norms[i](x), block_kwargs)

    @staticmethod
    def _add(y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        return x if y is None else y + x

    def chain(self, x0: torch.Tensor, **block_kwargs):
        """(y_{L-1}, the last term of the sum, [the terms of the sum]): the running sum before the last
        block's output, that output (times its long weight), and x_0 with every block's (ditto)."""
        return self._walk(x0, block_kwargs, keep_last_output=True)

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

    def _walk(self, x0: torch.Tensor, block_kwargs: dict, keep_last_output: bool):
        """chain; without keep_last_output, (y_L, None, outputs) where the last block adds x_L itself."""
        self.check_x0(x0)
        fused = self.fused(x0.device)
        s, x, y, x_in_y, outputs, previous = None, x0, None, False, [x0] + [None] * self.units, -1
        kept = self.kept_units()
        for n, i in enumerate(kept):
            arguments = (i, previous, n == len(kept) - 1, s, x, y, x_in_y, fused, block_kwargs, keep_last_output)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                s, y, x, x_in_y = checkpoint(self._step, *arguments, use_reentrant=False)
            else:
                s, y, x, x_in_y = self._step(*arguments)
            outputs[i + 1], previous = x, i
        terms = [self._x0_term(x0), *(torch.zeros_like(x0) if x is None else self._term(i, x)
                                      for i, x in enumerate(outputs[1:]))] if keep_last_output else outputs
        return (y, None, terms) if x_in_y else (y, self._x0_term(x) if previous == -1 else self._term(previous, x),
                                                terms)

    def kept_units(self) -> list:
        """The units this forward runs: every one, or in training with layer dropout rates, each depth
        skipped with its rate, all its units and the whole batch together (so every fused boundary
        stays one kernel), as if it were not there: the next kept unit reads the last kept one's state."""
        units = list(range(self.units))
        if not (self.training and self.layer_dropout and self.units):
            return units
        kept = (torch.rand(self.depth) >= torch.tensor(self.layer_dropout[:self.depth])).tolist()
        return [i for i in units if kept[i // self.units_per_depth]]

    def sum_and_norm(self, y: torch.Tensor | None, x: torch.Tensor | None) -> tuple:
        """(y + x, final_norm(y + x)), the last boundary (y + x twice without a final norm); x None:
        y is the whole sum already."""
        if x is None:
            x, y = y, None
        norm = self.final_norm
        if norm is None:
            total = self._add(y, x)
            return total, total
        if self.fused(x.device):
            weight, bias, eps = norm_parameters(norm, x)
            return accumulate_norm(x, y, weight, bias, eps=eps, norm=self.final_kind, normalize="sum",
                                   backend=self.backend)
        total = self._add(y, x)
        return total, norm(total)

    def forward(self, x0: torch.Tensor, **block_kwargs) -> torch.Tensor:
        y, x, _ = self._walk(x0, block_kwargs, keep_last_output=False)
        return self.sum_and_norm(y, x)[1]

    # ------------------------------------------------------------------ stepping by units

    def start_state(self, x0: torch.Tensor) -> tuple:
        """(s, y) before the first unit: its input x_0 and the sum b_0 x_0."""
        self.check_x0(x0)
        return x0, self._x0_term(x0)

    def run_units(self, first: int, stop: int, state: tuple, **block_kwargs) -> tuple:
        """(s, y) after units first..stop-1, from (s, y) after the units before: s is the next unit's
        input before its norm, y the sum so far. Eager, each norm as its module: what a caller that runs
        the first units apart from the rest (speculative decoding's draft, then its verify pass) needs."""
        s, y = state
        for i in range(first, stop):
            x = self._next_output(i, s, block_kwargs)
            s, y = self._short_state(i, s, x) if i + 1 < len(self.blocks) else x, y + self._term(i, x)
        return s, y

    def probe_outputs(self, outputs: list) -> torch.Tensor:
        """(L+1, ...): final_norm(y_k) for every depth, from the terms of the sum [x_0..x_L] (every
        unit's: the depths are every units_per_depth-th partial sum)."""
        xs = torch.stack(outputs)
        if self.units_per_depth > 1:  # each depth's units as one term
            xs = torch.cat([xs[:1], xs[1:].unflatten(0, (-1, self.units_per_depth)).sum(1)])
        norm = self.final_norm
        if norm is None:
            return xs.cumsum(0)
        if self.fused(xs.device):
            weight, bias, eps = norm_parameters(norm, xs)
            return probe_norm(xs, weight, bias, eps=eps, norm=self.final_kind, backend=self.backend)
        return norm(xs.cumsum(0))

    def probe(self, x0: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """(L+1, *x0.shape): the normalized partial sums of every depth k = 0..L."""
        return self.probe_outputs(self.chain(x0, **block_kwargs)[2])

    def early_exit(self, x0: torch.Tensor, head, threshold: float, **block_kwargs) -> tuple:
        """(logits, depth used per sample): each sample stops at the first depth k whose
        head(final_norm(y_k)) puts a softmax probability of at least `threshold` on one class (the
        deepest active depth otherwise); blocks run only for the samples still going. Each depth's
        y_k and final_norm(y_k) are one accumulate_norm(normalize="sum") on fused backends. Block
        kwargs are passed as given, so they must not have a batch dimension. The state of a depth:
        (the next block's input, y_k, final_norm(y_k))."""
        def advance(k, state):
            """The state after depth k + 1: its units run one after another, the last one's output added
            to the sum by the final norm's boundary."""
            last = (k + 1) * self.units_per_depth - 1
            s, y = self.run_units(k * self.units_per_depth, last, state[:2], **block_kwargs)
            x = self._next_output(last, s, block_kwargs)
            return (self._short_state(last, s, x) if last + 1 < len(self.blocks) else x,
                    *self.sum_and_norm(y, self._term(last, x)))

        self.check_x0(x0)
        return exit_early((x0, *self.sum_and_norm(None, self._x0_term(x0))), advance, lambda state: head(state[2]),
                          self.depth, threshold)

    def truncate(self, k: int) -> "LongConnections":
        """The first k depths (their blocks, norms, gates and long weights), sharing every parameter."""
        check_depth(k, self.depth)
        units = k * self.units_per_depth
        parts = {"blocks": nn.ModuleList(list(self.blocks)[:units])}
        for name, count in (("input_norms", units), *scalar_counts(units, self.units_per_scalar).items()):
            if getattr(self, name) is not None:
                parts[name] = type(getattr(self, name))(list(getattr(self, name))[:count])
        shallow = shallow_copy(self, **parts)
        shallow._active_depth = None
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


def check_hybrid_options(hybrid: bool, *, gate_scope: str, gate_init, learn_gates, long_weights: bool,
                         x0_weight: bool, gates_from_long_weights, long_weight_init, clamp_range,
                         skip_attention=False, not_hybrid: str = "gates=None") -> None:
    """The hybrid's options, each checked, and those that need the hybrid refused without it
    (`not_hybrid` says what made it not one, in the message)."""
    check_choice("gate_scope", gate_scope, SCOPES)
    check_real("gate_init", gate_init, "a real number (the short path's starting weight)")
    check_real("long_weight_init", long_weight_init, "a real number (the long weights' starting value)")
    check_bool("learn_gates", learn_gates)
    check_bool("gates_from_long_weights", gates_from_long_weights)
    check_bool("skip_attention", skip_attention)
    check_clamp_range(clamp_range)
    given = {"long_weights": long_weights, "x0_weight": x0_weight, "gates_from_long_weights": gates_from_long_weights,
             "clamp_range": clamp_range is not None, "skip_attention": skip_attention}
    for name, used in given.items():
        if used and not hybrid:
            raise ValueError(f"{name} needs the hybrid (the ACN's long path has unit weights and no short path), "
                             f"got {not_hybrid}")
    if gates_from_long_weights and not (long_weights and x0_weight):
        raise ValueError("gates_from_long_weights=True needs long_weights=True and x0_weight=True (each gate is 1 - "
                         f"the weight before it), got long_weights={long_weights}, x0_weight={x0_weight}")


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


def registered_scalars(long_connections: LongConnections) -> dict:
    """{name: ParameterList} of the hybrid's gates, long weights and x_0 weight, for an owner to register."""
    return {name: getattr(long_connections, name) for name in ("gates", "long_weights", "x0_weight")
            if getattr(long_connections, name) is not None}


def register_scalars(owner: nn.Module, long_connections: LongConnections) -> None:
    """Registers the hybrid's gates, long weights and x_0 weight on `owner` (`gates.i`, `long_weights.i`,
    `x0_weight.0`), which
    attaches the long connections without registering them."""
    for name, parameters in registered_scalars(long_connections).items():
        owner.add_module(name, parameters)


def attach(owner: nn.Module, long_connections: LongConnections) -> None:
    """Gives `owner` its long connections without registering them as a submodule: they reference
    modules the owner already registers, so its state_dict keys stay as they are."""
    object.__setattr__(owner, "long_connections", long_connections)
