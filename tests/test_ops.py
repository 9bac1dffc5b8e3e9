"""Every fused op against the reference: forward and every gradient, fresh random inputs, odd
shapes, non-contiguous layouts, each dtype, NaN-poisoned outputs, determinism and every error path.
Runs the Triton kernels on CUDA where there is a GPU, under Triton's interpreter otherwise."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from acn_kernels import backend as backend_module
from acn_kernels import reference
from acn_kernels.ops import (accumulate_norm, feed_forward, hybrid_accumulate_norm, linear, linear_act_accumulate,
                             probe_norm)
from acn_kernels.ops._rows import BWD_PER_THREAD as NORM_BWD_PER_THREAD
from acn_kernels.ops._rows import FWD_PER_THREAD as NORM_FWD_PER_THREAD
from acn_kernels.ops.probe_norm import BWD_PER_THREAD as PROBE_BWD_PER_THREAD
from acn_kernels.ops import _gemm
from acn_kernels.ops._common import fits_in_registers

from op_harness import DEVICE, DTYPES, FUSED_BACKENDS, GEMM_BACKENDS, check_op, randn, run

ODD_SHAPES = [(1, 1), (1, 17), (3, 5, 129), (70, 33)]
ACTIVATIONS = tuple(reference.ACTIVATIONS)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel allocates starts as NaN, so an element it fails to write fails the test."""
    monkeypatch.setenv("ACN_KERNELS_POISON", "1")


def norm_params(dim, bias=True):
    return randn(dim), (randn(dim) if bias else None)


# ----------------------------------------------------------------------------- accumulate_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("normalize", ("input", "sum"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulate_norm_matches_reference(dtype, shape, norm, normalize, backend):
    x, y = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, scale=3.0)
    weight, bias = norm_params(shape[-1])
    check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, bias), dtype, backend=backend,
             norm=norm, normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ("input", "sum"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulate_norm_chain_start_returns_x_as_the_sum(dtype, normalize, backend):
    x = randn(4, 3, 40, dtype=dtype)
    weight, bias = norm_params(40)
    (y_out, out), _ = check_op(accumulate_norm, reference.accumulate_norm, (x, None, weight, bias), dtype,
                               backend=backend,
                               normalize=normalize)
    assert y_out.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("normalize", ("input", "sum"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulate_norm_float32_running_sum_with_16_bit_x(dtype, normalize, backend):
    x, y = randn(6, 7, 96, dtype=dtype), randn(6, 7, 96, scale=4.0)
    weight, bias = norm_params(96)
    (y_out, out), _ = check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, bias), dtype, backend=backend,
                               normalize=normalize)
    assert y_out.dtype == torch.float32 and out.dtype == dtype


@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
def test_accumulate_norm_without_bias_and_with_16_bit_weight(norm):
    x, y = randn(9, 65, dtype=torch.bfloat16), randn(9, 65, dtype=torch.bfloat16)
    weight = randn(65, dtype=torch.bfloat16)
    check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, None), torch.bfloat16, norm=norm,
             normalize="sum", eps=1e-3)


@pytest.mark.parametrize("layout", ("strided_rows", "strided_last_dim", "transposed_leading_dims"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulate_norm_non_contiguous_inputs(layout, backend):
    dim = 48
    if layout == "strided_rows":
        x, y = randn(10, 2 * dim)[:, :dim], randn(10, 3 * dim)[:, dim:2 * dim]
    elif layout == "strided_last_dim":
        x, y = randn(10, 2 * dim)[:, ::2], randn(10, dim)
    else:
        x, y = randn(5, 3, dim).transpose(0, 1), randn(3, 5, dim)
    assert not x.is_contiguous()
    weight, bias = randn(2 * dim)[::2], randn(3 * dim)[::3]
    for normalize in ("input", "sum"):
        check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, bias), torch.float32, backend=backend,
                 normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", (4097, 8193))
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_accumulate_norm_rows_too_wide_for_registers(dtype, dim, norm, backend):
    """4097: the backward walks chunks; 8193: the forward does too."""
    assert not fits_in_registers(dim, NORM_BWD_PER_THREAD)
    assert fits_in_registers(dim, NORM_FWD_PER_THREAD) == (dim < 8192)
    x, y = randn(3, dim, dtype=dtype), randn(3, dim)
    weight, bias = norm_params(dim)
    for normalize in ("input", "sum"):
        check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, bias), dtype, backend=backend, norm=norm,
                 normalize=normalize)


def test_accumulate_norm_gradients_when_only_one_output_is_used():
    x, y = randn(5, 33), randn(5, 33)
    weight, bias = norm_params(33)
    for pick in (0, 1):
        outs, grads, g = run(lambda *a: accumulate_norm(*a, backend="triton", normalize="sum")[pick],
                             (x, y, weight, bias))
        ref_outs, ref_grads, _ = run(lambda *a: reference.accumulate_norm(*a, normalize="sum")[pick],
                                     (x, y, weight, bias), g)
        for actual, expected in zip(grads, ref_grads):
            if expected is None:  # weight and bias do not reach y_out
                assert actual is None or not actual.any()
            else:
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), dim=st.integers(1, 300), norm=st.sampled_from(("layernorm", "rmsnorm")),
       normalize=st.sampled_from(("input", "sum")), has_y=st.booleans(), has_bias=st.booleans())
def test_accumulate_norm_random_shapes(rows, dim, norm, normalize, has_y, has_bias):
    x = randn(rows, dim)
    y = randn(rows, dim) if has_y else None
    weight, bias = norm_params(dim, has_bias)
    check_op(accumulate_norm, reference.accumulate_norm, (x, y, weight, bias), torch.float32,
             norm=norm, normalize=normalize)


# ----------------------------------------------------------------------------- hybrid_accumulate_norm

def hybrid_with_positional_long_weight(op):
    """op with the long weight positional, so that the harness checks its gradient too."""
    return lambda x, f, y, gate, w, b, long_weight, **kwargs: op(x, f, y, gate, w, b, long_weight=long_weight,
                                                                  **kwargs)


def hybrid_inputs(shape, dtype, y="same", long_weight=True, bias=True):
    """(x, f, y, gate, weight, bias, long_weight): fresh random values, gate and long weight away from 0 and 1."""
    ys = {"none": None, "same": randn(*shape, dtype=dtype, scale=3.0), "float32": randn(*shape, scale=3.0)}
    gate, lw = randn() * 0.5 + 0.3, (randn() * 0.5 + 1.2 if long_weight else None)
    return (randn(*shape, dtype=dtype, scale=2.0), randn(*shape, dtype=dtype), ys[y], gate,
            *norm_params(shape[-1], bias), lw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("y,long_weight", [("same", True), ("none", True), ("same", False), ("none", False)])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_accumulate_norm_matches_reference(dtype, shape, norm, y, long_weight, backend):
    check_op(hybrid_with_positional_long_weight(hybrid_accumulate_norm),
             hybrid_with_positional_long_weight(reference.hybrid_accumulate_norm),
             hybrid_inputs(shape, dtype, y, long_weight), dtype, backend=backend, norm=norm)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_accumulate_norm_float32_running_sum_with_16_bit_x(dtype, backend):
    (x_next, y_out, out), _ = check_op(
        hybrid_with_positional_long_weight(hybrid_accumulate_norm),
        hybrid_with_positional_long_weight(reference.hybrid_accumulate_norm),
        hybrid_inputs((6, 7, 96), dtype, "float32"), dtype, backend=backend)
    assert (x_next.dtype, y_out.dtype, out.dtype) == (dtype, torch.float32, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", (4097, 8193))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_accumulate_norm_rows_too_wide_for_registers(dtype, dim, backend):
    """4097: the backward walks chunks; 8193: the forward does too."""
    check_op(hybrid_with_positional_long_weight(hybrid_accumulate_norm),
             hybrid_with_positional_long_weight(reference.hybrid_accumulate_norm),
             hybrid_inputs((3, dim), dtype), dtype, backend=backend, norm="rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_at_gate_zero_is_the_acn_boundary_exactly(dtype, backend):
    """gate = 0: x_next is f, y_out = y + f and out = norm(f), bit for bit accumulate_norm's."""
    x, f, y, _, weight, bias, _ = hybrid_inputs((5, 3, 40), dtype)
    x_next, y_out, out = hybrid_accumulate_norm(x, f, y, torch.zeros((), device=DEVICE), weight, bias, backend=backend)
    acn_y, acn_out = accumulate_norm(f, y, weight, bias, backend=backend)
    assert torch.equal(x_next, f) and torch.equal(y_out, acn_y) and torch.equal(out, acn_out)


@pytest.mark.parametrize("used", [(0,), (1,), (2,), (0, 2), (1, 2)], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_accumulate_norm_gradients_when_some_outputs_are_unused(used, backend):
    """Gradients reach only through the outputs used (x_next, y_out, out): the others send None."""
    def picked(op):
        return lambda *a, **k: tuple(hybrid_with_positional_long_weight(op)(*a, **k)[i] for i in used)
    check_op(picked(hybrid_accumulate_norm), picked(reference.hybrid_accumulate_norm),
             hybrid_inputs((9, 33), torch.float32), torch.float32, backend=backend)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hybrid_accumulate_norm_non_contiguous_inputs(backend):
    dim = 48
    x = randn(10, 2 * dim)[:, :dim]   # strided rows
    f = randn(dim, 10).t()             # column-major: copied
    y = randn(10, dim, 2)[..., 0]      # last stride 2: copied
    args = (x, f, y, randn() + 0.5, randn(2 * dim)[::2], randn(3 * dim)[::3], randn() + 1.0)
    assert not any(t.is_contiguous() for t in args[:3])
    check_op(hybrid_with_positional_long_weight(hybrid_accumulate_norm),
             hybrid_with_positional_long_weight(reference.hybrid_accumulate_norm), args, torch.float32,
             backend=backend)


# ----------------------------------------------------------------------------- probe_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 1), (1, 2, 17), (4, 3, 5, 129), (6, 37, 64)])  # (3, 5, 1): rows of
# zero variance, where the backward's rebuilt sums must be centered on their own mean
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_probe_norm_matches_reference(dtype, shape, norm, backend):
    xs = randn(*shape, dtype=dtype)
    weight, bias = norm_params(shape[-1])
    check_op(probe_norm, reference.probe_norm, (xs, weight, bias), dtype, backend=backend, norm=norm)


@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_probe_norm_backward_where_the_partial_sums_cancel(norm, backend):
    """y_1 = x_0 + x_1 is ~1e-5 of its terms: the backward rebuilds y_1 = y_2 - x_2, which must round
    to the forward's y_1; an ulp of x_2 (~2e-6) off would be magnified by rstd = 1/sqrt(var + eps) ~ 316."""
    x0 = randn(16, 64) * 4
    xs = torch.stack([x0, -x0 + 1e-5 * randn(16, 64), randn(16, 64) * 16])
    weight, bias = norm_params(64)
    check_op(probe_norm, reference.probe_norm, (xs, weight, bias), torch.float32, backend=backend, norm=norm)


def test_probe_norm_non_contiguous_and_without_bias():
    xs = randn(8, 5, 4, 80)[:, ::2, :, ::2]  # strided layers, rows and last dim
    weight, _ = norm_params(40)
    check_op(probe_norm, reference.probe_norm, (xs, weight, None), torch.float32, norm="rmsnorm")
    xs = randn(5, 3, 100)[:, :, :60]  # strided rows, last stride 1: no copy
    check_op(probe_norm, reference.probe_norm, (xs, randn(120)[::2], randn(60)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_probe_norm_rows_too_wide_for_registers(dtype, norm, backend):
    dim = 2049
    assert not fits_in_registers(dim, PROBE_BWD_PER_THREAD)
    xs = randn(3, 2, dim, dtype=dtype)
    weight, bias = norm_params(dim)
    check_op(probe_norm, reference.probe_norm, (xs, weight, bias), dtype, backend=backend, norm=norm)


def test_probe_norm_last_depth_is_the_final_norm_of_the_whole_sum():
    xs = randn(5, 6, 32)
    weight, bias = norm_params(32)
    outs = probe_norm(xs, weight, bias, backend="triton")
    _, final = accumulate_norm(xs.sum(0), None, weight, bias, normalize="sum", backend="triton")
    torch.testing.assert_close(outs[-1], final, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- linear_act_accumulate

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [((1, 1), 1), ((3, 5, 19), 17), ((70, 33), 129)])
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_matches_reference(dtype, activation, shape, backend):
    x_shape, out_features = shape
    in_features = x_shape[-1]
    x = randn(*x_shape, dtype=dtype)
    rows = 2 * out_features if activation == "swiglu" else out_features  # swiglu: gate rows, then up rows
    weight = randn(rows, in_features, dtype=dtype, scale=in_features ** -0.5)
    bias = randn(rows, dtype=dtype)
    y = randn(*x_shape[:-1], out_features, dtype=dtype, scale=2.0)
    check_op(linear_act_accumulate, reference.linear_act_accumulate, (x, weight, bias, y), dtype, backend=backend,
             activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_chain_start_and_no_bias(dtype, backend):
    x, weight = randn(9, 40, dtype=dtype), randn(24, 40, dtype=dtype, scale=0.2)
    (h, y_out), _ = check_op(linear_act_accumulate, reference.linear_act_accumulate, (x, weight, None, None),
                             dtype, backend=backend, activation="gelu")
    assert y_out is h


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_float32_running_sum(dtype, backend):
    x, weight, bias = randn(4, 8, 32, dtype=dtype), randn(48, 32, dtype=dtype, scale=0.2), randn(48, dtype=dtype)
    y = randn(4, 8, 48, scale=5.0)
    (h, y_out), _ = check_op(linear_act_accumulate, reference.linear_act_accumulate, (x, weight, bias, y),
                             dtype, backend=backend, activation="silu")
    assert h.dtype == dtype and y_out.dtype == torch.float32


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_non_contiguous_inputs(backend):
    x = randn(30, 2, 50)[:, 1, :]            # strided rows
    weight = randn(50, 40, scale=0.2).t()   # column-major

    y = randn(40, 30).t()                    # last stride not 1: copied
    bias = randn(80)[::2]
    check_op(linear_act_accumulate, reference.linear_act_accumulate, (x, weight, bias, y), torch.float32,
             backend=backend,
             activation="gelu_tanh")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ("gelu", "relu"))
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_with_y_being_x(dtype, activation, backend):
    """y is x (a residual add, the chain's start): x's two gradients are summed inside the op."""
    x, weight, bias = randn(7, 5, 24, dtype=dtype), randn(24, 24, dtype=dtype, scale=0.2), randn(24, dtype=dtype)
    check_op(lambda x, w, b, **k: linear_act_accumulate(x, w, b, x, **k),
             lambda x, w, b, **k: reference.linear_act_accumulate(x, w, b, x, **k), (x, weight, bias), dtype,
             backend=backend, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ("gelu", "relu", "identity"))
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_act_accumulate_running_sum_only(dtype, activation, backend):
    """return_h=False: h never written (None), y_out and every gradient as the reference's."""
    x, weight, bias = randn(5, 3, 24, dtype=dtype), randn(40, 24, dtype=dtype, scale=0.2), randn(40, dtype=dtype)
    y = randn(5, 3, 40, dtype=dtype)
    h, _ = linear_act_accumulate(x, weight, bias, y, activation=activation, backend=backend, return_h=False)
    assert h is None
    check_op(lambda *a, **k: linear_act_accumulate(*a, return_h=False, **k)[1],
             lambda *a, **k: reference.linear_act_accumulate(*a, **k)[1], (x, weight, bias, y), dtype,
             backend=backend, activation=activation)
    with pytest.raises(ValueError, match=r"return_h=False needs y"):
        linear_act_accumulate(x, weight, bias, None, backend=backend, return_h=False)


# ----------------------------------------------------------------------------- linear

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [((1, 1), 1), ((3, 5, 19), 17), ((300, 130), 70)])  # the last: three column
@pytest.mark.parametrize("has_bias", (True, False))                                   # tiles of dweight, a K tail
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_matches_reference(dtype, shape, has_bias, backend):
    x_shape, out_features = shape
    x = randn(*x_shape, dtype=dtype)
    weight = randn(out_features, x_shape[-1], dtype=dtype, scale=x_shape[-1] ** -0.5)
    bias = randn(out_features, dtype=dtype) if has_bias else None
    check_op(linear, reference.linear, (x, weight, bias), dtype, backend=backend)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_linear_non_contiguous_inputs(backend):
    x = randn(30, 2, 50)[:, 1, :]            # strided rows
    weight = randn(50, 40, scale=0.2).t()   # column-major
    check_op(linear, reference.linear, (x, weight, randn(80)[::2]), torch.float32, backend=backend)
    x = randn(6, 50, 7).transpose(1, 2)      # last stride not 1: copied
    check_op(linear, reference.linear, (x, weight, None), torch.float32, backend=backend)


def test_weight_gradient_needs_no_input_gradient():
    """A first layer (inputs without gradient): dweight and dbias from the one GEMM, no dx."""
    x, weight, bias = randn(37, 20), randn(9, 20, scale=0.2).requires_grad_(), randn(9).requires_grad_()
    g = randn(37, 9)
    grads = torch.autograd.grad(linear(x, weight, bias, backend="triton"), (weight, bias), g)
    exact = (g.double().t() @ x.double(), g.double().sum(0))
    for actual, expected in zip(grads, exact):
        torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- feed_forward

def feed_forward_params(dim, hidden, out, dtype, bias=True, activation="gelu"):
    rows = 2 * hidden if activation == "swiglu" else hidden  # swiglu: gate rows, then up rows
    w1, w2 = randn(rows, dim, dtype=dtype, scale=dim ** -0.5), randn(out, hidden, dtype=dtype, scale=hidden ** -0.5)
    return w1, (randn(rows, dtype=dtype) if bias else None), w2, (randn(out, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [((1, 1), 1, 1), ((3, 5, 19), 17, 7), ((70, 33), 129, 33)])
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_feed_forward_matches_reference(dtype, activation, shape, backend):
    x_shape, hidden, out = shape
    x = randn(*x_shape, dtype=dtype)
    check_op(feed_forward, reference.feed_forward,
             (x, *feed_forward_params(x_shape[-1], hidden, out, dtype, activation=activation)), dtype,
             backend=backend, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_feed_forward_without_biases(dtype, backend):
    x = randn(9, 40, dtype=dtype)
    check_op(feed_forward, reference.feed_forward, (x, *feed_forward_params(40, 24, 40, dtype, bias=False)), dtype,
             backend=backend, activation="relu")


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_feed_forward_non_contiguous_inputs(backend):
    x = randn(30, 2, 50)[:, 1, :]             # strided rows
    w1 = randn(50, 40, scale=0.2).t()         # column-major
    w2 = randn(64, 40, scale=0.2)[::2]        # every other row
    b1, b2 = randn(80)[::2], randn(32)
    check_op(feed_forward, reference.feed_forward, (x, w1, b1, w2, b2), torch.float32, backend=backend,
             activation="gelu_tanh")


def test_bf16_gemm_is_right_under_the_interpreter():
    """The interpreter's bf16 tl.dot is wrong unless its operands are upcast (ACN-NOTES section 6)."""
    x, weight = randn(64, 64, dtype=torch.bfloat16), randn(64, 64, dtype=torch.bfloat16, scale=0.125)
    h, _ = linear_act_accumulate(x, weight, None, None, activation="identity", backend="triton")
    exact = x.double() @ weight.double().t()
    assert (h.double() - exact).abs().max() <= 2 * (x @ weight.t()).double().sub(exact).abs().max() + 0.05


# ----------------------------------------------------------------------------- GEMM tiles

def test_gemm_tiles_fill_the_gpu_and_are_fixed_under_the_interpreter():
    from acn_kernels.ops._gemm import gemm_tiles

    def tile(*args):
        t = gemm_tiles(*args)
        return t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    assert tile(4096, 4096, 4096, torch.bfloat16, 132) == (128, 64, 64)  # 512 programs fill 132 SMs
    assert tile(512, 512, 512, torch.bfloat16, 132) == (32, 32, 32)      # the largest tiles that do
    assert tile(512, 512, 512, torch.bfloat16, None) == (128, 64, 64)    # the interpreter: largest fitting
    assert tile(64, 128, 128, torch.float32, None) == (64, 64, 16)
    assert tile(10, 128, 4096, torch.float32, 132) == (16, 16, 16)        # a classifier's weight gradient
    assert tile(1, 1, 1, torch.float16, None) == (16, 16, 16)


@pytest.mark.parametrize("dtype,activation,config", [
    (dtype, activation, c) for dtype in (torch.float32, torch.bfloat16) for activation in ("gelu", "swiglu")
    for c in _gemm.tile_configs(dtype, gated=activation == "swiglu")], ids=str)
def test_every_gemm_tile_configuration_is_right(dtype, activation, config, monkeypatch):
    """Each configuration the launcher can pick, forced on every GEMM: the three epilogues through
    feed_forward (forward; act' times the hidden gradient; both weight gradients with their biases)
    on odd sizes that leave partial tiles in every dimension; swiglu's tiles on its two accumulators."""
    monkeypatch.setattr(_gemm, "choose_tiles", lambda *args: dict(zip(_gemm.TILE_KEYS, config), GROUP_M=8))
    x = randn(3, 47, 37, dtype=dtype)
    check_op(feed_forward, reference.feed_forward, (x, *feed_forward_params(37, 71, 29, dtype, activation=activation)),
             dtype, activation=activation)


def test_tuned_tiles_are_timed_once_and_kept(tmp_path):
    from acn_kernels.ops._gemm import TileTuner, fitting_configs

    candidates = fitting_configs(512, 512, 512, torch.bfloat16)
    fastest, launched, timed = candidates[2][:3], [], []

    def launch(tiles):
        launched.append((tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]))

    def bench(fn):  # a stand-in for triton.testing.do_bench: the fastest config takes half the time
        fn()
        timed.append(launched[-1])
        return 0.5 if launched[-1] == fastest else 1.0

    path = str(tmp_path / "tiles.json")
    tiles = TileTuner(path, bench).tiles("H200|forward|512", candidates, launch)
    assert (tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]) == fastest
    assert sorted(timed) == sorted(c[:3] for c in candidates)
    again = TileTuner(path, bench)  # another process: the file decides, nothing is timed again
    assert again.tiles("H200|forward|512", candidates, launch) == tiles and len(timed) == len(candidates)


# ----------------------------------------------------------------------------- every op

def op_calls(dtype=torch.float32):
    x, y, weight, bias = randn(6, 33, dtype=dtype), randn(6, 33, dtype=dtype), randn(33), randn(33)
    w_lin, b_lin = randn(21, 33, dtype=dtype, scale=0.2), randn(21, dtype=dtype)
    y_lin = randn(6, 21, dtype=dtype)
    return {
        "accumulate_norm": (accumulate_norm, (x, y, weight, bias), {"normalize": "sum"}),
        "probe_norm": (probe_norm, (torch.stack([x, y, x * 2]), weight, bias), {}),
        "linear_act_accumulate": (linear_act_accumulate, (x, w_lin, b_lin, y_lin), {"activation": "gelu"}),
        "hybrid_accumulate_norm": (hybrid_with_positional_long_weight(hybrid_accumulate_norm),
                                   (x, y * 2, y, randn() + 0.5, weight, bias, randn() + 1.0), {}),
        "feed_forward": (feed_forward, (x, w_lin, b_lin, randn(5, 21, dtype=dtype, scale=0.2), randn(5, dtype=dtype)),
                         {"activation": "silu"}),
        "linear": (linear, (x, w_lin, b_lin), {}),
    }


OPS = ("accumulate_norm", "hybrid_accumulate_norm", "probe_norm", "linear_act_accumulate", "feed_forward", "linear")


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_bitwise_deterministic(name, dtype, backend):
    op, args, kwargs = op_calls(dtype)[name]
    first, first_grads, g = run(lambda *a: op(*a, backend=backend, **kwargs), args)
    for _ in range(2):
        again, again_grads, _ = run(lambda *a: op(*a, backend=backend, **kwargs), args, g)
        for a, b in zip((*first, *first_grads), (*again, *again_grads)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPS)
def test_reference_backend_is_the_reference(name):
    op, args, kwargs = op_calls()[name]
    ref = getattr(reference, name)
    if name == "hybrid_accumulate_norm":
        ref = hybrid_with_positional_long_weight(ref)
    outs, expected = op(*args, backend="reference", **kwargs), ref(*args, **kwargs)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (outs, expected))):
        assert torch.equal(a, b)


def second_order(op, args, kwargs, backend) -> torch.Tensor:
    """The gradient of the squared gradient of the op's squared outputs with respect to its first input."""
    outs = op(*args, backend=backend, **kwargs)
    loss = sum(o.square().sum() for o in (outs if isinstance(outs, tuple) else (outs,)))
    (grad,) = torch.autograd.grad(loss, args[0], create_graph=True)
    return torch.autograd.grad(grad.square().sum(), args[0])[0]


@pytest.mark.parametrize("name, backend", [
    pytest.param(name, backend.values[0], marks=backend.marks, id=f"{name}-{backend.id}") for name in OPS
    for backend in (GEMM_BACKENDS if name in backend_module.GEMM_OPS else FUSED_BACKENDS)])
def test_a_gradient_of_the_gradient_is_refused_by_name_on_the_kernels_and_right_on_the_reference(name, backend):
    """create_graph=True through a kernel would give a second-order gradient of None (its outputs carry
    no graph): refused in one line naming the op that refuses (feed_forward's cuBLAS path runs
    linear_act_accumulate; its `linear` is F.linear, which differentiates twice, as the reference does)."""
    op, args, kwargs = op_calls(torch.float32)[name]
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    expected = second_order(op, args, kwargs, "reference")
    assert expected.abs().sum() > 0
    refusing = {"feed_forward": "linear_act_accumulate", "linear": None}.get(name, name) if backend == "cublas" \
        else name
    if refusing is None:
        torch.testing.assert_close(second_order(op, args, kwargs, backend), expected)
        return
    with pytest.raises(RuntimeError, match=rf"^{refusing}: the gradient of its gradient \(create_graph=True\)"):
        second_order(op, args, kwargs, backend)


def test_auto_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    if backend_module.TRITON_INTERPRETED:  # the interpreter takes a GPU's unmeasured defaults
        assert backend_module.resolve_backend("auto", cpu, "accumulate_norm") == "triton"
        assert backend_module.resolve_backend("auto", cpu, "linear_act_accumulate") == "cublas"
        assert backend_module.resolve_backend("auto", cpu) == "mixed"
        assert backend_module.resolve_backend("cublas", cpu, "probe_norm") == "triton"
        assert backend_module.resolve_backend("cublas", cpu, "feed_forward") == "cublas"
    monkeypatch.setattr(backend_module, "TRITON_INTERPRETED", False)
    assert backend_module.resolve_backend("auto", cpu) == "reference"
    for backend in ("triton", "cublas"):
        with pytest.raises(ValueError, match=rf"backend='{backend}' needs CUDA tensors, got tensors on cpu.*"
                                             "TRITON_INTERPRET"):
            backend_module.resolve_backend(backend, cpu)
    accepted = r"\('auto', 'reference', 'triton', 'cublas', 'cuda'\)"
    with pytest.raises(ValueError, match=rf"backend must be one of {accepted}, got 'cudnn'"):
        accumulate_norm(randn(2, 4), None, randn(4), backend="cudnn")
    # without the extension it says to build it; with it (CI's CUDA venv), that it needs CUDA tensors
    built = backend_module.CUDA_EXTENSION is not None
    with pytest.raises(ValueError if built else RuntimeError,
                       match=r"backend='cuda' needs " + ("CUDA tensors, got tensors on cpu" if built
                                                         else r"the CUDA extension acn_kernels._C")):
        accumulate_norm(randn(2, 4), None, randn(4), backend="cuda")


def test_auto_follows_the_measured_table_per_op(monkeypatch):
    """On CUDA tensors "auto" runs, per op, what bench measured fastest on that GPU family; where the
    table is silent (or names the CUDA extension but it is not built), Triton for the norm ops and
    cuBLAS for the GEMM ops, and says why."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(backend_module, "gpu_family", lambda device: "sm_9x")
    monkeypatch.setattr(backend_module, "AUTO_TABLE", {"sm_9x": {"accumulate_norm": "cuda", "linear": "triton"}})
    monkeypatch.setattr(backend_module, "CUDA_EXTENSION", object())
    assert backend_module.resolve_backend("auto", gpu, "accumulate_norm") == "cuda"
    assert backend_module.resolve_backend("auto", gpu, "probe_norm") == "triton"
    assert backend_module.resolve_backend("auto", gpu, "linear") == "triton"
    assert backend_module.resolve_backend("auto", gpu, "feed_forward") == "cublas"
    assert backend_module.resolve_backend("auto", gpu) == "mixed"
    choices = backend_module.auto_choices(gpu)
    assert choices["accumulate_norm"] == ("cuda", "measured by bench")
    assert choices["feed_forward"] == ("cublas", "default: not measured on this GPU family")
    monkeypatch.setattr(backend_module, "CUDA_EXTENSION", None)
    assert backend_module.auto_choices(gpu)["accumulate_norm"] == (
        "triton", "default: measured cuda, but the extension is not built")
    monkeypatch.setattr(backend_module, "gpu_family", lambda device: "sm_8x")  # a family nobody measured
    assert backend_module.auto_backends(gpu) == {op: backend_module.default_backend(op) for op in backend_module.OPS}
    assert set(backend_module.auto_backends(gpu).values()) == {"triton", "cublas"}


ERRORS = [
    (lambda x, w: accumulate_norm(x.tolist(), None, w), TypeError, r"x must be a torch.Tensor, got list"),
    (lambda x, w: accumulate_norm(x.int(), None, w), TypeError, r"x must have dtype in .*, got torch.int32"),
    (lambda x, w: accumulate_norm(x[0, 0], None, w), ValueError, r"x must have at least one dimension"),
    (lambda x, w: accumulate_norm(x, x[:, :3], w), ValueError,
     r"y must have shape \(4, 8\) \(x's shape\), got \(4, 3\)"),
    (lambda x, w: accumulate_norm(x.bfloat16(), x.half(), w), TypeError,
     r"y must have dtype in \(torch\.bfloat16, torch\.float32\) like x \(or float32\), got torch\.float16"),
    (lambda x, w: accumulate_norm(x, None, w[:5]), ValueError,
     r"weight must have shape \(8,\) \(the last dimension of x\), got \(5,\)"),
    (lambda x, w: accumulate_norm(x, None, w, w[:2]), ValueError,
     r"bias must have shape \(8,\) \(the last dimension of x\), got \(2,\)"),
    (lambda x, w: accumulate_norm(x, None, w.to("meta")), ValueError, r"weight must be on cpu like x, got meta"),
    (lambda x, w: accumulate_norm(x, None, w, norm="batchnorm"), ValueError,
     r"norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"),
    (lambda x, w: accumulate_norm(x, None, w, normalize="output"), ValueError,
     r"normalize must be one of \('input', 'sum'\), got 'output'"),
    (lambda x, w: accumulate_norm(x, None, w, eps=-1.0), ValueError, r"eps must be a positive number, got -1.0"),
    (lambda x, w: hybrid_accumulate_norm(x, x, None, 0.5, w), TypeError,
     r"gate must be a 0-dim floating tensor \(a learnable scalar, dtype in .*\), got float"),
    (lambda x, w: hybrid_accumulate_norm(x, x, None, w[:1], w), TypeError,
     r"gate must be a 0-dim floating tensor .*, got a tensor of shape \(1,\) and dtype torch.float32"),
    (lambda x, w: hybrid_accumulate_norm(x, x, None, torch.tensor(1), w), TypeError,
     r"gate must be a 0-dim floating tensor .*, got a tensor of shape \(\) and dtype torch.int64"),
    (lambda x, w: hybrid_accumulate_norm(x, x, None, w[0], w, long_weight=w[:2]), TypeError,
     r"long_weight must be a 0-dim floating tensor .*, got a tensor of shape \(2,\)"),
    (lambda x, w: hybrid_accumulate_norm(x, x[:, :3], None, w[0], w), ValueError,
     r"f must have shape \(4, 8\) \(x's shape\), got \(4, 3\)"),
    (lambda x, w: hybrid_accumulate_norm(x, x.double(), None, w[0], w), TypeError,
     r"f must have dtype in \(torch\.float32,\) like x, got torch\.float64"),
    (lambda x, w: hybrid_accumulate_norm(x, x, x[:2], w[0], w), ValueError,
     r"y must have shape \(4, 8\) \(x's shape\), got \(2, 8\)"),
    (lambda x, w: hybrid_accumulate_norm(x, x, None, w[0].to("meta"), w), ValueError,
     r"gate must be on cpu like x, got meta"),
    (lambda x, w: probe_norm(x[0], w), ValueError,
     r"xs must have shape \(L\+1, ..., D\) with at least 2 dims and L\+1 >= 1 .*, got \(8,\)"),
    (lambda x, w: probe_norm(x[:0], w), ValueError, r"xs must have shape \(L\+1, ..., D\) .*, got \(0, 8\)"),
    (lambda x, w: probe_norm(x, w[:3]), ValueError,
     r"weight must have shape \(8,\) \(the last dimension of xs\), got \(3,\)"),
    (lambda x, w: probe_norm(x, w, norm="l2"), ValueError, r"norm must be one of"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 7), None, None), ValueError,
     r"weight must have shape \(out_features, 8\) \(the last dimension of x, whose shape is \(4, 8\)\), "
     r"got \(5, 7\)"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 8, dtype=torch.float16), None, None), TypeError,
     r"weight must have dtype in \(torch\.float32,\) like x, got torch\.float16"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 8), w, None), ValueError,
     r"bias must have shape \(5,\) \(weight's rows\), got \(8,\)"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 8), None, x), ValueError,
     r"y must have shape \(4, 5\) \(the output's: x's rows, weight's out_features\), got \(4, 8\)"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 8), None, None, activation="tanh"), ValueError,
     r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'silu', 'identity', 'swiglu'\), got 'tanh'"),
    (lambda x, w: linear_act_accumulate(x, randn(5, 8), None, None, activation="swiglu"), ValueError,
     r"weight must have an even number of rows for activation='swiglu' .*, got \(5, 8\)"),
    (lambda x, w: feed_forward(x, randn(6, 8), None, randn(8, 6), None, activation="swiglu"), ValueError,
     r"w2 must have shape \(out_features, 3\) \(w1's rows, halved for swiglu's \(gate, up\) pairs\), got \(8, 6\)"),
    (lambda x, w: linear(x, randn(5, 7)), ValueError, r"weight must have shape \(out_features, 8\) \(the last "
     r"dimension of x, whose shape is \(4, 8\)\), got \(5, 7\)"),
    (lambda x, w: linear(x, randn(5, 8), randn(4)), ValueError,
     r"bias must have shape \(5,\) \(weight's rows\), got \(4,\)"),
    (lambda x, w: linear(x.int(), randn(5, 8)), TypeError, r"x must have dtype in .*, got torch.int32"),
    (lambda x, w: feed_forward(x, randn(6, 8), None, randn(8, 5), None), ValueError,
     r"w2 must have shape \(out_features, 6\) \(w1's rows\), got \(8, 5\)"),
    (lambda x, w: feed_forward(x, randn(6, 8), randn(5), randn(8, 6), None), ValueError,
     r"b1 must have shape \(6,\) \(w1's rows\), got \(5,\)"),
    (lambda x, w: feed_forward(x, randn(6, 8), None, randn(8, 6, dtype=torch.float16), None), TypeError,
     r"w2 must have dtype in \(torch\.float32,\) like x, got torch\.float16"),
]


@pytest.mark.parametrize("call,error,message", ERRORS)
def test_bad_input_raises_a_clear_error(call, error, message):
    if DEVICE != "cpu" and "like x, got meta" in message:
        message = message.replace("cpu", DEVICE + ".*")
    with pytest.raises(error, match=message):
        call(randn(4, 8), randn(8))


@pytest.mark.gpu
def test_accumulate_norm_rows_past_2_to_the_31_elements():
    """64-bit offsets: 2^31 + a few elements of bf16 (4 GiB) in one tensor."""
    rows, dim = (2 ** 31) // 4096 + 3, 4096
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
    weight = torch.ones(dim, device="cuda")
    y_out, out = accumulate_norm(x, x, weight, backend="triton")
    tail = slice(rows - 3, rows)
    ref_y, ref_out = reference.accumulate_norm(x[tail], x[tail], weight)
    torch.testing.assert_close(y_out[tail], ref_y)
    torch.testing.assert_close(out[tail], ref_out, rtol=2e-2, atol=2e-2)


def test_a_tile_that_spills_on_one_triton_release_is_passed_over_there_only(monkeypatch):
    from acn_kernels.ops import _gemm
    spilling = (128, 64, 64, 8, 3)
    assert spilling in _gemm.tile_configs(torch.float16, epilogue="weight_grad") or _gemm.TRITON_RELEASE == (3, 6)
    monkeypatch.setattr(_gemm, "TRITON_RELEASE", (3, 6))
    assert spilling not in _gemm.tile_configs(torch.float16, epilogue="weight_grad")
    assert spilling in _gemm.tile_configs(torch.float16, epilogue="forward")
    tiles = _gemm.gemm_tiles(4096, 4096, 4096, torch.float16, epilogue="weight_grad")
    assert tuple(tiles[key] for key in _gemm.TILE_KEYS) == (64, 64, 64, 8, 3)  # the next largest
    monkeypatch.setattr(_gemm, "TRITON_RELEASE", (3, 9))
    assert spilling in _gemm.tile_configs(torch.float16, epilogue="weight_grad")


def test_the_chunked_kernels_halve_their_warps_on_triton_3_8_only(monkeypatch):
    from acn_kernels.ops import _common
    monkeypatch.setattr(_common, "TRITON_RELEASE", (3, 8))
    assert _common.chunk_tile(20000, 8) == (4096, 5, _common.MAX_WARPS // 2)
    monkeypatch.setattr(_common, "TRITON_RELEASE", (3, 9))
    assert _common.chunk_tile(20000, 8) == (4096, 5, _common.MAX_WARPS)
