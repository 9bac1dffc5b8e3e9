"""Tests that need processes: one spawn per world size a session runs every case of every module in
SPAWNED (a spawn of 2-4 processes costs 10-20 s on 2 cores, the cases seconds), each rank's results saved
for the test process to compare with its own single-process run. The first pytest-xdist worker that asks
for a world size spawns it under a file lock; the other reads the saved results.

A module in SPAWNED gives `WORLDS` (the world sizes its cases run at), `cases(world)` and
`run_on_rank(case, rank, world, calls)`; its tests take `session_results(module, world, tmp_path_factory)`:
one list a rank, one entry a case, in `cases(world)`'s order.
A case that raises on a rank gives ("raised", "<type>: <message>") there, so bad input is tested the
same way (a case must raise on every rank or on none, or the others would wait in a collective).
Collectives are counted per case: `calls` in each result is {name: count} of torch.distributed's
all_reduce, all-gather and reduce-scatter calls the case made.
"""
from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock

from acn_kernels.tools.parallel_loss_bench import COUNTED, counted  # the bench counts them the same way

TIMEOUT = datetime.timedelta(seconds=120)
SPAWNED = ("test_vocabulary_parallel", "test_distributed", "test_acnify")
_loaded = {}  # world -> every rank's results of this session's spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_results(module: str, world: int, tmp_path_factory) -> list:
    """[rank's results for module's cases(world)] for rank in range(world), from the session's one spawn."""
    everything = _loaded.get(world) or _loaded.setdefault(world, spawned_once(world, tmp_path_factory))
    keys = session_cases(world)
    return [[result for key, result in zip(keys, ranks) if key[0] == module] for ranks in everything]


def session_cases(world: int) -> list:
    """Every case of the modules in SPAWNED that this session collected (all of them for the whole suite;
    a file run alone spawns for its own cases), the same list on every xdist worker."""
    return [(name, i) for name in SPAWNED if name in sys.modules
            and world in (module := importlib.import_module(name)).WORLDS for i in range(len(module.cases(world)))]


def run_session_case(key: tuple, rank: int, world: int, calls):
    module = importlib.import_module(key[0])
    return module.run_on_rank(module.cases(world)[key[1]], rank, world, calls)


def spawned_once(world: int, tmp_path_factory) -> list:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder the run's workers share
    folder = root / f"spawned-world{world}"
    with FileLock(str(root / f"spawned-world{world}.lock")):
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            mp.start_processes(worker, args=(world, free_port(), session_cases(world), run_session_case, str(folder)),
                               nprocs=world, start_method="spawn")
            (folder / "done").touch()
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


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
