"""hybrid_accumulate_norm: the H-ACN block boundary, a gated short path beside the long connection,
one pass forward and one pass backward.

Math, per row of width D (x, the short state, and f, the block's output, are (..., D); y, the running
sum, is None or shaped like x; gate and long_weight are 0-dim parameters):

    x_next = gate * x + f                  the short path (gate 0: the ACN; gate 1: a residual chain)
    y_out  = y + long_weight * f           the long path (no long_weight: 1; y None: the sum starts at
                                           the term, which is f itself, no copy, without a long_weight)
    out    = norm(x_next)                  layernorm or rmsnorm, the next block's input

Backward, with dx_next and dy_out the gradients of x_next and y_out, and dv = the norm's backward at
x_next (see accumulate_norm):

    dtotal       = dv + dx_next            all of x_next's gradient
    dx           = gate * dtotal
    df           = dtotal + long_weight * dy_out
    dy           = dy_out                  (the same tensor, no copy)
    dgate        = sum of dtotal * x,      dlong_weight = sum of dy_out * f
    dw, db       as in accumulate_norm

Every parameter's sum is kept per program in one partial row (dweight, dbias, dgate, dlong_weight),
then one sum launch reduces them all: deterministic, no atomics.

Bytes, for R rows, A = R*D elements at x's size, A_y at y's size (A_y = A when y has x's dtype):

    forward   reads x, f, y (A_y), w, b:          2A + A_y + 2D     writes x_next, y_out, out, stats: 2A + A_y + 8R
    backward  reads dout, dx_next, x_next, x, dy_out (A_y), f (with a long weight), w, stats:
              4A + A_y (+ A)                      writes dx, df: 2A, + 4*P*W for the partial rows (P programs,
              W = 2D + 8 columns)

6A forward and 7A backward (8A with a long weight) where eager PyTorch moves 10A forward (12A with a
long weight: gate * x, + f, y + f, the norm) and 15A backward (autograd's adds of the fan-out, the
gate's and long weight's products and sums, the norm's backward): `traffic` counts both.
The rows these kernels walk in registers or in chunks are accumulate_norm's (D of any width).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..backend import resolve_backend
from ._common import (FLOAT_DTYPES, check_device, check_eps, check_norm_kind, check_norm_params, check_running_sum,
                      check_shape, check_tensor, first_order, fits_in_registers, parameter_grads, parameter_spec,
                      partial_width, register_cuda_twin, rows_of)
from ._rows import BWD_PER_THREAD, backward_programs, launch_backward, launch_forward


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, D) with a row stride of D, as the backward kernels read the hybrid's own rows."""
    return rows_of(t).contiguous()


# ----------------------------------------------------------------------------- registered ops
# Custom ops, as accumulate_norm's: outputs an op does not produce come back empty (y_out without y
# or a long weight, mean for RMSNorm).

@torch.library.custom_op("acn_kernels::hybrid_accumulate_norm_fwd", mutates_args=())
def hybrid_accumulate_norm_fwd(x: torch.Tensor, f: torch.Tensor, y: Optional[torch.Tensor], gate: torch.Tensor,
                               weight: torch.Tensor, bias: Optional[torch.Tensor], long_weight: Optional[torch.Tensor],
                               eps: float, is_layernorm: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_next, y_out, out, mean, rstd)."""
    y_out, out, mean, rstd, x_next = launch_forward(
        rows_of(f), rows_of(y) if y is not None else None, weight.contiguous(),
        bias.contiguous() if bias is not None else None, eps, is_layernorm, False, short2=rows_of(x), gate=gate,
        long_weight=long_weight, y_out_dtype=f.dtype)
    return (x_next.view(x.shape), y_out.view(x.shape) if y_out is not None else x.new_empty(0), out.view(x.shape),
            mean if mean is not None else rstd.new_empty(0), rstd)


@hybrid_accumulate_norm_fwd.register_fake
def hybrid_accumulate_norm_fwd_fake(x, f, y, gate, weight, bias, long_weight, eps, is_layernorm):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    stores_y = y is not None or long_weight is not None
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=y.dtype if y is not None else f.dtype) if stores_y
            else x.new_empty(0), x.new_empty(x.shape), stats.new_empty(rows) if is_layernorm else stats.new_empty(0),
            stats)


@torch.library.custom_op("acn_kernels::hybrid_accumulate_norm_bwd", mutates_args=())
def hybrid_accumulate_norm_bwd(dout: torch.Tensor, dx_next: Optional[torch.Tensor], dy_out: Optional[torch.Tensor],
                               x: torch.Tensor, f: torch.Tensor, x_next: torch.Tensor, gate: torch.Tensor,
                               weight: torch.Tensor, long_weight: Optional[torch.Tensor], mean: torch.Tensor,
                               rstd: torch.Tensor, has_bias: bool, is_layernorm: bool
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, df, dparams): dparams, float32 (partial_width,), holds dweight, dbias, dgate and dlong_weight."""
    df, _, dparams, dx = launch_backward(
        rows_of(dout), rows_of(dy_out) if dy_out is not None else None, rows_of(x_next), weight.contiguous(),
        mean if is_layernorm else None, rstd, has_bias, is_layernorm, f.dtype, None,
        hybrid=dict(dshort_out=contiguous_rows(dx_next) if dx_next is not None else None, short=contiguous_rows(x),
                    x=contiguous_rows(f), gate=gate, long_weight=long_weight))
    return dx.view(x.shape), df.view(f.shape), dparams


@hybrid_accumulate_norm_bwd.register_fake
def hybrid_accumulate_norm_bwd_fake(dout, dx_next, dy_out, x, f, x_next, gate, weight, long_weight, mean, rstd,
                                    has_bias, is_layernorm):
    sums = (1 + has_bias) * weight.shape[0] + 1 + (long_weight is not None)
    return x.new_empty(x.shape), f.new_empty(f.shape), weight.new_empty(sums, dtype=torch.float32)


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    x, f, y, gate, weight, bias, long_weight, eps, is_layernorm = inputs
    x_next, _, _, mean, rstd = output
    ctx.set_materialize_grads(False)  # unused outputs send None, not a zero-filled tensor
    ctx.save_for_backward(x, f, x_next, gate, weight, long_weight, mean, rstd)
    ctx.has_y, ctx.has_bias, ctx.is_layernorm = y is not None, bias is not None, is_layernorm
    ctx.op_has_y_out = y is not None or long_weight is not None  # else y_out is f itself, outside the op
    ctx.param_specs = tuple(map(parameter_spec, (weight, bias, gate, long_weight)))


def make_backward(backward_op):
    def backward(ctx, dx_next, dy_out, dout, _dmean, _drstd):
        """One kernel for every input gradient, its partial rows summed in one launch (see the module
        docstring). Without a gradient for out the norm's part is zero; a parameter no used output
        depends on gets None, as from autograd."""
        x, f, x_next, gate, weight, long_weight, mean, rstd = ctx.saved_tensors
        dy_out = dy_out if ctx.op_has_y_out else None
        uses_out, uses_short = dout is not None, dout is not None or dx_next is not None
        dx, df, dparams = backward_op(dout if uses_out else torch.zeros_like(x_next), dx_next, dy_out, x, f, x_next,
                                      gate, weight, long_weight, mean, rstd, ctx.has_bias, ctx.is_layernorm)
        dweight, dbias, dgate, dlong_weight = parameter_grads(dparams, *ctx.param_specs)
        return (dx if uses_short else None, df, (dy_out if ctx.has_y else None), dgate if uses_short else None,
                dweight if uses_out else None, dbias if uses_out else None,
                dlong_weight if dy_out is not None else None, None, None)
    return backward


hybrid_accumulate_norm_fwd.register_autograd(
    first_order("hybrid_accumulate_norm", make_backward(hybrid_accumulate_norm_bwd)), setup_context=setup_context)
FORWARD_OPS = {"triton": hybrid_accumulate_norm_fwd,
               "cuda": register_cuda_twin("hybrid_accumulate_norm_fwd", "hybrid_accumulate_norm_bwd",
                                          hybrid_accumulate_norm_fwd_fake, hybrid_accumulate_norm_bwd_fake,
                                          make_backward, setup_context)}


# ----------------------------------------------------------------------------- public function

def check_scalar_parameter(name: str, value, device: torch.device) -> None:
    """A 0-dim floating tensor (a learnable scalar) on x's device."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or value.dtype not in FLOAT_DTYPES:
        got = (f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        raise TypeError(f"{name} must be a 0-dim floating tensor (a learnable scalar, dtype in "
                        f"{FLOAT_DTYPES}), got {got}")
    check_device(name, value, device)


def hybrid_accumulate_norm(x, f, y, gate, weight, bias=None, *, long_weight=None, eps=1e-5, norm="layernorm",
                           backend="auto"):
    """Returns (x_next, y_out, out): x_next = gate * x + f, y_out = y + long_weight * f and out =
    norm(x_next). See the module docstring for the math and the bytes moved."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., D), got a 0-d tensor")
    check_tensor("f", f, dtypes=(x.dtype,), like="x")
    check_shape("f", f, x.shape, "x's shape")
    check_device("f", f, x.device)
    check_running_sum(y, x.shape, x.dtype, x.device)
    check_scalar_parameter("gate", gate, x.device)
    if long_weight is not None:
        check_scalar_parameter("long_weight", long_weight, x.device)
    check_norm_params(weight, bias, x.shape[-1], x.device)
    check_eps(eps)
    check_norm_kind(norm)
    resolved = resolve_backend(backend, x.device, "hybrid_accumulate_norm")
    if resolved == "reference":
        return reference.hybrid_accumulate_norm(x, f, y, gate, weight, bias, long_weight=long_weight, eps=eps,
                                                norm=norm)
    return run_forward(FORWARD_OPS[resolved], x, f, y, gate, weight, bias, long_weight, eps, norm)


def run_forward(forward_op, x, f, y, gate, weight, bias, long_weight, eps, norm):
    """(x_next, y_out, out) from a registered forward op of any backend (the host check passes its own)."""
    x_next, y_out, out, _, _ = forward_op(x, f, y, gate, weight, bias, long_weight, float(eps), norm == "layernorm")
    return x_next, (f if y is None and long_weight is None else y_out), out


def traffic_bound(x, f, y, gate, weight, bias, *, long_weight=None, norm="layernorm") -> tuple[int, int]:
    """The module docstring's byte counts for this call, (forward, backward), plus the scalars read.
    Checked by the traffic tests."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    a = x.numel() * x.element_size()
    a_y = y.numel() * y.element_size() if y is not None else (a if long_weight is not None else 0)
    scalars = sum(t.element_size() for t in (gate, long_weight) if t is not None)
    params = (1 + (bias is not None)) * dim * weight.element_size()
    stats = rows * 4 * (2 if norm == "layernorm" else 1)
    forward = (2 * a + (a_y if y is not None else 0) + params + scalars) + (2 * a + a_y + stats)
    programs = backward_programs(rows, dim, x.device)
    width = partial_width(dim, bias is not None, 1 + (long_weight is not None))
    reduction = 4 * (2 * programs * width + width)  # partial rows written, read by one sum, its result
    casts = sum(t.numel() * (4 + t.element_size()) for t in (weight, bias, gate, long_weight)
                if t is not None and t.dtype != torch.float32)
    wide_zeroing = 0 if fits_in_registers(dim, BWD_PER_THREAD) else programs * width * 4
    reads = 4 * a + a_y + (a if long_weight is not None else 0) + dim * weight.element_size() + stats + scalars
    return forward, reads + 2 * a + reduction + casts + wide_zeroing
