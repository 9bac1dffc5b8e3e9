"""acnify: turn a residual model from timm or Hugging Face into an ACN, in place."""
from __future__ import annotations

import sys

from torch import nn

from .._validation import check_choice
from ..backend import BACKENDS

SUPPORTED = ("timm.models.vision_transformer.VisionTransformer",
             "transformers BertModel and the Bert task models around one (BertForSequenceClassification, ...)")


def acnify(model: nn.Module, backend: str = "auto", connectivity: str = "acn", gate_init: float = 0.5,
           learn_gates: bool = True, long_weights: bool = False) -> nn.Module:
    """Converts `model` in place and returns it: long connections instead of its residual adds, with
    `probe` (the output of every depth) and `truncate(k)`. The state_dict keys do not change, so a
    residual checkpoint loads into the converted model (to fine-tune from) and back.
    connectivity="hybrid" keeps a gated short path beside the long one (the H-ACN; LongConnections'
    docstring): its gates (and, with long_weights=True, its long weights) are the only new parameters,
    registered as `gates.i` (`long_weights.i`) beside the converted blocks."""
    check_choice("backend", backend, BACKENDS)
    check_choice("connectivity", connectivity, ("acn", "hybrid"))
    options = dict(backend=backend, gates="learned" if connectivity == "hybrid" else None, gate_init=gate_init,
                   learn_gates=learn_gates, long_weights=long_weights)
    if "timm" in sys.modules:
        from timm.models.vision_transformer import VisionTransformer
        if type(model) is VisionTransformer:
            from .timm import acnify_vit
            return acnify_vit(model, options)
    if "transformers" in sys.modules:
        from transformers.models.bert.modeling_bert import BertEncoder, BertPreTrainedModel
        if isinstance(model, BertPreTrainedModel) and any(type(m) is BertEncoder for m in model.modules()):
            from .hf import acnify_bert
            return acnify_bert(model, options)
    converted = " (already converted)" if any(hasattr(m, "long_connections") for m in model.modules()) else ""
    raise TypeError(f"acnify supports {' and '.join(SUPPORTED)}; got {type(model).__name__}{converted}")
