"""Transformer families: ViT (pre-LN) and a BERT-style encoder (post-LN).

One block class serves both. Without residual adds (acn, ffn) a block is
pre-LN  `MLP(LN2(Attn(LN1(x))))`  or post-LN  `LN2(MLP(LN1(Attn(x))))`;
"residual" restores the two in-block skips of the standard designs (ACN-NOTES section 2).
"""
from __future__ import annotations

import torch
from torch import nn

from .._validation import check_positive_int
from .base import DepthModel
from .layers import FeedForward, FusedLinear, PatchEmbedding, SelfAttention


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, residual: bool, norm_first: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.residual = residual
        self.norm_first = norm_first

    def _skip(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new + old if self.residual else new

    @property
    def input_norm(self) -> nn.LayerNorm | None:
        """norm1 when the block starts with it (pre-LN without a skip around it)."""
        return self.norm1 if self.norm_first and not self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            h = self._skip(self.attn(self.norm1(x)), x)
            return self._skip(self.mlp(self.norm2(h)), h)
        h = self.norm1(self._skip(self.attn(x), x))
        return self.norm2(self._skip(self.mlp(h), h))

    def run_normed(self, x: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """The pre-LN block without skips, from normed = norm1(x)."""
        return self.mlp(self.norm2(self.attn(normed)))


def _blocks(depth: int, dim: int, heads: int, mlp_dim: int, connectivity: str, norm_first: bool):
    check_positive_int("mlp_dim", mlp_dim)
    return nn.ModuleList(
        TransformerBlock(dim, heads, mlp_dim, residual=connectivity == "residual", norm_first=norm_first)
        for _ in range(depth))


class ViT(DepthModel):
    """Patch embedding + learned positions, pre-LN blocks, final LayerNorm, mean pooling, head."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int,
                 heads: int, mlp_dim: int, num_classes: int, connectivity: str = "acn", backend: str = "auto", **hybrid_options):
        super().__init__(depth, connectivity, backend, **hybrid_options)
        check_positive_int("num_classes", num_classes)
        self.patch_embed = PatchEmbedding(image_size, patch_size, in_channels, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, dim) * 0.02)
        self.blocks = _blocks(depth, dim, heads, mlp_dim, connectivity, norm_first=True)
        self.final_norm = nn.LayerNorm(dim)
        self.classifier = FusedLinear(dim, num_classes)
        self.connect()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(images) + self.pos_embed

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden.mean(dim=1))


class Encoder(DepthModel):
    """BERT-style: token + position embeddings and LayerNorm, post-LN blocks, no final norm on the
    sum (ACN-NOTES section 2), first token into a linear classifier."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, heads: int,
                 mlp_dim: int, num_classes: int, connectivity: str = "acn", backend: str = "auto", **hybrid_options):
        super().__init__(depth, connectivity, backend, **hybrid_options)
        for name, value in (("vocab_size", vocab_size), ("max_len", max_len), ("dim", dim),
                            ("num_classes", num_classes)):
            check_positive_int(name, value)
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.blocks = _blocks(depth, dim, heads, mlp_dim, connectivity, norm_first=False)
        self.final_norm = nn.Identity()
        self.classifier = FusedLinear(dim, num_classes)
        self.connect()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        max_len = self.pos_embed.num_embeddings
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64) or tokens.shape[1] > max_len:
            raise ValueError(f"tokens must be an integer tensor of shape (batch, length <= {max_len}), "
                             f"got dtype {tokens.dtype} and shape {tuple(tokens.shape)}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.embed_norm(self.token_embed(tokens) + self.pos_embed(positions))

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden[:, 0])
