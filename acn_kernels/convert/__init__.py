"""acnify: turn a residual model from timm or Hugging Face into an ACN, in place."""
from __future__ import annotations

import dataclasses
import sys

from torch import nn

from .._validation import check_choice
from ..backend import BACKENDS
from ..long_connections import HybridOptions

SUPPORTED = ("timm.models.vision_transformer.VisionTransformer",
             "transformers BertModel, GPT2Model, LlamaModel and the Llama-shaped decoders (Qwen2, Mistral, ...), "
             "each with the task models around one (BertForSequenceClassification, GPT2LMHeadModel, "
             "LlamaForCausalLM, ...)")
CONNECTIVITIES = ("acn", "hybrid")


def acnify(model: nn.Module, backend: str = "auto", connectivity: str = "acn", **hybrid_options) -> nn.Module:
    """Converts `model` in place and returns it: long connections instead of its residual adds, with
    `probe` (the output of every depth) and `truncate(k)`. The state_dict keys do not change, so a
    residual checkpoint loads into the converted model (to fine-tune from) and back.
    connectivity="hybrid" keeps a gated short path beside the long one (the H-ACN), of the form its
    keywords give (long_connections.HybridOptions: the GPT's options of the same names; gate_scope="block"
    gives a decoder layer one gate, and one long weight, for both of its branches, as the authors' H-ACN
    does; skip_attention their LSN's whole attention path): its gates (long weights, x_0 weight) are the
    only new parameters, registered as `gates.i` (`long_weights.i`, `x0_weight.0`) beside the converted
    blocks, clamped after each optimizer step by the model's `clamp_after(optimizer)` where the form has a
    clamp_range. A Hugging Face model records the conversion in its config, so that it saves and loads
    back converted (huggingface.py)."""
    check_choice("backend", backend, BACKENDS)
    check_choice("connectivity", connectivity, CONNECTIVITIES)
    hybrid = HybridOptions.of(connectivity == "hybrid", f"connectivity={connectivity!r}", **hybrid_options)
    if any(hasattr(m, "long_connections") for m in model.modules()):
        raise TypeError(f"acnify supports {' and '.join(SUPPORTED)}; got {type(model).__name__} (already converted)")
    converter = find_converter(model)
    if converter is None:
        raise TypeError(f"acnify supports {' and '.join(SUPPORTED)}; got {type(model).__name__}")
    converted = converter(model, backend, hybrid)
    if getattr(model, "config", None) is not None and "transformers" in sys.modules:
        from .huggingface import record_conversion
        record_conversion(converted, record_of(connectivity, hybrid))
    return converted


def record_of(connectivity: str, hybrid: HybridOptions | None) -> dict:
    """What a Hugging Face config records of a conversion: the connectivity and the hybrid's options."""
    return {"connectivity": connectivity, **(hybrid or HybridOptions()).as_record()}


def hybrid_of(record: dict) -> HybridOptions | None:
    """The hybrid's options a config's record holds (one saved by an earlier version lacks the later
    fields: they take their defaults; "depth" was the block scope's earlier name), None for an ACN."""
    if record["connectivity"] != "hybrid":
        return None
    fields = {field.name for field in dataclasses.fields(HybridOptions)}
    options = {name: value for name, value in record.items() if name in fields}
    if options.get("gate_scope") == "depth":
        options["gate_scope"] = "block"
    return HybridOptions(**options)


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
        converter(model, "auto", hybrid_of(options))


from .huggingface import install  # noqa: E402

install()
