"""Runs in processes started by test_integration: one rank of a 2-process CPU (gloo) job."""
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from acn_kernels import MLP

STEPS = 3


def make_model(connectivity: str = "acn"):
    """The ACN, or the hybrid with every scalar it can have (gates, long weights, x_0 weight: one-element
    parameters, which FSDP2 shards; it refuses 0-dim ones)."""
    torch.manual_seed(0)
    hybrid = dict(long_weights=True, x0_weight=True, gate_init=0.3) if connectivity == "hybrid" else {}
    return MLP(10, 16, 3, 4, connectivity=connectivity, backend="auto", **hybrid)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 10, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def train(model, inputs, labels, steps=STEPS):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


@contextlib.contextmanager
def gloo_group(rank: int, world: int, out_dir: str):
    """A file rendezvous (no TCP port to pick, nothing left in TIME_WAIT for the next test); the ranks
    leave together: tearing gloo down while another rank still talks aborts."""
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def save_whole(model, rank: int, path: str) -> None:
    """Rank 0 saves the model's state, sharded parameters gathered whole (every rank takes part)."""
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(state, path)


def run_rank(rank: int, world: int, wrapper: str, out_dir: str, connectivity: str = "acn"):
    with gloo_group(rank, world, out_dir):
        model = make_model(connectivity)
        inputs, labels = global_batch()
        shard = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            wrapped = fully_shard(model)
        train(wrapped, inputs[shard], labels[shard])
        save_whole(model, rank, os.path.join(out_dir, f"{wrapper}-{connectivity}.pt"))


GPT_FORMS = {"hybrid": dict(connectivity="hybrid", long_weights=True, x0_weight=True, gate_init=0.3),
             "lsn": dict(connectivity="hybrid", long_weights=True, x0_weight=True, gates_from_long_weights=True,
                         long_weight_init=0.8, skip_attention=True)}  # the authors' LSN


def make_gpt(connectivity: str):
    """A small GPT of `connectivity` (the hybrid with every scalar; "lsn" the authors' LSN), on the fused
    ops where they run."""
    from acn_kernels import GPT

    torch.manual_seed(0)
    return GPT(29, 12, 16, 3, 2, backend="auto", **GPT_FORMS.get(connectivity, dict(connectivity=connectivity)))


def gpt_batch():
    return torch.randint(0, 29, (4, 12), generator=torch.Generator().manual_seed(2))


def train_gpt(model, ids, steps=STEPS):
    """SGD: Adam would turn the rounding in the key bias's gradient (zero in exact arithmetic: softmax
    ignores it) into full-size steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
    return model


def run_rank_gpt_per_block(rank: int, world: int, out_dir: str, connectivities: tuple):
    """FSDP2 as every recipe applies it: fully_shard on each block, then on the root; each rank its share
    of the batch, for every connectivity in turn (one spawn)."""
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, out_dir):
        ids = gpt_batch()
        shard = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
        for connectivity in connectivities:
            model = make_gpt(connectivity)
            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
            train_gpt(model, ids[shard])
            save_whole(model, rank, os.path.join(out_dir, f"gpt-{connectivity}.pt"))
