"""linear: nn.Linear whose backward computes the bias gradient inside the weight-gradient GEMM.

Math, for x (..., K), weight (N, K), bias (N,) or None:

    out = x @ weight.T + bias                      cuBLAS (torch.addmm)

Backward, dout the gradient of out:

    dx = dout @ weight                             cuBLAS
    dweight = dout.T @ x,  dbias = sum of dout's rows    one GEMM (_gemm's "weight_grad" epilogue)

Bytes, for M rows, A = M*N elements at x's size: the GEMMs' operands, and nothing else. Eager
PyTorch reads dout once more (A) in a launch of its own for dbias. The blocks' linears outside the
MLPs (attention's qkv and projection, the Mixer's tail) run it on the Triton backend; the "cuda" and
"cublas" backends run F.linear (cuBLAS for the GEMMs, a sum launch for dbias), said in `linear`'s
docstring.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backend import resolve_backend
from ._common import first_order, rows_of
from ._gemm import check_linear, checked_linear_input, fused_weight_grad


@torch.library.custom_op("acn_kernels::linear_fwd", mutates_args=())
def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ weight.T + bias by cuBLAS; the op exists for its backward."""
    return F.linear(x, weight, bias)


@linear_fwd.register_fake
def linear_fwd_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def backward(ctx, dout):
    """dx by cuBLAS; dweight and dbias in one weight_grad GEMM."""
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dout2 = rows_of(dout)
    dx = (dout2 @ weight).view(x.shape) if needs[0] else None
    dweight, dbias = fused_weight_grad(dout2, rows_of(x), needs[1], ctx.has_bias and needs[2])
    return dx, dweight, dbias


linear_fwd.register_autograd(first_order("linear", backward), setup_context=setup_context)


def linear(x, weight, bias=None, *, backend="auto"):
    """x @ weight.T + bias, as F.linear; see the module docstring. Under autocast, x, weight and bias
    are cast to the autocast dtype, as nn.Linear's are. backend="cuda" or "cublas" (auto's default on a
    GPU) runs F.linear itself."""
    x, weight, bias = checked_linear_input(x, weight, bias)
    check_linear("weight", weight, "bias", bias, x)
    resolved = resolve_backend(backend, x.device, "linear")
    if resolved == "reference":
        return reference.linear(x, weight, bias)
    if resolved in ("cuda", "cublas"):
        return F.linear(x, weight, bias)
    return linear_fwd(x, weight, bias)


def traffic_bound(x, weight, bias) -> tuple[int, int]:
    """The GEMMs' operands, (forward, backward). Checked by the traffic tests."""
    n, k = weight.shape
    m = x.numel() // k
    e = x.element_size()
    x_bytes, w_bytes, out_bytes, bias_bytes = m * k * e, n * k * e, m * n * e, (n * e if bias is not None else 0)
    forward = x_bytes + w_bytes + bias_bytes + out_bytes
    backward = (out_bytes + w_bytes + x_bytes) + (out_bytes + x_bytes + w_bytes + bias_bytes)
    return forward, backward
