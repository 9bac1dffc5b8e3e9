"""Building blocks shared by the model families."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_choice, check_divisible, check_float_tensor, check_model_dtype, check_positive_int
from ..backend import resolve_backend
from ..ops import feed_forward, linear

class SwiGLU(nn.Module):
    """silu(gate) * up of z = [gate | up] (Llama's MLP): the preceding linear has twice the rows."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up


ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "identity": nn.Identity,
    "swiglu": SwiGLU,
}


def make_activation(name: str) -> nn.Module:
    check_choice("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()


class FusedLinear(nn.Linear):
    """nn.Linear (the same parameters and state_dict keys) that runs `linear` on a fused backend
    (`backend`, which the model sets): its bias gradient inside the weight-gradient GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_backend(self.backend, x.device) == "reference":
            return super().forward(x)
        return linear(x, self.weight, self.bias, backend=self.backend)


class FeedForward(nn.Sequential):
    """Linear -> activation -> Linear. On a fused backend (`backend`, which the model sets) it is one
    `feed_forward`: the first linear's bias and activation in its GEMM's epilogue, the activation's
    backward in the epilogue of the GEMM that produces the hidden gradient."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True):
        gated = 2 if activation == "swiglu" else 1  # swiglu's first linear: the gate's rows, then the up's
        super().__init__(nn.Linear(dim, gated * hidden_dim, bias=bias), make_activation(activation),
                         nn.Linear(hidden_dim, dim, bias=bias))
        self.activation = activation
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_backend(self.backend, x.device) == "reference":
            return super().forward(x)
        first, _, second = self
        return feed_forward(x, first.weight, first.bias, second.weight, second.bias, activation=self.activation,
                            backend=self.backend)


class SelfAttention(nn.Module):
    """Multi-head self-attention over (batch, tokens, dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        check_positive_int("heads", heads)
        check_divisible("dim", dim, "heads", heads)
        self.heads = heads
        self.qkv = FusedLinear(dim, 3 * dim)
        self.proj = FusedLinear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


def pair(name: str, value) -> tuple[int, int]:
    """(height, width) from an int (square) or a pair of ints."""
    sizes = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    for size in sizes:
        check_positive_int(name, size)
    return sizes


class PatchEmbedding(nn.Module):
    """(batch, channels, H, W) -> (batch, patches, dim) with non-overlapping patches; sizes are ints
    (square) or (height, width) pairs, such as (1, 40) signals in (1, 4) patches."""

    def __init__(self, image_size, patch_size, in_channels: int, dim: int):
        super().__init__()
        image, patch = pair("image_size", image_size), pair("patch_size", patch_size)
        for name, value in (("in_channels", in_channels), ("dim", dim)):
            check_positive_int(name, value)
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(f"image_size must be divisible by patch_size={patch_size}, got image_size={image_size}")
        self.image_size = image
        self.num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.proj.in_channels, *self.image_size)
        check_float_tensor("images", images, f"(batch, {', '.join(map(str, expected))})",
                           lambda shape: len(shape) == 4 and tuple(shape[1:]) == expected)
        check_model_dtype("images", images, self)
        return self.proj(images).flatten(2).transpose(1, 2)
