"""Randomized bad input: every public op (the fused ops and depth_cross_entropy) called with one argument spoiled (a wrong type, a wrong
dtype, a wrong shape, a wrong device, an out-of-range value or an unknown option), drawn by
hypothesis, derandomized, with a fixed budget. Each call must raise a ValueError or TypeError that
names the spoiled argument (or, for a shape that no longer matches, the shape it gave), or, where the
spoiled value is one the op accepts, return what the reference returns for the same inputs: never a
wrong result."""
import re

import pytest
import torch
from hypothesis import given, note, settings, strategies as st

import acn_kernels
from acn_kernels import reference

from op_harness import DEVICE


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def scalar():
    return torch.rand((), device=DEVICE) + 0.1


VALID = {  # op -> its arguments, one valid call (options included, so that they can be spoiled too)
    "accumulate_norm": lambda: dict(x=randn(4, 8), y=randn(4, 8), weight=randn(8), bias=randn(8), eps=1e-5,
                                    norm="layernorm", normalize="input"),
    "hybrid_accumulate_norm": lambda: dict(x=randn(4, 8), f=randn(4, 8), y=randn(4, 8), gate=scalar(),
                                           weight=randn(8), bias=randn(8), long_weight=scalar(), eps=1e-5,
                                           norm="rmsnorm"),
    "probe_norm": lambda: dict(xs=randn(3, 4, 8), weight=randn(8), bias=randn(8), eps=1e-5, norm="layernorm"),
    "linear_act_accumulate": lambda: dict(x=randn(4, 8), weight=randn(6, 8), bias=randn(6), y=randn(4, 6),
                                          activation="gelu"),
    "feed_forward": lambda: dict(x=randn(4, 8), w1=randn(6, 8), b1=randn(6), w2=randn(8, 3), b2=randn(8),
                                 activation="swiglu"),  # w1's 6 rows: 3 (gate, up) pairs
    "linear": lambda: dict(x=randn(4, 8), weight=randn(6, 8), bias=randn(6)),
    "depth_cross_entropy": lambda: dict(states=randn(3, 2, 5, 8), targets=torch.randint(0, 11, (2, 5), device=DEVICE),
                                        norm_weight=randn(8), norm_bias=randn(8), head_weight=randn(11, 8),
                                        weights=torch.rand(3, device=DEVICE) + 0.1, head_bias=randn(11),
                                        label_smoothing=0.1, z_loss=1e-3, softcap=5.0, eps=1e-5, norm="layernorm"),
}
OPTIONS = ("norm", "normalize", "activation")


def spoilers(value):
    """(kind, spoiled value) for an argument's valid value."""
    if isinstance(value, str):
        return [("unknown option", value + "x"), ("option as a number", 1)]
    if isinstance(value, float):
        return [("negative", -value), ("NaN", float("nan")), ("zero", 0.0), ("string", str(value)),
                ("tensor", torch.tensor(value))]
    kinds = [("list", value.tolist()), ("string", "tensor"), ("int32", value.int()), ("bool", value > 0),
             ("float64", value.double()), ("float16", value.half()), ("meta device", value.to("meta"))]
    if value.dim() == 0:
        return kinds + [("shape (2,)", value.expand(2).clone()), ("shape (1,)", value[None].clone())]
    return kinds + [("last dimension + 1", torch.cat([value, value[..., :1]], -1)),
                    ("last dimension - 1", value[..., :-1].clone()),
                    ("first dimension + 1", torch.cat([value, value[:1]], 0)),
                    ("a dimension less", value[..., 0].clone() if value.dim() > 1 else value[0].clone())]


def shape_text(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else "\0"


def call(op: str, arguments: dict):
    positional = [p for p in __import__("inspect").signature(getattr(reference, op)).parameters.values()
                  if p.kind is p.POSITIONAL_OR_KEYWORD]
    args = [arguments[p.name] for p in positional if p.name in arguments]
    kwargs = {k: v for k, v in arguments.items() if k not in {p.name for p in positional}}
    return args, kwargs


def check_like_the_reference(op: str, args: list, kwargs: dict, got, what: str) -> None:
    expected = getattr(reference, op)(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in args],
                                      **{k: v.double() if isinstance(v, torch.Tensor) else v
                                         for k, v in kwargs.items()})
    got, expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(got) == len(expected), what
    for g, e in zip(got, expected):
        if isinstance(g, torch.Tensor):
            assert not g.is_meta, f"{what} returned a meta tensor"
            torch.testing.assert_close(g.double(), e.double(), rtol=1e-2, atol=1e-2, msg=f"{what}: accepted, and wrong")


@pytest.mark.parametrize("op", sorted(VALID))
def test_the_unspoiled_calls_run_as_the_reference(op):
    args, kwargs = call(op, VALID[op]())
    check_like_the_reference(op, args, kwargs, getattr(acn_kernels, op)(*args, **kwargs), op)


@pytest.mark.parametrize("op", sorted(VALID))
@settings(max_examples=200)
@given(data=st.data())
def test_a_spoiled_argument_is_named_or_computed_as_the_reference_computes_it(op, data):
    arguments = VALID[op]()
    name = data.draw(st.sampled_from(sorted(arguments)), label="argument")
    kind, spoiled = data.draw(st.sampled_from(spoilers(arguments[name])), label="spoiled as")
    note(f"{op}({name}={kind})")
    arguments[name] = spoiled
    args, kwargs = call(op, arguments)
    try:
        got = getattr(acn_kernels, op)(*args, **kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        named = re.search(rf"(^|\W){re.escape(name)}(\W|$)", message) is not None
        assert named or shape_text(spoiled) in message, f"{op}({name}={kind}) raised without naming it: {message}"
        return
    check_like_the_reference(op, args, kwargs, got, f"{op}({name}={kind})")  # accepted: a call it supports


# ----------------------------------------------------------------------------- the models' arguments

POSITIVE_INT = [0, -1, 2.5, "4", True, None]
SPOILERS = {"positive int": POSITIVE_INT, "positive int or None": POSITIVE_INT[:-1],
            "real": ["0.5", None, float("nan"), True], "choice": ["nope", 1, None], "bool": ["yes", 1.0, None]}
HYBRID = dict(connectivity="hybrid", backend="reference", gate_init=0.5, learn_gates=True, long_weights=True)
MODELS = {  # model -> (its arguments, one valid model, and the kind of each)
    "MLP": dict(in_features=7, dim=12, depth=3, num_classes=5, activation="gelu", **HYBRID),
    "Mixer": dict(image_size=6, patch_size=2, in_channels=3, dim=8, depth=3, token_dim=5, channel_dim=11,
                  num_classes=4, **HYBRID),
    "ViT": dict(image_size=6, patch_size=3, in_channels=2, dim=8, depth=3, heads=2, mlp_dim=13, num_classes=4,
                **HYBRID),
    "Encoder": dict(vocab_size=11, max_len=9, dim=8, depth=3, heads=2, mlp_dim=13, num_classes=4, **HYBRID),
    "GPT": dict(vocab_size=37, max_len=24, dim=32, depth=3, heads=4, mlp_dim=None, norm="rmsnorm", mlp="swiglu",
                positions="rotary", tie_embeddings=True, **HYBRID),
}
KINDS = {"gate_init": "real", "learn_gates": "bool", "long_weights": "bool", "tie_embeddings": "bool",
         "mlp_dim": "positive int or None", **dict.fromkeys(("activation", "connectivity", "backend", "norm", "mlp",
                                                              "positions"), "choice")}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_unspoiled_models_build(model):
    """The valid arguments that the test below spoils one at a time build the hybrid they ask for."""
    built = getattr(acn_kernels, model)(**MODELS[model])
    assert built.depth == 3 and built.connectivity == "hybrid" and built.long_connections.hybrid
    assert len(built.long_weights) == 3 * built.units_per_block and all(g.item() == 0.5 for g in built.gates)


@pytest.mark.parametrize("model", sorted(MODELS))
@settings(max_examples=100)
@given(data=st.data())
def test_a_spoiled_model_argument_is_named(model, data):
    arguments = dict(MODELS[model])
    name = data.draw(st.sampled_from(sorted(arguments)), label="argument")
    arguments[name] = data.draw(st.sampled_from(SPOILERS[KINDS.get(name, "positive int")]), label="spoiled as")
    with pytest.raises((ValueError, TypeError)) as error:
        getattr(acn_kernels, model)(**arguments)
    assert re.search(rf"(^|\W){re.escape(name)}(\W|$)", str(error.value)), str(error.value)
