"""What every Hugging Face conversion shares: `probe` and `truncate` on the model's own forward, and
saved conversions that load back converted.

The module that holds the long connections (a BertEncoder, a GPT2Model, a LlamaModel: the "owner")
records the block outputs when `recording` and returns `replaced_output` instead of running its layers
when that is set; so `probe` runs the whole model once, then once more on the inputs repeated for
every depth with the owner's output replaced by their sums (no layer runs again), and any head works
as it is.

A conversion is recorded in the model's config: `config.acn_kernels` holds acnify's options, and the
config's class becomes a subclass of its own whose model_type is "acn_<type> (import acn_kernels to
load it as an ACN)" (named like its base, so transformers' Auto mappings still find the model classes).
`save_pretrained` writes both. When transformers is imported in a process that imported acn_kernels,
these types are registered with AutoConfig (and "acn_<type>", which earlier versions saved), every
model whose config carries the record is converted at the end of its __init__ (post_init), and
transformers' warning that a concrete class loads a checkpoint of another model type is dropped for
them: `AutoModelFor*.from_pretrained(path)` and the concrete class's `from_pretrained` return the
converted model, whose weights (gates included) then load as saved. With transformers alone no code
of this package runs, so the model type is the message: an Auto class refuses the unknown type, and a
concrete class warns that it loads a checkpoint of that type, both naming `import acn_kernels`.
"""
from __future__ import annotations

import copy
import functools
import importlib.abc
import importlib.util
import logging
import sys
import types

import torch
from torch import nn

from .._validation import check_choice
from ..long_connections import attach, depth_sums, owner_of, register_scalars, shallow_copy

RECORD = "acn_kernels"  # the config attribute of a converted model: acnify's options
REGISTERED_TYPES = ("bert", "gpt2", "llama", "qwen2", "mistral")
LOAD_HINT = " (import acn_kernels to load it as an ACN)"  # what transformers alone shows, in the model type


# ----------------------------------------------------------------------------- probe and truncate

def model_output(output, what: str = "logits"):
    """What a probe compares across depths: the loss, or the logits of a task model, else the hidden states."""
    if what == "loss":
        if getattr(output, "loss", None) is None:
            raise ValueError("probe(..., output='loss') needs labels=, as the model's loss does")
        return output.loss
    for name in ("logits", "prediction_logits", "start_logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0]


def probe(model: nn.Module, *args, output: str = "logits", statistics: bool = False, **kwargs):
    """(L+1, ...): the model's output (its logits, or its loss with output="loss" and labels=) with
    the first k layers, k = 0..L. The layers run once, recording every depth's sum; then the model's
    own forward runs once more on the inputs repeated for the L+1 depths, the long connections' output
    replaced by those depths' sums (no layer runs again), so that its head, masks and pooling apply to
    every depth at once and its output is the result. A loss is one number per batch: output="loss"
    runs that second forward once per shallower depth instead, except for a causal LM, whose layers
    run once and whose depths' losses are read through depth_cross_entropy (causal_lm_depth_losses;
    with statistics=True also every depth's accuracy, agreement and entropy, as the GPT's probe)."""
    check_choice("output", output, ("logits", "loss"))
    if output == "loss" and callable(getattr(model, "exit_states", None)):
        return causal_lm_depth_losses(model, args, kwargs, statistics)
    if statistics:
        raise ValueError("statistics=True needs output='loss' on a causal LM (acnify'd, with exit_states), got "
                         f"output={output!r} on {type(model).__name__}")
    _, owner = owner_of(model)
    owner.recording = True
    try:
        deepest = model_output(model(*args, **kwargs), output)
        sums = owner.depth_sums()
        if output == "loss":
            shallower = []
            for k in range(len(sums) - 1):
                owner.replaced_output = sums[k]
                shallower.append(model_output(model(*args, **kwargs), output))
            return torch.stack([*shallower, deepest])
        batch, depths = sums.shape[1], len(sums)
        owner.replaced_output = sums.flatten(0, 1)
        repeated = model_output(model(*repeat_batch(args, batch, depths), **repeat_batch(kwargs, batch, depths)),
                                output)
    finally:
        owner.recording, owner.replaced_output, owner.recorded_outputs = False, None, None
    return repeated.unflatten(0, (depths, batch))


def causal_lm_depth_losses(model: nn.Module, args: tuple, kwargs: dict, statistics: bool = False):
    """(L+1,) a causal LM's next-token loss at every depth, its layers run once and every depth read
    through depth_cross_entropy (long_connections.Readout.losses: no logits kept), float32."""
    inputs = dict(kwargs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise ValueError("probe(..., output='loss') needs labels=, as the model's loss does")
    input_ids = inputs.pop("input_ids", args[0] if args else None)
    states, readout = model.exit_states(input_ids, *args[1:], **inputs)
    return readout.depth_losses(states, input_ids, labels, statistics)


def repeat_batch(inputs, batch: int, times: int):
    """Every tensor of `inputs` (a tuple or a dict) whose first dimension is the batch, repeated `times`
    times along it (depth-major, as the stacked sums are); the rest as they are."""
    def repeated(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            return value.repeat(times, *([1] * (value.dim() - 1)))
        return value
    if isinstance(inputs, dict):
        return {name: repeated(value) for name, value in inputs.items()}
    return tuple(repeated(value) for value in inputs)


def truncate(model: nn.Module, k: int) -> nn.Module:
    """The first k layers, every parameter shared: the modules on the way to the owner are copied,
    and so is their config, with the kept depth, so that what save_pretrained writes reloads as it is."""
    path, owner = owner_of(model)
    long = owner.long_connections.truncate(k)
    shallow = parent = shallow_copy(model)
    copies = [shallow]
    for name in filter(None, path.split(".")):
        parent._modules[name] = parent = shallow_copy(parent._modules[name])
        copies.append(parent)
    config = truncated_config(model.config, k)
    for module in copies:  # the copies only: the layers they share keep the model's config
        if getattr(module, "config", None) is model.config:
            module.config = config
    parent.keep_layers(k)
    register_scalars(parent, long.scalars)
    attach(parent, long)
    bind(shallow)
    return shallow


def truncated_config(config, k: int):
    """A copy of the config at depth k (GPT-2's n_layer through its num_hidden_layers alias); a
    per-layer list (layer_types) keeps its first k entries, and at depth 0 its first one, which the
    model's layer loop reads for the runner that stands at its index 0."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = k
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:max(k, 1)]
    return config


def clamp_after(model: nn.Module, optimizer: torch.optim.Optimizer):
    """The hybrid's gates and weights clamped into its clamp_range after each of optimizer's steps
    (LongConnections.clamp_after); returns the hook's handle."""
    return owner_of(model)[1].long_connections.clamp_after(optimizer)


def bind(model: nn.Module) -> None:
    """The conversion's methods on the model; a causal LM's too (the owner's CAUSAL_LM_METHODS: its
    speculator and its checked generate)."""
    model.probe = types.MethodType(probe, model)
    model.truncate = types.MethodType(truncate, model)
    model.clamp_after = types.MethodType(clamp_after, model)
    model.as_acn = types.MethodType(as_acn, model)
    if model.can_generate():
        for name, method in getattr(owner_of(model)[1], "CAUSAL_LM_METHODS", {}).items():
            setattr(model, name, types.MethodType(method, model))


def as_acn(model: nn.Module) -> nn.Module:
    """The converted hybrid as an ACN, in place (every gate 0, or a ValueError): its long connections
    without gates (whoever holds them sees it), the gates unregistered, the config's record of the
    conversion saying "acn", so that it saves and loads back as an ACN."""
    owner = owner_of(model)[1]
    owner.long_connections.become_acn()
    register_scalars(owner, None)
    record = dict(getattr(model.config, RECORD), connectivity="acn", skip_attention=False, clamp_range=None)
    record_conversion(model, record)
    return model


class Owner:
    """The mixin of every converted owner class: recording, replacing and the per-depth sums."""

    def prepare(self) -> None:
        self.recording, self.replaced_output, self.recorded_outputs, self.running = False, None, None, False

    def depth_sums(self) -> torch.Tensor:
        """(L+1, ...): the running sum after 0..L layers, from the recorded terms of the sum."""
        return depth_sums(self.recorded_outputs, self.long_connections.units_per_block)


class SumsAsHiddenStates:
    """The mixin of the converted model that takes `output_hidden_states` (the owner itself, or the
    BertModel around an owner): its hidden states, when asked for, are the running sums after 0..L
    layers, the last one the model's last hidden state (through the final norm where it has one),
    rather than what transformers records, each layer's own output."""

    def sums_owner(self) -> Owner:
        return self

    def forward(self, *args, output_hidden_states=None, **kwargs):
        owner = self.sums_owner()
        wanted = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = kwargs.pop("return_dict", None)
        recording, owner.recording, owner.running = owner.recording, owner.recording or bool(wanted), True
        try:
            outputs = super().forward(*args, output_hidden_states=False, return_dict=True, **kwargs)
            if wanted:
                outputs.hidden_states = (*owner.depth_sums()[:-1], outputs.last_hidden_state)
        finally:
            owner.recording, owner.running = recording, False
            if not recording:
                owner.recorded_outputs = None
        return outputs if return_dict is not False else outputs.to_tuple()


@functools.cache
def converted_class(mixin: type, base: type) -> type:
    """base's subclass with `mixin` first, named Acn<base>."""
    return type(f"Acn{base.__name__}", (mixin, base), {"__module__": base.__module__})


def register_recording(model: nn.Module) -> None:
    """What transformers does in PreTrainedModel.__init__ for the model's (now converted) class, so that
    output_attentions still records the attention modules (they run as they are)."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry records by its class attribute alone
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


# ----------------------------------------------------------------------------- saved conversions

@functools.cache
def acn_config_class(base: type, hint: str = LOAD_HINT) -> type:
    """base's subclass with model_type "acn_<type><hint>", named like base (transformers' Auto mappings
    find a config's model classes by its class name); hint="" gives the type earlier versions saved."""
    return type(base.__name__, (base,), {"model_type": f"acn_{base.model_type}{hint}", "__module__": __name__,
                                          "__qualname__": f"acn_{base.__qualname__}"})


def is_acn_type(model_type: str) -> bool:
    return model_type.startswith("acn_")


class DropAcnTypeWarning(logging.Filter):
    """Drops transformers' "You are using a model of type `acn_...` to instantiate a model of type ..."
    (a concrete class loading a converted checkpoint): post_init converts that model, so it is right."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "You are using a model of type `acn_" not in record.getMessage()


def record_conversion(model: nn.Module, options: dict) -> None:
    """Writes acnify's options into the config, and gives the config its "acn_" type, so that
    save_pretrained records the conversion and loading converts again (see the module docstring)."""
    config = model.config
    if not is_acn_type(config.model_type):
        config.__class__ = acn_config_class(type(config))
    setattr(config, RECORD, dict(options))
    register_config(config.__class__)


def register_config(config_class: type) -> None:
    if "transformers" not in sys.modules:
        return
    from transformers import AutoConfig
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


def convert_on_init(post_init):
    """PreTrainedModel.post_init, followed by the recorded conversion of a model built from a
    converted config (its inner models convert first; the outer one then finds them converted)."""
    @functools.wraps(post_init)
    def post_init_then_convert(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        options = getattr(getattr(self, "config", None), RECORD, None)
        if options:
            from . import convert_recorded
            convert_recorded(self, options)
    post_init_then_convert.acn_kernels = True
    return post_init_then_convert


def register_with_transformers() -> None:
    """The "acn_" config types of the supported families, and conversion at model init."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_utils import PreTrainedModel

    for model_type in REGISTERED_TYPES:
        for hint in (LOAD_HINT, ""):
            register_config(acn_config_class(CONFIG_MAPPING[model_type], hint))
    type_warnings = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, DropAcnTypeWarning) for f in type_warnings.filters):
        type_warnings.addFilter(DropAcnTypeWarning())
    if not getattr(PreTrainedModel.post_init, "acn_kernels", False):
        PreTrainedModel.post_init = convert_on_init(PreTrainedModel.post_init)


class RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs register_with_transformers once transformers has been imported, so that importing
    acn_kernels does not import transformers (seconds) where nobody uses it. It stays on the path until
    transformers is executed: a bare importlib.util.find_spec("transformers"), as libraries check for an
    optional package, imports nothing and must not use it up."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # the real spec, without asking this finder again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def exec_module(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                execute(module)
                register_with_transformers()
            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Registration now when transformers is imported already, else when it is."""
    if "transformers" in sys.modules:
        register_with_transformers()
    elif importlib.util.find_spec("transformers") is not None:
        sys.meta_path.insert(0, RegisterAfterImport())
