"""acnify for LlamaModel, LlamaForCausalLM and the decoders transformers ships in Llama's shape (Qwen2,
Mistral and their kin, recognized by their structure: a base model with `embed_tokens`, `layers`
of input_layernorm / self_attn / post_attention_layernorm / mlp, and `norm`), with the task heads
around them: each layer's attention branch and MLP branch as two units of the long connections, the
running sum from the token embeddings, the model's norm on the sum. See decoder.py."""
from __future__ import annotations

from torch import nn

from ..long_connections import HybridOptions
from .decoder import Decoder, convert_decoder

class LlamaShapedDecoder(Decoder):
    LAYERS = "layers"
    BRANCHES = (("self_attn", "input_layernorm"), ("mlp", "post_attention_layernorm"))

    @staticmethod
    def attention_keywords(**kwargs) -> dict:
        """The model calls each layer with keywords only (mask, rotary tables, position ids, cache)."""
        return kwargs


def llama_shaped_base(model: nn.Module) -> nn.Module | None:
    """The Llama-shaped base model of `model` (itself or its base model: `model`, or `transformer` in
    the question-answering head), or None."""
    for base in (model, getattr(model, "base_model", None)):
        layers = getattr(base, "layers", None)
        parts = [part for branch in LlamaShapedDecoder.BRANCHES for part in branch]
        if isinstance(layers, nn.ModuleList) and len(layers) and hasattr(base, "embed_tokens") \
                and hasattr(base, "norm") and all(hasattr(layers[0], part) for part in parts):
            return base
    return None


def acnify_llama(model: nn.Module, backend: str, hybrid: HybridOptions | None) -> nn.Module:
    base = llama_shaped_base(model)
    layer_types = set(getattr(base.config, "layer_types", None) or ())
    if len(layer_types) > 1:  # the model's loop would give the one runner a single layer type's mask
        raise TypeError(f"acnify converts Llama-shaped models whose layers all attend alike, got layer_types "
                        f"{sorted(layer_types)}")
    return convert_decoder(model, base, LlamaShapedDecoder, backend, hybrid)
