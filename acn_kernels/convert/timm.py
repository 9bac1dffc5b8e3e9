"""acnify for timm's VisionTransformer: each block without its two residual adds, a running sum from
the embedded tokens (after the position embedding and norm_pre), timm's final norm on the sum, then
timm's own pooling and head. Classes are swapped for subclasses, so parameter names, and with them
the state_dict keys, stay as timm has them."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..long_connections import HybridOptions, attach, build_long_connections, shallow_copy


class AcnBlock(Block):
    """x -> ls1(attn(norm1(x))) -> ls2(mlp(norm2(.))), drop paths where timm has them; no skips."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        return self.run_normed(x, self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)

    def run_normed(self, x, h, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        h = self.drop_path1(self.ls1(self.attn(h, attn_mask=attn_mask, is_causal=is_causal)))
        return self.drop_path2(self.ls2(self.mlp(self.norm2(h))))


class AcnVisionTransformer(VisionTransformer):
    """timm's ViT with long connections; `probe` gives the logits of every depth, `truncate(k)` the
    first k blocks (parameters shared)."""

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        self.long_connections.gradient_checkpointing = self.grad_checkpointing
        return self.long_connections(self.embed_tokens(x), attn_mask=attn_mask, is_causal=is_causal)

    def probe(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        """(L+1, batch, classes): timm's head on the normalized sum of every depth."""
        sums = self.long_connections.probe(self.embed_tokens(x), attn_mask=attn_mask, is_causal=is_causal)
        return torch.stack([self.forward_head(s) for s in sums])

    def forward_intermediates(self, *args, **kwargs):
        """Refused: timm's walk over the blocks would skip the running sum (and return wrong features)."""
        raise NotImplementedError(
            f"{type(self).__name__}: timm's forward_intermediates, get_intermediate_layers and "
            "prune_intermediate_layers walk the blocks without the long connections; use probe(x) for every "
            "depth's logits, long_connections.probe(embed_tokens(x)) for every depth's normalized sum, and "
            "truncate(k) to keep the first k blocks")

    get_intermediate_layers = prune_intermediate_layers = forward_intermediates  # the last: the blocks it
    # cut would still run in the long connections

    def clamp_after(self, optimizer: torch.optim.Optimizer):
        """The hybrid's gates and weights clamped into its clamp_range after each optimizer step."""
        return self.long_connections.clamp_after(optimizer)

    def truncate(self, k: int) -> "AcnVisionTransformer":
        long = self.long_connections.truncate(k)
        shallow = shallow_copy(self, blocks=nn.Sequential(*long.blocks), **(long.scalars.owned() if long.hybrid else {}))
        attach(shallow, long)
        return shallow


def acnify_vit(model: VisionTransformer, backend: str, hybrid: HybridOptions | None) -> AcnVisionTransformer:
    unsupported = sorted({type(b).__name__ for b in model.blocks if type(b) is not Block})
    if unsupported:
        raise TypeError(f"acnify converts timm ViTs built of timm.models.vision_transformer.Block, got blocks "
                        f"{', '.join(unsupported)}")
    for block in model.blocks:
        block.__class__ = AcnBlock
    model.__class__ = AcnVisionTransformer
    final = None if isinstance(model.norm, nn.Identity) else model.norm
    build_long_connections(model, list(model.blocks), [b.norm1 for b in model.blocks], final, backend, hybrid)
    return model
