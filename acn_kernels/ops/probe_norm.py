"""probe_norm: the shared final norm applied to every partial sum, for probing and early exit.

Math: xs is (L+1, ..., D), the layer outputs x_0..x_L of an ACN.

    y_k   = x_0 + ... + x_k        (inside the kernel a float32 pair hi + lo, TwoSum-compensated)
    out_k = norm(y_k) * w + b      layernorm or rmsnorm over D, as in accumulate_norm

Backward, with dy_k = norm backward of dout_k at y_k (see accumulate_norm):

    dx_k = dy_k + dy_{k+1} + ... + dy_L      (a suffix sum: x_k feeds every y_j with j >= k)
    dw   = sum over k and rows of dout_k * y_hat_k,  db = sum of dout_k  (one sum launch)

The backward walks k = L..0 keeping y_k: one pass over xs rebuilds y_L, then y_{k-1} = y_k - x_k.
A plain float32 sum rebuilt by subtraction differs from the forward's by an ulp of the terms, which
rstd magnifies where the terms cancel (up to 1/sqrt(eps)); the compensated pair rounds to the
forward's sum instead, for no extra bytes. Bytes, for R rows, A = R*D elements of xs's size:

    forward   reads xs (L+1)A, w, b        writes outs (L+1)A, mean and rstd 8(L+1)R
    backward  reads dout (L+1)A, xs 2(L+1)A, stats 8(L+1)R, w
              writes dxs (L+1)A + 4*P*D per reduced parameter (P programs)

Eager PyTorch (cumsum, then a norm per depth) reads and writes the partial sums as well.

Rows wider than 2048 take another plan (see probe_norm_fwd): a float32 cumsum, accumulate_norm's row
kernels over all (L+1) * R rows, and a reverse cumsum in backward; it also moves the float32
partial sums, 2(L+1)A more each way.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ..backend import resolve_backend
from ._common import (affine, check_eps, check_norm_kind, check_norm_params, check_tensor, first_order,
                      fits_in_registers, launch_options, load_param_row, load_rows, new_buffer, new_partial_rows,
                      norm_input_grad, normalize_tile, parameter_grads, parameter_spec, partial_width,
                      reduction_programs, register_cuda_twin, renormalize, row_tile, rows_of, saved_row_stats,
                      store_partial_rows, store_rows, sum_partial_rows)
from ._rows import launch_backward, launch_forward

# Row elements a thread holds: the backward keeps the running sum (a pair), the running gradient and
# the norm backward's values live at once (compile-report checks that these do not spill).
# BWD_PER_THREAD float32 elements set the widest row the backward holds in registers (2048).
FWD_PER_THREAD = 16
BWD_PER_THREAD = 4


def bwd_per_thread(dtype: torch.dtype) -> int:
    """The backward tile's elements per thread: one 16-byte access of its row (4 float32, 8 16-bit)."""
    return 16 // dtype.itemsize


@triton.jit
def add_compensated(hi, lo, x):
    """hi + x, with the add's rounding error kept in lo (TwoSum): hi + lo follows the exact sum of
    every term added or subtracted to about 2^-48 of their size, so the backward's y_k, rebuilt by
    subtraction, rounds to the forward's however much the terms cancel (csrc/row_math.h: the same)."""
    s = hi + x
    b = s - hi
    return s, lo + ((hi - (s - b)) + (x - b))


@triton.jit
def probe_norm_fwd_kernel(
    xs_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
    depth, n_rows, dim, xs_layer_stride, xs_row_stride, out_layer_stride, out_row_stride, eps,
    HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < dim)[None, :]
    xs_layer_stride = tl.cast(xs_layer_stride, tl.int64)
    out_layer_stride = tl.cast(out_layer_stride, tl.int64)
    hi = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    lo = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
    for k in range(0, depth):
        hi, lo = add_compensated(hi, lo, load_rows(xs_ptr + k * xs_layer_stride, rows, cols, xs_row_stride, mask))
        mean, rstd, v_hat = normalize_tile(hi + lo, mask, dim, eps, IS_LAYERNORM)
        out = affine(v_hat, w_ptr, b_ptr, cols, dim, HAS_BIAS)
        store_rows(out_ptr + k * out_layer_stride, rows, cols, out_row_stride, mask, out)
        if IS_LAYERNORM:
            tl.store(mean_ptr + k * n_rows + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + k * n_rows + rows, rstd, mask=row_mask)


@triton.jit
def probe_norm_bwd_kernel(
    dout_ptr, xs_ptr, w_ptr, mean_ptr, rstd_ptr, dxs_ptr, dw_ptr, db_ptr,
    depth, n_rows, dim, dout_layer_stride, dout_row_stride, xs_layer_stride, xs_row_stride,
    dxs_layer_stride, dxs_row_stride, partial_stride,
    HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    w = load_param_row(w_ptr, cols, dim)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dout_layer_stride = tl.cast(dout_layer_stride, tl.int64)
    xs_layer_stride = tl.cast(xs_layer_stride, tl.int64)
    dxs_layer_stride = tl.cast(dxs_layer_stride, tl.int64)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), tl.num_programs(0)):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        hi = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
        lo = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
        for k in range(0, depth):
            hi, lo = add_compensated(hi, lo, load_rows(xs_ptr + k * xs_layer_stride, rows, cols, xs_row_stride, mask))
        grad = tl.zeros((BLOCK_ROWS, BLOCK_D), dtype=tl.float32)
        for step in range(0, depth):
            k = depth - 1 - step
            mean, rstd = saved_row_stats(mean_ptr + k * n_rows, rstd_ptr + k * n_rows, rows, row_mask, IS_LAYERNORM)
            v_hat = renormalize(hi + lo, mean, rstd, mask)
            dout = load_rows(dout_ptr + k * dout_layer_stride, rows, cols, dout_row_stride, mask)
            dw += tl.sum(dout * v_hat, axis=0)
            if HAS_BIAS:
                db += tl.sum(dout, axis=0)
            grad += norm_input_grad(dout, v_hat, w, rstd, mask, dim, IS_LAYERNORM)
            store_rows(dxs_ptr + k * dxs_layer_stride, rows, cols, dxs_row_stride, mask, grad)
            hi, lo = add_compensated(hi, lo, -load_rows(xs_ptr + k * xs_layer_stride, rows, cols, xs_row_stride, mask))
    store_partial_rows(dw_ptr, db_ptr, pid, partial_stride, dim, cols, dw, db, HAS_BIAS)


def layers_of(t: torch.Tensor) -> torch.Tensor:
    """(L+1, rows, D) view of t; copies only if the last stride is not 1 or the dims do not fold."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(t.shape[0], -1, t.shape[-1])


def launch_probe_forward(xs3, weight, bias, eps: float, is_layernorm: bool):
    depth, n_rows, dim = xs3.shape
    block_rows, block_d, num_warps = row_tile(dim, FWD_PER_THREAD)
    out = new_buffer((depth, n_rows, dim), xs3.dtype, xs3.device)
    mean = new_buffer((depth, n_rows), torch.float32, xs3.device) if is_layernorm else None
    rstd = new_buffer((depth, n_rows), torch.float32, xs3.device)
    probe_norm_fwd_kernel[(max(1, triton.cdiv(n_rows, block_rows)),)](
        xs3, weight, bias if bias is not None else weight, out, mean if mean is not None else rstd, rstd,
        depth, n_rows, dim, xs3.stride(0), xs3.stride(1), out.stride(0), out.stride(1), eps,
        HAS_BIAS=bias is not None, IS_LAYERNORM=is_layernorm, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        **launch_options(num_warps))
    return out, mean, rstd


def backward_programs(n_rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> int:
    return max(1, reduction_programs(triton.cdiv(n_rows, row_tile(dim, bwd_per_thread(dtype))[0]), device))


def launch_probe_backward(dout3, xs3, weight, mean, rstd, has_bias: bool, is_layernorm: bool):
    depth, n_rows, dim = xs3.shape
    device = xs3.device
    block_rows, block_d, num_warps = row_tile(dim, bwd_per_thread(xs3.dtype))
    programs = backward_programs(n_rows, dim, xs3.dtype, device)
    dxs = new_buffer((depth, n_rows, dim), xs3.dtype, device)
    width = partial_width(dim, has_bias)
    partials = new_partial_rows(programs, width, device)
    probe_norm_bwd_kernel[(programs,)](
        dout3, xs3, weight, mean if mean is not None else rstd, rstd, dxs, partials, partials[:, dim:],
        depth, n_rows, dim, dout3.stride(0), dout3.stride(1), xs3.stride(0), xs3.stride(1),
        dxs.stride(0), dxs.stride(1), width,
        HAS_BIAS=has_bias, IS_LAYERNORM=is_layernorm, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        **launch_options(num_warps))
    return dxs, sum_partial_rows(partials)


def running_sums(xs3: torch.Tensor) -> torch.Tensor:
    """y_0..y_L in float32, as (rows, D): the wide plan's input to the row kernels."""
    return xs3.float().cumsum(0).view(-1, xs3.shape[-1])


# ----------------------------------------------------------------------------- registered ops
# Custom ops for torch.compile and opcheck (see accumulate_norm). Rows that fit in registers take
# the fused kernels above. Wider rows take a plan of three steps: a float32 cumsum, then
# accumulate_norm's row kernels over all (L+1)*rows rows, and in backward a reverse cumsum; it
# reads and writes the float32 partial sums, so it moves more bytes.

def is_wide(dim: int) -> bool:
    return not fits_in_registers(dim, BWD_PER_THREAD)


@torch.library.custom_op("acn_kernels::probe_norm_fwd", mutates_args=())
def probe_norm_fwd(xs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                   is_layernorm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(outs, mean, rstd); mean and rstd are (L+1, rows), mean empty for RMSNorm."""
    xs3 = layers_of(xs)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if is_wide(xs3.shape[-1]):
        _, out, mean, rstd, _ = launch_forward(running_sums(xs3), None, weight, bias, eps, is_layernorm, False,
                                          out_dtype=xs.dtype)
        mean = mean.view(xs3.shape[:2]) if mean is not None else None
        rstd = rstd.view(xs3.shape[:2])
    else:
        out, mean, rstd = launch_probe_forward(xs3, weight, bias, eps, is_layernorm)
    return out.view(xs.shape), (mean if mean is not None else rstd.new_empty(0)), rstd


@probe_norm_fwd.register_fake
def probe_norm_fwd_fake(xs, weight, bias, eps, is_layernorm):
    stats = xs.new_empty((xs.shape[0], xs.numel() // (xs.shape[0] * xs.shape[-1])), dtype=torch.float32)
    return xs.new_empty(xs.shape), (stats.new_empty(stats.shape) if is_layernorm else stats.new_empty(0)), stats


@torch.library.custom_op("acn_kernels::probe_norm_bwd", mutates_args=())
def probe_norm_bwd(dout: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool, is_layernorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxs, dparams): dparams, float32 (partial_width,), holds dweight and dbias (one reduction launch)."""
    xs3 = layers_of(xs)
    weight = weight.contiguous()
    mean = mean if is_layernorm else None
    if is_wide(xs3.shape[-1]):
        dys, _, dparams, _ = launch_backward(rows_of(dout), None, running_sums(xs3), weight,
                                       mean.view(-1) if mean is not None else None, rstd.view(-1), has_bias,
                                       is_layernorm, torch.float32, None)
        dxs = dys.view(xs3.shape).flip(0).cumsum(0).flip(0).to(xs.dtype)
    else:
        dxs, dparams = launch_probe_backward(layers_of(dout), xs3, weight, mean, rstd, has_bias, is_layernorm)
    return dxs.view(xs.shape), dparams


@probe_norm_bwd.register_fake
def probe_norm_bwd_fake(dout, xs, weight, mean, rstd, has_bias, is_layernorm):
    return xs.new_empty(xs.shape), weight.new_empty(partial_width(weight.shape[0], has_bias), dtype=torch.float32)


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    xs, weight, bias, eps, is_layernorm = inputs
    _, mean, rstd = output
    ctx.save_for_backward(xs, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # unused outputs send None, not a zero-filled tensor
    ctx.has_bias, ctx.is_layernorm = bias is not None, is_layernorm
    ctx.param_specs = (parameter_spec(weight), parameter_spec(bias))


def make_backward(backward_op):
    def backward(ctx, dout, _dmean, _drstd):
        xs, weight, mean, rstd = ctx.saved_tensors
        dxs, dparams = backward_op(dout, xs, weight, mean, rstd, ctx.has_bias, ctx.is_layernorm)
        return dxs, *parameter_grads(dparams, *ctx.param_specs), None, None
    return backward


probe_norm_fwd.register_autograd(first_order("probe_norm", make_backward(probe_norm_bwd)), setup_context=setup_context)
FORWARD_OPS = {"triton": probe_norm_fwd,
               "cuda": register_cuda_twin("probe_norm_fwd", "probe_norm_bwd", probe_norm_fwd_fake, probe_norm_bwd_fake,
                                          make_backward, setup_context)}


def probe_norm(xs, weight, bias=None, *, eps=1e-5, norm="layernorm", backend="auto"):
    """norm(x_0 + ... + x_k) for every k, shape of xs = (L+1, ..., D). See the module docstring."""
    check_tensor("xs", xs)
    if xs.dim() < 2 or xs.shape[0] == 0:
        raise ValueError(f"xs must have shape (L+1, ..., D) with at least 2 dims and L+1 >= 1 (x_0 at least), "
                         f"got {tuple(xs.shape)}")
    check_norm_params(weight, bias, xs.shape[-1], xs.device, like="xs")
    check_eps(eps)
    check_norm_kind(norm)
    resolved = resolve_backend(backend, xs.device, "probe_norm")
    if resolved == "reference":
        return reference.probe_norm(xs, weight, bias, eps=eps, norm=norm)
    return run_forward(FORWARD_OPS[resolved], xs, weight, bias, eps, norm)


def run_forward(forward_op, xs, weight, bias, eps, norm):
    """The normalized partial sums from a registered forward op of any backend."""
    return forward_op(xs, weight, bias, float(eps), norm == "layernorm")[0]


def traffic_bound(xs, weight, bias, *, norm="layernorm") -> tuple[int, int]:
    """The module docstring's byte counts for rows that fit in registers, (forward, backward).
    Checked by the traffic tests; the wide plan has no bound here."""
    depth, dim = xs.shape[0], xs.shape[-1]
    if is_wide(dim):
        raise ValueError(f"no byte bound for the wide plan (D={dim} > {row_tile(1, BWD_PER_THREAD)[1]})")
    rows = xs.numel() // (depth * dim)
    a_all = xs.numel() * xs.element_size()
    params = (1 + (bias is not None)) * dim * weight.element_size()
    stats = depth * rows * 4 * (2 if norm == "layernorm" else 1)
    programs = backward_programs(rows, dim, xs.dtype, xs.device)
    reduction = 4 * (programs * dim * 2 + dim)
    if weight.dtype != torch.float32:
        reduction += dim * (4 + weight.element_size())
    forward = (a_all + params) + (a_all + stats)
    backward = (a_all + 2 * a_all + stats + dim * weight.element_size()) + a_all \
        + (1 + (bias is not None)) * reduction
    return forward, backward
