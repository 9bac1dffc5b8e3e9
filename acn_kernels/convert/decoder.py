"""acnify for decoder-only language models (gpt2.py, llama.py): the machinery they share.

Each decoder layer becomes two units of the long connections, its attention branch then its MLP
branch (each after its own norm; the attention output feeds the MLP branch's norm), both added to a
running sum that starts at the embeddings; the model's own final norm then runs on the sum.

The model keeps its forward (embeddings, cache, position ids, masks, rotary tables, final norm, head):
its layer list becomes a `LongConnectionLayers`, which holds the same layers (the state_dict keys do
not change) but which, while that forward runs, its loop iterates as one runner of the long
connections (anywhere else the list is the layers, as before). The runner
gets the keywords the model passes its layers and hands the attention branches theirs; it returns
the running sum, so `generate`, the KV cache, attention masks, `labels=` and gradient checkpointing
work as the model has them. `output_hidden_states` gives the running sums after 0..L layers (the
last one through the final norm, as the model's last hidden state).
"""
from __future__ import annotations

import torch
from torch import nn

from ..long_connections import LongConnections, attach, register_scalars
from .huggingface import Owner, SumsAsHiddenStates, bind, converted_class, register_recording


class DecoderUnit(nn.Module):
    """A layer's branch as a unit of the long connections: the attention gets the layers' keywords
    and gives the first of its outputs; the MLP takes the hidden states alone."""

    def __init__(self, module: nn.Module, attention: bool):
        super().__init__()
        self.module, self.attention = module, attention

    def forward(self, hidden_states: torch.Tensor, **keywords) -> torch.Tensor:
        return self.module(hidden_states, **keywords)[0] if self.attention else self.module(hidden_states)


class Runner(nn.Module):
    """What the model's layer loop calls, once: the long connections over every layer's branches."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: the owner registers itself

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        owner = self.owner
        if owner.replaced_output is not None:
            return owner.replaced_output
        long = owner.long_connections
        layers = owner.layer_list()
        long.gradient_checkpointing = owner.training and getattr(layers[0], "gradient_checkpointing", False)
        keywords = owner.attention_keywords(*args, **kwargs)
        if not owner.recording:
            return long(hidden_states, **keywords)
        y, x, owner.recorded_outputs = long.chain(hidden_states, **keywords)
        return long.sum_and_norm(y, x)[0]


class LongConnectionLayers(nn.ModuleList):
    """The decoder layers as the model registers them; while the owner's forward runs, iterated (or
    sliced) as one Runner. Indexing by position always gives a layer."""

    def __init__(self, layers, runner: Runner):
        super().__init__(layers)
        object.__setattr__(self, "runner", runner)

    def __iter__(self):
        return iter((self.runner,)) if self.runner.owner.running else super().__iter__()

    def __getitem__(self, index):
        if isinstance(index, slice) and self.runner.owner.running:
            return [self.runner]
        return super().__getitem__(index)


class Decoder(SumsAsHiddenStates, Owner):
    """The mixin of a converted decoder model (its class becomes a subclass with this first). A family
    module sets LAYERS (the layer list's attribute name) and BRANCHES (a layer's attention branch and
    its input norm, then its MLP branch and its input norm, by attribute name) and defines
    `attention_keywords`."""

    LAYERS = "layers"
    BRANCHES: tuple = ()

    def units_of(self, layer: nn.Module) -> tuple:
        """(unit, its input norm) of the layer's attention branch, then of its MLP branch."""
        (attention, attention_norm), (mlp, mlp_norm) = self.BRANCHES
        return ((DecoderUnit(getattr(layer, attention), attention=True), getattr(layer, attention_norm)),
                (DecoderUnit(getattr(layer, mlp), attention=False), getattr(layer, mlp_norm)))

    def layer_list(self) -> list:
        return list(self._modules[self.LAYERS]._modules.values())

    def keep_layers(self, k: int) -> None:
        """The layer list of a truncated copy: its first k layers, run by a runner of the copy."""
        self._modules[self.LAYERS] = LongConnectionLayers(self.layer_list()[:k], Runner(self))


def convert_decoder(model: nn.Module, base_model: nn.Module, mixin: type, options: dict) -> nn.Module:
    """Converts the decoder `base_model` (inside `model`, or `model` itself) in place, unless done."""
    if not isinstance(base_model, Decoder):
        base_model.__class__ = converted_class(mixin, type(base_model))
        register_recording(base_model)
        base_model.prepare()
        layers = base_model.layer_list()
        units = [unit for layer in layers for unit in base_model.units_of(layer)]
        long = LongConnections([u for u, _ in units], [n for _, n in units], None, units_per_depth=2, **options)
        base_model._modules[base_model.LAYERS] = LongConnectionLayers(layers, Runner(base_model))
        register_scalars(base_model, long)
        attach(base_model, long)
    bind(model)
    return model
