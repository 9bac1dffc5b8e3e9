"""The Triton row engine of the boundary ops: whole rows (or chunks of wider ones) of a norm, with the
running sum (and the hybrid's short path) on the way, forward and backward. accumulate_norm is it
plainly; hybrid_accumulate_norm turns on its HYBRID path (the short state normalized, the long weight
on x into the sum, dgate and dlong_weight beside dweight and dbias); probe_norm calls its launchers for
rows too wide for its own kernels. The twin of csrc/boundary_norm.cuh, as the CUDA backend has it.

Forward, per row: y_out = y + long_weight x, short_out = gate short + x (HYBRID), then the norm of x,
of the sum (NORMALIZE_SUM) or of short_out (HYBRID). Backward: the norm's gradient into the row's
input, plus dy_out (the running sum's gradient, the fan-out) and, for the hybrid, dshort_out; the
parameters' gradients as per-program partial rows, summed in one more launch (deterministic). See
accumulate_norm.py and hybrid_accumulate_norm.py for the math and the bytes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (affine, chunk_tile, fits_in_registers, in_dtype_of, launch_options, load_param_row, load_rows,
                      new_buffer, new_partial_rows, norm_grad_from_terms, norm_grad_row_terms, norm_input_grad,
                      normalize_tile, partial_width, reduction_programs, renormalize, row_tile, saved_row_stats,
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
