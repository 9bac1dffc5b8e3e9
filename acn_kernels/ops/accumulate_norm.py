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
import triton
import triton.language as tl

from .. import reference
from .._validation import check_choice
from ..backend import resolve_backend
from ._common import (affine, check_eps, check_norm_kind, check_norm_params, check_running_sum, check_tensor,
                      chunk_tile, first_order, fits_in_registers, in_dtype_of, launch_options, load_param_row,
                      load_rows, new_buffer, new_partial_rows, norm_grad_from_terms, norm_grad_row_terms,
                      norm_input_grad, normalize_tile, parameter_grads, parameter_spec, partial_width,
                      reduction_programs, register_cuda_twin, renormalize, row_tile, rows_of, saved_row_stats,
                      store_partial_rows, store_rows, sum_partial_rows)

# Elements of a row that one thread holds: the forward keeps about four row-sized values live,
# the backward about eight, so these are the most each allows without spilling (compile-report).
FWD_PER_THREAD = 16
BWD_PER_THREAD = 8


@triton.jit
def boundary_scalars(gate_ptr, long_weight_ptr, HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr):
    """(gate, long_weight) as float32 scalars: 0-dim parameters read once per program; (0, 1) unused."""
    gate = 0.0
    long_weight = 1.0
    if HYBRID:
        gate = tl.load(gate_ptr).to(tl.float32)
    if LONG_WEIGHT:
        long_weight = tl.load(long_weight_ptr).to(tl.float32)
    return gate, long_weight


@triton.jit
def boundary_tile(x_ptr, y_ptr, y_out_ptr, short_ptr, short_out_ptr, gate, long_weight, rows, cols, x_stride,
                  y_stride, y_out_stride, short_stride, out_stride, mask, HAS_Y: tl.constexpr,
                  NORMALIZE_SUM: tl.constexpr, HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr, STORE: tl.constexpr):
    """The float32 tile a boundary normalizes, and (STORE) its other outputs: y_out = y + x (x times
    the long weight under LONG_WEIGHT; stored where there is a y or a long weight); HYBRID: short_out =
    gate * short + x, the tile normalized; otherwise x, or the sum under NORMALIZE_SUM. Every value is
    the stored (rounded) one, which the reference normalizes and the backward re-reads. Without STORE
    (the wide kernel's later passes) the tile is recomputed and nothing is stored."""
    v = load_rows(x_ptr, rows, cols, x_stride, mask)
    if (HAS_Y or LONG_WEIGHT) and (STORE or NORMALIZE_SUM):
        total = v
        if LONG_WEIGHT:
            total = v * long_weight
        if HAS_Y:
            total += load_rows(y_ptr, rows, cols, y_stride, mask)
        total = in_dtype_of(y_out_ptr, total)
        if STORE:
            store_rows(y_out_ptr, rows, cols, y_out_stride, mask, total)
        if NORMALIZE_SUM:
            v = total.to(tl.float32)
    if HYBRID:
        v = in_dtype_of(short_out_ptr, load_rows(short_ptr, rows, cols, short_stride, mask) * gate + v)
        if STORE:
            store_rows(short_out_ptr, rows, cols, out_stride, mask, v)
        v = v.to(tl.float32)
    return v


@triton.jit
def accumulate_norm_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, y_out_ptr, out_ptr, mean_ptr, rstd_ptr, short_ptr, short_out_ptr, gate_ptr,
    long_weight_ptr, n_rows, dim, x_stride, y_stride, y_out_stride, out_stride, short_stride, eps,
    HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr, NORMALIZE_SUM: tl.constexpr,
    HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Whole rows in registers: BLOCK_ROWS rows of width dim <= BLOCK_D per program."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < dim)[None, :]
    gate, long_weight = boundary_scalars(gate_ptr, long_weight_ptr, HYBRID, LONG_WEIGHT)
    v = boundary_tile(x_ptr, y_ptr, y_out_ptr, short_ptr, short_out_ptr, gate, long_weight, rows, cols, x_stride,
                      y_stride, y_out_stride, short_stride, out_stride, mask, HAS_Y, NORMALIZE_SUM, HYBRID,
                      LONG_WEIGHT, True)
    mean, rstd, v_hat = normalize_tile(v, mask, dim, eps, IS_LAYERNORM)
    store_rows(out_ptr, rows, cols, out_stride, mask, affine(v_hat, w_ptr, b_ptr, cols, dim, HAS_BIAS))
    if IS_LAYERNORM:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def accumulate_norm_fwd_wide_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, y_out_ptr, out_ptr, mean_ptr, rstd_ptr, short_ptr, short_out_ptr, gate_ptr,
    long_weight_ptr, n_rows, dim, x_stride, y_stride, y_out_stride, out_stride, short_stride, eps, num_chunks,
    HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr, NORMALIZE_SUM: tl.constexpr,
    HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """A row wider than the registers hold, one row per program, in three passes over its
    chunks (the sum, the centered sum of squares, the output); the re-reads hit L2."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    chunk = tl.arange(0, BLOCK_D)
    gate, long_weight = boundary_scalars(gate_ptr, long_weight_ptr, HYBRID, LONG_WEIGHT)
    row_sum = tl.zeros((1,), dtype=tl.float32)
    for c in range(0, num_chunks):
        cols = c * BLOCK_D + chunk
        mask = (cols < dim)[None, :]
        v = boundary_tile(x_ptr, y_ptr, y_out_ptr, short_ptr, short_out_ptr, gate, long_weight, rows, cols,
                          x_stride, y_stride, y_out_stride, short_stride, out_stride, mask, HAS_Y, NORMALIZE_SUM,
                          HYBRID, LONG_WEIGHT, True)
        row_sum += tl.sum(v, axis=1)
    mean = tl.zeros((1,), dtype=tl.float32)
    if IS_LAYERNORM:
        mean = row_sum / dim
    squares = tl.zeros((1,), dtype=tl.float32)
    for c in range(0, num_chunks):
        cols = c * BLOCK_D + chunk
        mask = (cols < dim)[None, :]
        v = boundary_tile(x_ptr, y_ptr, y_out_ptr, short_ptr, short_out_ptr, gate, long_weight, rows, cols,
                          x_stride, y_stride, y_out_stride, short_stride, out_stride, mask, HAS_Y, NORMALIZE_SUM,
                          HYBRID, LONG_WEIGHT, False)
        centered = tl.where(mask, v - mean[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    rstd = tl.rsqrt(squares / dim + eps)
    for c in range(0, num_chunks):
        cols = c * BLOCK_D + chunk
        mask = (cols < dim)[None, :]
        v = boundary_tile(x_ptr, y_ptr, y_out_ptr, short_ptr, short_out_ptr, gate, long_weight, rows, cols,
                          x_stride, y_stride, y_out_stride, short_stride, out_stride, mask, HAS_Y, NORMALIZE_SUM,
                          HYBRID, LONG_WEIGHT, False)
        out = affine((v - mean[:, None]) * rstd[:, None], w_ptr, b_ptr, cols, dim, HAS_BIAS)
        store_rows(out_ptr, rows, cols, out_stride, mask, out)
    if IS_LAYERNORM:
        tl.store(mean_ptr + rows, mean)
    tl.store(rstd_ptr + rows, rstd)


@triton.jit
def store_input_grads(dv, dy_out_ptr, dx_ptr, dy_ptr, rows, cols, dy_out_stride, dx_stride, dy_stride, mask,
                      HAS_DY_OUT: tl.constexpr, STORE_DY: tl.constexpr):
    """dx = dv + dy_out, and the same gradient as dy where y has its own dtype."""
    if HAS_DY_OUT:
        dv += load_rows(dy_out_ptr, rows, cols, dy_out_stride, mask)
    store_rows(dx_ptr, rows, cols, dx_stride, mask, dv)
    if STORE_DY:
        store_rows(dy_ptr, rows, cols, dy_stride, mask, dv)


@triton.jit
def store_hybrid_grads(dv, dshort_out_ptr, dy_out_ptr, short_ptr, x_ptr, dshort_ptr, dx_ptr, gate, long_weight,
                       rows, cols, dim, dy_out_stride, dx_stride, mask, HAS_DSHORT_OUT: tl.constexpr,
                       HAS_DY_OUT: tl.constexpr, LONG_WEIGHT: tl.constexpr):
    """The hybrid boundary's input gradients from dv, the norm's: dtotal = dv + dshort_out (all of
    short_out's gradient), dshort = gate * dtotal, dx = dtotal + long_weight * dy_out. Returns the
    tile's sums of dtotal * short and of dy_out * x, its terms of dgate and dlong_weight (scalars, so
    that no row-wide accumulator takes registers). The hybrid-only rows (dshort_out, short, x, dshort)
    are contiguous: their row stride is dim."""
    if HAS_DSHORT_OUT:
        dv += load_rows(dshort_out_ptr, rows, cols, dim, mask)
    store_rows(dshort_ptr, rows, cols, dim, mask, dv * gate)
    dgate = tl.sum(dv * load_rows(short_ptr, rows, cols, dim, mask))
    dlong_weight = tl.zeros_like(dgate)
    if HAS_DY_OUT:
        dy = load_rows(dy_out_ptr, rows, cols, dy_out_stride, mask)
        if LONG_WEIGHT:
            dlong_weight = tl.sum(dy * load_rows(x_ptr, rows, cols, dim, mask))
            dy = dy * long_weight
        dv += dy
    store_rows(dx_ptr, rows, cols, dx_stride, mask, dv)
    return dgate, dlong_weight


@triton.jit
def store_partial_scalars(dscalars_ptr, pid, partial_stride, dgate, dlong_weight, LONG_WEIGHT: tl.constexpr):
    """This program's dgate (and dlong_weight) sums, after its dweight and dbias partial sums."""
    tl.store(dscalars_ptr + pid * partial_stride, dgate)
    if LONG_WEIGHT:
        tl.store(dscalars_ptr + pid * partial_stride + 1, dlong_weight)


@triton.jit
def accumulate_norm_bwd_kernel(
    dout_ptr, dy_out_ptr, v_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr, dw_ptr, db_ptr,
    dshort_out_ptr, short_ptr, x_ptr, gate_ptr, long_weight_ptr, dshort_ptr, dscalars_ptr,
    n_rows, dim, dout_stride, dy_out_stride, v_stride, dx_stride, dy_stride, partial_stride,
    HAS_DY_OUT: tl.constexpr, STORE_DY: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr,
    HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr, HAS_DSHORT_OUT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Whole rows in registers; each program walks its row tiles and keeps dw, db (and the hybrid's
    dgate, dlong_weight) partial sums."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    w = load_param_row(w_ptr, cols, dim)
    gate, long_weight = boundary_scalars(gate_ptr, long_weight_ptr, HYBRID, LONG_WEIGHT)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dgate = tl.zeros((), dtype=tl.float32)
    dlong_weight = tl.zeros((), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_ROWS), tl.num_programs(0)):
        rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        mean, rstd = saved_row_stats(mean_ptr, rstd_ptr, rows, row_mask, IS_LAYERNORM)
        v_hat = renormalize(load_rows(v_ptr, rows, cols, v_stride, mask), mean, rstd, mask)
        dout = load_rows(dout_ptr, rows, cols, dout_stride, mask)
        dw += tl.sum(dout * v_hat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dout, axis=0)
        dv = norm_input_grad(dout, v_hat, w, rstd, mask, dim, IS_LAYERNORM)
        if HYBRID:
            tile_dgate, tile_dlong_weight = store_hybrid_grads(
                dv, dshort_out_ptr, dy_out_ptr, short_ptr, x_ptr, dshort_ptr, dx_ptr, gate, long_weight, rows, cols,
                dim, dy_out_stride, dx_stride, mask, HAS_DSHORT_OUT, HAS_DY_OUT, LONG_WEIGHT)
            dgate += tile_dgate
            dlong_weight += tile_dlong_weight
        else:
            store_input_grads(dv, dy_out_ptr, dx_ptr, dy_ptr, rows, cols, dy_out_stride, dx_stride, dy_stride, mask,
                              HAS_DY_OUT, STORE_DY)
    store_partial_rows(dw_ptr, db_ptr, pid, partial_stride, dim, cols, dw, db, HAS_BIAS)
    if HYBRID:
        store_partial_scalars(dscalars_ptr, pid, partial_stride, dgate, dlong_weight, LONG_WEIGHT)


@triton.jit
def chunk_grad_inputs(v_ptr, dout_ptr, w_ptr, rows, cols, v_stride, dout_stride, mask, dim, mean, rstd):
    """(v_hat, dout, w * dout) of one chunk of a wide row, as both backward passes need them."""
    v_hat = renormalize(load_rows(v_ptr, rows, cols, v_stride, mask), mean, rstd, mask)
    dout = load_rows(dout_ptr, rows, cols, dout_stride, mask)
    return v_hat, dout, dout * load_param_row(w_ptr, cols, dim)[None, :]


@triton.jit
def add_to_partial_rows(dw_ptr, db_ptr, pid, partial_stride, dim, cols, dw, db, HAS_BIAS: tl.constexpr):
    """Adds one chunk to this program's partial rows, which live in memory for wide rows."""
    partial = dw_ptr + pid * partial_stride + cols
    tl.store(partial, tl.load(partial, mask=cols < dim) + dw, mask=cols < dim)
    if HAS_BIAS:
        partial = db_ptr + pid * partial_stride + cols
        tl.store(partial, tl.load(partial, mask=cols < dim) + db, mask=cols < dim)


@triton.jit
def accumulate_norm_bwd_wide_kernel(
    dout_ptr, dy_out_ptr, v_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dy_ptr, dw_ptr, db_ptr,
    dshort_out_ptr, short_ptr, x_ptr, gate_ptr, long_weight_ptr, dshort_ptr, dscalars_ptr,
    n_rows, dim, dout_stride, dy_out_stride, v_stride, dx_stride, dy_stride, partial_stride, num_chunks,
    HAS_DY_OUT: tl.constexpr, STORE_DY: tl.constexpr, HAS_BIAS: tl.constexpr, IS_LAYERNORM: tl.constexpr,
    HYBRID: tl.constexpr, LONG_WEIGHT: tl.constexpr, HAS_DSHORT_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows wider than the registers hold: two passes over each row's chunks (the row terms,
    then the gradient). dw, db partial rows live in global memory (zeroed by the launcher), each
    owned by one program, so the sum stays deterministic; the hybrid's sums stay in registers."""
    pid = tl.program_id(0)
    chunk = tl.arange(0, BLOCK_D)
    gate, long_weight = boundary_scalars(gate_ptr, long_weight_ptr, HYBRID, LONG_WEIGHT)
    dgate = tl.zeros((), dtype=tl.float32)
    dlong_weight = tl.zeros((), dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        rows = row + tl.arange(0, 1)
        row_mask = rows < n_rows
        mean, rstd = saved_row_stats(mean_ptr, rstd_ptr, rows, row_mask, IS_LAYERNORM)
        proj = tl.zeros((1,), dtype=tl.float32)
        wdout_mean = tl.zeros((1,), dtype=tl.float32)
        for c in range(0, num_chunks):
            cols = c * BLOCK_D + chunk
            mask = (cols < dim)[None, :]
            v_hat, _, wdout = chunk_grad_inputs(v_ptr, dout_ptr, w_ptr, rows, cols, v_stride, dout_stride, mask, dim,
                                                mean, rstd)
            chunk_proj, chunk_mean = norm_grad_row_terms(wdout, v_hat, dim)
            proj += chunk_proj
            wdout_mean += chunk_mean
        for c in range(0, num_chunks):
            cols = c * BLOCK_D + chunk
            mask = (cols < dim)[None, :]
            v_hat, dout, wdout = chunk_grad_inputs(v_ptr, dout_ptr, w_ptr, rows, cols, v_stride, dout_stride, mask,
                                                   dim, mean, rstd)
            dv = norm_grad_from_terms(wdout, v_hat, rstd, proj, wdout_mean, mask, IS_LAYERNORM)
            if HYBRID:
                chunk_dgate, chunk_dlong_weight = store_hybrid_grads(
                    dv, dshort_out_ptr, dy_out_ptr, short_ptr, x_ptr, dshort_ptr, dx_ptr, gate, long_weight, rows,
                    cols, dim, dy_out_stride, dx_stride, mask, HAS_DSHORT_OUT, HAS_DY_OUT, LONG_WEIGHT)
                dgate += chunk_dgate
                dlong_weight += chunk_dlong_weight
            else:
                store_input_grads(dv, dy_out_ptr, dx_ptr, dy_ptr, rows, cols, dy_out_stride, dx_stride, dy_stride,
                                  mask, HAS_DY_OUT, STORE_DY)
            add_to_partial_rows(dw_ptr, db_ptr, pid, partial_stride, dim, cols, tl.sum(dout * v_hat, axis=0),
                                tl.sum(dout, axis=0), HAS_BIAS)
    if HYBRID:
        store_partial_scalars(dscalars_ptr, pid, partial_stride, dgate, dlong_weight, LONG_WEIGHT)


def launch_forward(x2, y2, weight, bias, eps: float, is_layernorm: bool, normalize_sum: bool,
                   out_dtype: torch.dtype | None = None, short2=None, gate=None, long_weight=None,
                   y_out_dtype: torch.dtype | None = None):
    """(y_out, out, mean, rstd, short_out) for (rows, D) views; y_out, mean and short_out are None where
    not produced. out has x's dtype unless out_dtype is given. The hybrid boundary passes short2 (a
    contiguous (rows, D) view), gate and long_weight (0-dim): short_out = gate * short + x is
    normalized, and y_out = y + long_weight * x, in y's dtype (y_out_dtype without a y)."""
    n_rows, dim = x2.shape
    device = x2.device
    hybrid, stores_y = short2 is not None, y2 is not None or long_weight is not None
    y_out = new_buffer((n_rows, dim), y2.dtype if y2 is not None else y_out_dtype, device) if stores_y else None
    out = new_buffer((n_rows, dim), out_dtype or x2.dtype, device)
    mean = new_buffer((n_rows,), torch.float32, device) if is_layernorm else None
    rstd = new_buffer((n_rows,), torch.float32, device)
    short_out = new_buffer((n_rows, dim), x2.dtype, device) if hybrid else None
    # Unused pointers get a harmless stand-in; the constexpr flags keep the kernel off them.
    args = (x2, y2 if y2 is not None else x2, weight, bias if bias is not None else weight,
            y_out if y_out is not None else out, out, mean if mean is not None else rstd, rstd,
            short2 if hybrid else x2, short_out if hybrid else out, gate if hybrid else rstd,
            long_weight if long_weight is not None else rstd,
            n_rows, dim, x2.stride(0), y2.stride(0) if y2 is not None else 0,
            y_out.stride(0) if y_out is not None else 0, out.stride(0), short2.stride(0) if hybrid else 0, eps)
    flags = dict(HAS_Y=y2 is not None, HAS_BIAS=bias is not None, IS_LAYERNORM=is_layernorm,
                 NORMALIZE_SUM=normalize_sum, HYBRID=hybrid, LONG_WEIGHT=long_weight is not None)
    if fits_in_registers(dim, FWD_PER_THREAD):
        block_rows, block_d, num_warps = row_tile(dim, FWD_PER_THREAD)
        accumulate_norm_fwd_kernel[(max(1, triton.cdiv(n_rows, block_rows)),)](
            *args, **flags, BLOCK_ROWS=block_rows, BLOCK_D=block_d, **launch_options(num_warps))
    else:
        block_d, num_chunks, num_warps = chunk_tile(dim, FWD_PER_THREAD)
        accumulate_norm_fwd_wide_kernel[(max(1, n_rows),)](
            *args, num_chunks, **flags, BLOCK_D=block_d, **launch_options(num_warps))
    return y_out, out, mean, rstd, short_out


def backward_programs(n_rows: int, dim: int, device: torch.device) -> int:
    """Programs of the backward kernel, each with its own dweight/dbias partial row."""
    if fits_in_registers(dim, BWD_PER_THREAD):
        return max(1, reduction_programs(triton.cdiv(n_rows, row_tile(dim, BWD_PER_THREAD)[0]), device))
    return max(1, reduction_programs(n_rows, device))


def launch_backward(dout2, dy_out2, v2, weight, mean, rstd, has_bias: bool, is_layernorm: bool,
                    dx_dtype: torch.dtype, dy_dtype: torch.dtype | None, hybrid: dict | None = None):
    """(dx, dy, dparams, dshort): dparams, float32 (partial_width,), holds dweight, dbias and the
    hybrid's dgate and dlong_weight, reduced in one launch; dy only when dy_dtype is given. `hybrid`
    (the hybrid boundary): contiguous (rows, D) dshort_out (or None), short and x, and gate and
    long_weight (or None); dshort = gate * (the norm's gradient + dshort_out)."""
    n_rows, dim = v2.shape
    device = v2.device
    wide = not fits_in_registers(dim, BWD_PER_THREAD)
    programs = backward_programs(n_rows, dim, device)
    if wide:
        block_d, num_chunks, num_warps = chunk_tile(dim, BWD_PER_THREAD)
    else:
        block_rows, block_d, num_warps = row_tile(dim, BWD_PER_THREAD)
    hybrid = hybrid or {}
    long_weight = hybrid.get("long_weight")
    dx = new_buffer((n_rows, dim), dx_dtype, device)
    dy = new_buffer((n_rows, dim), dy_dtype, device) if dy_dtype is not None else None
    dshort = new_buffer((n_rows, dim), hybrid["short"].dtype, device) if hybrid else None
    scalars = (1 + (long_weight is not None)) if hybrid else 0
    width = partial_width(dim, has_bias, scalars)
    partials = new_partial_rows(programs, width, device, zeroed=wide)  # the wide kernel adds into them
    dshort_out = hybrid.get("dshort_out")
    args = (dout2, dy_out2 if dy_out2 is not None else dout2, v2, weight,
            mean if mean is not None else rstd, rstd, dx, dy if dy is not None else dx, partials, partials[:, dim:],
            dshort_out if dshort_out is not None else dx, hybrid.get("short", dx), hybrid.get("x", dx),
            hybrid.get("gate", rstd), long_weight if long_weight is not None else rstd,
            dshort if hybrid else dx, partials[:, (1 + has_bias) * dim:],
            n_rows, dim, dout2.stride(0), dy_out2.stride(0) if dy_out2 is not None else 0, v2.stride(0),
            dx.stride(0), dy.stride(0) if dy is not None else 0, width)
    flags = dict(HAS_DY_OUT=dy_out2 is not None, STORE_DY=dy is not None, HAS_BIAS=has_bias,
                 IS_LAYERNORM=is_layernorm, HYBRID=bool(hybrid), LONG_WEIGHT=long_weight is not None,
                 HAS_DSHORT_OUT=dshort_out is not None)
    if wide:
        accumulate_norm_bwd_wide_kernel[(programs,)](
            *args, num_chunks, **flags, BLOCK_D=block_d, **launch_options(num_warps))
    else:
        accumulate_norm_bwd_kernel[(programs,)](
            *args, **flags, BLOCK_ROWS=block_rows, BLOCK_D=block_d, **launch_options(num_warps))
    return dx, dy, sum_partial_rows(partials[:, :(1 + has_bias) * dim + scalars]), dshort


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
