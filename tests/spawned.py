"""Tests that need processes: one spawn per world size runs every case a test file gives it (a spawn of
2-4 processes costs about a minute on 2 cores, the cases seconds), each rank's results saved for the
test process to compare with its own single-process run.

`spawn(world, cases, run_case, tmp)` starts `world` processes on the gloo backend; each runs
`run_case(case, rank, world)` for every case in order and returns the list of its results, rank by rank.
A case that raises on a rank gives ("raised", "<type>: <message>") there, so bad input is tested the
same way (a case must raise on every rank or on none, or the others would wait in a collective).
Collectives are counted per case: `calls` in each result is {name: count} of torch.distributed's
all_reduce, all-gather and reduce-scatter calls the case made.
"""
from __future__ import annotations

import datetime
import os
import socket
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from acn_kernels.tools.parallel_loss_bench import COUNTED, counted  # the bench counts them the same way

TIMEOUT = datetime.timedelta(seconds=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, cases: list, run_case, tmp) -> list:
    """[rank's results] for rank in range(world): each a list, one entry a case."""
    port = free_port()
    mp.start_processes(worker, args=(world, port, cases, run_case, str(tmp)), nprocs=world, start_method="spawn")
    return [torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]


def worker(rank: int, world: int, port: int, cases: list, run_case, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    calls, sent = Counter(), Counter()
    for name in COUNTED:
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), name, calls, sent))
    results = []
    for case in cases:
        calls.clear()
        try:
            result = run_case(case, rank, world, calls)
        except Exception as error:  # noqa: BLE001 - reported to the test, which says what it expected
            result = ("raised", f"{type(error).__name__}: {error}")
        results.append(result)
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()  # the ranks leave together: gloo torn down while another rank still talks aborts
    dist.destroy_process_group()
