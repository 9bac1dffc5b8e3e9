"""accumulate_norm: the ACN block boundary, one pass forward and one pass backward.

Math, per row of width D (x is (..., D); y, the running sum, is None or shaped like x):

    y_out = y + x                         (y is None: y_out is x itself, no copy)
    v     = x          if normalize == "input"  (the next block's first norm)
            y_out      if normalize == "sum"    (the ACN's final norm)
    out   = (v - mean(v)) * rstd * w + b  layernorm, rstd = 1 / sqrt(var(v) + eps)
            v * rstd * w + b              rmsnorm,   rstd = 1 / sqrt(mean(v^2) + eps)

Backward, with v_hat = (v - mean) * rstd and dv = rstd * (w*dout - v_hat * mean(w*dout*v_hat)
[- mean(w*dout) for layernorm]):

    normalize="input":  dx = dy_out + dv,  dy = dy_out (the same tensor, no copy)
    normalize="sum":    dx = dy = dy_out + dv
    dw = sum over rows of dout * v_hat,  db = sum over rows of dout   (per-program partial rows of
    both in one buffer, then one sum launch for both: deterministic, no atomics)

Bytes, for R rows, A = R*D elements at x's size, A_y at y's size (float32 y: twice A for bf16 x):

    forward   reads x, y, w, b:                 A + A_y + 2D       writes y_out, out, mean, rstd:  A_y + A + 8R
    backward  reads dout, dy_out, v, w, stats:  A + A_y + (A or A_y) + D + 8R
              writes dx:                        A  (+ A_y for dy when normalize="sum" and y is float32
              under a 16-bit x)  + 4*P*D per reduced parameter, P = programs (a few per SM)

Eager PyTorch moves 5A forward and 6A backward per boundary (ACN-NOTES section 5); this op 4A and 4A.

Rows wider than the registers hold (D > 8192 forward, D > 4096 backward) are walked in chunks by
the *_wide kernels: the same bytes from DRAM, with the row re-read from L2 (three passes forward,
two backward) and the dweight/dbias partial rows updated in L2.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_choice
from ..backend import resolve_backend
from ._common import (check_eps, check_norm_kind, check_norm_params, check_running_sum, check_tensor, first_order,
                      fits_in_registers, parameter_grads, parameter_spec, partial_width, register_cuda_twin, rows_of)
from ._rows import BWD_PER_THREAD, backward_programs, launch_backward, launch_forward

# ----------------------------------------------------------------------------- registered ops
# torch.library custom ops, so that torch.compile traces through them (fake implementations give
# the output shapes) and opcheck can test them; their autograd formula is registered below.
# A custom op may not return an alias of an input nor None, so outputs an op does not produce
# (y_out without y, mean for RMSNorm, dy when x's gradient serves, db without bias) come back empty.

@torch.library.custom_op("acn_kernels::accumulate_norm_fwd", mutates_args=())
def accumulate_norm_fwd(x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor,
                        bias: Optional[torch.Tensor], eps: float, is_layernorm: bool,
                        normalize_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y_out, out, mean, rstd, _ = launch_forward(
        rows_of(x), rows_of(y) if y is not None else None, weight.contiguous(),
        bias.contiguous() if bias is not None else None, eps, is_layernorm, normalize_sum)
    return (y_out.view(x.shape) if y_out is not None else x.new_empty(0), out.view(x.shape),
            mean if mean is not None else rstd.new_empty(0), rstd)


@accumulate_norm_fwd.register_fake
def accumulate_norm_fwd_fake(x, y, weight, bias, eps, is_layernorm, normalize_sum):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=y.dtype) if y is not None else x.new_empty(0), x.new_empty(x.shape),
            stats.new_empty(rows) if is_layernorm else stats.new_empty(0), stats)


@torch.library.custom_op("acn_kernels::accumulate_norm_bwd", mutates_args=())
def accumulate_norm_bwd(dout: torch.Tensor, dy_out: Optional[torch.Tensor], normalized: torch.Tensor,
                        weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool,
                        is_layernorm: bool, dy_dtype: Optional[torch.dtype]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, dparams): dx and dy shaped like `normalized`, dy only in dy_dtype when that is given;
    dparams, float32 (partial_width,): dweight and dbias in one tensor (one reduction launch for both)."""
    dx, dy, dparams, _ = launch_backward(
        rows_of(dout), rows_of(dy_out) if dy_out is not None else None, rows_of(normalized),
        weight.contiguous(), mean if is_layernorm else None, rstd, has_bias, is_layernorm, dout.dtype, dy_dtype)
    shape = normalized.shape
    return dx.view(shape), dy.view(shape) if dy is not None else dx.new_empty(0), dparams


@accumulate_norm_bwd.register_fake
def accumulate_norm_bwd_fake(dout, dy_out, normalized, weight, mean, rstd, has_bias, is_layernorm, dy_dtype):
    shape = normalized.shape
    return (dout.new_empty(shape), dout.new_empty(shape, dtype=dy_dtype) if dy_dtype is not None else dout.new_empty(0),
            weight.new_empty(partial_width(weight.shape[0], has_bias), dtype=torch.float32))


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    x, y, weight, bias, eps, is_layernorm, normalize_sum = inputs
    y_out, _, mean, rstd = output
    ctx.sum_has_own_grad = normalize_sum and y is not None
    ctx.set_materialize_grads(False)  # unused outputs send None, not a zero-filled tensor
    ctx.save_for_backward(y_out if ctx.sum_has_own_grad else x, weight, mean, rstd)
    ctx.has_y, ctx.has_bias, ctx.is_layernorm = y is not None, bias is not None, is_layernorm
    ctx.param_specs = (parameter_spec(weight), parameter_spec(bias))
    ctx.x_dtype, ctx.y_dtype = x.dtype, (y.dtype if y is not None else None)


def make_backward(backward_op):
    def backward(ctx, dy_out, dout, _dmean, _drstd):
        """dx = dy_out + norm backward (into x, or into y_out for normalize="sum"); dy = dy_out."""
        normalized, weight, mean, rstd = ctx.saved_tensors
        dy_out = dy_out if ctx.has_y else None
        if dout is None:
            return dy_out.to(ctx.x_dtype), dy_out, None, None, None, None, None
        split_dy = ctx.sum_has_own_grad and ctx.y_dtype != ctx.x_dtype
        dx, dy, dparams = backward_op(dout, dy_out, normalized, weight, mean, rstd, ctx.has_bias, ctx.is_layernorm,
                                      ctx.y_dtype if split_dy else None)
        if not ctx.sum_has_own_grad:
            dy = dy_out
        elif not split_dy:
            dy = dx
        return dx, dy, *parameter_grads(dparams, *ctx.param_specs), None, None, None
    return backward


accumulate_norm_fwd.register_autograd(first_order("accumulate_norm", make_backward(accumulate_norm_bwd)),
                                     setup_context=setup_context)
FORWARD_OPS = {"triton": accumulate_norm_fwd,
               "cuda": register_cuda_twin("accumulate_norm_fwd", "accumulate_norm_bwd", accumulate_norm_fwd_fake,
                                          accumulate_norm_bwd_fake, make_backward, setup_context)}


def accumulate_norm(x, y, weight, bias=None, *, eps=1e-5, norm="layernorm", normalize="input",
                    backend="auto"):
    """Returns (y_out, out): y_out = y + x and out = norm(x) (normalize="input") or norm(y_out)
    (normalize="sum"). See the module docstring for the math and the bytes moved."""
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., D), got a 0-d tensor")
    check_running_sum(y, x.shape, x.dtype, x.device)
    check_norm_params(weight, bias, x.shape[-1], x.device)
    check_eps(eps)
    check_norm_kind(norm)
    check_choice("normalize", normalize, ("input", "sum"))
    resolved = resolve_backend(backend, x.device, "accumulate_norm")
    if resolved == "reference":
        return reference.accumulate_norm(x, y, weight, bias, eps=eps, norm=norm, normalize=normalize)
    return run_forward(FORWARD_OPS[resolved], x, y, weight, bias, eps, norm, normalize)


def run_forward(forward_op, x, y, weight, bias, eps, norm, normalize):
    """(y_out, out) from a registered forward op of any backend (the host check passes its own)."""
    y_out, out, _, _ = forward_op(x, y, weight, bias, float(eps), norm == "layernorm", normalize == "sum")
    return (x if y is None else y_out), out


def traffic_bound(x, y, weight, bias, *, norm="layernorm", normalize="input") -> tuple[int, int]:
    """The module docstring's byte counts for this call, (forward, backward): what the kernels
    and the launchers' own torch ops may read and write at most. Checked by the traffic tests."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    a, a_y = x.numel() * x.element_size(), (y.numel() * y.element_size() if y is not None else 0)
    params = (1 + (bias is not None)) * dim * weight.element_size()
    stats = rows * 4 * (2 if norm == "layernorm" else 1)
    forward = (a + a_y + params) + (a_y + a + stats)
    programs = backward_programs(rows, dim, x.device)
    normalized = a_y if normalize == "sum" and y is not None else a
    split_dy = normalize == "sum" and y is not None and y.dtype != x.dtype
    reduction = 4 * (programs * dim * 2 + dim)  # partial rows written, read by one sum, its result
    if weight.dtype != torch.float32:
        reduction += dim * (4 + weight.element_size())  # the cast to weight's dtype
    wide_zeroing = 0 if fits_in_registers(dim, BWD_PER_THREAD) else programs * dim * 4
    backward = (a + a_y + normalized + dim * weight.element_size() + stats) + (a + (a_y if split_dy else 0)) \
        + (1 + (bias is not None)) * (reduction + wide_zeroing)
    return forward, backward
