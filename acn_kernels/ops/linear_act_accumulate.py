"""linear_act_accumulate: an MLP layer of an ACN with the running sum in its GEMM epilogue.

Math, for x (..., K), weight (N, K) as in nn.Linear, bias (N,) or None, y None or (..., N):

    z     = x @ weight.T + bias
    h     = act(z)                         act in relu, gelu, gelu_tanh, silu, identity
    y_out = y + h                          (y is None: y_out is h itself, no copy)

Backward, with dh and dy_out the gradients of the two outputs (h feeds the next layer, y_out the
long connection; both reach z):

    dz = (dh + dy_out) * act'(z)           one fused elementwise pass
    dx = dz @ weight,  dweight = dz.T @ x,  dbias = sum over rows of dz   (cuBLAS via torch.matmul)
    dy = dy_out                            (the same tensor, no copy)

Bytes beyond the GEMM's own operands, for M rows, A = M*N elements at x's size, A_y at y's size:

    forward epilogue   reads bias, y (A_y)      writes h (A), y_out (A_y), z (A; gelu, gelu_tanh, silu)
    backward pass      reads dh, dy_out, z or h (A + A_y + A)      writes dz (A)

Eager PyTorch writes z, then h, then reads both for y + h, and in backward adds dh + dy_out and
multiplies by act'(z) in separate passes: about 5A more per layer (ACN-NOTES section 5).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._validation import check_choice
from ..backend import resolve_backend
from ._common import (check_device, check_running_sum, check_shape, check_tensor, dot_in_fp32, new_buffer,
                      register_cuda_twin, rows_of)

ACTIVATIONS = tuple(reference.ACTIVATIONS)
# act'(z) needs z itself for these; relu reads h > 0 and identity needs nothing.
# The constants are constexpr globals; each expression keeps a tensor on the left of them, since
# constexpr * tensor stays a constexpr under Triton's interpreter and then fails.
NEEDS_PREACTIVATION = ("gelu", "gelu_tanh", "silu")
SQRT_HALF = tl.constexpr(0.7071067811865476)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_TANH_CUBIC = tl.constexpr(0.044715)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    out = z
    if ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
    if ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))
    if ACTIVATION == "gelu_tanh":
        tanh = 2.0 * tl.sigmoid((z + z * z * z * GELU_TANH_CUBIC) * SQRT_2_OVER_PI * 2.0) - 1.0
        out = 0.5 * z * (1.0 + tanh)
    if ACTIVATION == "silu":
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def activation_grad(saved, ACTIVATION: tl.constexpr):
    """act'(z) from what the forward saved: z, or h for relu."""
    grad = tl.full(saved.shape, 1.0, tl.float32)
    if ACTIVATION == "relu":
        grad = tl.where(saved > 0.0, 1.0, 0.0)
    if ACTIVATION == "gelu":
        grad = 0.5 * (1.0 + tl.math.erf(saved * SQRT_HALF)) + saved * INV_SQRT_2PI * tl.exp(-0.5 * saved * saved)
    if ACTIVATION == "gelu_tanh":
        inner = (saved + saved * saved * saved * GELU_TANH_CUBIC) * SQRT_2_OVER_PI
        tanh = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        grad = 0.5 * (1.0 + tanh) + 0.5 * saved * (1.0 - tanh * tanh) * SQRT_2_OVER_PI * (
            1.0 + saved * saved * GELU_TANH_CUBIC * 3.0)
    if ACTIVATION == "silu":
        sig = tl.sigmoid(saved)
        grad = sig * (1.0 + saved * (1.0 - sig))
    return grad


@triton.jit
def nearest_bf16(v):
    """v rounded to the nearest bfloat16 (ties to even), still float32: Triton's interpreter converts
    float32 to bfloat16 by truncation where a GPU rounds, and a truncated h fed to the next GEMM
    doubles the error. Used only where DOT_IN_FP32 (interpreting bfloat16) is set (in_dtype_of)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def in_dtype_of(ptr, value, DOT_IN_FP32: tl.constexpr):
    """A float32 value in ptr's element dtype, rounded to nearest where the interpreter would truncate."""
    if DOT_IN_FP32 and ptr.dtype.element_ty == tl.bfloat16:
        value = nearest_bf16(value)
    return value.to(ptr.dtype.element_ty)


@triton.jit
def linear_act_accumulate_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, h_ptr, z_ptr, y_out_ptr,
    M, N, K, x_stride_m, x_stride_k, w_stride_n, w_stride_k,
    ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Y: tl.constexpr, STORE_Z: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, TIMES_ACTIVATION_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row-blocks walk the column-blocks together, so weight tiles stay in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_stride_m + ks[None, :] * x_stride_k
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * w_stride_n + ks[:, None] * w_stride_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        a = tl.load(x_ptrs, mask=(rows < M)[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & (cols < N)[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * x_stride_k
        w_ptrs += BLOCK_K * w_stride_k

    # The epilogue's four (M, N) tensors are contiguous, so one offset tile serves them all and
    # the register budget goes to the accumulator rather than to four 64-bit pointer tiles.
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tile_start = (pid_m * BLOCK_M).to(tl.int64) * N  # 64-bit once; 32-bit offsets inside the tile
    offsets = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    if TIMES_ACTIVATION_GRAD:
        # feed_forward's backward: dz = (dout @ w2) * act'(z), from what the forward saved (at z_ptr).
        if ACTIVATION != "identity":
            acc *= activation_grad(tl.load(z_ptr + tile_start + offsets, mask=mask, other=0.0).to(tl.float32),
                                   ACTIVATION)
        tl.store(h_ptr + tile_start + offsets, in_dtype_of(h_ptr, acc, DOT_IN_FP32), mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if STORE_Z:
            tl.store(z_ptr + tile_start + offsets, in_dtype_of(z_ptr, acc, DOT_IN_FP32), mask=mask)
        h = in_dtype_of(h_ptr, activation(acc, ACTIVATION), DOT_IN_FP32)
        tl.store(h_ptr + tile_start + offsets, h, mask=mask)
        if HAS_Y:
            y = tl.load(y_ptr + tile_start + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_out_ptr + tile_start + offsets, in_dtype_of(y_out_ptr, y + h.to(tl.float32), DOT_IN_FP32),
                     mask=mask)


@triton.jit
def activation_backward_kernel(
    dh_ptr, dy_out_ptr, saved_ptr, dz_ptr, n_elements,
    HAS_DH: tl.constexpr, HAS_DY_OUT: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    grad = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_DH:
        grad += tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DY_OUT:
        grad += tl.load(dy_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION != "identity":
        saved = tl.load(saved_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad *= activation_grad(saved, ACTIVATION)
    tl.store(dz_ptr + offsets, grad.to(dz_ptr.dtype.element_ty), mask=mask)


ELEMENTWISE_BLOCK = 1024


def gemm_tiles(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes: 128x64 output tiles with 8 warps, smaller for small problems (tl.dot needs 16).
    compile-report shows 128x128 tiles spilling on sm_80 with this epilogue, and float32 with a
    K step of 32; these do not."""
    def fit(size: int, most: int) -> int:
        return max(16, min(most, triton.next_power_of_2(size)))

    block_m, block_n = fit(M, 128), fit(N, 64)
    block_k = fit(K, 16 if dtype == torch.float32 else 64)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m * block_n >= 64 * 64 else 4, num_stages=3)


def input_precision(dtype: torch.dtype) -> str:
    """float32 GEMMs follow torch's own switch, so the kernel and eager agree on using TF32."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_forward(x2, weight, bias, y2, act: str):
    """(h, y_out, saved) for x2 (M, K); saved is z or h (what act' needs) or None for identity."""
    M, K = x2.shape
    N = weight.shape[0]
    device, dtype = x2.device, x2.dtype
    h = new_buffer((M, N), dtype, device)
    z = new_buffer((M, N), dtype, device) if act in NEEDS_PREACTIVATION else None
    y_out = new_buffer((M, N), y2.dtype, device) if y2 is not None else None
    tiles = gemm_tiles(M, N, K, dtype)
    grid = (max(1, triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"])),)
    linear_act_accumulate_fwd_kernel[grid](
        x2, weight, bias if bias is not None else weight, y2 if y2 is not None else h, h,
        z if z is not None else h, y_out if y_out is not None else h,
        M, N, K, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        ACTIVATION=act, HAS_BIAS=bias is not None, HAS_Y=y2 is not None, STORE_Z=z is not None,
        DOT_IN_FP32=dot_in_fp32(dtype), INPUT_PRECISION=input_precision(dtype), TIMES_ACTIVATION_GRAD=False,
        **tiles)
    saved = z if z is not None else (h if act == "relu" else None)
    return h, y_out, saved


def launch_activation_backward(dh, dy_out, saved, act: str, shape, dtype, device):
    """dz = (dh + dy_out) * act'(z) over contiguous (M, N) buffers."""
    dz = new_buffer(shape, dtype, device)
    n_elements = dz.numel()
    dh = dh.contiguous() if dh is not None else None
    dy_out = dy_out.contiguous() if dy_out is not None else None
    stand_in = dz
    activation_backward_kernel[(max(1, triton.cdiv(n_elements, ELEMENTWISE_BLOCK)),)](
        dh if dh is not None else stand_in, dy_out if dy_out is not None else stand_in,
        saved if saved is not None else stand_in, dz, n_elements,
        HAS_DH=dh is not None, HAS_DY_OUT=dy_out is not None, ACTIVATION=act, BLOCK=ELEMENTWISE_BLOCK)
    return dz


# ----------------------------------------------------------------------------- registered ops
# Custom ops for torch.compile and opcheck (see accumulate_norm). Outputs an op does not produce
# come back empty: y_out without y, and the saved pre-activation where act' does not need z
# (for relu the autograd formula keeps h itself, which an op may not return twice).

@torch.library.custom_op("acn_kernels::linear_act_accumulate_fwd", mutates_args=())
def linear_act_accumulate_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              y: Optional[torch.Tensor], activation: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, y_out, z)."""
    y2 = rows_of(y).contiguous() if y is not None else None  # the epilogue's layout
    h, y_out, z = launch_forward(rows_of(x), weight, bias.contiguous() if bias is not None else None, y2, activation)
    out_shape = (*x.shape[:-1], weight.shape[0])
    empty = h.new_empty(0)
    return (h.view(out_shape), y_out.view(out_shape) if y_out is not None else empty,
            z.view(out_shape) if activation in NEEDS_PREACTIVATION else empty.clone())


@linear_act_accumulate_fwd.register_fake
def linear_act_accumulate_fwd_fake(x, weight, bias, y, activation):
    out_shape = (*x.shape[:-1], weight.shape[0])
    return (x.new_empty(out_shape), x.new_empty(out_shape, dtype=y.dtype) if y is not None else x.new_empty(0),
            x.new_empty(out_shape if activation in NEEDS_PREACTIVATION else (0,)))


@torch.library.custom_op("acn_kernels::activation_backward", mutates_args=())
def activation_backward(dh: Optional[torch.Tensor], dy_out: Optional[torch.Tensor], saved: Optional[torch.Tensor],
                        activation: str, dtype: torch.dtype) -> torch.Tensor:
    """dz = (dh + dy_out) * act'(z) in `dtype` (x's), shaped like the gradients."""
    shape = next(t.shape for t in (dh, dy_out) if t is not None)
    rows = (shape.numel() // shape[-1], shape[-1])
    flat = [t.reshape(rows) if t is not None else None for t in (dh, dy_out, saved)]
    device = next(t.device for t in (dh, dy_out) if t is not None)
    return launch_activation_backward(*flat, activation, rows, dtype, device).view(shape)


@activation_backward.register_fake
def activation_backward_fake(dh, dy_out, saved, activation, dtype):
    grad = dh if dh is not None else dy_out
    return grad.new_empty(grad.shape, dtype=dtype)


# ----------------------------------------------------------------------------- autograd

def setup_context(ctx, inputs, output):
    x, weight, bias, y, activation = inputs
    h, _, z = output
    saved = z if activation in NEEDS_PREACTIVATION else (h if activation == "relu" else None)
    ctx.save_for_backward(x, weight, saved)
    ctx.set_materialize_grads(False)  # unused outputs send None, not a zero-filled tensor
    ctx.activation, ctx.has_y, ctx.has_bias = activation, y is not None, bias is not None


def make_backward(activation_backward_op):
    def backward(ctx, dh, dy_out, _dz):
        """dz = (dh + dy_out) * act'(z) in one kernel, then dx, dweight, dbias by cuBLAS; dy = dy_out."""
        x, weight, saved = ctx.saved_tensors
        dy_out = dy_out if ctx.has_y else None
        dz = activation_backward_op(dh, dy_out, saved, ctx.activation, x.dtype)
        dz2 = dz.reshape(-1, weight.shape[0])
        dx = (dz2 @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        dweight = dz2.t() @ rows_of(x) if ctx.needs_input_grad[1] else None
        dbias = dz2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None  # float32 accumulation inside
        return dx, dweight, dbias, dy_out, None
    return backward


linear_act_accumulate_fwd.register_autograd(make_backward(activation_backward), setup_context=setup_context)
FORWARD_OPS = {"triton": linear_act_accumulate_fwd,
               "cuda": register_cuda_twin("linear_act_accumulate_fwd", "activation_backward",
                                          linear_act_accumulate_fwd_fake, activation_backward_fake, make_backward,
                                          setup_context)}


def cast_for_autocast(device_type: str, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def check_linear(weight_name: str, weight, bias_name: str, bias, x: torch.Tensor, in_features: int | None = None):
    """weight (out_features, in_features: x's last dimension by default) and bias (out_features,) or
    None, of x's dtype and on x's device."""
    in_features = x.shape[-1] if in_features is None else in_features
    check_tensor(weight_name, weight, dtypes=(x.dtype,))
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ValueError(f"{weight_name} must have shape (out_features, {in_features}), got {tuple(weight.shape)}")
    check_device(weight_name, weight, x.device)
    if bias is not None:
        check_tensor(bias_name, bias, dtypes=(x.dtype,))
        check_shape(bias_name, bias, (weight.shape[0],))
        check_device(bias_name, bias, x.device)


def linear_act_accumulate(x, weight, bias, y, *, activation="gelu", backend="auto"):
    """Returns (h, y_out): h = act(x @ weight.T + bias), y_out = y + h. See the module docstring.
    Under autocast, x, weight and bias are cast to the autocast dtype as nn.Linear's are; y is not."""
    check_tensor("x", x)
    if torch.is_autocast_enabled(x.device.type):
        x, weight, bias = cast_for_autocast(x.device.type, x, weight, bias)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., K), got a 0-d tensor")
    check_linear("weight", weight, "bias", bias, x)
    check_running_sum(y, (*x.shape[:-1], weight.shape[0]), x.dtype, x.device)
    check_choice("activation", activation, ACTIVATIONS)
    resolved = resolve_backend(backend, x.device)
    if resolved == "reference":
        return reference.linear_act_accumulate(x, weight, bias, y, activation=activation)
    return run_forward(FORWARD_OPS[resolved], x, weight, bias, y, activation)


def run_forward(forward_op, x, weight, bias, y, activation):
    """(h, y_out) from a registered forward op of any backend."""
    h, y_out, _ = forward_op(x, weight, bias, y, activation)
    return h, (h if y is None else y_out)


def traffic_bound(x, weight, bias, y, *, activation="gelu") -> tuple[int, int]:
    """The module docstring's byte counts plus the GEMMs' operands, (forward, backward). Checked
    by the traffic tests."""
    n, k = weight.shape
    m = x.numel() // k
    e = x.element_size()
    a, a_y = m * n * e, (m * n * y.element_size() if y is not None else 0)
    z = a if activation in NEEDS_PREACTIVATION else 0
    bias_bytes = n * e if bias is not None else 0
    forward = (m * k * e + n * k * e + bias_bytes + a_y) + (a + a_y + z)
    saved = a if activation != "identity" else 0
    elementwise = (a + a_y + saved) + a                        # dh, dy_out, z or h -> dz
    gemms = (a + n * k * e + m * k * e) + (a + m * k * e + n * k * e)  # dx = dz W, dW = dz^T x
    bias_grad = (a + n * e) if bias is not None else 0
    return forward, elementwise + gemms + bias_grad
