"""Training across processes (gloo, on the CPU) equal to one process: DDP and FSDP2 on the MLP, FSDP2 as
every recipe applies it (each block, then the root) on every connectivity of the GPT, and with layer
dropout on ranks seeded apart (the same blocks skipped on every rank, no hang); a distributed checkpoint
saved at step 2 resumes to step 3 bit for bit, and loads into one process. Every case of a world size runs
in the session's one spawn (tests/spawned.py)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from acn_kernels import (GPT, MLP, EarlyExitLoss, GateAnnealing, LayerDropout, ShrinkOnCompression,
                         early_exit_loss)
from op_harness import DEVICE
from spawned import session_results

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the gloo tests run on the CPU")

WORLDS = (2, 4)
STEPS = 3
GPT_CONNECTIVITIES = ("acn", "hybrid", "lsn", "residual", "ffn")
CASES = ([dict(name=f"{wrapper} mlp {connectivity}", model="mlp", wrapper=wrapper, connectivity=connectivity)
          for wrapper, connectivity in (("ddp", "acn"), ("fsdp", "acn"), ("fsdp", "hybrid"))]
         + [dict(name=f"fsdp2 per block gpt {connectivity}", model="gpt", wrapper="fsdp per block",
                 connectivity=connectivity) for connectivity in GPT_CONNECTIVITIES]
         + [dict(name=f"{wrapper} gpt {connectivity}, layer dropout", model="gpt", wrapper=wrapper,
                 connectivity=connectivity, dropout=True)
            for wrapper, connectivity in (("fsdp per block", "acn"), ("ddp", "hybrid"))]
         + [dict(name=f"{wrapper} gpt {connectivity}, every exit's loss", model="gpt", wrapper=wrapper,
                 connectivity=connectivity, early_exit=True)
            for wrapper, connectivity in (("fsdp per block", "acn"), ("fsdp per block", "hybrid"), ("ddp", "acn"))])
CASES += [dict(name="fsdp2 per block mlp acn, shrink on compression", model="mlp", wrapper="fsdp per block",
               connectivity="acn", shrink=True)]
RESUMED = [dict(name=f"dcp checkpoint at step 2 (model, optimizer, schedules), resumed, gpt {connectivity}",
                connectivity=connectivity) for connectivity in ("acn", "hybrid")]


PLACEMENTS = ("replicate", "shard 0", "shard 1")
DTENSOR_OPS = [dict(name=f"dtensor {op} {placement}", op=op, placement=placement)
               for op in ("accumulate_norm", "accumulate_norm sum rmsnorm", "hybrid_accumulate_norm", "probe_norm",
                          "linear", "feed_forward", "linear_act_accumulate")
               for placement in PLACEMENTS]
REFUSED = [dict(name="dtensor refused: the normalized dimension split", op="accumulate_norm", placement="shard 2"),
           dict(name="dtensor refused: a sharded norm weight", op="accumulate_norm", placement="shard 1",
                weight="shard 0"),
           dict(name="dtensor refused: row tensors split apart", op="hybrid_accumulate_norm", placement="shard 1",
                f="shard 0")]


TRAIN = dict(name="python -m acn_kernels train across 2 processes, resumed", train=True)
TRAIN_TP = dict(name="python -m acn_kernels train --tp 2 across 4 processes, resumed", train=True)


# 4 processes: parallelize(model, mesh) on a 2 x 2 (dp, tp) mesh, FSDP2 x tensor parallelism with sequence
# parallelism and the loss over the TP group, against one process on the whole batch
TENSOR_PARALLEL = ([dict(name=f"2 x 2 fsdp2 x tp gpt {form}", connectivity=form) for form in GPT_CONNECTIVITIES]
                   + [dict(name="2 x 2 fsdp2 x tp gpt acn, the reference backend", connectivity="acn",
                           backend="reference"),
                      dict(name="2 x 2 fsdp2 x tp gpt hybrid, the triton backend (one fused feed_forward)",
                           connectivity="hybrid", backend="triton"),
                      dict(name="2 x 2 fsdp2 x tp gpt acn, every exit's loss", connectivity="acn", early_exit=True),
                      dict(name="2 x 2 fsdp2 x tp gpt lsn, every exit's loss", connectivity="lsn", early_exit=True),
                      dict(name="2 x 2 fsdp2 x tp gpt hybrid, no sequence or loss parallelism", connectivity="hybrid",
                           sequence_parallel=False, loss_parallel=False),
                      dict(name="tp over 4 ranks alone (dp=None), gpt acn of 4 heads, every exit's loss",
                           connectivity="acn", tp_only=True, early_exit=True),
                      dict(name="2 x 2 fsdp2 x tp gpt acn, rotary, no biases, AdamW, activation checkpointing, "
                                "float64", connectivity="acn", authors=True, backend="reference",
                           activation_checkpointing=True)])
PARALLELIZE_REFUSED = [
    dict(name="parallelize refused: a mesh without the named dimension", bad="mesh",
         match=r"tp='model' must name a dimension of the mesh \(init_device_mesh\(\.\.\., mesh_dim_names=\.\.\.\)\), "
               r"got a mesh with dimensions \('dp', 'tp'\)"),
    dict(name="parallelize refused: a tp size that does not divide the heads", bad="heads",
         match=r"the tensor-parallel size \(2, mesh\[tp\]\) must divide the model's heads, got heads=3"),
    dict(name="parallelize refused: a family the package does not parallelize", bad="family",
         match=r"TypeError: model must be the package's GPT or an acnify'd Llama-shaped Hugging Face model "
               r"\(acnify\(model\) first\), got MLP"),
    dict(name="parallelize refused: swiglu's fused rows", bad="swiglu", match=r"model's MLP must be gelu")]


def cases(world: int) -> list:
    if world == 4:
        return TENSOR_PARALLEL + PARALLELIZE_REFUSED + [TRAIN_TP]
    return CASES + RESUMED + DTENSOR_OPS + REFUSED + [TRAIN]


def make_mlp(connectivity: str):
    """The ACN, or the hybrid with every scalar it can have (gates, long weights, x_0 weight: one-element
    parameters, which FSDP2 shards; it refuses 0-dim ones)."""
    torch.manual_seed(0)
    hybrid = dict(long_weights=True, x0_weight=True, gate_init=0.3) if connectivity == "hybrid" else {}
    return MLP(10, 16, 3, 4, connectivity=connectivity, backend="auto", **hybrid)


GPT_FORMS = {"hybrid": dict(connectivity="hybrid", long_weights=True, x0_weight=True, gate_init=0.3),
             "lsn": dict(connectivity="hybrid", long_weights=True, x0_weight=True, gates_from_long_weights=True,
                         long_weight_init=0.8, skip_attention=True)}  # the authors' LSN


def make_gpt(connectivity: str):
    """A small GPT of `connectivity` (the hybrid with every scalar; "lsn" the authors' LSN), on the fused
    ops where they run."""
    torch.manual_seed(0)
    return GPT(29, 12, 16, 3, 2, backend="auto", **GPT_FORMS.get(connectivity, dict(connectivity=connectivity)))


def batch(model: str) -> tuple:
    generator = torch.Generator().manual_seed(1)
    if model == "gpt":
        ids = torch.randint(0, 29, (4, 12), generator=generator)
        return ids[:, :-1], ids[:, 1:]
    return torch.randn(8, 10, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def train(model, inputs, labels, case: dict, blocks) -> list:
    """STEPS steps (the GPT with SGD: Adam would turn the rounding in the key bias's gradient, zero in exact
    arithmetic since softmax ignores it, into full-size steps); [the blocks that ran, a step]. With
    layer dropout, LayerDropout per batch at a high rate, and the global generator seeded apart on each
    rank (as a data loader's workers leave it): its coins must not come from there."""
    sgd = case["model"] == "gpt"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5) if sgd else torch.optim.AdamW(model.parameters(), lr=1e-2)
    dropout = LayerDropout(blocks, STEPS, p_max=0.9, curriculum=None, per="batch", seed=5) \
        if case.get("dropout") else None
    shrinker = ShrinkOnCompression(blocks, *probe_data(case["ranks"]), every=1, patience=1, tolerance=5.0) \
        if case.get("shrink") else None
    ran, hooks = [], [next(m for m in block.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda *_, i=i: ran[-1].append(i)) for i, block in enumerate(getattr(blocks, "blocks", ()))]
    for _ in range(STEPS):
        ran.append([])
        optimizer.zero_grad()
        if case.get("early_exit"):  # DDP's EarlyExitLoss, or the (FSDP2-sharded) model itself
            (model(inputs, inputs) if isinstance(model, torch.nn.parallel.DistributedDataParallel)
             else early_exit_loss(model, inputs, inputs)).backward()
        else:
            F.cross_entropy(model(inputs).flatten(0, -2), labels.flatten()).backward()
        optimizer.step()
        if dropout is not None:
            dropout.step()
        if shrinker is not None:
            shrinker.step()
    for hook in hooks:
        hook.remove()
    return ran if shrinker is None else [[step, scores] for step, scores, _ in shrinker.history]


def probe_data(ranks: list) -> tuple:
    """ShrinkOnCompression's held-out data: each rank its own, one process all of theirs."""
    parts = [(torch.randn(6, 10, generator=torch.Generator().manual_seed(20 + rank)),
              torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(30 + rank))) for rank in ranks]
    return torch.cat([inputs for inputs, _ in parts]), torch.cat([targets for _, targets in parts])


def one_process(case: dict) -> tuple:
    """(the state after training in one process, the blocks that ran a step, or the shrinker's probes)."""
    model = (make_gpt if case["model"] == "gpt" else make_mlp)(case["connectivity"])
    ran = train(model, *batch(case["model"]), {**case, "ranks": [0, 1]}, model)
    return model.state_dict(), ran


def whole(model) -> dict:
    """The model's state, its shards gathered (every rank takes part)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def sharded_gpt(connectivity: str) -> tuple:
    """(the GPT with FSDP2 on each block, then the root, its AdamW, its schedules: layer dropout, and gate
    annealing for the hybrid)."""
    from torch.distributed.fsdp import fully_shard

    model = make_gpt(connectivity)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    from torch.distributed.checkpoint.state_dict import get_state_dict

    schedules = [LayerDropout(model, 4, p_max=0.5, curriculum=None, per="batch", seed=3)]
    schedules += [GateAnnealing(model, total_steps=4)] if connectivity == "hybrid" else []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    get_state_dict(model, optimizer)  # every parameter's optimizer state now: a block dropped so far has one too
    return model, optimizer, schedules


def adamw_steps(model, optimizer, schedules, ids, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        for schedule in schedules:
            schedule.step()


def run_resumed(case: dict, rank: int, world: int) -> dict:
    """Two AdamW steps, a torch.distributed.checkpoint of the model and optimizer, a third step; a fresh
    model and optimizer loaded from the checkpoint take the third step again."""
    import tempfile

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = [tempfile.mkdtemp(prefix="acn-dcp-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    ids = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(7 + rank))  # each rank its own
    model, optimizer, schedules = sharded_gpt(case["connectivity"])
    adamw_steps(model, optimizer, schedules, ids, 2)
    at_two = whole(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state,
              "schedules": [schedule.state_dict() for schedule in schedules]}, checkpoint_id=folder[0])
    adamw_steps(model, optimizer, schedules, ids, 1)
    again, again_optimizer, again_schedules = sharded_gpt(case["connectivity"])
    model_state, optimizer_state = get_state_dict(again, again_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state,
             "schedules": [schedule.state_dict() for schedule in again_schedules]}
    dcp.load(state, checkpoint_id=folder[0])
    set_state_dict(again, again_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for schedule, saved in zip(again_schedules, state["schedules"]):
        schedule.load_state_dict(saved)
    adamw_steps(again, again_optimizer, again_schedules, ids, 1)
    return dict(at_two=at_two, uninterrupted=whole(model), resumed=whole(again), folder=folder[0])


def op_inputs(op: str) -> tuple:
    """(the op's call on its inputs, its row inputs, its parameters): fresh inputs of odd sizes, the
    running sums (batch 2, 6 tokens, width 24) the rows, the gradients of every output drawn too."""
    import acn_kernels

    generator = torch.Generator().manual_seed(sum(map(ord, op)))

    def draw(*shape):
        return torch.randn(*shape, generator=generator)
    rows, params = dict(x=draw(2, 6, 24), y=draw(2, 6, 24) * 3), dict(weight=1 + draw(24) / 10, bias=draw(24))
    if op == "probe_norm":
        return (lambda r, p: (acn_kernels.probe_norm(r["xs"], p["weight"], p["bias"], backend="triton"),),
                dict(xs=draw(4, 2, 6, 24)), params)
    if op == "hybrid_accumulate_norm":
        rows["f"] = draw(2, 6, 24)
        params.update(gate=torch.rand((), generator=generator), long_weight=1 + draw(()) / 5)
        return (lambda r, p: acn_kernels.hybrid_accumulate_norm(r["x"], r["f"], r["y"], p["gate"], p["weight"],
                                                                 p["bias"], long_weight=p["long_weight"],
                                                                 backend="triton"), rows, params)
    if op in ("linear", "feed_forward", "linear_act_accumulate"):  # the GEMM-epilogue ops: 24 -> 20 (-> 24)
        params = dict(w1=draw(20, 24) / 5, b1=draw(20))
        rows["y"] = draw(2, 6, 20)  # the running sum linear_act_accumulate adds into; the others take none
        if op != "linear_act_accumulate":
            del rows["y"]
        if op == "linear":
            return (lambda r, p: (acn_kernels.linear(r["x"], p["w1"], p["b1"], backend="triton"),), rows, params)
        if op == "feed_forward":
            params.update(w2=draw(24, 20) / 5, b2=draw(24))
            return (lambda r, p: (acn_kernels.feed_forward(r["x"], p["w1"], p["b1"], p["w2"], p["b2"],
                                                           backend="triton"),), rows, params)
        return (lambda r, p: acn_kernels.linear_act_accumulate(r["x"], p["w1"], p["b1"], r["y"], backend="triton"),
                rows, params)
    if op == "accumulate_norm sum rmsnorm":
        del params["bias"]
        return (lambda r, p: acn_kernels.accumulate_norm(r["x"], r["y"], p["weight"], None, norm="rmsnorm",
                                                          normalize="sum", backend="triton"), rows, params)
    return (lambda r, p: acn_kernels.accumulate_norm(r["x"], r["y"], p["weight"], p["bias"], backend="triton"),
            rows, params)


def op_run(case: dict, mesh=None) -> list:
    """[every output, then every input's gradient] of the op, on DTensors placed as the case says where a
    mesh is given (gathered whole), else on plain tensors."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    call, rows, params = op_inputs(case["op"])

    def placed(value, placement: str):
        if mesh is None:
            return value.clone().requires_grad_()
        dim = placement.removeprefix("shard ")
        where = Replicate() if placement == "replicate" else Shard(int(dim) + (value.dim() == 4))  # probe's depths
        return distribute_tensor(value, mesh, [where]).requires_grad_()
    rows = {k: placed(v, case.get(k, case["placement"])) for k, v in rows.items()}
    params = {k: placed(v, case.get(k, "replicate")) for k, v in params.items()}
    outputs = call(rows, params)
    grads = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5)) for o in outputs]
    if mesh is not None:
        grads = [distribute_tensor(g, mesh, o.placements) for g, o in zip(grads, outputs)]
    torch.autograd.backward(outputs, grads)
    values = [*outputs, *(t.grad for t in (*rows.values(), *params.values()))]
    return [v.full_tensor() if hasattr(v, "full_tensor") else v.detach() for v in values]


def run_train(rank: int, tp: int = 1) -> dict:
    """The train command's run (the hybrid, every exit's loss, parallelize on this group: FSDP2, over tp
    tensor-parallel ranks too), then the same run resumed from its step-2 checkpoint in a second folder."""
    import json
    import os
    import shutil
    import tempfile

    import torch.distributed as dist

    from acn_kernels.experiments.train import TrainOptions, run

    folder = [tempfile.mkdtemp(prefix="acn-train-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    whole, resumed = os.path.join(folder[0], "whole"), os.path.join(folder[0], "resumed")
    options = TrainOptions(out=whole, row="hybrid", depth=2, dim=32, heads=2, context=32, batch=4, steps=4,
                           eval_every=2, checkpoint_every=2, exit_loss=True, backend="reference", tp=tp)
    curve = run(options)
    if rank == 0:
        shutil.copytree(os.path.join(whole, "step-2"), os.path.join(resumed, "step-2"))
        with open(os.path.join(resumed, "latest"), "w") as handle:
            handle.write("step-2\n")
    dist.barrier()
    run(dataclasses.replace(options, out=resumed, resume=True))
    dist.barrier()
    if rank:
        return dict(curve=curve)
    saved = dict(curve=curve, whole=torch.load(os.path.join(whole, "model.pt")),
                 resumed=torch.load(os.path.join(resumed, "model.pt")),
                 config=json.load(open(os.path.join(whole, "config.json"))))
    shutil.rmtree(folder[0])
    return saved


def tensor_parallel_gpt(case: dict):
    """The case's GPT; the authors' (no biases, rotary positions) in float64, where AdamW's steps do not
    turn float32's rounding of a gradient near 0 into a step of their size."""
    torch.manual_seed(0)
    authors = dict(bias=False, positions="rotary", scaled_output_init=True) if case.get("authors") else {}
    model = GPT(29, 12, 16, 3, 4 if case.get("tp_only") else 2, backend=case.get("backend", "auto"), **authors,
                **GPT_FORMS.get(case["connectivity"], dict(connectivity=case["connectivity"])))
    return model.double() if case.get("authors") else model


def tensor_parallel_steps(model, ids: torch.Tensor, case: dict) -> dict:
    """STEPS steps (AdamW for the authors' GPT without biases, SGD otherwise: see train); every step's loss,
    the first step's gradients and the last state, each whole (the shards gathered)."""
    from acn_kernels.parallel import loss_context

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2) if case.get("authors") \
        else torch.optim.SGD(model.parameters(), lr=0.5)
    losses, grads = [], None
    for _ in range(STEPS):
        optimizer.zero_grad()
        if case.get("early_exit"):
            loss = early_exit_loss(model, ids, ids)
            loss.backward()
        else:
            logits = model(ids[:, :-1])
            with loss_context(logits):
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
        losses.append(float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss))
        if grads is None:
            grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                     for name, p in model.named_parameters()}
        optimizer.step()
    return dict(losses=losses, grads=grads, state=whole(model))


def run_parallelized(case: dict, rank: int) -> dict:
    """parallelize on a 2 x 2 (dp, tp) mesh, each dp rank half of the batch (or tensor parallelism alone over
    the 4 ranks, each the whole batch)."""
    from torch.distributed.device_mesh import init_device_mesh

    from acn_kernels.parallel import parallelize

    if case.get("tp_only"):
        model = parallelize(tensor_parallel_gpt(case), init_device_mesh("cpu", (4,), mesh_dim_names=("tp",)), dp=None)
        return tensor_parallel_steps(model, batch("gpt")[0], case)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    if "bad" in case:
        return refused_parallelize(case, mesh)
    model = parallelize(tensor_parallel_gpt(case), mesh, sequence_parallel=case.get("sequence_parallel", True),
                        loss_parallel=case.get("loss_parallel", True),
                        activation_checkpointing=case.get("activation_checkpointing", False))
    ids = batch("gpt")[0]
    half = mesh["dp"].get_local_rank()
    return tensor_parallel_steps(model, ids[half * 2:half * 2 + 2], case)


def refused_parallelize(case: dict, mesh):
    from acn_kernels.parallel import parallelize

    torch.manual_seed(0)
    if case["bad"] == "mesh":
        return parallelize(make_gpt("acn"), mesh, tp="model")
    if case["bad"] == "heads":
        return parallelize(GPT(29, 12, 18, 2, 3), mesh)
    if case["bad"] == "family":
        return parallelize(make_mlp("acn"), mesh)
    return parallelize(GPT(29, 12, 16, 2, 2, mlp="swiglu"), mesh)


def run_on_rank(case: dict, rank: int, world: int, calls) -> dict:
    """The case's model trained on this rank's share of the batch; its whole state (shards gathered)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if case == TRAIN_TP:
        return run_train(rank, tp=2)
    if world == 4:
        return run_parallelized(case, rank)
    if case in RESUMED:
        return run_resumed(case, rank, world)
    if case == TRAIN:
        return run_train(rank)
    if "op" in case:
        return op_run(case, init_device_mesh("cpu", (world,)))

    model = (make_gpt if case["model"] == "gpt" else make_mlp)(case["connectivity"])
    inputs, labels = batch(case["model"])
    share = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    if case["wrapper"] == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(EarlyExitLoss(model) if case.get("early_exit") else model,
                                                            find_unused_parameters=bool(case.get("dropout")))
    else:
        for block in model.blocks if case["wrapper"] == "fsdp per block" else ():
            fully_shard(block)
        wrapped = fully_shard(model)
    torch.manual_seed(1000 + rank)
    ran = train(wrapped, inputs[share], labels[share], {**case, "ranks": [rank]}, model)
    return dict(state=whole(model), ran=ran)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return session_results(__name__, 2, tmp_path_factory)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case["name"])
def test_training_across_two_processes_matches_one_process(spawned, case):
    """FSDP2 per block: the fused boundary reads each block's norm where FSDP2 has gathered it, and the
    hybrid's scalars shard."""
    single, ran = one_process(case)
    if case.get("dropout"):  # the coins skipped a block at some step
        assert any(len(set(step)) < len(make_gpt("acn").blocks) for step in ran), ran
    for rank, results in enumerate(spawned):
        result = results[CASES.index(case)]
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        if case.get("shrink"):  # the mean of the ranks' scores: one process's on all their probe data
            assert [step for step, _ in result["ran"]] == [step for step, _ in ran] == [1, 2, 3]
            for (_, scores), (_, expected) in zip(result["ran"], ran):
                assert scores == pytest.approx(expected, rel=1e-12), f"rank {rank}"
        else:
            assert result["ran"] == ran, f"rank {rank} ran the blocks {result['ran']}, one process {ran}"
        for name, value in single.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process loads on purpose
@pytest.mark.parametrize("case", RESUMED, ids=lambda case: case["name"])
def test_a_distributed_checkpoint_resumes_bit_for_bit_and_loads_in_one_process(spawned, case):
    import shutil

    import torch.distributed.checkpoint as dcp

    results = [ranks[len(CASES) + RESUMED.index(case)] for ranks in spawned]
    for rank, result in enumerate(results):
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        for name, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], value), f"rank {rank}: {name} differs after resuming"
    one = make_gpt(case["connectivity"])  # the package's GPT of the same form, in this process, no group
    state = {"model": one.state_dict()}
    dcp.load(state, checkpoint_id=results[0]["folder"])
    one.load_state_dict(state["model"])
    shutil.rmtree(results[0]["folder"])
    assert one.connectivity == ("hybrid" if case["connectivity"] == "hybrid" else "acn")
    for name, value in results[0]["at_two"].items():
        assert torch.equal(one.state_dict()[name], value), name


@pytest.mark.parametrize("case", DTENSOR_OPS, ids=lambda case: case["name"])
def test_the_fused_ops_on_dtensors_equal_the_op_on_whole_tensors(spawned, case):
    """Replicated, or split on a token dimension (sequence parallelism): every output and every gradient
    as on whole tensors (the parameters' gradients Partial sums over the ranks' rows)."""
    expected = op_run(case)
    for rank, results in enumerate(spawned):
        result = results[cases(2).index(case)]
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        for i, (actual, value) in enumerate(zip(result, expected)):
            torch.testing.assert_close(actual, value, rtol=1e-5, atol=1e-5, msg=f"rank {rank}: value {i}")


@pytest.mark.parametrize("case, match", list(zip(REFUSED, (
    r"accumulate_norm_fwd: row tensors may be Replicate or Shard on a token dimension \(\[0, 1\]\), not on their "
    r"features \(the last\), got \(Shard\(dim=2\),\)",
    r"accumulate_norm_fwd: the parameters \(norms', linears', the hybrid's scalars\) must be Replicate, got "
    r"\(Shard\(dim=0\),\)",
    r"hybrid_accumulate_norm_fwd: every row tensor must have the same placements"))),
    ids=lambda value: value["name"] if isinstance(value, dict) else "")
def test_a_placement_the_rules_do_not_cover_is_refused_by_name(spawned, case, match):
    import re
    for rank, results in enumerate(spawned):
        result = results[cases(2).index(case)]
        assert isinstance(result, tuple) and re.search(match, result[1]), f"rank {rank}: {result}"


def train_results(results: list) -> tuple:
    """(the held-out curve, the whole run's model.pt), after checking every rank's curve and the resumed
    run's model (equal to the whole run's bit for bit) and loading model.pt into a GPT of config.json."""
    for rank, result in enumerate(results):
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        assert [step for step, _ in result["curve"]] == [2, 4]
        assert all(len(losses) == 3 for _, losses in result["curve"])
        assert result["curve"] == results[0]["curve"]  # the mean over the ranks, on every rank
    whole, resumed = results[0]["whole"], results[0]["resumed"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    model = GPT(**results[0]["config"])
    model.load_state_dict(whole)
    assert model.connectivity == "hybrid"
    return results[0]["curve"], whole


def test_the_train_command_across_processes_resumes_bit_for_bit_and_saves_a_gpt(spawned):
    train_results([ranks[cases(2).index(TRAIN)] for ranks in spawned])


def test_the_train_command_with_tensor_parallelism_trains_as_fsdp2_alone(spawned, spawned_four):
    """--tp 2 on 4 processes: 2 data ranks, as the 2-process run has, drawing the same batches: the same
    held-out curve and model, within float32's sums in another order."""
    curve, model = train_results([ranks[cases(4).index(TRAIN_TP)] for ranks in spawned_four])
    expected_curve, expected = train_results([ranks[cases(2).index(TRAIN)] for ranks in spawned])
    for (step, losses), (expected_step, expected_losses) in zip(curve, expected_curve):
        assert step == expected_step and losses == pytest.approx(expected_losses, rel=1e-5)
    for name, value in expected.items():
        torch.testing.assert_close(model[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def spawned_four(tmp_path_factory):
    return session_results(__name__, 4, tmp_path_factory)


@pytest.mark.parametrize("case", TENSOR_PARALLEL, ids=lambda case: case["name"])
def test_fsdp2_by_tensor_parallelism_on_a_2x2_mesh_matches_one_process(spawned_four, case):
    """Every connectivity, the fused ops (Triton's, interpreted) and the reference backend: the loss at every
    step (the dp ranks' mean), every gradient of the first step and the state after three steps."""
    expected = tensor_parallel_steps(tensor_parallel_gpt(case), batch("gpt")[0], case)
    tolerance = dict(rtol=1e-10, atol=1e-12) if case.get("authors") else dict(rtol=1e-5, atol=1e-6)  # float64
    results = [ranks[TENSOR_PARALLEL.index(case)] for ranks in spawned_four]
    for rank, result in enumerate(results):
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        for name, value in expected["grads"].items():
            torch.testing.assert_close(result["grads"][name], value, **tolerance, msg=f"rank {rank}: {name}")
        for name, value in expected["state"].items():
            torch.testing.assert_close(result["state"][name], value, **tolerance, msg=f"rank {rank}: {name}")
    for pair in ((0, 2), (1, 3)) if not case.get("tp_only") else ((r,) for r in range(4)):  # rank 2 dp + tp:
        means = [sum(results[r]["losses"][step] for r in pair) / len(pair) for step in range(STEPS)]  # a tp rank's
        assert means == pytest.approx(expected["losses"], rel=tolerance["rtol"])  # dp ranks, halves of the batch


@pytest.mark.parametrize("case", PARALLELIZE_REFUSED, ids=lambda case: case["name"])
def test_parallelize_refuses_what_it_cannot_split_by_name(spawned_four, case):
    import re
    for rank, ranks in enumerate(spawned_four):
        result = ranks[len(TENSOR_PARALLEL) + PARALLELIZE_REFUSED.index(case)]
        assert isinstance(result, tuple) and re.search(case["match"], result[1]), f"rank {rank}: {result}"
