"""Argument checks shared by ops and models: each raises with the argument's name, the accepted
values and what was given, so a user never meets a bare assert or a crash inside a kernel."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_real(name: str, value, meaning: str, minimum: float | None = None) -> None:
    """A real number (an int or float, not a bool, not NaN), at least `minimum` when one is given;
    `meaning` says what is expected, in the message."""
    real = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    if not real or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be {meaning}, got {value!r}")


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor != 0:
        raise ValueError(
            f"{name} must be divisible by {divisor_name}={divisor}, got {name}={value}"
        )


def check_float_tensor(name: str, value, shape_text: str, shape_ok: Callable[[torch.Size], bool]) -> None:
    """A floating-point tensor whose shape passes `shape_ok` (`shape_text` describes it, in the message)."""
    check_tensor(name, value, "a floating-point", torch.Tensor.is_floating_point, shape_text, shape_ok)


def check_int_tensor(name: str, value, shape_text: str, shape_ok: Callable[[torch.Size], bool]) -> None:
    """An integer (or bool) tensor whose shape passes `shape_ok`."""
    check_tensor(name, value, "an integer", lambda t: not (t.is_floating_point() or t.is_complex()), shape_text,
                 shape_ok)


def check_tensor(name: str, value, kind: str, kind_ok: Callable[[torch.Tensor], bool], shape_text: str,
                 shape_ok: Callable[[torch.Size], bool]) -> None:
    if not isinstance(value, torch.Tensor) or not kind_ok(value) or not shape_ok(value.shape):
        got = (f"dtype {value.dtype} and shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise ValueError(f"{name} must be {kind} tensor of shape {shape_text}, got {got}")


def check_token_ids(name: str, tokens: torch.Tensor, vocab_size: int, vocabulary: str) -> None:
    """Token ids in [0, vocab_size); `vocabulary` says where the size comes from, in the message."""
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{name} must be in [0, {vocab_size}) ({vocabulary}), got values in "
                         f"[{tokens.min().item()}, {tokens.max().item()}]")


def check_model_dtype(name: str, inputs: torch.Tensor, model: torch.nn.Module) -> None:
    """inputs of the dtype of the model's parameters, as its layers take them (under autocast any
    floating-point dtype, which autocast casts)."""
    dtype = next(model.parameters()).dtype
    device = inputs.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if inputs.dtype != dtype and not autocast:
        raise ValueError(f"{name} must have the model's dtype {dtype} (its parameters'; convert the model with "
                         f".to({inputs.dtype}) or the {name} with .to({dtype}), or run under autocast), got "
                         f"{inputs.dtype}")
