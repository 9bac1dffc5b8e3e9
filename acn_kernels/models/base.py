"""The skeleton every model family shares: embed -> L blocks -> final norm -> readout.

`connectivity` decides how the blocks are joined (ACN-NOTES section 1):

    "acn":      x_i = f_i(x_{i-1}),              state after k blocks: y_k = x_0 + ... + x_k
    "residual": x_i = x_{i-1} + f_i(x_{i-1})     (the residual adds live inside each block)
    "ffn":      x_i = f_i(x_{i-1})               state after k blocks: x_k

The states after k = 0..L blocks, read through the shared final norm and readout, are the L+1
nested sub-networks that `probe` scores and `truncate` keeps.

An "acn" model runs its long connections through the fused ops on `backend`: each block boundary
is one `accumulate_norm` (y += x_i and the next block's input norm), the final norm its
normalize="sum" mode, and `probe` one `probe_norm`. The residual and ffn twins are the eager
PyTorch baselines. Parameters and state_dict are the same whatever the backend.
"""
from __future__ import annotations

import copy
import warnings
from collections import deque
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._validation import check_choice, check_positive_int
from ..backend import BACKENDS, resolve_backend
from ..ops import accumulate_norm, probe_norm

CONNECTIVITIES = ("acn", "residual", "ffn")


def accumulate(y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if y is None else y + x


def fused_boundary(block: nn.Module, x: torch.Tensor, y: torch.Tensor | None, backend: str):
    """(y + x, block(x)) for a block that starts by normalizing its input (`block.input_norm`, then
    `block.run_normed(x, h)`): y + x and input_norm(x) come from one accumulate_norm pass."""
    norm = block.input_norm
    y, h = accumulate_norm(x, y, norm.weight, norm.bias, eps=norm.eps, backend=backend)
    return y, block.run_normed(x, h)


class DepthModel(nn.Module):
    """Subclasses set `self.blocks`, `self.final_norm`, and define `embed` and `readout`."""

    def __init__(self, depth: int, connectivity: str, backend: str = "auto"):
        super().__init__()
        check_positive_int("depth", depth)
        check_choice("connectivity", connectivity, CONNECTIVITIES)
        check_choice("backend", backend, BACKENDS)
        if connectivity != "acn" and backend not in ("auto", "reference"):
            warnings.warn(f"backend={backend!r} applies to the long connections of connectivity='acn'; "
                          f"the {connectivity} twin runs eager PyTorch", stacklevel=3)
        self.connectivity = connectivity
        self.requested_backend = backend
        self.gradient_checkpointing = False

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def backend(self) -> str:
        """What the long connections run on for this model's device ("reference" for the twins)."""
        if self.connectivity != "acn":
            return "reference"
        return resolve_backend(self.requested_backend, next(self.parameters()).device)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, fn, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # ------------------------------------------------------------------ eager chains (all twins)

    def states(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the hidden state after k = 0..L blocks (before the final norm), in eager PyTorch."""
        x = self.embed(inputs)
        running_sum = x
        yield x
        for block in self.blocks:
            x = self.run_block(block, x)
            if self.connectivity == "acn":
                running_sum = running_sum + x
                yield running_sum
            else:
                yield x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.readout(self.final_norm(hidden))

    # ------------------------------------------------------------------ the ACN on fused ops

    def acn_chain(self, inputs: torch.Tensor, backend: str):
        """(y, x_L, [x_0..x_L]) with y = x_0 + ... + x_{L-1} (None when L = 0)."""
        x = self.embed(inputs)
        y, outputs = None, [x]
        for block in self.blocks:
            if getattr(block, "input_norm", None) is not None:
                y, x = self.run_block(fused_boundary, block, x, y, backend)
            else:
                y, x = accumulate(y, x), self.run_block(block, x)
            outputs.append(x)
        return y, x, outputs

    def final_sum_norm(self, y: torch.Tensor | None, x: torch.Tensor, backend: str) -> torch.Tensor:
        norm = self.final_norm
        if isinstance(norm, nn.LayerNorm):
            return accumulate_norm(x, y, norm.weight, norm.bias, eps=norm.eps, normalize="sum", backend=backend)[1]
        return norm(accumulate(y, x))

    # ------------------------------------------------------------------ public

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.connectivity == "acn":
            backend = self.requested_backend
            y, x, _ = self.acn_chain(inputs, backend)
            return self.readout(self.final_sum_norm(y, x, backend))
        last_state = deque(self.states(inputs), maxlen=1)[0]  # walks the chain, keeps only the end
        return self.head(last_state)

    def partial_sums(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, *hidden_shape): y_0..y_L for "acn", the state after k blocks otherwise."""
        return torch.stack(list(self.states(inputs)))

    def probe(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, batch, classes): logits of every depth k through the shared final norm and head."""
        if self.connectivity != "acn":
            return torch.stack([self.head(hidden) for hidden in self.states(inputs)])
        _, _, outputs = self.acn_chain(inputs, self.requested_backend)
        xs = torch.stack(outputs)
        norm = self.final_norm
        if isinstance(norm, nn.LayerNorm):
            normed = probe_norm(xs, norm.weight, norm.bias, eps=norm.eps, backend=self.requested_backend)
        else:
            normed = norm(xs.cumsum(0))
        return torch.stack([self.readout(hidden) for hidden in normed])

    def truncate(self, k: int) -> "DepthModel":
        """A model that runs only the first k blocks; it shares every parameter with this one."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.depth:
            raise ValueError(f"k must be an integer in [0, {self.depth}], got {k!r}")
        shallow = copy.copy(self)
        # copy.copy shares the module dicts; give the copy its own so replacing blocks is local.
        shallow._modules = dict(self._modules)
        shallow._modules["blocks"] = nn.ModuleList(list(self.blocks)[:k])
        return shallow
