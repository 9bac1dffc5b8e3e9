"""depth_cross_entropy over a tensor-parallel group (gloo, 2 and 4 processes, every case of a world size in
one spawn) equal to one process on the whole head: the loss, per-exit losses, statistics and every gradient
(float64 to 1e-12 relative; float32 and bfloat16 within the package's tolerance rule against the float64
reference), odd vocabularies padded as Megatron pads them (a rank holding only padding among them), 1 and 13
exits, shared and per-exit targets and norms, no target on a rank's slice, every option, sequence-parallel
states, a DTensor head, the collectives counted; and bad input named on every rank."""
import pytest
import torch

from acn_kernels import depth_cross_entropy
from acn_kernels.tools.agreement import mismatch
from spawned import session_results

WORLDS = (2, 4)

CASES = [
    dict(name="one exit, statistics", exits=1, lead=(4, 3), dim=8, vocab=37, chunk_rows=5, statistics=True),
    dict(name="13 exits, per-exit targets and norms, every option", exits=13, lead=(4, 3), dim=12, vocab=37,
         chunk_rows=7, per_exit_targets=True, per_exit_norms=True, statistics=True,
         options=dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0), twice=True),
    dict(name="rmsnorm, no biases, a vocabulary of 5, weights, ignore_index 3", exits=3, lead=(4, 2), dim=6, vocab=5,
         chunk_rows=4, norm_bias=False, head_bias=False, weights=True, statistics=True,
         options=dict(norm="rmsnorm", ignore_index=3, label_smoothing=0.2, z_loss=1e-2)),
    dict(name="no target on the first rank's slice", exits=2, lead=(4, 3), dim=8, vocab=41, chunk_rows=100,
         targets_from="second slice", statistics=True),
    dict(name="sequence-parallel states", exits=3, lead=(4, 3), dim=8, vocab=29, chunk_rows=6, sequence_parallel=True,
         per_exit_targets=True, statistics=True, options=dict(label_smoothing=0.1)),
    dict(name="a DTensor head, torch.chunk's uneven rows", exits=2, lead=(4, 3), dim=8, vocab=37, chunk_rows=9,
         dtensor=True, options=dict(z_loss=1e-3)),
    dict(name="float32, the Triton row kernels", exits=3, lead=(4, 3), dim=16, vocab=61, chunk_rows=10,
         dtype=torch.float32, backend="triton", statistics=True, options=dict(label_smoothing=0.1, softcap=4.0)),
    dict(name="bfloat16, the Triton row kernels", exits=2, lead=(4, 2), dim=16, vocab=29, chunk_rows=5,
         dtype=torch.bfloat16, backend="triton", per_exit_norms=True),
    dict(name="statistics without gradients", exits=3, lead=(4, 3), dim=8, vocab=37, chunk_rows=8, statistics=True,
         no_grad=True),
    dict(name="bad: a head slice of another size on one rank", exits=1, lead=(4,), dim=4, vocab=16, chunk_rows=4,
         bad="rows"),
    dict(name="bad: a group other than the DTensor's", exits=1, lead=(4,), dim=4, vocab=16, chunk_rows=4,
         dtensor=True, bad="group"),
]
DEFAULTS = dict(dtype=torch.float64, backend="chunked", statistics=False, per_exit_targets=False,
                per_exit_norms=False, norm_bias=True, head_bias=True, weights=False, options={},
                sequence_parallel=False, dtensor=False, no_grad=False, targets_from=None, twice=False, bad=None)
GRADIENTS = ("states", "norm_weight", "norm_bias", "head_weight", "head_bias")


def cases(world: int) -> list:
    return CASES


def settings(case: dict) -> dict:
    return {**DEFAULTS, **case}


def whole_inputs(case: dict, world: int) -> dict:
    """The whole problem, the same on every rank (drawn from the case's name); the head's padding rows
    drawn too, so that a use of them shows."""
    c = settings(case)
    generator = torch.Generator().manual_seed(sum(map(ord, c["name"])))

    def draw(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    exits, lead, dim, vocab = c["exits"], c["lead"], c["dim"], c["vocab"]
    rows_a_rank = -(-vocab // world)
    target_shape = (exits, *lead) if c["per_exit_targets"] else lead
    low = rows_a_rank if c["targets_from"] == "second slice" else 0
    targets = torch.randint(low, vocab, target_shape, generator=generator)
    targets[torch.rand(target_shape, generator=generator) < 0.25] = c["options"].get("ignore_index", -100)
    norm_shape = (exits, dim) if c["per_exit_norms"] else (dim,)
    return dict(states=draw(exits, *lead, dim), targets=targets, norm_weight=1 + draw(*norm_shape, scale=0.1),
                norm_bias=draw(*norm_shape, scale=0.1) if c["norm_bias"] else None,
                head_weight=draw(rows_a_rank * world, dim, scale=dim ** -0.5),
                head_bias=draw(rows_a_rank * world, scale=0.1) if c["head_bias"] else None,
                weights=torch.rand(exits, generator=generator, dtype=torch.float64) + 0.1 if c["weights"] else None)


def loss_call(c: dict, inputs: dict, **extra):
    """(outputs, [gradients by GRADIENTS' names]) of depth_cross_entropy on these inputs."""
    leaves = {name: inputs[name].to(c["dtype"], copy=True).requires_grad_(not c["no_grad"])  # fresh leaves a call
              if inputs[name] is not None else None for name in GRADIENTS}
    with torch.set_grad_enabled(not c["no_grad"]):
        outputs = depth_cross_entropy(leaves["states"], inputs["targets"], leaves["norm_weight"], leaves["norm_bias"],
                                      leaves["head_weight"], head_bias=leaves["head_bias"], weights=inputs["weights"],
                                      statistics=c["statistics"], backend=extra.pop("backend", c["backend"]),
                                      chunk_rows=c["chunk_rows"], **c["options"], **extra)
    if c["no_grad"]:
        return outputs, [None] * 5
    (0.7 * outputs[0]).backward()
    return outputs, [None if leaf is None else leaf.grad for leaf in leaves.values()]


def run_on_rank(case: dict, rank: int, world: int, calls) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    c = settings(case)
    inputs = whole_inputs(case, world)
    vocab = c["vocab"]
    whole_head, whole_bias = inputs["head_weight"], inputs["head_bias"]
    extra = dict(tp_group=dist.group.WORLD, vocab_size=vocab)
    if c["dtensor"]:  # torch.chunk's rows over the vocabulary itself, no padding
        mesh = init_device_mesh("cpu", (world,))
        inputs["head_weight"] = distribute_tensor(whole_head[:vocab].to(c["dtype"]), mesh, [Shard(0)])
        inputs["head_bias"] = distribute_tensor(whole_bias[:vocab].to(c["dtype"]), mesh, [Shard(0)])
        extra = dict(tp_group=dist.new_group(list(range(world)))) if c["bad"] == "group" else {}
    else:
        rows = whole_head.shape[0] // world
        if c["bad"] == "rows":  # each rank its own size: the slices cannot tile the vocabulary
            rows += rank
            whole_head, whole_bias = torch.cat([whole_head, whole_head]), torch.cat([whole_bias, whole_bias])
        inputs["head_weight"] = whole_head[rank * rows:(rank + 1) * rows]
        inputs["head_bias"] = None if whole_bias is None else whole_bias[rank * rows:(rank + 1) * rows]
    if c["sequence_parallel"]:
        share = inputs["states"].shape[1] // world
        inputs["states"] = inputs["states"][:, rank * share:(rank + 1) * share]
        extra["sequence_parallel"] = True
    outputs, grads = loss_call(c, inputs, **extra)
    result = dict(outputs=[o if isinstance(o, torch.Tensor) else torch.stack(list(o)) for o in outputs],
                  grads=grads, calls=dict(calls))
    if c["dtensor"]:
        result["grads"][3:] = [grad.full_tensor() for grad in grads[3:]]
    if c["twice"]:
        result["again"] = loss_call(c, inputs, **extra)
    return result


@pytest.fixture(scope="module", params=WORLDS, ids=("2-processes", "4-processes"))
def spawned(request, tmp_path_factory):
    return request.param, session_results(__name__, request.param, tmp_path_factory)


def one_process(case: dict, world: int) -> tuple:
    """The case on the whole head in this process (the padding rows cut off: they are no words)."""
    c = settings(case)
    inputs = whole_inputs(case, world)
    inputs["head_weight"] = inputs["head_weight"][:c["vocab"]]
    inputs["head_bias"] = None if inputs["head_bias"] is None else inputs["head_bias"][:c["vocab"]]
    outputs, grads = loss_call(c, inputs)
    return [o if isinstance(o, torch.Tensor) else torch.stack(list(o)) for o in outputs], grads, inputs


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str, c: dict, exact=None, eager=None) -> None:
    """float64: within 1e-12 of the largest magnitude (float32 outputs, per_exit and the statistics, within
    their rounding); float32 and bfloat16: the package's rule against the float64 reference (exact), eager
    PyTorch's error at the dtype (eager) the yardstick."""
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    if exact is None:
        rtol = 1e-12 if actual.dtype == torch.float64 else 2.0 ** -22
        scale = expected.double().abs().max().clamp(min=1).item()
        error = (actual.double() - expected.double()).abs().max().item()
        assert error <= rtol * scale, f"{what}: off by {error:.3g} (of {scale:.3g})"
        return
    problem = mismatch(actual, exact.double(), eager, c["dtype"], 1e-5, what)
    assert problem is None, problem


def reference_run(case: dict, world: int, dtype: torch.dtype) -> tuple:
    c = {**settings(case), "dtype": dtype, "backend": "reference"}
    outputs, grads = loss_call(c, one_process(case, world)[2])
    return [o if isinstance(o, torch.Tensor) else torch.stack(list(o)) for o in outputs], grads


def rank_rows(grad, rank: int, world: int, vocab: int, case: dict, dim: int = 0):
    """This rank's part of a whole gradient: its rows of the padded head (zero past the vocabulary), or its
    share of the sequence-parallel states' tokens."""
    if grad is None:
        return None
    if dim == 1:
        share = grad.shape[1] // world
        return grad[:, rank * share:(rank + 1) * share]
    rows = -(-vocab // world)
    padded = torch.cat([grad, grad.new_zeros((rows * world - vocab, *grad.shape[1:]))])
    return padded[rank * rows:(rank + 1) * rows]


@pytest.mark.parametrize("case", [case for case in CASES if "bad" not in case], ids=lambda case: case["name"])
def test_every_rank_gets_one_process_loss_statistics_and_gradients(spawned, case):
    world, results = spawned
    c = settings(case)
    outputs, grads, _ = one_process(case, world)
    runs = [(outputs, grads, None, None)]
    if c["dtype"] != torch.float64:  # the tolerance rule's yardsticks, on the whole head
        (exact, exact_grads), (eager, eager_grads) = (reference_run(case, world, dtype)
                                                      for dtype in (torch.float64, c["dtype"]))
        runs = [(exact, exact_grads, eager, eager_grads)]
    expected, expected_grads, eager, eager_grads = runs[0]
    for rank, ranks_results in enumerate(results):
        result = ranks_results[CASES.index(case)]
        assert not isinstance(result, tuple), f"rank {rank} raised {result[1]}"
        for i, actual in enumerate(result["outputs"]):
            assert_same(actual, outputs[i], f"rank {rank}: output {i}", c,
                        *((expected[i], eager[i]) if eager is not None else ()))
        for name, actual, one, exact_grad, eager_grad in zip(GRADIENTS, result["grads"], grads, expected_grads,
                                                              eager_grads or [None] * 5):
            if one is None:
                assert actual is None, f"rank {rank}: {name} has a gradient where one process has none"
                continue
            if name.startswith("head") and not c["dtensor"] or name == "states" and c["sequence_parallel"]:
                dim = 1 if name == "states" else 0
                one, exact_grad, eager_grad = (rank_rows(g, rank, world, c["vocab"], c, dim)
                                               for g in (one, exact_grad, eager_grad))
            assert_same(actual, one, f"rank {rank}: d{name}", c,
                        *((exact_grad, eager_grad) if eager is not None else ()))


@pytest.mark.parametrize("case", [case for case in CASES if "bad" not in case and not case.get("dtensor")],
                         ids=lambda case: case["name"])
def test_two_collectives_a_chunk_whatever_the_exits(spawned, case):
    """MAX and SUM a chunk (a third, MIN, with statistics), one SUM of the states' and norm's gradients a
    call (sequence-parallel: one all-gather, one reduce-scatter, one SUM of the norm's)."""
    world, results = spawned
    c = settings(case)
    rows = c["exits"] * torch.Size(c["lead"]).numel()
    chunks = -(-rows // c["chunk_rows"])
    grads = not c["no_grad"]
    expected = {"all_reduce": (2 + c["statistics"]) * chunks + grads}
    if c["sequence_parallel"]:
        expected.update({gather_name(): 1, scatter_name(): 1} if grads else {gather_name(): 1})
    for rank, ranks_results in enumerate(results):
        assert ranks_results[CASES.index(case)]["calls"] == expected, f"rank {rank}"


def gather_name() -> str:
    import torch.distributed as dist
    return "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def scatter_name() -> str:
    import torch.distributed as dist
    return "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


def test_a_rerun_is_bitwise_the_same(spawned):
    world, results = spawned
    index = next(i for i, case in enumerate(CASES) if case.get("twice"))
    for ranks_results in results:
        first, (outputs, grads) = ranks_results[index], ranks_results[index]["again"]
        assert all(torch.equal(a, b if isinstance(b, torch.Tensor) else torch.stack(list(b)))
                   for a, b in zip(first["outputs"], outputs))
        assert all(torch.equal(a, b) for a, b in zip(first["grads"], grads) if a is not None)


@pytest.mark.parametrize("bad, match", [
    ("rows", r"head_weight's rows on the ranks of tp_group must tile the vocabulary \[0, 16\) .* got the slices"),
    ("group", r"tp_group must be None or head_weight's mesh's group"),
])
def test_bad_input_is_named_on_every_rank(spawned, bad, match):
    import re
    world, results = spawned
    index = next(i for i, case in enumerate(CASES) if case.get("bad") == bad)
    for rank, ranks_results in enumerate(results):
        result = ranks_results[index]
        assert isinstance(result, tuple) and re.search(match, result[1]), f"rank {rank}: {result}"


def test_statistics_are_those_of_the_materialized_logits():
    """One process: accuracy, agreement and entropy against argmax and entropy over every logit (the
    reference), ties to the lower index."""
    case = CASES[1]
    c = settings(case)
    inputs = one_process(case, 1)[2]
    inputs["head_weight"][5] = inputs["head_weight"][3]  # two equal logits in every row: a tie for some rows
    for backend in ("chunked", "triton"):
        ours = loss_call({**c, "backend": backend, "dtype": torch.float32}, inputs)[0][2]
        theirs = loss_call({**c, "backend": "reference", "dtype": torch.float32}, inputs)[0][2]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
