"""acnify for Hugging Face's BertModel and the task models around one: the AC-BERT of the paper.
Both `+ input` adds of every layer removed (post-LN: LayerNorm(dropout(dense(h))) alone), a running
sum from the embedding output, no final norm, and the pooler and heads on the sum. Classes are
swapped for subclasses, so parameter names and state_dict keys stay as they are.

`probe` runs the model's own forward once with every layer, then once per shallower depth with the
encoder's output replaced by that depth's sum (no layer runs again): any head works as it is.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions
from transformers.models.bert.modeling_bert import BertEncoder, BertOutput, BertSelfOutput

from ..long_connections import LongConnections, attach, register_scalars, registered_scalars, shallow_copy


class AcnBertSelfOutput(BertSelfOutput):
    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)))


class AcnBertOutput(BertOutput):
    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)))


class AcnBertEncoder(BertEncoder):
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


def find_encoder(model: nn.Module) -> tuple[str, AcnBertEncoder]:
    return next((name, m) for name, m in model.named_modules() if isinstance(m, AcnBertEncoder))


def model_output(output):
    """What a probe compares across depths: the logits of a task model, else the hidden states."""
    for name in ("logits", "prediction_logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0]


def probe(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """(L+1, ...): the model's output with the first k layers, k = 0..L."""
    _, encoder = find_encoder(model)
    encoder.recording = True
    try:
        deepest = model_output(model(*args, **kwargs))
        sums = torch.stack(encoder.recorded_outputs).cumsum(0)
        shallower = []
        for k in range(encoder.long_connections.depth):
            encoder.replaced_output = sums[k]
            shallower.append(model_output(model(*args, **kwargs)))
    finally:
        encoder.recording, encoder.replaced_output, encoder.recorded_outputs = False, None, None
    return torch.stack([*shallower, deepest])


def truncate(model: nn.Module, k: int) -> nn.Module:
    """The first k layers, every parameter shared: the modules on the way to the encoder are copied."""
    path, encoder = find_encoder(model)
    long = encoder.long_connections.truncate(k)
    shallow = parent = shallow_copy(model)
    for name in path.split("."):
        parent._modules[name] = parent = shallow_copy(parent._modules[name])
    parent._modules["layer"] = nn.ModuleList(long.blocks)
    parent._modules.update(registered_scalars(long))
    attach(parent, long)
    bind(shallow)
    return shallow


def bind(model: nn.Module) -> None:
    model.probe = types.MethodType(probe, model)
    model.truncate = types.MethodType(truncate, model)


def acnify_bert(model: nn.Module, options: dict) -> nn.Module:
    encoders = [m for m in model.modules() if type(m) is BertEncoder]
    for encoder in encoders:
        for layer in encoder.layer:
            layer.attention.output.__class__ = AcnBertSelfOutput
            layer.output.__class__ = AcnBertOutput
        encoder.__class__ = AcnBertEncoder
        encoder.recording, encoder.replaced_output, encoder.recorded_outputs = False, None, None
        long = LongConnections(list(encoder.layer), **options)
        register_scalars(encoder, long)
        attach(encoder, long)
    bind(model)
    return model
