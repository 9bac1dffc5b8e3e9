"""The skeleton every model family shares: embed -> L blocks -> final norm -> readout.

`connectivity` decides how the blocks are joined (ACN-NOTES section 1):

    "acn":      x_i = f_i(x_{i-1}),              state after k blocks: y_k = x_0 + ... + x_k
    "residual": x_i = x_{i-1} + f_i(x_{i-1})     (the residual adds live inside each block)
    "ffn":      x_i = f_i(x_{i-1})               state after k blocks: x_k

The states after k = 0..L blocks, read through the shared final norm and readout, are the L+1
nested sub-networks that `probe` scores and `truncate` keeps.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from .._validation import check_choice, check_positive_int

CONNECTIVITIES = ("acn", "residual", "ffn")


class DepthModel(nn.Module):
    """Subclasses set `self.blocks`, `self.final_norm`, and define `embed` and `readout`."""

    def __init__(self, depth: int, connectivity: str):
        super().__init__()
        check_positive_int("depth", depth)
        check_choice("connectivity", connectivity, CONNECTIVITIES)
        self.connectivity = connectivity

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def states(self, inputs: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the hidden state after k = 0..L blocks (before the final norm)."""
        x = self.embed(inputs)
        running_sum = x
        yield x
        for block in self.blocks:
            x = block(x)
            if self.connectivity == "acn":
                running_sum = running_sum + x
                yield running_sum
            else:
                yield x

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.readout(self.final_norm(hidden))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        for hidden in self.states(inputs):
            pass
        return self.head(hidden)

    def partial_sums(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, *hidden_shape): y_0..y_L for "acn", the state after k blocks otherwise."""
        return torch.stack(list(self.states(inputs)))

    def probe(self, inputs: torch.Tensor) -> torch.Tensor:
        """(L+1, batch, classes): logits of every depth k through the shared final norm and head."""
        return torch.stack([self.head(hidden) for hidden in self.states(inputs)])

    def truncate(self, k: int) -> "DepthModel":
        """A model that runs only the first k blocks; it shares every parameter with this one."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.depth:
            raise ValueError(f"k must be an integer in [0, {self.depth}], got {k!r}")
        shallow = copy.copy(self)
        # copy.copy shares the module dicts; give the copy its own so replacing blocks is local.
        shallow._modules = dict(self._modules)
        shallow._modules["blocks"] = nn.ModuleList(list(self.blocks)[:k])
        return shallow
