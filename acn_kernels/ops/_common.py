"""What the fused ops share: argument checks, the (rows, D) view of a tensor, output allocation,
launch sizes, and the Triton helpers for a tile of normalized rows."""
from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl

from .._validation import check_choice
from ..backend import CUDA_EXTENSION, TRITON_INTERPRETED

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- argument checks

def check_tensor(name: str, value, dtypes=FLOAT_DTYPES, like: str | None = None) -> torch.Tensor:
    """A tensor of one of `dtypes`; `like` names the argument they come from, in the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(dtypes)}{f' like {like}' if like else ''}, "
                        f"got {value.dtype}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: tuple, source: str | None = None) -> None:
    """`source` says which argument the expected shape comes from, in the message."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{f' ({source})' if source else ''}, "
                         f"got {tuple(value.shape)}")


def check_device(name: str, value: torch.Tensor, device: torch.device, like: str = "x") -> None:
    if value.device != device:
        raise ValueError(f"{name} must be on {device} like {like}, got {value.device}")


def check_running_sum(y, shape: tuple, dtype: torch.dtype, device: torch.device, source: str = "x's shape") -> None:
    """y is None (the chain's start) or a tensor of the block output's shape, in its dtype or float32."""
    if y is None:
        return
    check_tensor("y", y, dtypes=tuple(dict.fromkeys((dtype, torch.float32))), like="x (or float32)")
    check_shape("y", y, shape, source)
    check_device("y", y, device)


def check_norm_params(weight, bias, dim: int, device: torch.device, like: str = "x") -> None:
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None and name == "bias":
            continue
        check_tensor(name, param)
        check_shape(name, param, (dim,), f"the last dimension of {like}")
        check_device(name, param, device, like)


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def check_norm_kind(norm: str) -> None:
    check_choice("norm", norm, ("layernorm", "rmsnorm"))


# ----------------------------------------------------------------------------- tensors and launches

def rows_of(t: torch.Tensor) -> torch.Tensor:
    """(rows, D) view of t; copies only if the last stride is not 1 or the leading dims do not fold."""
    if t.dim() > 0 and t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def new_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here. ACN_KERNELS_POISON=1 fills it first, with NaN (with the
    lowest integer for an integer output: an index no row has), so an element a kernel fails to write
    shows up in the result."""
    if os.environ.get("ACN_KERNELS_POISON") == "1":
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def partial_width(dim: int, has_bias: bool, scalars: int = 0) -> int:
    """Columns of a norm backward's partial rows: dweight's D, dbias's D, then `scalars` single sums
    (the hybrid's dgate and dlong_weight), padded to 8 floats so every program's row starts 32-byte
    aligned for the CUDA kernels' packed stores (the padding is neither written nor summed)."""
    width = (1 + has_bias) * dim + scalars
    return width if not scalars else -(-width // 8) * 8


def new_partial_rows(programs: int, width: int, device: torch.device, zeroed: bool = False) -> torch.Tensor:
    """float32 (programs, width): each program of a norm backward writes its partial sums of dweight,
    dbias (and scalars, see partial_width) into its own row, so that one launch sums them all (and
    one zeroes them, where a kernel adds into them)."""
    if zeroed:
        return torch.zeros((programs, width), dtype=torch.float32, device=device)
    return new_buffer((programs, width), torch.float32, device)


def sum_partial_rows(partials: torch.Tensor) -> torch.Tensor:
    """float32 (width,): every partial sum reduced in one launch; the autograd formulas slice it and
    cast each parameter's gradient to that parameter's dtype."""
    return partials.sum(0)


def parameter_spec(param: torch.Tensor | None):
    """(shape, dtype) of a parameter whose gradient comes from partial rows, or None; what the
    autograd formulas keep of a parameter they do not save."""
    return None if param is None else (param.shape, param.dtype)


def parameter_grads(dparams: torch.Tensor, *specs) -> list:
    """The gradients of the parameters that `specs` describe (parameter_spec's, in partial_width's
    column order) from a reduced partial row, each shaped and typed like its parameter; None where a
    spec is None (that parameter has no columns). Adjacent parameters of one dtype share one cast (a
    norm's 16-bit weight and bias: one launch)."""
    grads, start = [None] * len(specs), 0
    present = [(i, spec) for i, spec in enumerate(specs) if spec is not None]
    for dtype, group in itertools.groupby(present, key=lambda item: item[1][1]):
        group = list(group)
        size = sum(shape.numel() for _, (shape, _) in group)
        cast = dparams[start:start + size].to(dtype)
        for i, (shape, _) in group:
            grads[i] = cast[:shape.numel()].view(shape)
            cast = cast[shape.numel():]
        start += size
    return grads


MAX_WARPS = 16  # 512 threads a program keep 128 registers each


def fits_in_registers(dim: int, per_thread: int) -> bool:
    """Whether a whole row of width dim fits in one program at `per_thread` elements a thread."""
    return triton.next_power_of_2(dim) <= MAX_WARPS * 32 * per_thread


def row_tile(dim: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_D, num_warps) for a kernel that holds whole rows in registers: about 2K
    elements a tile, at most `per_thread` of them per thread, the most that kernel's live values
    allow without spilling (compile-report checks every tile this returns). Up to 32 rows, so that
    even the narrowest tile gives each thread a whole row of 16 bytes: one 16-byte access."""
    block_d = triton.next_power_of_2(dim)
    block_rows = max(1, min(32, 2048 // block_d))
    num_warps = min(MAX_WARPS, max(1, block_rows * block_d // (32 * per_thread)))
    return block_rows, block_d, num_warps


def launch_options(num_warps: int) -> dict:
    """Launch options of the norm kernels. An explicit register budget (the most one program may
    use) because, left alone, ptxas trades a few bytes of spills for occupancy on some tiles."""
    return {"num_warps": num_warps, "maxnreg": min(255, 65536 // (32 * num_warps))}


TRITON_RELEASE = tuple(int(part) for part in triton.__version__.split(".")[:2])
# Triton 3.8 spills 8 bytes of the hybrid's chunked backward at 16 warps (its 128-register budget,
# sm_90, unaligned; compile-report); there the chunk's threads halve and each keeps twice the elements.
CHUNK_WARPS = {(3, 8): MAX_WARPS // 2}


def chunk_tile(dim: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_D, num_chunks, num_warps) for a row too wide for registers, walked in chunks."""
    block_d = MAX_WARPS * 32 * per_thread
    return block_d, triton.cdiv(dim, block_d), CHUNK_WARPS.get(TRITON_RELEASE, MAX_WARPS)


def sm_count(device: torch.device) -> int | None:
    """The GPU's SM count; None under Triton's interpreter, which has no SMs to fill."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def reduction_programs(tiles: int, device: torch.device) -> int:
    """Programs of a kernel that also reduces dweight/dbias: each keeps one partial row, and the
    fixed count makes the final sum deterministic for a given device and shape. The interpreter
    takes 8, so that it walks rows in the persistent loop too."""
    sms = sm_count(device)
    return min(tiles, 4 * sms if sms else 8)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes tl.dot on bf16 operands wrongly; there (never on a GPU) the
    operands are upcast first."""
    return TRITON_INTERPRETED and dtype == torch.bfloat16


def first_order(op: str, backward):
    """`backward`, an autograd formula that runs kernels, refusing a gradient of its gradient
    (torch.autograd.grad(..., create_graph=True), the only way grad mode is on in a backward): its
    kernels' outputs carry no graph, so that gradient would come back silently None."""
    @functools.wraps(backward)
    def first_order_backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{op}: the gradient of its gradient (create_graph=True) is not computed by the fused "
                               f"kernels; use backend='reference' for higher-order gradients")
        return backward(ctx, *grads)
    return first_order_backward


def register_cuda_twin(forward_name: str, backward_name: str, forward_fake, backward_fake, make_backward,
                       setup_context):
    """Gives the CUDA extension's op pair (acn_kernels_cuda::*, the Triton pair's schemas) the same
    fake implementations and autograd formula; returns its forward op, or None when not built."""
    if CUDA_EXTENSION is None:
        return None
    for name, fake in ((forward_name, forward_fake), (backward_name, backward_fake)):
        torch.library.register_fake(f"acn_kernels_cuda::{name}")(fake)
    backward_op = getattr(torch.ops.acn_kernels_cuda, backward_name)
    op = forward_name.removesuffix("_fwd")
    torch.library.register_autograd(f"acn_kernels_cuda::{forward_name}", first_order(op, make_backward(backward_op)),
                                    setup_context=setup_context)
    return getattr(torch.ops.acn_kernels_cuda, forward_name)


# ----------------------------------------------------------------------------- Triton helpers

# Triton's interpreter converts float32 to bfloat16 by truncation where a GPU rounds to nearest, a bias
# that sums up in reductions (a gate's gradient) and doubles a GEMM's error when its truncated output
# feeds the next GEMM; there the kernels round to nearest by hand (a constant False on a GPU).
ROUND_BF16_BY_HAND = tl.constexpr(TRITON_INTERPRETED)


@triton.jit
def nearest_bf16(v):
    """float32 v rounded to the nearest bfloat16 (ties to even), still float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def in_dtype_of(ptr, value):
    """value in ptr's element dtype, rounded to nearest as a GPU rounds (see ROUND_BF16_BY_HAND)."""
    if ROUND_BF16_BY_HAND:
        if ptr.dtype.element_ty == tl.bfloat16:
            value = nearest_bf16(value.to(tl.float32))
    return value.to(ptr.dtype.element_ty)


@triton.jit
def load_rows(ptr, rows, cols, stride, mask):
    """A (BLOCK_ROWS, BLOCK_D) tile of a (rows, D) matrix as float32; 64-bit row offsets."""
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_rows(ptr, rows, cols, stride, mask, value):
    offsets = rows.to(tl.int64)[:, None] * stride + cols[None, :]
    tl.store(ptr + offsets, in_dtype_of(ptr, value), mask=mask)


@triton.jit
def load_param_row(ptr, cols, dim):
    """A norm parameter (weight or bias) as a float32 row."""
    return tl.load(ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)


@triton.jit
def affine(v_hat, w_ptr, b_ptr, cols, dim, HAS_BIAS: tl.constexpr):
    """v_hat * w (+ b) for a (rows, cols) tile."""
    out = v_hat * load_param_row(w_ptr, cols, dim)[None, :]
    if HAS_BIAS:
        out += load_param_row(b_ptr, cols, dim)[None, :]
    return out


@triton.jit
def store_partial_rows(dw_ptr, db_ptr, pid, partial_stride, dim, cols, dw, db, HAS_BIAS: tl.constexpr):
    """This program's dweight (and dbias) partial sums, into its row of the partial rows."""
    tl.store(dw_ptr + pid * partial_stride + cols, dw, mask=cols < dim)
    if HAS_BIAS:
        tl.store(db_ptr + pid * partial_stride + cols, db, mask=cols < dim)


@triton.jit
def normalize_tile(v, mask, dim, eps, IS_LAYERNORM: tl.constexpr):
    """(mean, rstd, v_hat) of each row of a float32 tile; mean is 0 for RMSNorm."""
    if IS_LAYERNORM:
        mean = tl.sum(v, axis=1) / dim
        v = tl.where(mask, v - mean[:, None], 0.0)
    else:
        mean = tl.zeros_like(tl.sum(v, axis=1))
    rstd = tl.rsqrt(tl.sum(v * v, axis=1) / dim + eps)
    return mean, rstd, v * rstd[:, None]


@triton.jit
def saved_row_stats(mean_ptr, rstd_ptr, rows, row_mask, IS_LAYERNORM: tl.constexpr):
    """The forward's (mean, rstd) of each row; mean is 0 for RMSNorm (no mean was stored)."""
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    mean = tl.zeros_like(rstd)
    if IS_LAYERNORM:
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    return mean, rstd


@triton.jit
def renormalize(v, mean, rstd, mask):
    """v_hat = (v - mean) * rstd of a float32 tile, from saved statistics; 0 where masked."""
    return tl.where(mask, (v - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def norm_grad_row_terms(wdout, v_hat, dim):
    """The two row means that the norm backward needs: mean(w*dout*v_hat) and mean(w*dout)."""
    return tl.sum(wdout * v_hat, axis=1) / dim, tl.sum(wdout, axis=1) / dim


@triton.jit
def norm_grad_from_terms(wdout, v_hat, rstd, proj, wdout_mean, mask, IS_LAYERNORM: tl.constexpr):
    """dLoss/dv of out = v_hat * w + b, given wdout = w * dLoss/dout and the row terms."""
    dv = wdout - v_hat * proj[:, None]
    if IS_LAYERNORM:
        dv -= wdout_mean[:, None]
    return tl.where(mask, dv * rstd[:, None], 0.0)


@triton.jit
def norm_input_grad(dout, v_hat, w, rstd, mask, dim, IS_LAYERNORM: tl.constexpr):
    """dLoss/dv for whole rows held in registers (float32 tiles)."""
    wdout = dout * w[None, :]
    proj, wdout_mean = norm_grad_row_terms(wdout, v_hat, dim)
    return norm_grad_from_terms(wdout, v_hat, rstd, proj, wdout_mean, mask, IS_LAYERNORM)
