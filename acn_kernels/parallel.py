"""The package across processes: DTensor sharding rules of the fused ops.

Every fused op a model runs works row by row on its tokens: a boundary op (accumulate_norm,
hybrid_accumulate_norm, probe_norm) normalizes each row of width D on its own, a GEMM-epilogue op
(linear, feed_forward, linear_act_accumulate) multiplies each row by the same weights; only the
parameters (norms', linears', the hybrid's gate and long weight) see every row. So on DTensors, for
each mesh dimension:

    Replicate                  every tensor replicated: each rank computes the whole op
    Shard(d), d a token dim    the row tensors (x, f, y, hidden activations and their gradients) split
                               on the same token dimension (sequence parallelism: d = 1 for (batch,
                               tokens, D)), the parameters replicated; forward writes each rank's rows,
                               backward's parameter gradients are Partial (summed where they are read)

and nothing else: the normalized dimension split, a parameter sharded, a Partial input or row tensors
split apart are refused with a ValueError naming the op and the placement (never a silent gather).
The row statistics the forward keeps for backward (mean, rstd) are placed Shard on their rows
whatever token dimension is split: their order is each rank's own, and only the op's backward reads
them. The rules cover the Triton ops (acn_kernels::*) and the CUDA extension's twins where it is
built; `torch.distributed.tensor.experimental.register_sharding` registers them on import. (Tensor
parallelism's column and row splits of the weights are not among them.)
"""
from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from .ops._common import CUDA_EXTENSION

ROW_OPS = {  # op: (what each argument is, what each output is); "row" tensors split with the tokens
    "accumulate_norm_fwd": (("row", "row?", "param", "param?", None, None, None), ("row?", "row", "stats?", "stats")),
    "accumulate_norm_bwd": (("row", "row?", "row", "param", "stats?", "stats", None, None, None),
                            ("row", "row?", "partial")),
    "hybrid_accumulate_norm_fwd": (("row", "row", "row?", "param", "param", "param?", "param?", None, None),
                                   ("row", "row?", "row", "stats?", "stats")),
    "hybrid_accumulate_norm_bwd": (("row", "row?", "row?", "row", "row", "row", "param", "param", "param?",
                                    "stats?", "stats", None, None), ("row", "row", "partial")),
    "probe_norm_fwd": (("depths", "param", "param?", None, None), ("depths", "depth stats?", "depth stats")),
    "probe_norm_bwd": (("depths", "depths", "param", "depth stats?", "depth stats", None, None),
                       ("depths", "partial")),
    "linear_fwd": (("row", "param", "param?"), ("row",)),
    "weight_grad": (("row", "row", None), ("partial", "partial?")),
    "feed_forward_fwd": (("row", "param", "param?", "param", "param?", None), ("row", "row", "row?")),
    "times_activation_grad": (("row", "param", "row?", None), ("row",)),
    "linear_act_accumulate_fwd": (("row", "param", "param?", "row?", None, None), ("row?", "row?", "row?")),
    "linear_act_accumulate_cublas_fwd": (("row", "param", "param?", "row?", None, None), ("row?", "row?", "row?")),
    "activation_backward": (("row?", "row?", "row?", None, None), ("row",)),
}


def is_empty(spec) -> bool:
    """An optional tensor the op returns empty (y_out without y, mean for RMSNorm): shape (0,)."""
    return spec is not None and tuple(spec.shape) == (0,)


def placement_of(kind: str | None, spec, split: int | None):
    """The placement of an argument or output of `kind` where the rows are split on `split` (None:
    replicated); None for a non-tensor or an absent optional one."""
    if kind is None or spec is None and kind.endswith("?"):
        return None
    kind = kind.removesuffix("?")
    if split is None or kind == "param" or is_empty(spec):
        return Replicate()
    return {"row": Shard(split), "depths": Shard(split + 1), "stats": Shard(0), "depth stats": Shard(1),
            "partial": Partial()}[kind]


def row_tensors(kinds: tuple, args: tuple) -> list:
    """The (kind, spec) of the arguments that hold rows of tokens (absent and empty ones left out)."""
    return [(kind, spec) for kind, spec in zip(kinds, args) if kind and kind.rstrip("?") in ("row", "depths")
            and spec is not None and not is_empty(spec)]


def check_placements(op: str, kinds: tuple, args: tuple) -> None:
    """Refuses, by name, what the rules do not cover (rather than let DTensor gather a tensor)."""
    rows = row_tensors(kinds, args)
    row_dim = rows[0][1].ndim - 1
    for kind, spec in zip(kinds, args):
        if not kind or spec is None or not hasattr(spec, "placements") or is_empty(spec):
            continue
        kind = kind.rstrip("?")
        token_dims = range(1, row_dim) if kind == "depths" else range(row_dim)
        for placement in spec.placements:
            if placement.is_partial():
                raise ValueError(f"{op}: a Partial input is not supported (reduce it first), got {spec.placements}")
            if kind == "param" and not placement.is_replicate():
                raise ValueError(f"{op}: the parameters (norms', linears', the hybrid's scalars) must be "
                                 f"Replicate, got {spec.placements}")
            if kind in ("row", "depths") and placement.is_shard() and placement.dim not in token_dims:
                raise ValueError(f"{op}: row tensors may be Replicate or Shard on a token dimension "
                                 f"({list(token_dims)}), not on their features (the last), got {spec.placements}")
    if len({spec.placements for _, spec in rows}) > 1:
        raise ValueError(f"{op}: every row tensor must have the same placements, got "
                         f"{[spec.placements for _, spec in rows]}")


def empty_outputs(overload, args: tuple) -> list:
    """Which outputs the op returns empty for these arguments: its fake implementation on meta tensors."""
    meta = [torch.empty(spec.shape, dtype=spec.tensor_meta.dtype, device="meta") if hasattr(spec, "placements")
            else spec for spec in args]
    return [tuple(out.shape) == (0,) for out in overload(*meta)]


def row_op_rule(overload, op: str):
    kinds, output_kinds = ROW_OPS[op]

    def rule(*args):
        check_placements(op, kinds, args)
        kind, first = row_tensors(kinds, args)[0]
        token_dims = first.ndim - (2 if kind == "depths" else 1)
        empty = empty_outputs(overload, args)
        strategies = []
        for split in (None, *range(token_dims)):
            outputs = [Replicate() if absent else placement_of(kind.removesuffix("?"), None, split)
                       for kind, absent in zip(output_kinds, empty)]
            strategies.append((outputs, [placement_of(kind, spec, split) for kind, spec in zip(kinds, args)]))
        return strategies
    return rule


def register_row_op_rules() -> None:
    namespaces = [torch.ops.acn_kernels] + ([torch.ops.acn_kernels_cuda] if CUDA_EXTENSION is not None else [])
    for namespace in namespaces:
        for op in filter(functools.partial(hasattr, namespace), ROW_OPS):  # the extension has some
            overload = getattr(namespace, op).default
            register_sharding(overload)(row_op_rule(overload, op))


register_row_op_rules()
