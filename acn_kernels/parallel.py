"""The package across processes: DTensor sharding rules of the fused ops, and parallelize(model, mesh).

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

and, for the GEMM-epilogue ops, tensor parallelism's splits of the weights (SPLITS: Megatron's):

    column-wise                x replicated, the weight and bias split on their rows (Shard(0)): the
                               output split on its features; backward's dx Partial
    row-wise                   x split on its features, the weight on its columns (Shard(1)): the
                               output Partial, the bias added once over the group (its Replicate share)
    feed_forward               its first linear column-wise, its second row-wise: one op on the shards

A Partial row input (a gradient summed over the group, as a column-wise linear's dx) is reduced to
where the op's other rows are. Nothing else: the normalized dimension split, a norm's parameter
sharded or row tensors split apart are refused with a ValueError naming the op and the placement
(never a silent gather). The row statistics the forward keeps for backward (mean, rstd) are placed Shard
on their rows whatever token dimension is split: their order is each rank's own, and only the op's
backward reads them. The rules cover the Triton ops (acn_kernels::*) and the CUDA extension's twins
where it is built; `torch.distributed.tensor.experimental.register_sharding` registers them on import.

`parallelize` lays the package's GPT on a (dp, tp) mesh with torch's own parallel styles and FSDP2, as
torchtitan lays its Llama: see its docstring.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               loss_parallel, parallelize_module)

from ._validation import check_bool
from .long_connections import LongConnections
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


def row_splits(op: str, kinds: tuple, args: tuple) -> tuple:
    """The token dimensions the op may run split on (None: replicated): where the row tensors are, or
    any where they are all Partial or the mesh has several dimensions; refuses, by name, what the rules
    do not cover (rather than let DTensor gather a tensor)."""
    rows = row_tensors(kinds, args)
    row_dim = rows[0][1].ndim - 1
    for kind, spec in zip(kinds, args):
        if not kind or spec is None or not hasattr(spec, "placements") or is_empty(spec):
            continue
        kind = kind.rstrip("?")
        token_dims = range(1, row_dim) if kind == "depths" else range(row_dim)
        for placement in spec.placements:
            if kind == "param" and not placement.is_replicate():
                raise ValueError(f"{op}: the parameters (norms', linears', the hybrid's scalars) must be "
                                 f"Replicate, got {spec.placements}")
            if kind in ("row", "depths") and placement.is_shard() and placement.dim not in token_dims:
                raise ValueError(f"{op}: row tensors may be Replicate or Shard on a token dimension "
                                 f"({list(token_dims)}), not on their features (the last), got {spec.placements}")
    placed = {(kind, spec.placements) for kind, spec in rows if not any(p.is_partial() for p in spec.placements)}
    if len({placements for _, placements in placed}) > 1:  # a Partial one, a gradient summed over the group,
        raise ValueError(f"{op}: every row tensor must have the same placements, got "  # is reduced to the others'
                         f"{[spec.placements for _, spec in rows]}")
    everywhere = (None, *range(rows[0][1].ndim - (2 if rows[0][0].startswith("depths") else 1)))
    if not placed or len(rows[0][1].placements) > 1:
        return everywhere
    kind, (placement,) = next(iter(placed))
    return (None,) if placement.is_replicate() else (placement.dim - kind.startswith("depths"),)


def empty_outputs(overload, args: tuple) -> list:
    """Which outputs the op returns empty for these arguments: its fake implementation on meta tensors."""
    meta = [torch.empty(spec.shape, dtype=spec.tensor_meta.dtype, device="meta") if hasattr(spec, "placements")
            else spec for spec in args]
    return [tuple(out.shape) == (0,) for out in overload(*meta)]


# Tensor parallelism's splits of the GEMM-epilogue ops: (the argument whose placement says which split (the
# first present one), that placement, every argument's placement, every output's); "S-1" the last dimension
# of the rows, "P" Partial (a row-split linear's bias enters as Replicate's share, added once over the group)
COLUMNS = ((1,), "S0", ("R", "S0", "S0", None, None, None), ("S-1", "S-1", "S-1"))  # linear_act_accumulate's
SPLITS = {
    "linear_fwd": (((1,), "S0", ("R", "S0", "S0"), ("S-1",)),  # column-wise
                   ((1,), "S1", ("S-1", "S1", "P"), ("P",))),  # row-wise
    "weight_grad": (((0,), "S-1", ("S-1", "R", None), ("S0", "S0")),
                    ((1,), "S-1", ("R", "S-1", None), ("S1", "R"))),
    "feed_forward_fwd": (((1,), "S0", ("R", "S0", "S0", "S1", "P", None), ("P", "S-1", "S-1")),),  # columns, rows
    "times_activation_grad": (((1,), "S1", ("R", "S1", "S-1", None), ("S-1",)),),
    "linear_act_accumulate_fwd": (COLUMNS,),
    "linear_act_accumulate_cublas_fwd": (COLUMNS,),
    "activation_backward": (((0, 1), "S-1", ("S-1", "S-1", "S-1", None, None), ("S-1",)),),  # elementwise
}


def split_placement(code: str | None, rows: int):
    """The placement a SPLITS code names, for row tensors of `rows` dimensions."""
    if code is None:
        return None
    return {"R": Replicate(), "P": Partial(), "S0": Shard(0), "S1": Shard(1), "S-1": Shard(rows - 1)}[code]


def tensor_parallel_strategy(op: str, args: tuple, empty: list):
    """The one strategy of the split the arguments' placements say (None where none of SPLITS' applies)."""
    rows = next(arg.ndim for arg in args if hasattr(arg, "placements"))
    for indices, code, inputs, outputs in SPLITS.get(op, ()):
        key = next(args[i] for i in indices if args[i] is not None)
        if key.placements[0] == split_placement(code, key.ndim):
            return ([Replicate() if absent else split_placement(out, rows) for out, absent in zip(outputs, empty)],
                    [None if arg is None else split_placement(kind, rows) for kind, arg in zip(inputs, args)])
    return None


def row_op_rule(overload, op: str):
    kinds, output_kinds = ROW_OPS[op]

    def rule(*args):
        empty = empty_outputs(overload, args)
        tensor_parallel = tensor_parallel_strategy(op, args, empty)
        if tensor_parallel is not None:
            return [tensor_parallel]
        strategies = []
        for split in row_splits(op, kinds, args):
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


# ----------------------------------------------------------------------------- parallelize

def parallelize(model: nn.Module, mesh: DeviceMesh, *, tp: str | None = "tp", dp: str | None = "dp",
                sequence_parallel: bool = True, loss_parallel: bool = True,
                activation_checkpointing: bool = False) -> nn.Module:
    """The package's GPT, or an acnify'd Llama-shaped Hugging Face model, across the mesh's ranks, in
    place, as torchtitan parallelizes its Llama:

    tp   tensor parallelism over mesh[tp] (Megatron's splits on DTensors): each block's attention input
         projections column-wise (whole heads a rank: the GPT's qkv rows are head-major) and its output
         projection row-wise, the MLP's input projections column-wise and its output projection row-wise
         (the GPT's one feed_forward on the shards where it fuses), the token embedding row-wise (the
         vocabulary split) and the head column-wise; with sequence_parallel the running sum, the norms
         and every boundary op split on the tokens (Shard(1): each rank its share of every row tensor,
         gathered before attention and the MLP, reduce-scattered after them), else replicated. With
         loss_parallel the logits stay split on the vocabulary (model(tokens) gives a DTensor:
         F.cross_entropy in torch's loss_parallel(); early_exit_loss runs depth_cross_entropy over the
         group), else gathered. Every other parameter (the norms', the hybrid's scalars, learned
         positions) is replicated.
    dp   FSDP2 over mesh[dp]: each block (decoder layer), then the root (the fused boundary reads a
         block's input norm in that block's FSDP2 forward: LongConnections.steps_of).
    activation_checkpointing: every unit's step recomputed in backward.

    tp=None or dp=None leaves that one out (a 1-D mesh). Returns the model."""
    plan_of, blocks = family_of(model)
    for name, value in (("sequence_parallel", sequence_parallel), ("loss_parallel", loss_parallel),
                        ("activation_checkpointing", activation_checkpointing)):
        check_bool(name, value)
    names = tuple(mesh.mesh_dim_names or ()) if isinstance(mesh, DeviceMesh) else None
    if names is None:
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    for argument, name in (("tp", tp), ("dp", dp)):
        if name is not None and name not in names:
            raise ValueError(f"{argument}={name!r} must name a dimension of the mesh (init_device_mesh(..., "
                             f"mesh_dim_names=...)), got a mesh with dimensions {names}")
    if tp is not None:
        stream = Shard(1) if sequence_parallel else Replicate()
        tensor_parallel(model, mesh[tp], plan_of(model, mesh[tp].size(), stream), stream, loss_parallel)
    if hasattr(model, "gradient_checkpointing_enable"):  # a Hugging Face model: its layers' flag
        if activation_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing = activation_checkpointing
    if dp is not None:
        for block in blocks:
            fully_shard(block, mesh=mesh[dp])
        fully_shard(model, mesh=mesh[dp])
    return model


def family_of(model: nn.Module) -> tuple:
    """(the function giving the model's tensor-parallel plan, the blocks FSDP2 shards one by one)."""
    from .convert.llama import llama_shaped_base
    from .models import GPT

    if isinstance(model, GPT):
        return gpt_plan, list(model.blocks)
    base = llama_shaped_base(model) if isinstance(model, nn.Module) else None
    if base is not None and isinstance(getattr(base, "long_connections", None), LongConnections):
        return llama_plan, list(base.layers)
    raise TypeError(f"model must be the package's GPT or an acnify'd Llama-shaped Hugging Face model (acnify(model) "
                    f"first), got {type(model).__name__}")


def check_split(size: int, **sizes: int) -> None:
    for name, value in sizes.items():
        if value % size:
            raise ValueError(f"the tensor-parallel size ({size}, mesh[tp]) must divide the model's {name}, got "
                             f"{name}={value}")


def gathered(stream, use_local_output: bool = True) -> PrepareModuleInput:
    """A module's input gathered from the stream's placement (attention's, the MLP's)."""
    return PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                              use_local_output=use_local_output)


def gpt_plan(model: nn.Module, size: int, stream) -> dict:
    """The GPT's blocks: qkv column-wise, proj row-wise, the MLP one FeedForwardParallel."""
    if model.blocks[0].mlp.activation == "swiglu":
        raise ValueError("model's MLP must be gelu for tensor parallelism: swiglu's first linear holds every gate "
                         "row, then every up row, which a split of its rows would part, got mlp='swiglu'")
    attention = model.blocks[0].attn
    check_split(size, heads=attention.heads, dim=attention.proj.in_features,
                mlp_dim=model.blocks[0].mlp[0].out_features)
    plan = {"blocks.*.attn.qkv": ColwiseParallel(input_layouts=stream),
            "blocks.*.attn.proj": RowwiseParallel(output_layouts=stream, use_local_output=False),
            "blocks.*.mlp": FeedForwardParallel(stream)}
    if model.pos_embed is not None:
        plan["pos_embed"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),),
                                               use_local_output=False)
    return dict(plan=plan, embedding="token_embed", head="lm_head")


def llama_plan(model: nn.Module, size: int, stream) -> dict:
    """An acnify'd Llama's decoder layers as torchtitan splits its Llama's (each branch's input gathered
    once, its projections on local tensors: the layer's attention reshapes to its own heads)."""
    from .convert.llama import llama_shaped_base

    base = llama_shaped_base(model)
    config = base.config
    check_split(size, num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                hidden_size=config.hidden_size, intermediate_size=config.intermediate_size)
    layers = path_of(model, base.layers)
    plan = {f"{layers}.*.self_attn": gathered(stream),
            **{f"{layers}.*.self_attn.{name}_proj": ColwiseParallel() for name in "qkv"},
            f"{layers}.*.self_attn.o_proj": RowwiseParallel(output_layouts=stream, use_local_output=False),
            f"{layers}.*.mlp": gathered(stream),
            **{f"{layers}.*.mlp.{name}_proj": ColwiseParallel() for name in ("gate", "up")},
            f"{layers}.*.mlp.down_proj": RowwiseParallel(output_layouts=stream, use_local_output=False)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return dict(plan=plan, embedding=path_of(model, base.embed_tokens),
                head=None if head is None else path_of(model, head))


def path_of(model: nn.Module, module: nn.Module) -> str:
    """module's name in model (what a parallelize_module plan names it by)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


class FeedForwardParallel(ParallelStyle):
    """A FeedForward's first linear column-wise, its second row-wise: its input gathered from the stream's
    placement, its output (the row-wise linear's Partial sum, or the fused op's) reduced back to it."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        first, _, second = module
        ColwiseParallel(use_local_output=False)._apply(first, device_mesh)
        RowwiseParallel(output_layouts=self.stream, use_local_output=False)._apply(second, device_mesh)
        gathered(self.stream, use_local_output=False)._apply(module, device_mesh)
        module.register_forward_hook(lambda _, __, out: out.redistribute(placements=[self.stream]))
        return module


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, family: dict, stream, loss_parallel: bool) -> None:
    """The family's plan, with the token embedding row-wise and the head column-wise (split on the
    vocabulary; a tied pair stays one parameter), on a 1-D mesh; every other parameter replicated."""
    plan = {family["embedding"]: RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                                 use_local_output=False), **family["plan"]}
    embedding = model.get_submodule(family["embedding"])
    head = None if family["head"] is None else model.get_submodule(family["head"])
    tied = head is not None and head.weight is embedding.weight
    if head is not None:
        plan[family["head"]] = ColwiseParallel(input_layouts=stream,
                                               output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                               use_local_output=not loss_parallel)
    parallelize_module(model, mesh, plan)
    if tied:  # each style made its own parameter of the shared weight (both split on the vocabulary)
        head.weight = embedding.weight
    replicate_parameters(model, mesh)


def loss_context(logits: torch.Tensor):
    """Where F.cross_entropy and its backward run on `logits`: torch's loss_parallel() for logits split on
    the vocabulary (parallelize(..., loss_parallel=True)), else nothing."""
    return loss_parallel() if isinstance(logits, DTensor) and logits.placements[-1].is_shard() \
        else contextlib.nullcontext()


def replicate_parameters(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every parameter the plan did not place, replicated over the mesh (one DTensor a parameter, where
    modules share it: the hybrid's scalars)."""
    made = {}
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is None or isinstance(parameter, DTensor):
                continue
            if id(parameter) not in made:
                made[id(parameter)] = nn.Parameter(distribute_tensor(parameter.data, mesh, [Replicate()]),
                                                   requires_grad=parameter.requires_grad)
            module._parameters[name] = made[id(parameter)]
