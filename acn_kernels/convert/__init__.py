"""acnify: turn a residual model from timm or Hugging Face into an ACN, in place."""
from __future__ import annotations

import sys

from torch import nn

from .._validation import check_choice
from ..backend import BACKENDS
from ..long_connections import check_hybrid_options

SUPPORTED = ("timm.models.vision_transformer.VisionTransformer",
             "transformers BertModel, GPT2Model, LlamaModel and the Llama-shaped decoders (Qwen2, Mistral, ...), "
             "each with the task models around one (BertForSequenceClassification, GPT2LMHeadModel, "
             "LlamaForCausalLM, ...)")
CONNECTIVITIES = ("acn", "hybrid")


def acnify(model: nn.Module, backend: str = "auto", connectivity: str = "acn", gate_init: float = 0.5,
           learn_gates: bool = True, long_weights: bool = False, gate_scope: str = "unit", x0_weight: bool = False,
           gates_from_long_weights: bool = False, long_weight_init: float = 1.0, clamp_range=None,
           skip_attention: bool = False) -> nn.Module:
    """Converts `model` in place and returns it: long connections instead of its residual adds, with
    `probe` (the output of every depth) and `truncate(k)`. The state_dict keys do not change, so a
    residual checkpoint loads into the converted model (to fine-tune from) and back.
    connectivity="hybrid" keeps a gated short path beside the long one (the H-ACN; LongConnections'
    docstring): its gates (and, with long_weights=True, its long weights; with x0_weight=True the
    weight of x_0) are the only new parameters, registered as `gates.i` (`long_weights.i`,
    `x0_weight.0`) beside the converted blocks. gate_scope="block" gives a decoder layer one gate (and
    one long weight) for both of its branches, as the authors' H-ACN does; gates_from_long_weights,
    long_weight_init, clamp_range (with the model's `clamp_after(optimizer)`) and skip_attention (a
    decoder layer's attention short path whole, only its MLP's gated: the authors' LSN) are the GPT's
    options of the same names. A Hugging Face model records the conversion in its config, so that it saves and
    loads back converted (huggingface.py)."""
    check_choice("backend", backend, BACKENDS)
    check_choice("connectivity", connectivity, CONNECTIVITIES)
    check_choice("gate_scope", gate_scope, GATE_SCOPES)
    check_hybrid_options(connectivity == "hybrid", gate_scope="unit", gate_init=gate_init, learn_gates=learn_gates,
                         long_weights=long_weights is not False, x0_weight=x0_weight is not False,
                         gates_from_long_weights=gates_from_long_weights, long_weight_init=long_weight_init,
                         clamp_range=clamp_range, skip_attention=skip_attention,
                         not_hybrid=f"connectivity={connectivity!r}")
    if any(hasattr(m, "long_connections") for m in model.modules()):
        raise TypeError(f"acnify supports {' and '.join(SUPPORTED)}; got {type(model).__name__} (already converted)")
    options = dict(connectivity=connectivity, gate_init=gate_init, learn_gates=learn_gates, long_weights=long_weights,
                   gate_scope=gate_scope, x0_weight=x0_weight, gates_from_long_weights=gates_from_long_weights,
                   long_weight_init=long_weight_init, clamp_range=None if clamp_range is None else list(clamp_range),
                   skip_attention=skip_attention)
    converter = find_converter(model)
    if converter is None:
        raise TypeError(f"acnify supports {' and '.join(SUPPORTED)}; got {type(model).__name__}")
    converted = converter(model, long_connection_options(backend, options))
    if getattr(model, "config", None) is not None and "transformers" in sys.modules:
        from .huggingface import record_conversion
        record_conversion(converted, options)
    return converted


GATE_SCOPES = ("unit", "block")


def long_connection_options(backend: str, options: dict) -> dict:
    """LongConnections' arguments from acnify's (a config saved by an earlier version has only the first
    four of its options: the others take their defaults)."""
    clamp_range = options.get("clamp_range")
    return dict(backend=backend, gates="learned" if options["connectivity"] == "hybrid" else None,
                gate_init=options["gate_init"], learn_gates=options["learn_gates"],
                long_weights=options["long_weights"],
                gate_scope="depth" if options.get("gate_scope", "unit") == "block" else "unit",
                x0_weight=options.get("x0_weight", False),
                gates_from_long_weights=options.get("gates_from_long_weights", False),
                long_weight_init=options.get("long_weight_init", 1.0),
                clamp_range=None if clamp_range is None else tuple(clamp_range),
                skip_attention=options.get("skip_attention", False))


def find_converter(model: nn.Module):
    """The function that converts `model`'s family, or None."""
    if "timm" in sys.modules:
        from timm.models.vision_transformer import VisionTransformer
        if type(model) is VisionTransformer:
            from .timm import acnify_vit
            return acnify_vit
    if "transformers" not in sys.modules:
        return None
    from transformers import GPT2Model, GPT2PreTrainedModel
    from transformers.models.bert.modeling_bert import BertEncoder, BertPreTrainedModel
    if isinstance(model, BertPreTrainedModel) and any(isinstance(m, BertEncoder) for m in model.modules()):
        from .bert import acnify_bert
        return acnify_bert
    if isinstance(model, GPT2PreTrainedModel) and any(isinstance(m, GPT2Model) for m in model.modules()):
        from .gpt2 import acnify_gpt2
        return acnify_gpt2
    from .llama import acnify_llama, llama_shaped_base
    if llama_shaped_base(model) is not None:
        return acnify_llama
    return None


def convert_recorded(model: nn.Module, options: dict) -> None:
    """The conversion a loaded config records, at the end of the model's init: nothing where the model
    is converted already, or is a part that the recorded conversion does not concern."""
    if hasattr(model, "probe") and any(hasattr(m, "long_connections") for m in model.modules()):
        return
    converter = find_converter(model)
    if converter is not None:
        converter(model, long_connection_options("auto", options))


from .huggingface import install  # noqa: E402

install()
