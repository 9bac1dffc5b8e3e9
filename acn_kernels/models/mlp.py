"""MLP: x_0 = Linear(input), blocks act(Linear(x)), final LayerNorm, linear head."""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_float_tensor, check_model_dtype, check_positive_int
from ..backend import resolve_backend
from ..ops import linear_act_accumulate
from .base import DepthModel
from .layers import FusedLinear, make_activation


class MLPBlock(nn.Module):
    """act(linear(x)), plus x in the residual twin. On a fused backend (`backend`, which the model
    sets) the block is one `linear_act_accumulate`, the residual add in its epilogue."""

    def __init__(self, dim: int, activation: str, residual: bool):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.act = make_activation(activation)
        self.activation = activation
        self.residual = residual
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_backend(self.backend, x.device) == "reference":
            out = self.act(self.linear(x))
            return x + out if self.residual else out
        return self.run_accumulate(x, x if self.residual else None, self.backend)[1]

    def run_accumulate(self, x: torch.Tensor, y: torch.Tensor | None, backend: str, keep_output: bool = True):
        """(act(linear(x)), y + act(linear(x))) from one GEMM with the sum in its epilogue
        (LongConnections calls it on fused backends); keep_output=False: (None, y + act(linear(x)))."""
        return linear_act_accumulate(x, self.linear.weight, self.linear.bias, y, activation=self.activation,
                                     backend=backend, return_h=keep_output)


class MLP(DepthModel):
    def __init__(self, in_features: int, dim: int, depth: int, num_classes: int,
                 activation: str = "gelu", connectivity: str = "acn", backend: str = "auto", **hybrid_options):
        super().__init__(depth, connectivity, backend, **hybrid_options)
        for name, value in (("in_features", in_features), ("dim", dim), ("num_classes", num_classes)):
            check_positive_int(name, value)
        make_activation(activation)  # validates the name before any block is built
        self.input_proj = FusedLinear(in_features, dim)
        self.blocks = nn.ModuleList(
            MLPBlock(dim, activation, residual=connectivity == "residual") for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.classifier = FusedLinear(dim, num_classes)
        self.connect()

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        width = self.input_proj.in_features
        check_float_tensor("inputs", inputs, f"(batch, {width})", lambda shape: len(shape) == 2 and shape[1] == width)
        check_model_dtype("inputs", inputs, self)
        return self.input_proj(inputs)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)
