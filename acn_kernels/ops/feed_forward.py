"""feed_forward: Linear -> act -> Linear, the activation and its backward inside GEMM epilogues.

Math, for x (..., D), w1 (H, D), b1 (H,) or None, w2 (E, H), b2 (E,) or None:

    z   = x @ w1.T + b1,  h = act(z)     one GEMM, bias and act in its epilogue (linear_act_accumulate's;
                                         swiglu: w1 (2H, D), gate rows then up rows, h = silu(z_gate) * z_up)
    out = h @ w2.T + b2                  cuBLAS (torch.addmm)

Backward, dout the gradient of out:

    dz  = (dout @ w2) * act'(z)          one GEMM, act'(z) in its epilogue: dh is never written
    dx  = dz @ w1                        cuBLAS
    dw2, db2 = dout.T @ h, sum of dout   one GEMM, the bias gradient from the tiles it loads (_gemm)
    dw1, db1 = dz.T @ x, sum of dz       one GEMM likewise

Bytes beyond the GEMMs' operands, for M rows, A = M*H elements at x's size:

    forward    writes h (A) and z (A; gelu, gelu_tanh and silu, which act' needs)
    backward   reads z (or h for relu; nothing for identity) and writes dz (A)

Eager PyTorch reads z back for the activation (A more, one launch) and, in backward, writes dh and
reads it back with z for the activation's backward (2A more, one launch), and reads dz and dout
once more for the bias gradients (A and the output's size, two launches): 4A plus the output's
size, and four launches, more per MLP.
The "cuda" and "cublas" backends have no twin of the backward's GEMM: there the first linear is
their `linear_act_accumulate` and the rest eager (cuBLAS), said in `feed_forward`'s docstring.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._validation import check_choice
from ..backend import resolve_backend
from ._common import first_order, rows_of
from ._gemm import (ACTIVATIONS, GATED, activation_grad_input, check_linear, checked_linear_input, fused_weight_grad,
                    launch_forward, launch_times_activation_grad, output_width, saves_preactivation)
from .linear_act_accumulate import linear_act_accumulate


# ----------------------------------------------------------------------------- registered ops
# Custom ops for torch.compile and opcheck (see accumulate_norm); z comes back empty where act'
# does not need it (relu's backward keeps h, which an op may not return twice).

@torch.library.custom_op("acn_kernels::feed_forward_fwd", mutates_args=())
def feed_forward_fwd(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                     b2: Optional[torch.Tensor], activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h, z)."""
    h, _, saved = launch_forward(rows_of(x), w1, b1.contiguous() if b1 is not None else None, None, activation)
    out = torch.addmm(b2, h, w2.t()) if b2 is not None else h @ w2.t()
    lead = x.shape[:-1]
    return (out.view(*lead, w2.shape[0]), h.view(*lead, output_width(w1, activation)),
            saved.view(*lead, w1.shape[0]) if saves_preactivation(activation) else h.new_empty(0))


@feed_forward_fwd.register_fake
def feed_forward_fwd_fake(x, w1, b1, w2, b2, activation):
    lead = x.shape[:-1]
    return (x.new_empty((*lead, w2.shape[0])), x.new_empty((*lead, output_width(w1, activation))),
            x.new_empty((*lead, w1.shape[0]) if saves_preactivation(activation) else (0,)))


@torch.library.custom_op("acn_kernels::times_activation_grad", mutates_args=())
def times_activation_grad(dout: torch.Tensor, w2: torch.Tensor, saved: Optional[torch.Tensor],
                          activation: str) -> torch.Tensor:
    """dz = (dout @ w2) * act'(z), shaped like z (..., H; swiglu's (..., 2H)); saved is z, or h for relu,
    or None for identity."""
    dz = launch_times_activation_grad(rows_of(dout.to(w2.dtype)), w2,
                                      rows_of(saved) if saved is not None else None, activation)
    return dz.view(*dout.shape[:-1], dz.shape[-1])


@times_activation_grad.register_fake
def times_activation_grad_fake(dout, w2, saved, activation):
    return dout.new_empty((*dout.shape[:-1], saved.shape[-1] if activation in GATED else w2.shape[1]),
                          dtype=w2.dtype)


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    _, h, z = output
    ctx.save_for_backward(x, w1, w2, h, activation_grad_input(activation, h, z))
    ctx.set_materialize_grads(False)  # h and z are the op's own: no gradient comes for them
    ctx.activation, ctx.has_b1, ctx.has_b2 = activation, b1 is not None, b2 is not None


def backward(ctx, dout, _dh, _dz):
    """dz in one GEMM with act' in its epilogue, dx by cuBLAS, each weight and bias gradient in one
    weight_grad GEMM."""
    x, w1, w2, h, saved = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    needs = ctx.needs_input_grad
    dz2 = rows_of(times_activation_grad(dout, w2, saved, ctx.activation))
    dx = (dz2 @ w1).view(x.shape) if needs[0] else None
    dw1, db1 = fused_weight_grad(dz2, rows_of(x), needs[1], ctx.has_b1 and needs[2])
    dw2, db2 = fused_weight_grad(rows_of(dout), rows_of(h), needs[3], ctx.has_b2 and needs[4])
    return dx, dw1, db1, dw2, db2, None


feed_forward_fwd.register_autograd(first_order("feed_forward", backward), setup_context=setup_context)


# ----------------------------------------------------------------------------- public function

def feed_forward(x, w1, b1, w2, b2, *, activation="gelu", backend="auto"):
    """act(x @ w1.T + b1) @ w2.T + b2; see the module docstring. Under autocast, x, weights and biases
    are cast to the autocast dtype, as nn.Linear's are. On backend="cuda" or "cublas" (auto's default on
    a GPU) the first linear is that backend's linear_act_accumulate (cuBLAS and an elementwise kernel for
    the activation, and one for its backward) and the second eager (cuBLAS)."""
    x, w1, b1, w2, b2 = checked_linear_input(x, w1, b1, w2, b2)
    check_choice("activation", activation, ACTIVATIONS)
    check_linear("w1", w1, "b1", b1, x, activation=activation)
    check_linear("w2", w2, "b2", b2, x, in_features=output_width(w1, activation),
                 in_features_source="w1's rows" + (f", halved for {activation}'s (gate, up) pairs"
                                                    if activation in GATED else ""))
    resolved = resolve_backend(backend, x.device, "feed_forward")
    if resolved == "reference":
        return reference.feed_forward(x, w1, b1, w2, b2, activation=activation)
    if resolved in ("cuda", "cublas"):
        return F.linear(linear_act_accumulate(x, w1, b1, None, activation=activation, backend=resolved)[0], w2, b2)
    return feed_forward_fwd(x, w1, b1, w2, b2, activation)[0]


def traffic_bound(x, w1, b1, w2, b2, *, activation="gelu") -> tuple[int, int]:
    """The module docstring's byte counts plus the GEMMs' operands, (forward, backward). Checked by
    the traffic tests."""
    rows_w1, dim = w1.shape  # z's width: swiglu's is twice h's
    hidden = output_width(w1, activation)
    out_features = w2.shape[0]
    m = x.numel() // dim
    e = x.element_size()
    a, a_z = m * hidden * e, m * rows_w1 * e
    z = a_z if saves_preactivation(activation) else 0
    saved = a_z if activation != "identity" else 0
    x_bytes, out_bytes = m * dim * e, m * out_features * e
    w1_bytes, w2_bytes = rows_w1 * dim * e, out_features * hidden * e
    b1_bytes = rows_w1 * e if b1 is not None else 0
    b2_bytes = out_features * e if b2 is not None else 0
    forward = (x_bytes + w1_bytes + b1_bytes + a + z) + (a + w2_bytes + b2_bytes + out_bytes)
    backward = (out_bytes + w2_bytes + saved + a_z) \
        + (out_bytes + a + w2_bytes + b2_bytes) \
        + (a_z + w1_bytes + x_bytes) + (a_z + x_bytes + w1_bytes + b1_bytes)
    return forward, backward
