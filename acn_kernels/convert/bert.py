"""acnify for Hugging Face's BertModel and the task models around one: the AC-BERT of the paper.
Both `+ input` adds of every layer removed (post-LN: LayerNorm(dropout(dense(h))) alone), a running
sum from the embedding output, no final norm, and the pooler and heads on the sum; the BertModel's
`output_hidden_states` are the running sums. Classes are swapped for subclasses, so parameter names
and state_dict keys stay as they are; `probe` and `truncate` are huggingface.py's.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEncoder, BertModel, BertOutput, BertSelfOutput

from ..long_connections import HybridOptions, build_long_connections
from .huggingface import Owner, SumsAsHiddenStates, bind, converted_class, register_recording


class AcnBertSelfOutput(BertSelfOutput):
    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)))


class AcnBertOutput(BertOutput):
    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)))


class AcnBertEncoder(Owner, BertEncoder):
    """The layers joined by long connections; its output is x_0 + ... + x_L."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, use_cache=None, **kwargs):
        if self.replaced_output is not None:
            total = self.replaced_output
        else:
            y, x, outputs = self.long_connections.chain(
                hidden_states, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask, cache=cache, **kwargs)
            total = self.long_connections.sum_and_norm(y, x)[1]
            self.recorded_outputs = outputs if self.recording else None
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=total, cache=cache if use_cache else None)

    def keep_layers(self, k: int) -> None:
        self._modules["layer"] = nn.ModuleList(list(self.layer)[:k])


class BertSums(SumsAsHiddenStates):
    """The mixin of a converted BertModel: its hidden states are its encoder's running sums."""

    def sums_owner(self) -> AcnBertEncoder:
        return self.encoder


def acnify_bert(model: nn.Module, backend: str, hybrid: HybridOptions | None) -> nn.Module:
    """Converts every (unconverted) BertEncoder inside `model`, and the BertModel around it, and gives
    `model` probe and truncate."""
    for bert in [m for m in model.modules() if type(m) is BertModel and type(m.encoder) is BertEncoder]:
        bert.__class__ = converted_class(BertSums, BertModel)
        register_recording(bert)
    for encoder in [m for m in model.modules() if type(m) is BertEncoder]:
        for layer in encoder.layer:
            layer.attention.output.__class__ = AcnBertSelfOutput
            layer.output.__class__ = AcnBertOutput
        encoder.__class__ = AcnBertEncoder
        encoder.prepare()
        build_long_connections(encoder, list(encoder.layer), None, None, backend, hybrid)
    bind(model)
    return model
