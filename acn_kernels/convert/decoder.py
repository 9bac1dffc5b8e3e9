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

Self-speculative decoding (`speculative_generate`, acn_kernels/speculative.py) runs the same forward
with the runner told to run only some units (a `Segment`): the first 2k from the embeddings (the draft),
or the others from the state the draft left (the verify pass); see `DecoderSpeculator`.
transformers' own early-exit drafting, `generate(..., assistant_early_exit=k)`, sets the model's
`config.num_hidden_layers` to k while it drafts (with a cache of k layers); the runner honours it as
the model's own layer loop does, running the first k layers and leaving their running sum y_k to the
model's final norm and head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._validation import check_int_tensor, check_token_ids
from ..long_connections import HybridOptions, Readout, build_long_connections, owner_of
from ..speculative import check_draft_depth
from .huggingface import Owner, SumsAsHiddenStates, bind, converted_class, register_recording


@dataclass
class Segment:
    """Units first..stop-1 of the long connections for one forward: from the embeddings (state None),
    or from a state (s, y) that units before `first` left; the runner leaves its state after them here."""
    first: int
    stop: int
    state: tuple | None = None


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
        segment = owner.segment
        if segment is None and owner.config.num_hidden_layers < long.depth:
            segment = Segment(0, owner.config.num_hidden_layers * long.units_per_block)  # an early exit's draft
        if segment is not None:
            state = long.start_state(hidden_states) if segment.state is None else segment.state
            segment.state = long.run_units(segment.first, segment.stop, state, **keywords)
            return segment.state[1]
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


def check_input_ids(owner: nn.Module, input_ids: torch.Tensor, end: int, name: str = "input_ids",
                    reach: str = "") -> None:
    """input_ids within the model's vocabulary (its embedding's rows), and the positions they reach, up
    to `end` (`reach` says how), within its config.max_position_embeddings (GPT-2's n_positions): what
    the model would otherwise meet as a bare IndexError in its embeddings, or not at all (rotary
    positions past the trained range)."""
    check_token_ids("input_ids", input_ids, owner.get_input_embeddings().num_embeddings,
                    "the model's vocabulary: its embedding's rows")
    limit = owner.config.max_position_embeddings
    if end > limit:
        raise ValueError(f"{name} must fit the model's {limit} positions (config.max_position_embeddings), got "
                         f"{reach or f'{input_ids.shape[-1]} positions'}, {end} in all")


def check_generation(owner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     new_tokens: int) -> None:
    """check_input_ids for a generation: the positions it reaches are the longest prompt (without its
    left padding) and the new tokens."""
    prompt = input_ids.shape[-1] if attention_mask is None else int(attention_mask.sum(-1).max())
    check_input_ids(owner, input_ids, prompt + new_tokens, "input_ids and max_new_tokens",
                    f"{input_ids.shape[-1]} positions and {new_tokens} new tokens")


def checked_generate(model: nn.Module, inputs=None, *args, **kwargs):
    """The model's own generate, its input_ids and the positions the generation reaches checked first
    (check_input_ids; bound to an acnify'd causal LM as `generate`)."""
    ids = kwargs.get("input_ids", inputs)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() == 2:
        config = kwargs.get("generation_config") or model.generation_config
        new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if new_tokens is None:
            new_tokens = kwargs.get("max_length", config.max_length) - ids.shape[-1]
        check_generation(owner_of(model)[1], ids, kwargs.get("attention_mask"), new_tokens)
    return type(model).generate(model, inputs, *args, **kwargs)


def exit_states(model: nn.Module, input_ids: torch.Tensor, **inputs) -> tuple:
    """(the running sums after 0..L layers (L+1, batch, positions, D), their Readout: the final norm
    and head) of an acnify'd causal LM, its layers run once by its base model (no head): what
    early_exit_loss reads every depth through (bound to the model as `exit_states`)."""
    owner = owner_of(model)[1]
    recording, owner.recording = owner.recording, True
    try:
        owner(input_ids=input_ids, **inputs)
        sums = owner.depth_sums()
    finally:
        owner.recording, owner.recorded_outputs = recording, None
    head = model.get_output_embeddings()
    return sums, Readout(getattr(owner, owner.FINAL_NORM), head.weight, head.bias, owner.long_connections.backend)


def speculator(model: nn.Module, draft_depth: int, input_ids: torch.Tensor, max_new_tokens: int,
               attention_mask: torch.Tensor | None = None) -> "DecoderSpeculator":
    """What speculative_generate drafts and verifies with, for an acnify'd causal LM and this prompt
    (bound to the model as `speculator`)."""
    owner = owner_of(model)[1]
    check_draft_depth(draft_depth, owner.long_connections.depth)
    check_int_tensor("input_ids", input_ids, "(batch, positions)", lambda shape: len(shape) == 2 and shape[1] > 0)
    if attention_mask is not None:
        check_int_tensor("attention_mask", attention_mask, f"{tuple(input_ids.shape)} (input_ids' shape)",
                         lambda shape: shape == input_ids.shape)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()) or \
                bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()) or not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask must mark left padding: zeros, then ones up to the last position in "
                             "every row (as a tokenizer with padding_side='left' gives), got another pattern")
    check_generation(owner, input_ids, attention_mask, max_new_tokens)
    return DecoderSpeculator(model, owner, draft_depth, input_ids, max_new_tokens, attention_mask)


class DecoderSpeculator:
    """An acnify'd causal LM's first k layers as the draft and the others as the verify pass, through
    the model's own forward (embeddings, position ids, masks, rotary tables, final norm and head) over
    one DynamicCache: the runner runs only the pass's units (a Segment). The positions are those
    `generate` gives a left-padded batch (the mask's running count). The model sizes its mask by the
    cache of layer 0, which holds the drafted positions already when the verify pass runs; so that pass
    gets its mask made by transformers for the cache of layer k, which does not hold them yet."""

    def __init__(self, model: nn.Module, owner: Decoder, draft_depth: int, prompt: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None):
        from transformers import DynamicCache

        self.model, self.owner, self.k = model, owner, draft_depth
        self.cache = DynamicCache(config=model.config)
        mask = torch.ones_like(prompt) if attention_mask is None else attention_mask.to(prompt.dtype)
        self.mask = torch.cat([mask, mask.new_ones(len(prompt), max_new_tokens)], 1)
        self.positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        long = owner.long_connections
        self.draft_units, self.all_units = draft_depth * long.units_per_block, long.units

    def run(self, model: nn.Module, tokens: torch.Tensor, start: int, segment: Segment | None, attention_mask=None,
            **keywords):
        """model's output (the causal LM's, or the owner's: no head) for `tokens` at positions start..,
        with the runner running `segment`."""
        stop = start + tokens.shape[1]
        self.owner.segment = segment
        try:
            return model(input_ids=tokens, position_ids=self.positions[:, start:stop], cache=self.cache,
                         attention_mask=self.mask[:, :stop] if attention_mask is None else attention_mask,
                         use_cache=True, **keywords)
        finally:
            self.owner.segment = None

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.run(self.model, prompt, 0, None, logits_to_keep=1).logits[:, -1]

    def draft(self, token: torch.Tensor, position: int, readout: bool = True) -> tuple:
        segment = Segment(0, self.draft_units)
        if not readout:  # the state alone: the model without its head
            self.run(self.owner, token, position, segment)
            return None, segment.state
        return self.run(self.model, token, position, segment, logits_to_keep=1).logits[:, -1], segment.state

    def verify(self, states: list, position: int) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        state = tuple(torch.cat(parts, 1) for parts in zip(*states))
        stop = position + state[0].shape[1]
        mask = create_causal_mask(config=self.model.config, inputs_embeds=state[0], attention_mask=self.mask[:, :stop],
                                  cache=self.cache, position_ids=self.positions[:, position:stop], layer_idx=self.k,
                                  allow_is_causal_skip=False)
        placeholders = torch.zeros_like(self.mask[:, position:stop])  # embedded, then replaced by the state
        return self.run(self.model, placeholders, position, Segment(self.draft_units, self.all_units, state), mask,
                        logits_to_keep=0).logits

    def crop(self, length: int) -> None:
        self.cache.crop(length - self.cache.get_seq_length())  # a negative count: the positions to drop


class Decoder(SumsAsHiddenStates, Owner):
    """The mixin of a converted decoder model (its class becomes a subclass with this first). A family
    module sets LAYERS (the layer list's attribute name) and BRANCHES (a layer's attention branch and
    its input norm, then its MLP branch and its input norm, by attribute name) and defines
    `attention_keywords`."""

    LAYERS = "layers"
    BRANCHES: tuple = ()

    def prepare(self) -> None:
        super().prepare()
        self.segment = None

    # bound to a causal LM around the owner (huggingface.bind)
    CAUSAL_LM_METHODS = {"speculator": speculator, "generate": checked_generate, "exit_states": exit_states}
    FINAL_NORM = "norm"  # the final norm's attribute name

    def forward(self, input_ids=None, *args, **kwargs):
        """The model's forward, its input_ids checked first (check_input_ids): the positions they take
        after the cached ones, or their position_ids."""
        if isinstance(input_ids, torch.Tensor):
            positions, cache = kwargs.get("position_ids"), kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            end = int(positions.max()) + 1 if positions is not None else past + input_ids.shape[-1]
            check_input_ids(self, input_ids, end, reach=f"positions up to {end - 1}")
        return super().forward(input_ids, *args, **kwargs)

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


def convert_decoder(model: nn.Module, base_model: nn.Module, mixin: type, backend: str,
                    hybrid: HybridOptions | None) -> nn.Module:
    """Converts the decoder `base_model` (inside `model`, or `model` itself) in place, unless done."""
    if not isinstance(base_model, Decoder):
        base_model.__class__ = converted_class(mixin, type(base_model))
        register_recording(base_model)
        base_model.prepare()
        layers = base_model.layer_list()
        units = [unit for layer in layers for unit in base_model.units_of(layer)]
        base_model._modules[base_model.LAYERS] = LongConnectionLayers(layers, Runner(base_model))
        build_long_connections(base_model, [u for u, _ in units], [n for _, n in units], None, backend, hybrid,
                               units_per_block=2, owners=layers)
    bind(model)
    return model

