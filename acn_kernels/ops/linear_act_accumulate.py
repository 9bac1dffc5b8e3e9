"""linear_act_accumulate: an MLP layer of an ACN with the running sum in its GEMM epilogue.

Math, for x (..., K), weight (N, K) as in nn.Linear, bias (N,) or None, y None or (..., N):

    z     = x @ weight.T + bias
    h     = act(z)                         act in relu, gelu, gelu_tanh, silu, identity, swiglu
    y_out = y + h                          (y is None: y_out is h itself, no copy)

swiglu (Llama's MLP) takes weight (2N, K), rows [0, N) the gate projection and [N, 2N) the up
projection (bias likewise): z = [z_gate | z_up] is (..., 2N) and h = silu(z_gate) * z_up (..., N),
both halves accumulated by each GEMM program, so h never needs a second pass.

Backward, with dh and dy_out the gradients of the two outputs (h feeds the next layer, y_out the
long connection; both reach z):

    dz = (dh + dy_out) * act'(z)           one fused elementwise pass
    dx = dz @ weight                       cuBLAS (torch.matmul)
    dweight = dz.T @ x,  dbias = sum over rows of dz     one GEMM, dbias from the tiles it loads (_gemm)
    dy = dy_out                            (the same tensor, no copy)
    y is x (a residual add, the chain's start): dx = dz @ weight + dy_out in one cuBLAS addmm

The CUDA backend runs the GEMM through ATen: relu with a bias in cuBLASLt's bias + ReLU epilogue and
identity as the GEMM itself, then one CUDA kernel for y + h where there is a y; the other
activations (cuBLASLt's GELU is the tanh form and ATen does not return the pre-activation act'
needs) as cuBLAS's z and one CUDA kernel for act and the sum. dweight and dbias by cuBLAS and a
sum launch. The "cublas" backend (auto's default for this op until a GPU run measures the Triton
GEMM) is that design with Triton kernels and no build: cuBLAS's z (torch.addmm), then
activation_epilogue_kernel for h and y_out (identity without y: h is z, no launch), and
activation_backward_kernel, cuBLAS and a sum launch backward.

Bytes beyond the GEMM's own operands, for M rows, A = M*N elements at x's size, A_y at y's size:

    forward epilogue   reads bias, y (A_y)      writes h (A), y_out (A_y), z (A; gelu, gelu_tanh, silu)
                       (return_h=False, as for the last block of a chain: no h, and z for relu too)
    backward pass      reads dh, dy_out, z or h (A + A_y + A)      writes dz (A)

The "cublas" forward moves z twice more (cuBLAS writes it, the epilogue reads it: 2A; identity
without y none), and its backward reads dz once more for dbias (A, one launch more).

Eager PyTorch writes z, then h, then reads both for y + h, and in backward adds dh + dy_out and
multiplies by act'(z) in separate passes: about 5A more per layer (ACN-NOTES section 5), and reads
dz once more for dbias (A, one launch more).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._validation import check_choice
from ..backend import resolve_backend
from ._common import check_running_sum, first_order, in_dtype_of, new_buffer, register_cuda_twin, rows_of
from ._gemm import (ACTIVATIONS, GATED, activation, activation_grad, activation_grad_input, check_linear,
                    checked_linear_input, eager_weight_grad, fused_weight_grad, launch_forward, output_width,
                    saves_preactivation, swiglu_grads)



@triton.jit
def elementwise_block(width, n_elements, BLOCK: tl.constexpr):
    """(row, cols, offsets, mask) of this program's BLOCK of a row of `width` (program_id(0) the row,
    (1) the block), n_elements in all."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offsets = row * width + cols
    return row, cols, offsets, (cols < width) & (offsets < n_elements)


@triton.jit
def activation_epilogue_kernel(
    z_ptr, y_ptr, h_ptr, y_out_ptr, width, n_elements,
    HAS_Y: tl.constexpr, STORE_H: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    """The "cublas" path's forward epilogue: h = act(z) rounded to z's dtype (as the GEMM epilogue
    rounds it), y_out = y + h. swiglu: z rows are (gate, up) pairs, 2 * width wide."""
    row, cols, offsets, mask = elementwise_block(width, n_elements, BLOCK)
    if ACTIVATION == "swiglu":
        pairs = row * 2 * width + cols
        gate = tl.load(z_ptr + pairs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(z_ptr + pairs + width, mask=mask, other=0.0).to(tl.float32)
        h = in_dtype_of(z_ptr, gate * tl.sigmoid(gate) * up)
    else:
        h = in_dtype_of(z_ptr, activation(tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32), ACTIVATION))
    if STORE_H:
        tl.store(h_ptr + offsets, h, mask=mask)
    if HAS_Y:
        y = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_out_ptr + offsets, in_dtype_of(y_out_ptr, y + h.to(tl.float32)), mask=mask)


@triton.jit
def activation_backward_kernel(
    dh_ptr, dy_out_ptr, saved_ptr, dz_ptr, width, n_elements,
    HAS_DH: tl.constexpr, HAS_DY_OUT: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    """dz = (dh + dy_out) * act'(saved) for one BLOCK of gradients; swiglu: a (gate, up) row of z,
    2 * width wide, per row of gradients."""
    row, cols, offsets, mask = elementwise_block(width, n_elements, BLOCK)
    grad = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DH:
        grad += tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DY_OUT:
        grad += tl.load(dy_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "swiglu":
        pairs = row * 2 * width + cols
        gate = tl.load(saved_ptr + pairs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(saved_ptr + pairs + width, mask=mask, other=0.0).to(tl.float32)
        dgate, dup = swiglu_grads(grad, gate, up)
        tl.store(dz_ptr + pairs, in_dtype_of(dz_ptr, dgate), mask=mask)
        tl.store(dz_ptr + pairs + width, in_dtype_of(dz_ptr, dup), mask=mask)
    else:
        if ACTIVATION != "identity":
            saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad *= activation_grad(saved, ACTIVATION)
        tl.store(dz_ptr + offsets, in_dtype_of(dz_ptr, grad), mask=mask)


ELEMENTWISE_BLOCK = 1024


def elementwise_grid(rows: int, width: int, glu: bool) -> tuple[tuple[int, int], int]:
    """(grid, row width) of the elementwise kernels over (rows, width) values: a program row per row
    for a GLU, whose z rows pair up (width / ELEMENTWISE_BLOCK blocks each, the grid's second
    dimension), else every value in rows of one block."""
    if not glu:
        rows, width = triton.cdiv(rows * width, ELEMENTWISE_BLOCK), ELEMENTWISE_BLOCK
    return (max(1, rows), max(1, triton.cdiv(width, ELEMENTWISE_BLOCK))), width


def launch_activation_epilogue(z, y, act: str, store_h: bool):
    """(h, y_out) for contiguous z (M, N; swiglu (M, 2N)) and y (M, N) or None: h = act(z), y_out = y + h.
    h is None without store_h; identity's h is z itself."""
    rows, width = z.shape[0], z.shape[1] // 2 if act in GATED else z.shape[1]
    h = (z if act == "identity" else new_buffer((rows, width), z.dtype, z.device)) if store_h else None
    if y is None and h is z:
        return h, None
    y_out = new_buffer((rows, width), y.dtype, z.device) if y is not None else None
    grid, block_width = elementwise_grid(rows, width, act in GATED)
    stand_in = z
    activation_epilogue_kernel[grid](
        z, y if y is not None else stand_in, h if h is not None else stand_in, y_out if y_out is not None else stand_in,
        block_width, rows * width, HAS_Y=y is not None, STORE_H=h is not None and h is not z, ACTIVATION=act,
        BLOCK=ELEMENTWISE_BLOCK)
    return h, y_out


def launch_activation_backward(dh, dy_out, saved, act: str, shape, dtype, device):
    """dz = (dh + dy_out) * act'(z) over contiguous (M, N) gradients; swiglu: dz and z are (M, 2N)."""
    rows, width = shape
    glu = act in GATED
    dz = new_buffer((rows, 2 * width) if glu else shape, dtype, device)
    dh = dh.contiguous() if dh is not None else None
    dy_out = dy_out.contiguous() if dy_out is not None else None
    grid, block_width = elementwise_grid(rows, width, glu)
    stand_in = dz
    activation_backward_kernel[grid](
        dh if dh is not None else stand_in, dy_out if dy_out is not None else stand_in,
        saved if saved is not None else stand_in, dz, block_width, rows * width,
        HAS_DH=dh is not None, HAS_DY_OUT=dy_out is not None, ACTIVATION=act, BLOCK=ELEMENTWISE_BLOCK)
    return dz


# ----------------------------------------------------------------------------- registered ops
# Custom ops for torch.compile and opcheck (see accumulate_norm). Outputs an op does not produce
# come back empty: y_out without y, and the saved pre-activation where act' does not need z
# (for relu the autograd formula keeps h itself, which an op may not return twice).

@torch.library.custom_op("acn_kernels::linear_act_accumulate_fwd", mutates_args=())
def linear_act_accumulate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              y: Optional[torch.Tensor], activation: str, store_h: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y_out, z); h comes back empty when store_h is off (only y_out wanted)."""
    y2 = rows_of(y).contiguous() if y is not None else None  # the epilogue's layout
    h, y_out, saved = launch_forward(rows_of(x), weight, bias.contiguous() if bias is not None else None, y2,
                                     activation, store_h)
    return forward_outputs(x, weight, activation, store_h, h, y_out, saved)


def forward_outputs(x, weight, activation: str, store_h: bool, h, y_out, saved) -> tuple:
    """The forward ops' (h, y_out, z) shaped like x's rows; a fresh empty tensor for each output an op
    does not produce."""
    out_shape = (*x.shape[:-1], output_width(weight, activation))
    absent = x.new_empty
    return (h.view(out_shape) if h is not None else absent(0),
            y_out.view(out_shape) if y_out is not None else absent(0),
            saved.view(*x.shape[:-1], weight.shape[0]) if saves_preactivation(activation, store_h) else absent(0))


@linear_act_accumulate_fwd.register_fake
def linear_act_accumulate_fwd_fake(x, weight, bias, y, activation, store_h=True):
    out_shape = (*x.shape[:-1], output_width(weight, activation))
    z_shape = (*x.shape[:-1], weight.shape[0])
    return (x.new_empty(out_shape if store_h else (0,)),
            x.new_empty(out_shape, dtype=y.dtype) if y is not None else x.new_empty(0),
            x.new_empty(z_shape if saves_preactivation(activation, store_h) else (0,)))


@torch.library.custom_op("acn_kernels::activation_backward", mutates_args=())
def activation_backward(dh: Optional[torch.Tensor], dy_out: Optional[torch.Tensor], saved: Optional[torch.Tensor],
                        activation: str, dtype: torch.dtype) -> torch.Tensor:
    """dz = (dh + dy_out) * act'(z) in `dtype` (x's), shaped like z (twice the gradients' width for swiglu)."""
    shape = next(t.shape for t in (dh, dy_out) if t is not None)
    rows = (shape.numel() // shape[-1], shape[-1])
    flat = [t.reshape(rows) if t is not None else None for t in (dh, dy_out)]
    saved = saved.reshape(rows[0], -1) if saved is not None else None
    device = next(t.device for t in (dh, dy_out) if t is not None)
    dz = launch_activation_backward(*flat, saved, activation, rows, dtype, device)
    return dz.view(*shape[:-1], dz.shape[-1])


@activation_backward.register_fake
def activation_backward_fake(dh, dy_out, saved, activation, dtype):
    grad = dh if dh is not None else dy_out
    return grad.new_empty(saved.shape if activation in GATED else grad.shape, dtype=dtype)


@torch.library.custom_op("acn_kernels::linear_act_accumulate_cublas_fwd", mutates_args=())
def linear_act_accumulate_cublas_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                     y: Optional[torch.Tensor], activation: str, store_h: bool = True
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "cublas" path, outputs as linear_act_accumulate_fwd's: cuBLAS's z = x @ weight.T + bias
    (torch.addmm), then activation_epilogue_kernel for h and y_out."""
    x2 = rows_of(x)
    z = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    y2 = rows_of(y).contiguous() if y is not None else None
    h, y_out = launch_activation_epilogue(z, y2, activation, store_h)
    return forward_outputs(x, weight, activation, store_h, h, y_out, activation_grad_input(activation, h, z, store_h))


linear_act_accumulate_cublas_fwd.register_fake(linear_act_accumulate_fwd_fake)


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    x, weight, bias, y, activation, store_h = inputs
    h, _, z = output
    ctx.save_for_backward(x, weight, activation_grad_input(activation, h, z, store_h))
    ctx.set_materialize_grads(False)  # unused outputs send None, not a zero-filled tensor
    ctx.activation, ctx.has_y, ctx.has_bias = activation, y is not None, bias is not None
    ctx.y_is_x = y is x  # a residual add (or the chain's start): x's gradient takes dy_out in its GEMM


def input_grad(dz2, weight, dy_out):
    """dz2 @ weight, plus dy_out where y was x itself: one cuBLAS addmm instead of autograd's add of
    the two gradients of x (3A and a launch saved)."""
    if dy_out is None:
        return dz2 @ weight
    return torch.addmm(rows_of(dy_out).to(dz2.dtype), dz2, weight)


def make_backward(activation_backward_op, weight_grad_of=eager_weight_grad):
    def backward(ctx, dh, dy_out, _dz):
        """dz = (dh + dy_out) * act'(z) in one kernel, dx by cuBLAS, dweight and dbias by
        `weight_grad_of` (one GEMM launch on Triton); dy = dy_out."""
        x, weight, saved = ctx.saved_tensors
        dy_out = dy_out if ctx.has_y else None
        dz = activation_backward_op(dh, dy_out, saved, ctx.activation, x.dtype)
        dz2 = dz.reshape(-1, weight.shape[0])
        needs = ctx.needs_input_grad
        dx = input_grad(dz2, weight, dy_out if ctx.y_is_x else None).view(x.shape) if needs[0] else None
        dweight, dbias = weight_grad_of(dz2, rows_of(x), needs[1], ctx.has_bias and needs[2])
        return dx, dweight, dbias, (None if ctx.y_is_x else dy_out), None, None
    return backward


linear_act_accumulate_fwd.register_autograd(
    first_order("linear_act_accumulate", make_backward(activation_backward, fused_weight_grad)),
    setup_context=setup_context)
linear_act_accumulate_cublas_fwd.register_autograd(
    first_order("linear_act_accumulate", make_backward(activation_backward)), setup_context=setup_context)
FORWARD_OPS = {"triton": linear_act_accumulate_fwd, "cublas": linear_act_accumulate_cublas_fwd,
               "cuda": register_cuda_twin("linear_act_accumulate_fwd", "activation_backward",
                                          linear_act_accumulate_fwd_fake, activation_backward_fake, make_backward,
                                          setup_context)}


def linear_act_accumulate(x, weight, bias, y, *, activation="gelu", backend="auto", return_h=True):
    """Returns (h, y_out): h = act(x @ weight.T + bias), y_out = y + h. See the module docstring.
    return_h=False (with y): the layer's output feeds only the running sum, so h is None and never
    written (A less). Under autocast, x, weight and bias are cast to the autocast dtype
    as nn.Linear's are; y is not."""
    x, weight, bias = checked_linear_input(x, weight, bias)
    check_choice("activation", activation, ACTIVATIONS)
    check_linear("weight", weight, "bias", bias, x, activation=activation)
    check_running_sum(y, (*x.shape[:-1], output_width(weight, activation)), x.dtype, x.device,
                      "the output's: x's rows, weight's out_features")
    resolved = resolve_backend(backend, x.device, "linear_act_accumulate")
    if not return_h and y is None:
        raise ValueError("return_h=False needs y: without a running sum there is nothing else to return")
    if resolved == "reference":
        h, y_out = reference.linear_act_accumulate(x, weight, bias, y, activation=activation)
        return (h if return_h else None), y_out
    return run_forward(FORWARD_OPS[resolved], x, weight, bias, y, activation, return_h)


def run_forward(forward_op, x, weight, bias, y, activation, return_h=True):
    """(h, y_out) from a registered forward op of any backend; h is None without return_h."""
    h, y_out, _ = forward_op(x, weight, bias, y, activation, return_h)
    if not return_h:
        return None, y_out
    return h, (h if y is None else y_out)


def traffic_bound(x, weight, bias, y, *, activation="gelu", backend="triton") -> tuple[int, int]:
    """The module docstring's byte counts plus the GEMMs' operands, (forward, backward), for the
    "triton" or the "cublas" path. Checked by the traffic tests."""
    rows_w, k = weight.shape  # z's width: swiglu's is twice h's
    n = output_width(weight, activation)
    m = x.numel() // k
    e = x.element_size()
    a, a_y, a_z = m * n * e, (m * n * y.element_size() if y is not None else 0), m * rows_w * e
    bias_bytes = rows_w * e if bias is not None else 0
    operands = m * k * e + rows_w * k * e + bias_bytes
    if backend == "cublas":  # cuBLAS writes z, the epilogue reads it back (identity: h is z, no launch without y)
        launches_epilogue = y is not None or activation != "identity"
        epilogue = a_z + 2 * a_y + (a if activation != "identity" else 0) if launches_epilogue else 0
        forward = operands + a_z + epilogue
    else:
        forward = operands + (a + 2 * a_y + (a_z if saves_preactivation(activation) else 0))
    saved = a_z if activation != "identity" else 0
    elementwise = (a + a_y + saved) + a_z                      # dh, dy_out, z or h -> dz
    gemms = (a_z + rows_w * k * e + m * k * e) + (a_z + m * k * e + rows_w * k * e)  # dx = dz W, dW = dz^T x
    bias_grad = bias_bytes + (a_z if backend == "cublas" and bias is not None else 0)  # cuBLAS path: a sum of dz
    return forward, elementwise + gemms + bias_grad
