"""MLP-Mixer as in the ACN paper: patch embedding plus a CLS token, L mixer layers, final
LayerNorm, CLS token into a linear classifier.

A layer is token-MLP then channel-MLP, then the authors' tail LN(ReLU(Linear(c) + x)), whose
short skip from the layer input both twins keep (ACN-NOTES section 2). "residual" adds the usual
skips around the two MLPs; "acn" and "ffn" have none inside the layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_positive_int
from .base import DepthModel
from .layers import FeedForward, FusedLinear, PatchEmbedding


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int, token_dim: int, channel_dim: int, residual: bool):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = FeedForward(tokens, token_dim)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = FeedForward(dim, channel_dim)
        self.tail = FusedLinear(dim, dim)
        self.tail_norm = nn.LayerNorm(dim)
        self.residual = residual

    @property
    def input_norm(self) -> nn.LayerNorm:
        return self.token_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_normed(x, self.token_norm(x))

    def run_normed(self, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        mixed = self.token_mlp(normed.transpose(1, 2)).transpose(1, 2)
        if self.residual:
            mixed = mixed + x
        channels = self.channel_mlp(self.channel_norm(mixed))
        if self.residual:
            channels = channels + mixed
        return self.tail_norm(torch.relu(self.tail(channels) + x))


class Mixer(DepthModel):
    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int,
                 token_dim: int, channel_dim: int, num_classes: int, connectivity: str = "acn",
                 backend: str = "auto", **hybrid_options):
        super().__init__(depth, connectivity, backend, **hybrid_options)
        for name, value in (("token_dim", token_dim), ("channel_dim", channel_dim),
                            ("num_classes", num_classes)):
            check_positive_int(name, value)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        tokens = self.patch_embed.num_patches + 1
        self.blocks = nn.ModuleList(
            MixerBlock(tokens, dim, token_dim, channel_dim, residual=connectivity == "residual")
            for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.classifier = FusedLinear(dim, num_classes)
        self.connect()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(images)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden[:, 0])
