"""LongConnections: the ACN's running sum around any blocks, the one implementation of it.

    x_i   = blocks[i](input_norms[i](x_{i-1}))      (blocks[i](x_{i-1}) without input norms)
    y_k   = x_0 + x_1 + ... + x_k                   k = 0..L, the nested sub-networks
    out   = final_norm(y_L)                         (y_L itself without a final norm)

gates="learned" makes it the hybrid (H-ACN): a gated short path beside the long one,

    s_0   = x_0,   s_i = g_i * s_{i-1} + x_i        i = 1..L-1, the short path, g_i = gates[i-1]
    x_i   = blocks[i](input_norms[i](s_{i-1}))      each block reads the short state
    y_k   = x_0 + b_1 x_1 + ... + b_k x_k           b_i = long_weights[i-1] (1 unless long_weights=True)

with L-1 learnable scalar gates (the last block's output feeds only the sum): every gate 0 is the
ACN exactly, every gate 1 a residual chain whose outputs also feed the sum. The sums y_k are the same
nested sub-networks, so probe, truncate, compress, early exit and ShrinkOnCompression work unchanged.

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

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._validation import check_choice, check_positive_int, check_real
from .backend import BACKENDS, resolve_backend
from .ops import accumulate_norm, hybrid_accumulate_norm, probe_norm


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


def norm_parameters(module: nn.Module, x: torch.Tensor) -> tuple:
    """(weight, bias, eps) as the fused ops take them; a norm without affine parameters gets ones."""
    weight = module.weight if module.weight is not None else torch.ones(x.shape[-1], device=x.device)
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    eps = eps if eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default
    return weight, getattr(module, "bias", None), eps


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


class LongConnections(nn.Module):
    """forward(x0, **block_kwargs) = final_norm(x_0 + ... + x_L); see the module docstring.
    gates: None (the ACN), "learned" (the hybrid: L-1 scalar gates at gate_init, trained unless
    learn_gates=False) or L-1 0-dim parameters to share; long_weights: False, True (L scalars at 1,
    trained) or L 0-dim parameters to share."""

    def __init__(self, blocks, input_norms=None, final_norm: nn.Module | None = None, backend: str = "auto",
                 gates=None, gate_init: float = 0.5, learn_gates: bool = True, long_weights=False,
                 units_per_depth: int = 1):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        check_positive_int("units_per_depth", units_per_depth)
        if len(self.blocks) % units_per_depth:
            raise ValueError(f"blocks must be a whole number of depths of units_per_depth={units_per_depth} blocks, "
                             f"got {len(self.blocks)}")
        self.units_per_depth = units_per_depth
        if gates is None and long_weights is not False:
            raise ValueError("long_weights needs the hybrid's gates (gates='learned'): the ACN's long path has unit "
                             "weights")
        check_real("gate_init", gate_init, "a real number (the short path's starting weight)")
        self.gates = None if gates is None else scalar_parameters("gates", gates, max(len(self.blocks) - 1, 0),
                                                                  gate_init, learn_gates)
        self.long_weights = None if long_weights is False else scalar_parameters("long_weights", long_weights,
                                                                                 len(self.blocks), 1.0, True)
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
        return self.gates is not None

    def _term(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block i's output as the sum takes it: times its long weight, where there are long weights."""
        return x if self.long_weights is None else self.long_weights[i] * x

    def _short_state(self, i: int, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The input of block i + 1 (before its norm) from block i's input s and output x: x itself for
        the ACN, gates[i] * s + x for the hybrid."""
        return x if not self.hybrid else torch.addcmul(x, self.gates[i], s)

    def _step(self, i: int, s: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor | None, x_in_y: bool,
              fused: bool, block_kwargs: dict, keep_last_output: bool = True):
        """(s_i, y, x_{i+1}, whether y holds x_{i+1}) for block i, given x (x_0 or block i-1's output), the
        input s of block i-1 (None for x_0), the sum y and whether y holds x already. s_i is block i's
        input before its norm: x for the ACN, gates[i-1] * s + x for the hybrid. Without keep_last_output,
        the last block's x_{i+1} may come back None, added into y."""
        block, last = self.blocks[i], i == self.units - 1
        joins_short_path = self.hybrid and s is not None
        run_accumulate = getattr(block, "run_accumulate", None) if fused and self.long_weights is None else None
        if run_accumulate is not None:  # the block adds its output to y itself, but where x_L is
            state = self._short_state(i - 1, s, x) if joins_short_path else x  # wanted, the last one's goes
            y = y if x_in_y else self._add(y, x)                                # to the final boundary
            if last and keep_last_output:
                return state, y, run_accumulate(state, None, self.backend)[0], False
            x_next, y = run_accumulate(state, y, self.backend, keep_output=not last)
            return state, y, x_next, True
        norm = None if self.input_norms is None else self.input_norms[i]
        if fused and norm is not None and joins_short_path:
            weight, bias, eps = norm_parameters(norm, x)
            long_weight = None if self.long_weights is None else self.long_weights[i - 1]
            state, y, h = hybrid_accumulate_norm(s, x, y, self.gates[i - 1], weight, bias, long_weight=long_weight,
                                                 eps=eps, norm=self.norm_kinds[i], backend=self.backend)
        elif fused and norm is not None and not x_in_y:
            weight, bias, eps = norm_parameters(norm, x)
            state, (y, h) = x, accumulate_norm(x, y, weight, bias, eps=eps, norm=self.norm_kinds[i],
                                               backend=self.backend)
        else:
            state = self._short_state(i - 1, s, x) if joins_short_path else x
            y = y if x_in_y else self._add(y, self._term(i - 1, x) if joins_short_path else x)
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

    def _walk(self, x0: torch.Tensor, block_kwargs: dict, keep_last_output: bool):
        """chain; without keep_last_output, (y_L, None, outputs) where the last block adds x_L itself."""
        fused = self.fused(x0.device)
        s, x, y, x_in_y, outputs = None, x0, None, False, [x0]
        for i in range(self.units):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                s, y, x, x_in_y = checkpoint(self._step, i, s, x, y, x_in_y, fused, block_kwargs, keep_last_output,
                                             use_reentrant=False)
            else:
                s, y, x, x_in_y = self._step(i, s, x, y, x_in_y, fused, block_kwargs, keep_last_output)
            outputs.append(x)
        terms = [outputs[0], *(self._term(i, x) for i, x in enumerate(outputs[1:]))] if keep_last_output else outputs
        return (y, None, terms) if x_in_y else (y, self._term(self.units - 1, x) if self.units else x, terms)

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
            s, y = state[0], state[1]
            for i in range(k * self.units_per_depth, (k + 1) * self.units_per_depth):
                x = self._next_output(i, s, block_kwargs)
                term, s = self._term(i, x), self._short_state(i, s, x) if i + 1 < self.units else x
                if i + 1 < (k + 1) * self.units_per_depth:
                    y = self._add(y, term)
            return (s, *self.sum_and_norm(y, term))

        return exit_early((x0, *self.sum_and_norm(None, x0)), advance, lambda state: head(state[2]), self.depth,
                          threshold)

    def truncate(self, k: int) -> "LongConnections":
        """The first k depths (their blocks, norms, gates and long weights), sharing every parameter."""
        check_depth(k, self.depth)
        units = k * self.units_per_depth
        parts = {"blocks": nn.ModuleList(list(self.blocks)[:units])}
        for name, count in (("input_norms", units), ("gates", max(units - 1, 0)), ("long_weights", units)):
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
    """{name: ParameterList} of the hybrid's gates and long weights, for an owner to register."""
    return {name: getattr(long_connections, name) for name in ("gates", "long_weights")
            if getattr(long_connections, name) is not None}


def register_scalars(owner: nn.Module, long_connections: LongConnections) -> None:
    """Registers the hybrid's gates and long weights on `owner` (`gates.i`, `long_weights.i`), which
    attaches the long connections without registering them."""
    for name, parameters in registered_scalars(long_connections).items():
        owner.add_module(name, parameters)


def attach(owner: nn.Module, long_connections: LongConnections) -> None:
    """Gives `owner` its long connections without registering them as a submodule: they reference
    modules the owner already registers, so its state_dict keys stay as they are."""
    object.__setattr__(owner, "long_connections", long_connections)
