"""`python -m acn_kernels train`: a byte-level GPT of any row of table 6 (the ACN, the authors' H-ACN and
LSN, the residual twin, ...) trained on a text file, or the package's corpus, with the authors' recipe
(AdamW on the linear weights, one cycle, clipping), in one process or under torchrun: parallelize on a
(dp, tp) mesh of every rank (gloo on CPUs, NCCL on GPUs): FSDP2 over dp, and with --tp N tensor and
sequence parallelism over groups of N ranks; each tensor-parallel group its own batches.

Every --eval-every steps it prints the held-out loss at every depth (probe(output="loss"), the mean over
the ranks); every --checkpoint-every steps and at the end it saves a distributed checkpoint of the model,
optimizer and schedule (torch.distributed.checkpoint) in OUT/step-N, which --resume continues from
bit for bit, and at the end OUT/model.pt (the whole state_dict) and OUT/config.json, which load into
one process's GPT: `GPT(**json.load(open("config.json")))` then `load_state_dict`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..backend import resolve_backend
from ..depth import depth_scores_across_ranks
from ..models import GPT
from ..training import early_exit_loss
from . import text
from .lm.rows import RECIPES, ROWS
from .lm.train import parameter_groups, schedule

TRAINABLE = ("acn", "hybrid", "lsn", "residual", "hybrid-unit")  # the rows a user trains as they are built
EVAL_WINDOWS = 32


@dataclass(frozen=True)
class TrainOptions:
    out: str
    text: str | None = None     # a text file, read as bytes; None: the package's corpus
    row: str = "acn"
    depth: int = 4
    dim: int = 128
    heads: int = 4
    context: int = 128
    batch: int = 16             # sequences a step, on each rank
    steps: int = 200
    eval_every: int = 50
    checkpoint_every: int = 100
    exit_loss: bool = False     # every exit's loss (early_exit_loss, uniform weights) in place of the last's
    seed: int = 0
    resume: bool = False
    backend: str = "auto"       # the GPT's: the fused kernels on a GPU
    tp: int = 1                 # tensor-parallel ranks (a dimension of the mesh); FSDP2 over the others


def config(options: TrainOptions) -> dict:
    """The GPT's constructor arguments (what OUT/config.json holds)."""
    return dict(vocab_size=text.VOCAB, max_len=options.context, dim=options.dim, depth=options.depth,
                heads=options.heads, **RECIPES["authors"].model, **ROWS[options.row].gpt)


def tokens_of(options: TrainOptions) -> text.TextSplit:
    """The text's bytes, the last 5% held out."""
    if options.text is None:
        return text.load_corpus()
    with open(options.text, "rb") as handle:
        data = handle.read()
    if len(data) < 20 * (options.context + 1):
        raise ValueError(f"--text must hold at least {20 * (options.context + 1)} bytes for --context "
                         f"{options.context} (5% held out), got {len(data)} in {options.text}")
    return text.split_bytes(data)


def batch_of(tokens: torch.Tensor, options: TrainOptions, step: int, rank: int, device) -> torch.Tensor:
    """Step `step`'s windows on this rank, drawn from the seed, the step and the rank alone (a resumed run
    draws what the uninterrupted one would)."""
    generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 1009 + rank)
    return text.windows(tokens, options.context - 1, options.batch, generator).to(device)


def process_group() -> tuple:
    """(rank, world, device, started): torchrun's process group, started here (started True) where it is
    not yet."""
    started = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device, started


def check_tp(tp: int, world: int) -> None:
    if world % tp:
        raise ValueError(f"--tp must divide the number of processes ({world}), got {tp}")


def data_rank(rank: int, options: TrainOptions) -> int:
    """The rank's place among those that draw their own batches: a tensor-parallel group shares one."""
    return rank // options.tp


def built(options: TrainOptions, world: int, device) -> tuple:
    """(model, optimizer, learning-rate schedule), across processes on a (dp, tp) mesh: parallelize."""
    resolve_backend(options.backend, device)  # a backend this device cannot run: named before any work
    torch.manual_seed(options.seed)
    model = GPT(**config(options), backend=options.backend).to(device)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from ..parallel import parallelize
        mesh = init_device_mesh(device.type, (world // options.tp, options.tp), mesh_dim_names=("dp", "tp"))
        parallelize(model, mesh, tp="tp" if options.tp > 1 else None)
    recipe = RECIPES["authors"]
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    get_state_dict(model, optimizer)  # every parameter's optimizer state now, so that checkpoints hold them all
    if model.connectivity == "hybrid":
        model.clamp_after(optimizer)
    return model, optimizer, schedule(optimizer, recipe, options.steps)


def held_out_losses(model: GPT, validation: torch.Tensor, rank: int) -> list:
    """Every depth's mean next-token loss on fixed held-out windows (each data rank its own; the mean)."""
    windows = text.windows(validation, model.max_len - 1, EVAL_WINDOWS, torch.Generator().manual_seed(rank))
    windows = windows.to(next(model.parameters()).device)
    return depth_scores_across_ranks(model, windows, windows, "loss")


@contextlib.contextmanager
def one_process_ok():
    """torch.distributed.checkpoint in one process, which it warns of: here on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint(model, optimizer, lr_schedule, step: int, out: str, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with one_process_ok():
        dcp.save({"model": model_state, "optimizer": optimizer_state, "schedule": lr_schedule.state_dict(),
                  "step": step}, checkpoint_id=os.path.join(out, f"step-{step}"))
    if rank == 0:
        with open(os.path.join(out, "latest"), "w") as handle:
            handle.write(f"step-{step}\n")


def latest_checkpoint(out: str) -> str:
    """The folder OUT/latest names (written at each checkpoint)."""
    latest = os.path.join(out, "latest")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"--resume needs a checkpoint in --out: no {latest} (a run with --out {out} "
                                f"writes it at its first checkpoint)")
    with open(latest) as handle:
        return os.path.join(out, handle.read().strip())


def resumed(model, optimizer, lr_schedule, folder: str) -> int:
    """The step the checkpoint in `folder` was saved at, model, optimizer and schedule loaded from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "schedule": lr_schedule.state_dict(), "step": 0}
    with one_process_ok():
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    lr_schedule.load_state_dict(state["schedule"])
    return int(state["step"])


def save_whole(model, options: TrainOptions, rank: int) -> None:
    """OUT/model.pt (every parameter whole, gathered from the shards) and OUT/config.json, on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, os.path.join(options.out, "model.pt"))
        with open(os.path.join(options.out, "config.json"), "w") as handle:
            json.dump(config(options), handle, indent=1)


def run(options: TrainOptions, progress=None) -> list:
    """Trains as the module docstring says; returns [(step, every depth's held-out loss)]. `progress`
    wraps the steps (tqdm on rank 0)."""
    if options.steps < 3:  # OneCycleLR's two phases: a warmup of 2 steps at least, then a decay
        raise ValueError(f"--steps must be at least 3 (the one-cycle schedule warms up over 2), got {options.steps}")
    folder = latest_checkpoint(options.out) if options.resume else None
    data = tokens_of(options)
    rank, world, device, started = process_group()
    try:
        check_tp(options.tp, world)
        return trained(options, data, folder, rank, world, device, progress)
    finally:
        if started:
            dist.destroy_process_group()


def trained(options: TrainOptions, data: text.TextSplit, folder: str | None, rank: int, world: int, device,
            progress) -> list:
    """run's training in its process group: [(step, every depth's held-out loss)]."""
    from ..parallel import loss_context

    os.makedirs(options.out, exist_ok=True)
    model, optimizer, lr_schedule = built(options, world, device)
    first = resumed(model, optimizer, lr_schedule, folder) + 1 if options.resume else 1
    curve = []
    steps = range(first, options.steps + 1)
    steps = progress(steps) if progress is not None and rank == 0 else steps
    say = getattr(steps, "write", print)  # beside a progress bar, its own line
    for step in steps:
        ids = batch_of(data.train, options, step, data_rank(rank, options), device)
        optimizer.zero_grad(set_to_none=True)
        if options.exit_loss:
            early_exit_loss(model, ids, ids, weights="uniform").backward()
        else:
            logits = model(ids[:, :-1])
            with loss_context(logits):  # torch's loss_parallel where they are split on the vocabulary
                F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPES["authors"].clip)
        optimizer.step()
        lr_schedule.step()
        if step % options.eval_every == 0 or step == options.steps:
            curve.append((step, held_out_losses(model, data.validation, data_rank(rank, options))))
            if rank == 0:
                say(f"step {step}: held-out loss at depth 0..{options.depth}: "
                    + " ".join(f"{value:.3f}" for value in curve[-1][1]))
        if step % options.checkpoint_every == 0 or step == options.steps:
            checkpoint(model, optimizer, lr_schedule, step, options.out, rank)
    save_whole(model, options, rank)
    return curve


def options_of(arguments) -> TrainOptions:
    """TrainOptions from the command line's namespace (its fields by name)."""
    return TrainOptions(**{f.name: getattr(arguments, f.name) for f in dataclasses.fields(TrainOptions)})
