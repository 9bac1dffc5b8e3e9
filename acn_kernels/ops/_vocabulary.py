"""The vocabulary split over a tensor-parallel group, as depth_cross_entropy runs it.

Rank r of a group of T holds rows [offset_r, offset_r + rows_r) of the head; the slices tile the vocabulary
in rank order from 0, and rows at or past `vocab_size` are padding (never counted). Megatron's layout is
rows_r = V_padded / T on every rank, offset_r = r rows_r (V_padded: the vocabulary rounded up to a multiple
of T, or of T times Megatron's make_vocab_size_divisible_by); a DTensor sharded on the head's rows gives
torch.chunk's: ceil(V / T) rows a rank, the last ones fewer (or none). The group is passed to the library op
by name (GROUPS), since an op's schema takes no process group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # a torch without distributed: nothing is a DTensor
    DTensor = Replicate = Shard = ()

GROUPS: dict = {}  # group_name -> ProcessGroup, for the library op


def name_of(group) -> str:
    """The name the library op finds `group` by ("" for none)."""
    if group is None:
        return ""
    GROUPS[group.group_name] = group
    return group.group_name


def group_named(name: str):
    return GROUPS[name] if name else None


@dataclass(frozen=True)
class Slice:
    """This rank's part of the head: its first vocabulary row, its rows, the whole vocabulary's size."""
    offset: int
    rows: int
    vocab_size: int

    @property
    def words(self) -> int:
        """This rank's rows that are words (not padding): its logits' width."""
        return max(0, min(self.rows, self.vocab_size - self.offset))


def slice_of(group, rows: int, vocab_size: Optional[int], global_rows: Optional[int] = None) -> Slice:
    """This rank's Slice of a head of `rows` rows here: at rank x rows (Megatron's layout), or, given the
    DTensor's global rows G, at rank x ceil(G / T) (torch.chunk's). vocab_size: every row by default; rows
    past it are padding. Over a group in Megatron's layout the slices' sizes are checked by the first
    collective (check_layout, on every rank alike), not here, where one rank refusing alone would leave
    the others waiting in it."""
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    checked_later = group is not None and global_rows is None
    stride = rows if global_rows is None else -(-global_rows // world)
    global_rows = rows * world if global_rows is None else global_rows
    vocab_size = global_rows if vocab_size is None else vocab_size
    if checked_later:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1 (the vocabulary's words, head_weight's rows on "
                             f"the {world} ranks of tp_group padding past them), got {vocab_size!r}")
        return Slice(rank * stride, rows, vocab_size)
    over = f" over the {world} ranks of tp_group" if group is not None else ""
    if global_rows < 1:
        raise ValueError(f"head_weight must have at least one row{over}, got none")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= global_rows:
        raise ValueError(f"vocab_size must be an integer in [1, {global_rows}] (head_weight's rows{over}"
                         f"{', padding past the vocabulary' if over else ''}), got {vocab_size!r}")
    return Slice(min(rank * stride, global_rows), rows, vocab_size)


def layout_entries(split: Slice, world: int, rank: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(2 T + 2): this rank's slice start and end at its rank's places, its vocab_size and -vocab_size, the
    rest -inf: a MAX all-reduce of it tells every rank every slice (check_layout), in the chunk's first
    collective."""
    entries = torch.full((2 * world + 2,), float("-inf"), dtype=dtype, device=device)
    entries[rank], entries[world + rank] = split.offset, split.offset + split.rows
    entries[-2], entries[-1] = split.vocab_size, -split.vocab_size
    return entries


def check_layout(entries: torch.Tensor, world: int) -> None:
    """The slices tile the vocabulary in rank order from 0 and every rank has the same vocab_size."""
    values = entries.tolist()
    starts, ends = values[:world], values[world:2 * world]
    vocab_size, negated = values[-2], values[-1]
    if vocab_size != -negated:
        raise ValueError(f"vocab_size must be the same on every rank of tp_group, got values from {-negated:.0f} "
                         f"to {vocab_size:.0f}")
    slices = [(int(a), int(b)) for a, b in zip(starts, ends)]
    tiled = slices[0][0] == 0 and all(slices[r][1] == slices[r + 1][0] for r in range(world - 1))
    if not tiled or slices[-1][1] < vocab_size:
        raise ValueError(f"head_weight's rows on the ranks of tp_group must tile the vocabulary [0, {vocab_size:.0f}) "
                         f"in rank order (rank r from r x its rows, the same rows on every rank), got the slices "
                         f"{slices}")


def all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    """torch.distributed.all_reduce in place (looked up at the call, so that a test can count it)."""
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def gather_tokens(states: torch.Tensor, group) -> torch.Tensor:
    """Sequence-parallel states (E, n, ..., D) from every rank, joined on dimension 1: (E, T n, ..., D)."""
    world = dist.get_world_size(group)
    gathered = states.new_empty((world * states.shape[0], *states.shape[1:]))  # the ranks' states one after another
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # named so from torch 2.13
    gather(gathered, states.contiguous(), group=group)
    return gathered.unflatten(0, (world, -1)).movedim(0, 1).flatten(1, 2)


def scatter_token_grad(grad: torch.Tensor, group) -> torch.Tensor:
    """gather_tokens's backward: each rank's share of dimension 1 of the summed gradient (a reduce-scatter)."""
    world = dist.get_world_size(group)
    pieces = grad.unflatten(1, (world, -1)).movedim(1, 0).contiguous()
    out = grad.new_empty(pieces.shape[1:])
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # named so from torch 2.13
    scatter(out, pieces.flatten(0, 1), op=dist.ReduceOp.SUM, group=group)
    return out


PLACEMENTS = {"states": "Replicate() (whole on every rank) or Shard(1) (sequence-parallel)",
              "head_weight": "Shard(0)", "head_bias": "Shard(0)", "norm_weight": "Replicate()",
              "norm_bias": "Replicate()"}


def local_tensors(tensors: dict, tp_group) -> tuple:
    """(the local tensors, the group, the head's global rows or None, whether states are sequence-sharded)
    of depth_cross_entropy's tensors by name, where head_weight may be a DTensor sharded on its rows over a
    1-D mesh (ColwiseParallel(use_local_output=False) on the head, or torchtitan's loss parallel): the
    group is its mesh's, every DTensor is taken as its local part with its placements for the gradient
    (to_local's grad_placements), and plain tensors are whole on every rank."""
    head = tensors["head_weight"]
    if not isinstance(head, DTensor):
        for name, tensor in tensors.items():
            if isinstance(tensor, DTensor):
                raise ValueError(f"{name} is a DTensor, so head_weight must be one too (sharded on its rows, "
                                 f"Shard(0)), got a {type(head).__name__}")
        return tensors, tp_group, None, False
    mesh = head.device_mesh
    if mesh.ndim != 1 or tuple(head.placements) != (Shard(0),):
        raise ValueError(f"head_weight, a DTensor, must be sharded on its rows (placements (Shard(dim=0),)) over a "
                         f"1-D mesh, got placements {tuple(head.placements)} on a mesh of {mesh.ndim} dimensions")
    group = mesh.get_group()
    if tp_group is not None and name_of(tp_group) != name_of(group):
        raise ValueError(f"tp_group must be None or head_weight's mesh's group ({group.group_name}), got "
                         f"{tp_group.group_name}")
    local = {name: local_part(name, tensor, mesh) for name, tensor in tensors.items()}
    sharded = isinstance(tensors["states"], DTensor) and tensors["states"].placements[0] == Shard(1)
    return local, group, head.shape[0], sharded


def local_part(name: str, tensor, mesh):
    """A DTensor's local tensor (its gradient given back with its placements), after checking its mesh and
    placement; a plain tensor as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    allowed = {"states": (Replicate(), Shard(1)), "head_weight": (Shard(0),), "head_bias": (Shard(0),)}
    if tensor.device_mesh != mesh or tensor.placements[0] not in allowed.get(name, (Replicate(),)):
        raise ValueError(f"{name}, a DTensor, must be on head_weight's mesh with placement {PLACEMENTS[name]}, got "
                         f"{tuple(tensor.placements)} on {tensor.device_mesh}")
    return tensor.to_local(grad_placements=tensor.placements)
