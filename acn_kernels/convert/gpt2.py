"""acnify for GPT2Model and the task models around one (GPT2LMHeadModel, ...): each block's
attention branch (after ln_1) and MLP branch (after ln_2) as two units of the long connections, the
running sum from the embeddings after the position embeddings (and dropout), ln_f on the sum. See
decoder.py for how the model's own forward runs them."""
from __future__ import annotations

from torch import nn

from ..long_connections import HybridOptions
from .decoder import Decoder, convert_decoder


class GPT2Decoder(Decoder):
    LAYERS = "h"
    BRANCHES = (("attn", "ln_1"), ("mlp", "ln_2"))
    FINAL_NORM = "ln_f"

    @staticmethod
    def attention_keywords(cache=None, attention_mask=None, encoder_hidden_states=None, *, encoder_attention_mask=None,
                           use_cache=False, **kwargs) -> dict:
        """GPT2Model calls a block with (hidden_states, cache, mask, encoder_hidden_states, ...)."""
        return dict(cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs)


def acnify_gpt2(model: nn.Module, backend: str, hybrid: HybridOptions | None) -> nn.Module:
    from transformers import GPT2Model

    base = model if isinstance(model, GPT2Model) else model.transformer
    if base.config.add_cross_attention:
        raise TypeError("acnify converts decoder-only GPT-2 models, got one with cross-attention "
                        "(config.add_cross_attention=True)")
    return convert_decoder(model, base, GPT2Decoder, backend, hybrid)
