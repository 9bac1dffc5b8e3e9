"""The skeleton every model family shares: embed -> L blocks -> final norm -> readout.

`connectivity` decides how the blocks are joined (ACN-NOTES section 1):

    "acn":      x_i = f_i(x_{i-1}),              state after k blocks: y_k = x_0 + ... + x_k
    "residual": x_i = x_{i-1} + f_i(x_{i-1})     (the residual adds live inside each block)
    "ffn":      x_i = f_i(x_{i-1})               state after k blocks: x_k
    "hybrid":   x_i = f_i(s_{i-1}), s_i = g_i s_{i-1} + x_i (the H-ACN: a gated short path beside the
                long one, g_i learnable), state after k blocks: y_k = x_0 + ... + x_k, as the acn's

The states after k = 0..L blocks, read through the shared final norm and readout, are the L+1
nested sub-networks that `probe` scores and `truncate` keeps.

An "acn" (or "hybrid") model runs its long connections through `LongConnections` (the one
implementation of them; see its docstring for the hybrid's gates and long weights) on `backend`:
each block boundary one `accumulate_norm` (y += x_i and the next block's input norm; the hybrid's
`hybrid_accumulate_norm`), the final norm its normalize="sum" mode, and `probe` one `probe_norm`. On
a fused backend every twin runs the blocks' MLPs on the fused ops (`feed_forward` in FeedForward,
`linear_act_accumulate` in the MLP model's blocks, its residual add in the GEMM's epilogue too), so
that the twins differ only in their connections; the residual twins' other adds stay eager.
backend="reference" is pure eager PyTorch. Parameters and state_dict are the same whatever the backend.
"""
from __future__ import annotations

import functools
from collections import deque
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._validation import check_choice, check_positive_int
from ..backend import BACKENDS, resolve_backend
from ..long_connections import (HybridOptions, HybridScalars, LongConnections, attach, check_depth, depth_sums,
                                exit_early, register_scalars, shallow_copy)

CONNECTIVITIES = ("acn", "residual", "ffn", "hybrid")
LAYER_DROPOUT_PER = ("sample", "batch")
LONG = ("acn", "hybrid")  # the connectivities with long connections: their depths are nested sub-networks


class DepthModel(nn.Module):
    """Subclasses set `self.blocks` and `self.final_norm`, call `self.connect()`, and define `embed`
    and `readout`. A block that starts with a norm names it `input_norm` (and takes `run_normed`); a
    family whose blocks hold several units of the long connections (GPT: attention, then MLP) sets
    `units_per_block` and defines `units()`.
    A "hybrid" model takes the hybrid's options (long_connections.HybridOptions: gate_scope, gate_init,
    learn_gates, long_weights, x0_weight, gates_from_long_weights, long_weight_init, clamp_range,
    skip_attention) as keywords, and registers its scalars (`gates.0` ... `gates.{L-2}`, `long_weights.i`,
    `x0_weight.0`: HybridScalars, built here once); every other parameter is the acn twin's, so
    checkpoints load between them (strict=False)."""

    units_per_block = 1

    def __init__(self, depth: int, connectivity: str, backend: str = "auto", **hybrid_options):
        super().__init__()
        check_positive_int("depth", depth)
        check_choice("connectivity", connectivity, CONNECTIVITIES)
        check_choice("backend", backend, BACKENDS)
        options = HybridOptions.of(connectivity == "hybrid", f"connectivity={connectivity!r}", **hybrid_options)
        self.connectivity = connectivity
        self.requested_backend = backend
        self._checkpointing = False
        self.layer_dropout: list | None = None  # per block: set_layer_dropout
        self.layer_dropout_per = "sample"
        self.coins = torch.Generator().manual_seed(0)  # layer dropout's: never the global generator
        self.scalars = None if options is None else HybridScalars(options, depth * self.units_per_block,
                                                                  self.units_per_block)
        register_scalars(self, self.scalars)

    def units(self) -> list:
        """(module, input norm or None) of every unit of the long connections, in order: the blocks."""
        return [(block, getattr(block, "input_norm", None)) for block in self.blocks]

    def connect(self) -> None:
        """The long connections over this model's blocks (referenced, not registered: see attach),
        and the backend of every fused layer (FeedForward, MLPBlock, FusedLinear)."""
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = self.requested_backend
        modules, norms = zip(*self.units()) if self.blocks else ((), ())
        final = None if isinstance(self.final_norm, nn.Identity) else self.final_norm
        long_connections = LongConnections(list(modules), None if None in norms else list(norms), final,
                                           self.requested_backend, units_per_block=self.units_per_block,
                                           scalars=self.scalars, owners=list(self.blocks))
        long_connections.gradient_checkpointing = self._checkpointing
        long_connections.layer_dropout, long_connections.coins = self.layer_dropout, self.coins
        attach(self, long_connections.train(self.training))

    def train(self, mode: bool = True) -> "DepthModel":
        """The long connections' mode too (referenced, not registered: see attach): layer dropout reads it."""
        super().train(mode)
        self.long_connections.train(mode)
        return self

    def set_layer_dropout(self, rates: list | None, per: str = "sample", coins: torch.Generator | None = None) -> None:
        """Each block skipped in training with its rate (training.LayerDropout sets them), per "sample"
        (the residual and ffn chains) or per "batch" (every connectivity: an ACN's long connections skip
        a depth for the whole batch); None skips none. The coins come from `coins` (a CPU generator:
        LayerDropout's, seeded by its seed and the step, so that every rank skips the same), else the
        model's own."""
        check_choice("per", per, LAYER_DROPOUT_PER)
        if rates is not None and (len(rates) != self.depth or per == "sample" and self.connectivity in LONG):
            raise ValueError(f"rates must be one per block ({self.depth}) and per='batch' for connectivity "
                             f"{self.connectivity!r}, got {len(rates)} rates per={per!r}")
        self.layer_dropout, self.layer_dropout_per = rates, per
        self.coins = coins if coins is not None else self.coins
        self.long_connections.layer_dropout, self.long_connections.coins = rates, self.coins

    def as_acn(self) -> "DepthModel":
        """This hybrid as an ACN, in place (every gate 0, nothing else hybrid, or a ValueError): connectivity
        "acn", its gates dropped; the long connections, and whoever holds them, see it."""
        self.long_connections.become_acn()
        self.connectivity, self.scalars = "acn", None
        register_scalars(self, None)
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        return self._checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        """Recompute each block in backward (the acn chain, the residual and ffn twins alike)."""
        self._checkpointing = bool(value)
        self.long_connections.gradient_checkpointing = self._checkpointing

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def backend(self) -> str:
        """What the fused ops (the long connections, the blocks' MLPs) run on for this model's device."""
        return resolve_backend(self.requested_backend, next(self.parameters()).device)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, block, x: torch.Tensor, index: int | None = None, **block_kwargs) -> torch.Tensor:
        """block(x, **block_kwargs), block `index`'s step of the residual or ffn chain: recomputed in
        backward under gradient checkpointing, and in training with a layer dropout rate
        (set_layer_dropout) skipped with that probability, per sample (those samples' x passed on, their
        compute saved) or for the whole batch."""
        rate = self.layer_dropout[index] if self.training and self.layer_dropout and index is not None else 0.0
        if rate > 0 and self.layer_dropout_per == "batch" and torch.rand((), generator=self.coins).item() < rate:
            return x
        if rate > 0 and self.layer_dropout_per == "sample":
            kept = (torch.rand(x.shape[0], generator=self.coins) >= rate).to(x.device)
            if not bool(kept.all()):
                out = x.clone()
                if bool(kept.any()):
                    out[kept] = self.run_block(block, x[kept], **block_kwargs)
                return out
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(functools.partial(block, **block_kwargs), x, use_reentrant=False)
        return block(x, **block_kwargs)

    # ------------------------------------------------------------------ the twins' chains

    def run_blocks(self, first: int, stop: int, x: torch.Tensor, **block_kwargs) -> torch.Tensor:
        """The residual or ffn chain's state after blocks first..stop-1, from the state before them."""
        for i in range(first, stop):
            x = self.run_block(self.blocks[i], x, i, **block_kwargs)
        return x

    def states(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the residual or ffn chain's state after k = 0..L blocks, in eager PyTorch."""
        x = self.embed(inputs)
        yield x
        for i in range(self.depth):
            x = self.run_blocks(i, i + 1, x)
            yield x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.readout(self.final_norm(hidden))

    # ------------------------------------------------------------------ public

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.connectivity in LONG:
            return self.readout(self.long_connections(self.embed(inputs)))
        last_state = deque(self.states(inputs), maxlen=1)[0]  # walks the chain, keeps only the end
        return self.head(last_state)

    def partial_sums(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, *hidden_shape): y_0..y_L for "acn" and "hybrid", the state after k blocks otherwise."""
        if self.connectivity in LONG:
            return depth_sums(self.long_connections.chain(self.embed(inputs))[2], self.units_per_block)
        return torch.stack(list(self.states(inputs)))

    def probe(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, batch, classes): logits of every depth k through the shared final norm and head."""
        if self.connectivity not in LONG:
            return torch.stack([self.head(hidden) for hidden in self.states(inputs)])
        normed = self.long_connections.probe(self.embed(inputs))
        return torch.stack([self.readout(hidden) for hidden in normed])

    def early_exit(self, inputs: torch.Tensor, threshold: float) -> tuple:
        """(logits, depth used per sample): each sample leaves at the first depth k whose logits (the
        state after k blocks through the final norm and head, as in `probe`) put a softmax probability
        of at least `threshold` on one class, the full depth otherwise; a block computes only the
        samples still in. threshold 0: every sample at depth 0; above 1: the full forward."""
        if self.connectivity in LONG:
            return self.long_connections.early_exit(self.embed(inputs), self.readout, threshold)
        return exit_early((self.embed(inputs),), lambda i, state: (self.run_blocks(i, i + 1, state[0]),),
                          lambda state: self.head(state[0]), self.depth, threshold)

    def clamp_scalars(self) -> None:
        """The hybrid's gates and weights into its clamp_range (LongConnections.clamp_scalars)."""
        self.long_connections.clamp_scalars()

    def clamp_after(self, optimizer: torch.optim.Optimizer):
        """clamp_scalars after each of optimizer's steps (the authors' H-ACN: clamp_range=(0, 1)); returns
        the hook's handle."""
        return self.long_connections.clamp_after(optimizer)

    def truncate(self, k: int) -> "DepthModel":
        """A model that runs only the first k blocks; it shares every parameter with this one."""
        check_depth(k, self.depth)
        scalars = None if self.scalars is None else self.scalars.truncated(k * self.units_per_block)
        shallow = shallow_copy(self, blocks=nn.ModuleList(list(self.blocks)[:k]),
                               **({} if scalars is None else scalars.owned()))
        shallow.scalars = scalars
        shallow.connect()
        return shallow
