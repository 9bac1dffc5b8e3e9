"""`bench --suite loss`'s tensor-parallel rows: every exit's loss over a vocabulary split on T ranks, per rank.

Two ways to the same loss (13 exits, 4 x 1024 tokens, width 768, GPT-2's and Llama-3's vocabularies,
T = 2 and 4; float32 states, the head's rows split as Megatron splits them):

- "depth_cross_entropy": the package's op with tp_group (two all-reduces a chunk for every exit at
  once, the states' gradient summed once a call);
- "per-exit Megatron": what Megatron-Core's multi-token prediction does, the output layer and a
  vocabulary-parallel cross-entropy called once per exit (VocabParallelCrossEntropy below: the max, the
  target logit and the exp-sum each all-reduced; each exit's (tokens, V / T) float32 logits kept for
  backward, where the column-parallel head all-reduces the exit's input gradient).

Each (way, vocabulary, T) runs in a process of its own playing rank 0 of T on torch's fake process
group (collectives that move nothing), since T gloo ranks of the per-exit loss at V = 128256 hold
T x 6.8 GB, beyond this machine's memory; a rank's memory is its own either way, and the same op on
gloo equals one process (tests/test_vocabulary_parallel.py). Reported per rank: peak memory beyond the
inputs (VmHWM, as loss_bench measures it), collectives and the bytes handed to them (a ring all-reduce
sends 2 (T - 1) / T of them), chunks.
"""
from __future__ import annotations

import inspect
import os
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .loss_bench import measured

EXITS, TOKENS, WIDTH = 13, 4096, 768
VOCABS, WORLDS = (50257, 128256), (2, 4)
QUICK = dict(exits=13, tokens=256, width=64, vocabs=(1000,), worlds=(2,))
WAYS = ("depth_cross_entropy", "per-exit Megatron")
COUNTED = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
           "reduce_scatter_tensor")


@dataclass
class ParallelCase:
    way: str
    vocab: int
    world: int
    exits: int
    tokens: int
    width: int


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocabulary-parallel cross-entropy (learned from its recipe, written here): the local
    logits (N, V / T) float32, three all-reduces, the softmax kept in the logits' own storage."""

    @staticmethod
    def forward(ctx, logits, targets, offset: int, group):
        peak = logits.max(-1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        logits.sub_(peak[:, None])
        local = targets - offset
        here = (local >= 0) & (local < logits.shape[1])
        index = torch.where(here, local, 0)
        target_logit = logits.gather(1, index[:, None])[:, 0] * here
        dist.all_reduce(target_logit, group=group)
        exp = logits.exp_()
        total = exp.sum(-1)
        dist.all_reduce(total, group=group)
        exp.div_(total[:, None])
        ctx.save_for_backward(exp, index, here)
        return total.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, index, here = ctx.saved_tensors
        softmax.scatter_add_(1, index[:, None], -here[:, None].to(softmax.dtype))
        return softmax.mul_(grad[:, None]), None, None, None


class AllReducedInputGradient(torch.autograd.Function):
    """A column-parallel layer's input: the identity forward, its gradient all-reduced over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def per_exit_megatron(states, targets, norm_weight, norm_bias, head, offset: int, group) -> torch.Tensor:
    """The mean of every exit's loss, one output layer and vocabulary-parallel loss an exit."""
    losses = []
    for state in states:
        hidden = torch.nn.functional.layer_norm(state, state.shape[-1:], norm_weight, norm_bias)
        logits = torch.nn.functional.linear(AllReducedInputGradient.apply(hidden, group), head)
        losses.append(VocabParallelCrossEntropy.apply(logits, targets, offset, group).mean())
    return torch.stack(losses).mean()


def run_parallel_case(case: ParallelCase) -> dict:
    """One loss and backward as rank 0 of case.world, in this process: peak, collectives, bytes."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..ops import _vocabulary
    from ..ops.depth_cross_entropy import chunk_rows_for, depth_cross_entropy

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=case.world)
    _vocabulary.check_layout = lambda entries, world: None  # the fake group reduces nothing to check
    calls, sent = Counter(), Counter()
    for name in COUNTED:
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), name, calls, sent))
    torch.manual_seed(0)
    rows = -(-case.vocab // case.world)
    states = torch.randn(case.exits, case.tokens, case.width, requires_grad=True)
    targets = torch.randint(0, case.vocab, (case.tokens,))
    norm_weight = torch.ones(case.width, requires_grad=True)
    norm_bias = torch.zeros(case.width, requires_grad=True)
    head = (torch.randn(rows, case.width) / case.width ** 0.5).requires_grad_()
    gradients = sum(t.numel() * t.element_size() for t in (states, norm_weight, norm_bias, head))

    def loss_and_backward(rows=slice(None)):
        if case.way == "per-exit Megatron":
            loss = per_exit_megatron(states[:, rows], targets[rows], norm_weight, norm_bias, head, 0,
                                     dist.group.WORLD)
        else:
            loss, _ = depth_cross_entropy(states[:, rows], targets[rows], norm_weight, norm_bias, head,
                                          tp_group=dist.group.WORLD, vocab_size=case.vocab, backend="chunked")
        loss.backward()
    loss_and_backward(slice(8))  # the math libraries' own buffers and pools, which any loss here pays once
    for tensor in (states, norm_weight, norm_bias, head):
        tensor.grad = None
    calls.clear()
    sent.clear()
    seconds, peak, _ = measured(loss_and_backward, "cpu")
    dist.destroy_process_group()
    chunks = case.exits if case.way == "per-exit Megatron" else \
        -(-case.exits * case.tokens // chunk_rows_for(case.exits * case.tokens, rows, case.width, head.device))
    return dict(way=case.way, vocab=case.vocab, world=case.world, seconds=seconds, peak_gib=peak / 2 ** 30,
                beyond_gradients_gib=(peak - gradients) / 2 ** 30, chunks=chunks, collectives=sum(calls.values()),
                sent_mib=sum(sent.values()) / 2 ** 20,
                **{f"calls_{name}": count for name, count in calls.items()})


def counted(collective, name: str, calls: Counter, sent: Counter):
    """`collective`, counting its calls and the bytes of the tensor it sends (all_reduce's only tensor, the
    input of the others, however the caller names them: FSDP2 passes keywords)."""
    signature = inspect.signature(collective)

    def counting(*args, **kwargs):
        calls[name] += 1
        payload = list(signature.bind(*args, **kwargs).arguments.values())[0 if name == "all_reduce" else 1]
        sent[name] += payload.numel() * payload.element_size()
        return collective(*args, **kwargs)
    return counting


def parallel_rows(quick: bool, context) -> list:
    """Every (way, vocabulary, T) in a process of its own, each row printed as it is measured, then the
    ratios."""
    shape = QUICK if quick else dict(exits=EXITS, tokens=TOKENS, width=WIDTH, vocabs=VOCABS, worlds=WORLDS)
    smoke = "SMOKE RUN (--quick, a small vocabulary): " if quick else ""
    print(f"{smoke}every exit's loss over a vocabulary split on T ranks, per rank: {shape['exits']} exits, "
          f"{shape['tokens']} tokens, width {shape['width']}, float32, loss and backward (rank 0 of T on the fake "
          f"process group, each case in its own process); peak beyond the inputs (and beyond their gradients too)")
    print(f"{'way':<20} {'vocab':>7} {'T':>2} {'seconds':>8} {'peak GiB':>9} {'beyond grads':>13} {'chunks':>7} "
          f"{'collectives':>12} {'sent MiB':>9}", flush=True)
    rows = []
    for vocab in shape["vocabs"]:
        for world in shape["worlds"]:
            for way in WAYS:
                case = ParallelCase(way, vocab, world, shape["exits"], shape["tokens"], shape["width"])
                with context.Pool(1) as pool:
                    row = pool.apply(run_parallel_case, (case,))
                print(f"{row['way']:<20} {row['vocab']:>7} {row['world']:>2} {row['seconds']:>8.2f} "
                      f"{row['peak_gib']:>9.3f} {row['beyond_gradients_gib']:>13.3f} {row['chunks']:>7} "
                      f"{row['collectives']:>12} {row['sent_mib']:>9.2f}", flush=True)
                rows.append(row)
    print_ratios(rows, quick)
    return [{"path": f"tp {row['way']}", **row} for row in rows]


def print_ratios(rows: list, quick: bool) -> None:
    pairs = {}
    for row in rows:
        pairs.setdefault((row["vocab"], row["world"]), {})[row["way"]] = row
    for (vocab, world), ways in pairs.items():
        ours, theirs = ways["depth_cross_entropy"], ways["per-exit Megatron"]
        target = " (target <= 0.05)" if (vocab, world) == (128256, 4) and not quick else ""
        print(f"V {vocab}, T {world}: depth_cross_entropy's peak is {ours['peak_gib'] / theirs['peak_gib']:.3f} of "
              f"the per-exit Megatron loss's{target}, "
              f"{ours['beyond_gradients_gib'] / theirs['beyond_gradients_gib']:.3f} beyond the gradients; "
              f"{ours['collectives']} collectives ({ours['chunks']} chunks) against {theirs['collectives']}")


# ----------------------------------------------------------------------------- a training step under parallelize

STEP = dict(vocab=50257, width=768, depth=12, heads=12, batch=2, tokens=1024)  # an AC-GPT of GPT-2's size
QUICK_STEP = dict(vocab=1000, width=64, depth=2, heads=4, batch=2, tokens=64)
MESH = (2, 2)  # (dp, tp)


def training_step_peak(shape: dict, rank: int = 0) -> tuple:
    """(peak resident GiB, seconds) of one AdamW step of every exit's loss on its data rank's share of the
    batch, the peak beyond what the process held before the model (its imports and process group), the
    AC-GPT built and laid on a MESH of the group's ranks where there is one (parallelize): its parameters'
    shards resident, the step's gradients, optimizer state and activations on top (what a GPU's peak
    allocated memory counts). The model is built whole on every rank first (torchtitan builds it on the
    meta device); that peak, before the step, is left out."""
    from ..models import GPT
    from ..parallel import parallelize
    from ..training import early_exit_loss
    from .loss_bench import peak_resident_bytes, reset_peak_resident, resident_bytes

    baseline = resident_bytes()
    torch.manual_seed(0)
    model = GPT(shape["vocab"], shape["tokens"], shape["width"], shape["depth"], shape["heads"], bias=False)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["tokens"]),
                        generator=torch.Generator().manual_seed(1))
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
        model = parallelize(model, mesh)
        share = shape["batch"] // MESH[0]
        ids = ids[mesh["dp"].get_local_rank() * share:][:share]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    reset_peak_resident()
    began = time.perf_counter()
    early_exit_loss(model, ids, ids).backward()
    optimizer.step()
    return (peak_resident_bytes() - baseline) / 2 ** 30, time.perf_counter() - began


def parallelize_rank(rank: int, world: int, port: int, shape: dict, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    peak, seconds = training_step_peak(shape, rank)
    with open(os.path.join(folder, f"rank{rank}"), "w") as handle:
        handle.write(f"{peak} {seconds}\n")
    dist.barrier()
    dist.destroy_process_group()


def parallelize_rows(quick: bool, context) -> list:
    """One process's training step, then the same step on 4 gloo processes on a 2 x 2 (dp, tp) mesh:
    each rank's peak, the largest against one process's."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    shape = QUICK_STEP if quick else STEP
    # a fixed threshold: every tensor in its own mapping, returned to the system when freed, so that the
    # resident set follows the live tensors (glibc raises a dynamic one and keeps what a freed model held)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    with context.Pool(1) as pool:
        one, one_seconds = pool.apply(training_step_peak, (shape,))
    world = MESH[0] * MESH[1]
    with tempfile.TemporaryDirectory() as folder, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        mp.start_processes(parallelize_rank, args=(world, port, shape, folder), nprocs=world, start_method="spawn")
        ranks, seconds = zip(*(map(float, open(f"{folder}/rank{rank}").read().split()) for rank in range(world)))
    target = "" if quick else " (target <= 0.35)"
    print(f"{'SMOKE RUN: ' if quick else ''}an AC-GPT training step (width {shape['width']}, {shape['depth']} blocks, "
          f"vocabulary {shape['vocab']}, {shape['batch']} x {shape['tokens']} tokens, every exit's loss, AdamW): peak "
          f"resident of the step beyond the imports {one:.3f} GiB in one process; parallelize on a 2 x 2 (dp, tp) "
          f"mesh of 4 gloo processes, per rank {' '.join(f'{peak:.3f}' for peak in ranks)} GiB: the largest "
          f"{max(ranks) / one:.3f} of one process's{target}", flush=True)
    return [dict(path="training step, one process", peak_gib=one, seconds=one_seconds),
            *(dict(path="training step, parallelize 2 x 2", world=world, rank=rank, peak_gib=peak, seconds=time)
              for rank, (peak, time) in enumerate(zip(ranks, seconds)))]
