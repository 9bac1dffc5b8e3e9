"""Training across processes (gloo, on the CPU) equal to one process: DDP and FSDP2 on the MLP, FSDP2 as
every recipe applies it (each block, then the root) on every connectivity of the GPT, and with layer
dropout on ranks seeded apart (the same blocks skipped on every rank, no hang). Every case of a world size
runs in the session's one spawn (tests/spawned.py)."""
import pytest
import torch
import torch.nn.functional as F

from acn_kernels import GPT, MLP, LayerDropout
from op_harness import DEVICE
from spawned import session_results

pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="the gloo tests run on the CPU")

WORLDS = (2,)
STEPS = 3
GPT_CONNECTIVITIES = ("acn", "hybrid", "lsn", "residual", "ffn")
CASES = ([dict(name=f"{wrapper} mlp {connectivity}", model="mlp", wrapper=wrapper, connectivity=connectivity)
          for wrapper, connectivity in (("ddp", "acn"), ("fsdp", "acn"), ("fsdp", "hybrid"))]
         + [dict(name=f"fsdp2 per block gpt {connectivity}", model="gpt", wrapper="fsdp per block",
                 connectivity=connectivity) for connectivity in GPT_CONNECTIVITIES]
         + [dict(name=f"{wrapper} gpt {connectivity}, layer dropout", model="gpt", wrapper=wrapper,
                 connectivity=connectivity, dropout=True)
            for wrapper, connectivity in (("fsdp per block", "acn"), ("ddp", "hybrid"))])


def cases(world: int) -> list:
    return CASES


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
    ran, hooks = [], [next(m for m in block.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
        lambda *_, i=i: ran[-1].append(i)) for i, block in enumerate(getattr(blocks, "blocks", ()))]
    for _ in range(STEPS):
        ran.append([])
        optimizer.zero_grad()
        F.cross_entropy(model(inputs).flatten(0, -2), labels.flatten()).backward()
        optimizer.step()
        if dropout is not None:
            dropout.step()
    for hook in hooks:
        hook.remove()
    return ran


def one_process(case: dict) -> tuple:
    """(the state after training in one process, the blocks that ran a step)."""
    model = (make_gpt if case["model"] == "gpt" else make_mlp)(case["connectivity"])
    ran = train(model, *batch(case["model"]), case, model)
    return model.state_dict(), ran


def run_on_rank(case: dict, rank: int, world: int, calls) -> dict:
    """The case's model trained on this rank's share of the batch; its whole state (shards gathered)."""
    from torch.distributed.fsdp import fully_shard

    model = (make_gpt if case["model"] == "gpt" else make_mlp)(case["connectivity"])
    inputs, labels = batch(case["model"])
    share = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    if case["wrapper"] == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=bool(case.get("dropout")))
    else:
        for block in model.blocks if case["wrapper"] == "fsdp per block" else ():
            fully_shard(block)
        wrapped = fully_shard(model)
    torch.manual_seed(1000 + rank)
    ran = train(wrapped, inputs[share], labels[share], case, model)
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
             for k, v in model.state_dict().items()}
    return dict(state=state, ran=ran)


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
        assert result["ran"] == ran, f"rank {rank} ran the blocks {result['ran']}, one process {ran}"
        for name, value in single.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
