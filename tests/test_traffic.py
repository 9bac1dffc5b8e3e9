"""The memory-traffic model's checks: every fused op moves no more bytes than its docstring states,
and an ACN block boundary (forward and backward) moves at most 0.8 of eager PyTorch's bytes."""
import pytest
import torch

from acn_kernels import reference
from acn_kernels.backend import TRITON_INTERPRETED
from acn_kernels.ops import accumulate_norm
from acn_kernels.tools.cuda_host_check import toolchain
from acn_kernels.tools.traffic import TrafficCounter, cuda_host_ops, measure, model_rows, op_cases

pytestmark = pytest.mark.skipif(not TRITON_INTERPRETED, reason="counts loads and stores under Triton's interpreter")

CASES = op_cases(rows=96, dim=160, depth=4)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fused_op_moves_no_more_than_its_docstring_states(case):
    name, fused, _, inputs, kwargs, (forward_bound, backward_bound) = case
    forward, backward = measure(lambda *a: fused(*a, backend="triton", **kwargs), inputs)
    assert 0 < forward.total <= forward_bound, f"{name} forward: {forward.total} > {forward_bound}"
    assert 0 < backward.total <= backward_bound, f"{name} backward: {backward.total} > {backward_bound}"


@pytest.mark.parametrize("activation", ("gelu", "relu", "identity", "swiglu"))
@pytest.mark.parametrize("has_y", (True, False))
def test_cublas_path_moves_no_more_than_its_docstring_states(activation, has_y):
    """linear_act_accumulate on backend="cublas" (auto's default on a GPU): cuBLAS's z, then one
    elementwise launch (none for identity without y), and its backward."""
    from acn_kernels.ops import linear_act_accumulate
    from acn_kernels.ops.linear_act_accumulate import traffic_bound

    rows_w = 96 if activation == "swiglu" else 48
    inputs = [torch.randn(40, 32).requires_grad_(), torch.randn(rows_w, 32).requires_grad_(),
              torch.randn(rows_w).requires_grad_(), torch.randn(40, 48).requires_grad_() if has_y else None]
    outputs = slice(None) if has_y else slice(0, 1)  # without y, y_out is h itself: one gradient
    forward, backward = measure(
        lambda *a: linear_act_accumulate(*a, activation=activation, backend="cublas")[outputs], inputs)
    forward_bound, backward_bound = traffic_bound(*inputs, activation=activation, backend="cublas")
    assert 0 < forward.total <= forward_bound and 0 < backward.total <= backward_bound, (forward, backward)
    assert forward.launches == (1 if activation == "identity" and not has_y else 2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("normalize", ("input", "sum"))
def test_acn_boundary_moves_at_most_0_8_of_eager_bytes(dtype, normalize):
    rows, dim = 256, 384
    inputs = [torch.randn(rows, dim).to(dtype).requires_grad_() for _ in range(2)] + \
             [torch.randn(dim).requires_grad_() for _ in range(2)]
    eager_f, eager_b = measure(lambda *a: reference.accumulate_norm(*a, normalize=normalize), inputs)
    fused_f, fused_b = measure(lambda *a: accumulate_norm(*a, normalize=normalize, backend="triton"), inputs)
    ratio = (fused_f.total + fused_b.total) / (eager_f.total + eager_b.total)
    assert ratio <= 0.8, f"fused/eager bytes {ratio:.3f}"
    assert fused_f.launches == 1


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_hybrid_vit_training_step_moves_at_most_0_85_of_eager_bytes(dtype, capsys):
    (row,) = model_rows(dtypes=(dtype,), names=("ViT",), connectivities=("hybrid",))
    assert capsys.readouterr().err == f"traffic: training steps 1/1: ViT {str(dtype)[6:]} hybrid\n"  # progress
    assert row["fused"].total <= 0.85 * row["eager"].total, (row["fused"], row["eager"])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_ac_gpt_training_step_moves_at_most_0_85_of_eager_bytes_and_launches(dtype):
    (row,) = model_rows(dtypes=(dtype,), names=("GPT",), connectivities=("acn",))
    assert row["fused"].total <= 0.85 * row["eager"].total, (row["fused"], row["eager"])
    assert row["fused"].launches <= 0.85 * row["eager"].launches, (row["fused"], row["eager"])


def test_counter_sees_views_as_free_and_copies_as_traffic():
    x = torch.randn(64, 32)
    with TrafficCounter() as counter:
        x.view(32, 64).t()
    assert counter.traffic.total == 0 and counter.traffic.launches == 0
    with TrafficCounter() as counter:
        x.clone()
    assert (counter.traffic.read, counter.traffic.written, counter.traffic.launches) == (x.nbytes, x.nbytes, 1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_eager_rms_norm_counts_as_one_kernel_each_way_with_torchs_gradients(dtype):
    """As CUDA's torch runs it (_fused_rms_norm), not as the CPU's decomposition."""
    x, weight = torch.randn(48, 40).to(dtype).requires_grad_(), torch.randn(40).to(dtype).requires_grad_()
    forward, backward = measure(lambda x, w: torch.nn.functional.rms_norm(x, (40,), w, 1e-6), (x, weight))
    rows = 4 * 48  # a float per row
    assert (forward.read, forward.written, forward.launches) == (x.nbytes + weight.nbytes, x.nbytes + rows, 1)
    assert (backward.read, backward.written, backward.launches) == (
        2 * x.nbytes + weight.nbytes + rows, x.nbytes + weight.nbytes, 1)
    dout = torch.randn(48, 40).to(dtype)
    with TrafficCounter():
        counted = torch.autograd.grad(torch.nn.functional.rms_norm(x, (40,), weight, 1e-6), (x, weight), dout)
    expected = torch.autograd.grad(torch.nn.functional.rms_norm(x, (40,), weight, 1e-6), (x, weight), dout)
    assert all(torch.equal(a, b) for a, b in zip(counted, expected))
    assert "counted" not in torch.nn.functional.rms_norm.__name__  # torch's own again, outside the counter


BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.skipif(
    isinstance(toolchain(), str), reason="the CUDA kernels' counts come from cuda-host-check"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in op_cases(rows=256, dim=384) if c[0].startswith("hybrid")],
                         ids=lambda c: c[0])
def test_hybrid_boundary_moves_at_most_0_6_of_eager_bytes_in_three_launches(case, backend):
    name, fused, reference_op, inputs, kwargs, _ = case
    eager_f, eager_b = measure(reference_op, inputs)
    op = fused if backend == "triton" else cuda_host_ops()["hybrid_accumulate_norm"]
    fused_f, fused_b = measure(lambda *a: op(*a, **({"backend": "triton"} if backend == "triton" else {})), inputs)
    ratio = (fused_f.total + fused_b.total) / (eager_f.total + eager_b.total)
    assert ratio <= 0.6, f"{name}: fused/eager bytes {ratio:.3f}"
    assert (fused_f.launches, fused_b.launches) == (1, 2), (fused_f, fused_b)


@pytest.mark.skipif(isinstance(toolchain(), str), reason="the CUDA kernels' counts come from cuda-host-check")
@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith(("accumulate_norm", "hybrid", "probe_norm"))],
                         ids=lambda c: c[0])
def test_cuda_norm_kernels_read_each_input_once(case):
    """The host execution counts each byte a CUDA kernel touches once: every norm forward (the hybrid
    boundary's too) moves exactly its docstring bytes in one launch, and every backward at most its
    docstring bytes in two (the kernel, one sum of the partial rows it wrote once; a cast more for
    16-bit parameters)."""
    name, fused, _, inputs, kwargs, (forward_bound, backward_bound) = case
    cuda = cuda_host_ops()
    forward, backward = measure(lambda *a: cuda[fused.__name__](*a, **kwargs), inputs)
    assert (forward.total, forward.launches) == (forward_bound, 1), name
    assert 0 < backward.total <= backward_bound and backward.launches <= 2, (name, backward)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0].startswith("depth_cross_entropy")], ids=lambda c: c[0])
def test_depth_cross_entropy_moves_no_more_than_its_docstring_states_on_either_row_kernel(case, backend):
    name, fused, _, inputs, kwargs, (forward_bound, backward_bound) = case
    op = (lambda *a, **k: fused(*a, backend="triton", **k)) if backend == "triton" \
        else cuda_host_ops()["depth_cross_entropy"]
    forward, backward = measure(lambda *a: op(*a, **kwargs), inputs)
    assert 0 < forward.total <= forward_bound and 0 < backward.total <= backward_bound, (name, forward, backward)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", (1, 37, 2048))
def test_the_cross_entropy_row_kernels_read_a_row_once_and_write_its_gradient_once(backend, vocab):
    """One launch: the logits read (from DRAM once; the second walk's re-read counts once), the target,
    the scale; the gradient over the logits, the loss and the lse written."""
    from acn_kernels.ops.depth_cross_entropy import triton_rows
    from acn_kernels.tools.cuda_host_check import HostKernels, HostOps, Placement

    rows = 5
    logits, targets, scale = torch.randn(rows, vocab), torch.randint(0, vocab, (rows,)), torch.rand(rows)
    row_work = triton_rows if backend == "triton" else \
        HostOps(HostKernels.load(placement=Placement(checked=False))).cross_entropy_rows
    if backend == "cuda":  # the host launches count into the active counter, as cuda_host_ops wires them
        row_work.__self__.k.on_launch = lambda launch: counter.count_launch(launch.bytes_read, launch.bytes_written)
    with TrafficCounter() as counter:
        row_work(logits, targets, scale, -100, 0.1, 1e-3, 0.0, True)
    traffic = counter.traffic
    assert (traffic.read, traffic.written, traffic.launches) == (rows * (4 * vocab + 8 + 4), rows * (4 * vocab + 8), 1)
