"""Runs in processes started by test_integration: one rank of a 2-process CPU (gloo) job."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from acn_kernels import MLP

STEPS = 3


def make_model():
    torch.manual_seed(0)
    return MLP(10, 16, 3, 4, connectivity="acn", backend="auto")


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


def run_rank(rank: int, world: int, wrapper: str, out_dir: str):
    # A file rendezvous: no TCP port to pick, nothing left in TIME_WAIT for the next test.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = make_model()
        inputs, labels = global_batch()
        shard = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            wrapped = fully_shard(model)
        train(wrapped, inputs[shard], labels[shard])
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"{wrapper}.pt"))
        # Both ranks leave together: tearing gloo down while the other rank still talks aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()
