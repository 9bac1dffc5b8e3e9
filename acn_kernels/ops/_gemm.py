"""The GEMM kernel every linear op shares, with its three epilogues, and their launchers.

    out = a @ b.T   a (M, K), b (N, K), both read through their strides, float32 accumulation

    epilogue "forward"                z = out + bias, h = act(z), y_out = y + h
                                      (linear_act_accumulate, feed_forward's first linear)
    epilogue "times_activation_grad"  dz = out * act'(z)   (feed_forward's backward: dz = (dout @ w2) * act'(z))

swiglu (a gated linear unit, Llama's MLP): b is (2N, K), rows [0, N) the gate projection and [N, 2N)
the up projection, z = [z_gate | z_up] is (M, 2N) and h = silu(z_gate) * z_up is (M, N). Each program
accumulates both halves of its N columns (two dots on the same a tile), so the pairing needs no
second pass; the backward epilogue writes both halves of dz: dz_gate = dh * z_up * silu'(z_gate),
dz_up = dh * silu(z_gate).
    epilogue "weight_grad"            dweight = out, dbias = the row sums of a
                                      (a = dout.T, b = x.T: dweight = dout.T @ x, dbias = sum of dout's rows)

The weight gradient's bias term is what cuBLASLt calls a BGRADA epilogue: the row sums of the tiles
of dout.T the GEMM loads anyway, so the bias gradient costs no launch and no read of its own (eager
PyTorch reads dout once more in a sum launch). Only the programs of the first column of output tiles
store it, from the same loads, so it stays deterministic.
"""
from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import (TRITON_RELEASE, check_device, check_shape, check_tensor, dot_in_fp32, in_dtype_of, new_buffer,
                      rows_of, sm_count)

# act'(z) needs z itself for these; relu reads h > 0 and identity needs nothing.
# The constants are constexpr globals; each expression keeps a tensor on the left of them, since
# constexpr * tensor stays a constexpr under Triton's interpreter and then fails.
NEEDS_PREACTIVATION = ("gelu", "gelu_tanh", "silu", "swiglu")
GATED = ("swiglu",)  # activations of a (gate, up) pair: z is twice h's width
ACTIVATIONS = tuple(reference.ACTIVATIONS)  # in this order: csrc/row_math.h's codes
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
def swiglu_grads(dh, gate, up):
    """(dz_gate, dz_up) of h = silu(gate) * up, float32 tiles."""
    sig = tl.sigmoid(gate)
    return dh * up * sig * (1.0 + gate * (1.0 - sig)), dh * gate * sig


@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, bias_ptr, y_ptr, h_ptr, z_ptr, y_out_ptr,
    M, N, K, a_stride_m, a_stride_k, b_stride_n, b_stride_k,
    EPILOGUE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Y: tl.constexpr,
    STORE_H: tl.constexpr, STORE_Z: tl.constexpr, DOT_IN_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """h_ptr receives the (M, N) result of every epilogue (h, dz or dweight; "forward" skips h when
    STORE_H is off: only y_out is wanted); bias_ptr is the bias read by "forward" and the bias gradient
    written by "weight_grad"; z_ptr is z, written by "forward" and read by "times_activation_grad".
    swiglu: b, bias and z hold (gate, up) pairs, N apart; "times_activation_grad" writes dz, (M, 2N)."""
    # Grouped order: GROUP_M row-blocks walk the column-blocks together, so b's tiles stay in L2.
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
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * a_stride_m + ks[None, :] * a_stride_k
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * b_stride_n + ks[:, None] * b_stride_k
    up_shift = tl.cast(N, tl.int64) * b_stride_n  # the up projection's rows, N after the gate's (swiglu)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sums = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + ks) < K
        b_mask = k_mask[:, None] & (cols < N)[None, :]
        a = tl.load(a_ptrs, mask=(rows < M)[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if EPILOGUE == "weight_grad" and HAS_BIAS:
            row_sums += tl.sum(a.to(tl.float32), axis=1)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if ACTIVATION == "swiglu" and EPILOGUE == "forward":
            b_up = tl.load(b_ptrs + up_shift, mask=b_mask, other=0.0)
            if DOT_IN_FP32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * a_stride_k
        b_ptrs += BLOCK_K * b_stride_k

    # The epilogue's (M, N) tensors are contiguous, so one offset tile serves them all and the
    # register budget goes to the accumulator rather than to several 64-bit pointer tiles.
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tile_start = (pid_m * BLOCK_M).to(tl.int64) * N  # 64-bit once; 32-bit offsets inside the tile
    offsets = tl.arange(0, BLOCK_M)[:, None] * N + cols[None, :]
    if EPILOGUE == "weight_grad":
        tl.store(h_ptr + tile_start + offsets, in_dtype_of(h_ptr, acc), mask=mask)
        if HAS_BIAS:
            if pid_n == 0:
                tl.store(bias_ptr + rows, in_dtype_of(bias_ptr, row_sums), mask=rows < M)
    # A GLU's z and dz rows are 2N wide: the gate half at cols, the up half N further.
    pair_start = tile_start * 2
    pair_offsets = tl.arange(0, BLOCK_M)[:, None] * (2 * N) + cols[None, :]
    if EPILOGUE == "times_activation_grad":
        if ACTIVATION == "swiglu":
            gate = tl.load(z_ptr + pair_start + pair_offsets, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(z_ptr + pair_start + pair_offsets + N, mask=mask, other=0.0).to(tl.float32)
            dgate, dup = swiglu_grads(acc, gate, up)
            tl.store(h_ptr + pair_start + pair_offsets, in_dtype_of(h_ptr, dgate), mask=mask)
            tl.store(h_ptr + pair_start + pair_offsets + N, in_dtype_of(h_ptr, dup), mask=mask)
        else:
            if ACTIVATION != "identity":
                acc *= activation_grad(tl.load(z_ptr + tile_start + offsets, mask=mask, other=0.0).to(tl.float32),
                                       ACTIVATION)
            tl.store(h_ptr + tile_start + offsets, in_dtype_of(h_ptr, acc), mask=mask)
    if EPILOGUE == "forward":
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION == "swiglu":
                acc_up += tl.load(bias_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == "swiglu":
            if STORE_Z:
                tl.store(z_ptr + pair_start + pair_offsets, in_dtype_of(z_ptr, acc), mask=mask)
                tl.store(z_ptr + pair_start + pair_offsets + N, in_dtype_of(z_ptr, acc_up), mask=mask)
            # the rounded z, as the backward reads it and the reference computes h from it
            gate, up = in_dtype_of(z_ptr, acc).to(tl.float32), in_dtype_of(z_ptr, acc_up).to(tl.float32)
            h = in_dtype_of(h_ptr, gate * tl.sigmoid(gate) * up)
        else:
            if STORE_Z:
                tl.store(z_ptr + tile_start + offsets, in_dtype_of(z_ptr, acc), mask=mask)
            h = in_dtype_of(h_ptr, activation(acc, ACTIVATION))
        if STORE_H:
            tl.store(h_ptr + tile_start + offsets, h, mask=mask)
        if HAS_Y:
            y = tl.load(y_ptr + tile_start + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_out_ptr + tile_start + offsets, in_dtype_of(y_out_ptr, y + h.to(tl.float32)),
                     mask=mask)


# The tiles the launcher picks from, largest first: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# by element size. compile-report compiles every one (none spills; 128x128 tiles spill on sm_80 with
# these epilogues, as do float32 K steps of 32 and 64x64 tiles on 4 warps), and shows sm_90 running
# the 64-row ones on wgmma.
GEMM_CONFIGS = {
    2: ((128, 64, 64, 8, 3), (64, 64, 64, 8, 3), (64, 32, 32, 4, 3), (32, 32, 32, 4, 2), (16, 16, 16, 4, 2)),
    4: ((128, 64, 16, 8, 3), (64, 64, 16, 8, 3), (64, 32, 16, 4, 3), (32, 32, 16, 4, 2), (16, 16, 16, 4, 2)),
}
# A gated activation's programs keep two accumulators (the gate's and the up projection's): the
# plain list's largest tiles spill then (compile-report, unaligned builds), these do not.
GATED_CONFIGS = {
    2: ((128, 32, 64, 8, 3), (64, 64, 32, 8, 3), (64, 32, 32, 4, 3), (32, 32, 32, 4, 2), (16, 16, 16, 4, 2)),
    4: ((128, 32, 16, 8, 3), (64, 64, 16, 8, 3), (64, 32, 16, 4, 3), (32, 32, 16, 4, 2), (16, 16, 16, 4, 2)),
}
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# Tiles that spill on one Triton release only, {(major, minor): {epilogue: {(element size, tile)}}}:
# Triton 3.6 spills these in unaligned builds (compile-report: weight_grad 128x64x64 on sm_80 and
# 32x32x32 on sm_90, 16-bit; times_activation_grad 128x64x16 TF32 on sm_80), 3.8 and 3.9 do not.
# There the launcher and compile-report pass them over.
SPILLING_TILES = {
    (3, 6): {"weight_grad": {(2, (128, 64, 64, 8, 3)), (2, (32, 32, 32, 4, 2))},
             "times_activation_grad": {(4, (128, 64, 16, 8, 3))}},
}


def tile_configs(dtype: torch.dtype, gated: bool = False, epilogue: str = "forward") -> tuple:
    """The configurations the launcher picks from for this epilogue on this Triton, largest first."""
    size = min(dtype.itemsize, 4)
    spilling = SPILLING_TILES.get(TRITON_RELEASE, {}).get(epilogue, set())
    return tuple(c for c in (GATED_CONFIGS if gated else GEMM_CONFIGS)[size] if (size, c) not in spilling)


def fitting_configs(M: int, N: int, K: int, dtype: torch.dtype, gated: bool = False,
                    epilogue: str = "forward") -> list[tuple]:
    """The configurations whose tiles do not overhang the problem by more than a power of two (the
    16x16x16 one, tl.dot's smallest, always fits)."""
    def fits(block: int, size: int) -> bool:
        return block <= max(16, triton.next_power_of_2(size))
    return [c for c in tile_configs(dtype, gated, epilogue) if fits(c[0], M) and fits(c[1], N) and fits(c[2], K)]


def programs(config: tuple, M: int, N: int) -> int:
    return triton.cdiv(M, config[0]) * triton.cdiv(N, config[1])


def gemm_tiles(M: int, N: int, K: int, dtype: torch.dtype, sm_count: int | None = None, gated: bool = False,
               epilogue: str = "forward") -> dict:
    """The launch's tiles, a pure function of the shape, dtype and SM count, so a GPU always runs a
    given GEMM the same way: the largest fitting tiles that give every SM a program, else the ones
    that give the most programs. sm_count None (Triton's interpreter): the largest fitting tiles."""
    fitting = fitting_configs(M, N, K, dtype, gated, epilogue)
    filling = [c for c in fitting if sm_count is None or programs(c, M, N) >= sm_count]
    config = filling[0] if filling else max(fitting, key=lambda c: programs(c, M, N))
    return dict(zip(TILE_KEYS, config), GROUP_M=8)


def do_bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20)


class TileTuner:
    """ACN_KERNELS_AUTOTUNE=1 on a GPU: each GEMM (device, epilogue, activation, dtype, M, N, K) times
    every fitting configuration once and keeps the fastest, in memory and in a JSON file
    (ACN_KERNELS_TUNING_CACHE, default $XDG_CACHE_HOME/acn_kernels/gemm_tiles.json), so the choice
    stays the same for that shape and device across runs. Every candidate shares the dtype's accumulation in
    float32 over K, and a launch writes its outputs whole, so timing them changes no result. The
    timing runs at a shape's first call: make that call eagerly, before capturing a CUDA graph."""

    def __init__(self, path: str, bench=None):
        self.path = path
        self.bench = bench or do_bench
        self.choices = None

    def _load(self) -> dict:
        if self.choices is None:
            try:
                with open(self.path) as f:
                    self.choices = json.load(f)
            except (OSError, ValueError):
                self.choices = {}
        return self.choices

    def tiles(self, key: str, candidates: list[tuple], launch) -> dict:
        choices = self._load()
        if key not in choices:
            times = [self.bench(lambda c=c: launch(dict(zip(TILE_KEYS, c), GROUP_M=8))) for c in candidates]
            choices[key] = list(candidates[min(range(len(times)), key=times.__getitem__)])
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w") as f:
                json.dump(choices, f, indent=0, sort_keys=True)
        return dict(zip(TILE_KEYS, choices[key]), GROUP_M=8)


TUNER = TileTuner(os.environ.get("ACN_KERNELS_TUNING_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "acn_kernels",
    "gemm_tiles.json"))


def choose_tiles(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, what: str, launch,
                 gated: bool = False, epilogue: str = "forward") -> dict:
    """gemm_tiles, or under ACN_KERNELS_AUTOTUNE=1 on a GPU the tuned tiles for this GEMM."""
    if os.environ.get("ACN_KERNELS_AUTOTUNE") == "1" and device.type == "cuda":
        key = f"{torch.cuda.get_device_name(device)}|{what}|{dtype}|{M}x{N}x{K}"
        return TUNER.tiles(key, fitting_configs(M, N, K, dtype, gated, epilogue), launch)
    return gemm_tiles(M, N, K, dtype, sm_count(device), gated, epilogue)


def input_precision(dtype: torch.dtype) -> str:
    """float32 GEMMs follow torch's own switch, so the kernel and eager agree on using TF32."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_gemm(a, a_strides, b, b_strides, out, M, N, K, epilogue: str, activation: str = "identity",
                bias=None, y=None, z=None, y_out=None, store_z: bool = False) -> None:
    """One launch of gemm_kernel: out (M, N) = a @ b.T through the given strides, then `epilogue`;
    out None: the forward epilogue stores y_out (and z) only. Pointers of absent tensors stand in for
    them, never touched."""
    stand_in = out if out is not None else a
    flags = dict(EPILOGUE=epilogue, ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_Y=y is not None,
                 STORE_H=out is not None, STORE_Z=store_z, DOT_IN_FP32=dot_in_fp32(a.dtype),
                 INPUT_PRECISION=input_precision(a.dtype))

    def launch(tiles: dict) -> None:
        gemm_kernel[(max(1, triton.cdiv(M, tiles["BLOCK_M"]) * triton.cdiv(N, tiles["BLOCK_N"])),)](
            a, b, bias if bias is not None else stand_in, y if y is not None else stand_in, stand_in,
            z if z is not None else stand_in, y_out if y_out is not None else stand_in,
            M, N, K, *a_strides, *b_strides, **flags, **tiles)
    gated = activation in GATED and epilogue != "weight_grad"
    launch(choose_tiles(M, N, K, a.dtype, a.device, "|".join(map(str, flags.values())), launch, gated, epilogue))


def saves_preactivation(activation: str, store_h: bool = True) -> bool:
    """Whether the forward keeps z for act': gelu, gelu_tanh, silu, and relu when h is not stored."""
    return activation in NEEDS_PREACTIVATION or (activation == "relu" and not store_h)


def activation_grad_input(activation: str, h, z, store_h: bool = True):
    """What act' reads in the backward: z where the forward keeps it, else h for relu (h > 0 exactly
    where z > 0), nothing for identity."""
    return z if saves_preactivation(activation, store_h) else (h if activation == "relu" else None)


def output_width(weight: torch.Tensor, act: str) -> int:
    """h's width for a linear of `weight` (out_features, in_features): half the rows for a GLU."""
    return weight.shape[0] // 2 if act in GATED else weight.shape[0]


def launch_forward(x2, weight, bias, y2, act: str, store_h: bool = True):
    """(h, y_out, saved) for x2 (M, K): h = act(x2 @ weight.T + bias), y_out = y2 + h; saved is z
    or h (what act' needs) or None for identity. store_h False (y2 given): h is None, and relu saves z.
    swiglu: weight (2N, K), z (M, 2N), h (M, N)."""
    M, K = x2.shape
    N = output_width(weight, act)
    h = new_buffer((M, N), x2.dtype, x2.device) if store_h else None
    z = new_buffer((M, weight.shape[0]), x2.dtype, x2.device) if saves_preactivation(act, store_h) else None
    y_out = new_buffer((M, N), y2.dtype, x2.device) if y2 is not None else None
    launch_gemm(x2, x2.stride(), weight, weight.stride(), h, M, N, K, "forward", act, bias=bias, y=y2, z=z,
                y_out=y_out, store_z=z is not None)
    return h, y_out, activation_grad_input(act, h, z, store_h)


def launch_times_activation_grad(g2, w2, saved2, act: str):
    """dz (M, H) = (g2 @ w2) * act'(saved2) for g2 (M, E), w2 (E, H): w2 is read through its strides
    as the (H, E) operand the kernel's a @ b.T takes. swiglu: dz and saved2 are (M, 2H)."""
    M, E = g2.shape
    H = w2.shape[1]
    dz = new_buffer((M, 2 * H if act in GATED else H), g2.dtype, g2.device)
    launch_gemm(g2, g2.stride(), w2, (w2.stride(1), w2.stride(0)), dz, M, H, E, "times_activation_grad", act,
                z=saved2)
    return dz


def launch_weight_grad(dout2, x2, has_bias: bool):
    """(dweight (N, K), dbias (N,) or None) for dout2 (M, N) and x2 (M, K): dout2.T @ x2 and the column
    sums of dout2, in one launch that reads each operand through its transposed strides."""
    M, N = dout2.shape
    K = x2.shape[1]
    dweight = new_buffer((N, K), dout2.dtype, dout2.device)
    dbias = new_buffer((N,), dout2.dtype, dout2.device) if has_bias else None
    launch_gemm(dout2, (dout2.stride(1), dout2.stride(0)), x2, (x2.stride(1), x2.stride(0)), dweight, N, K, M,
                "weight_grad", bias=dbias)
    return dweight, dbias


# ----------------------------------------------------------------------------- registered op
# Shared by the backward of every linear op on the Triton backend (torch.compile sees one op).

@torch.library.custom_op("acn_kernels::weight_grad", mutates_args=())
def weight_grad(dout: torch.Tensor, x: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dweight, dbias) of a linear layer, x (..., K) its input and dout (..., N) its output's
    gradient; dbias comes back empty without a bias."""
    dweight, dbias = launch_weight_grad(rows_of(dout.to(x.dtype)), rows_of(x), has_bias)
    return dweight, dbias if dbias is not None else dweight.new_empty(0)


@weight_grad.register_fake
def weight_grad_fake(dout, x, has_bias):
    return x.new_empty((dout.shape[-1], x.shape[-1])), x.new_empty((dout.shape[-1],) if has_bias else (0,))


def eager_weight_grad(dout2: torch.Tensor, x2: torch.Tensor, needs_weight: bool, needs_bias: bool) -> tuple:
    """(dweight, dbias) by cuBLAS and a sum launch, each None where not needed (the CUDA backend's)."""
    return dout2.t() @ x2 if needs_weight else None, dout2.sum(0) if needs_bias else None


def fused_weight_grad(dout2: torch.Tensor, x2: torch.Tensor, needs_weight: bool, needs_bias: bool) -> tuple:
    """(dweight, dbias) from one weight_grad launch, each None where not needed."""
    if not needs_weight:
        return None, dout2.sum(0) if needs_bias else None
    dweight, dbias = weight_grad(dout2, x2, needs_bias)
    return dweight, dbias if needs_bias else None


# ----------------------------------------------------------------------------- the linear ops' checks

def cast_for_autocast(device_type: str, *tensors):
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def checked_linear_input(x, *params) -> tuple:
    """(x, *params) as a linear op's GEMM takes them: x a float tensor of at least one dimension, and
    under autocast all of them cast to the autocast dtype, as nn.Linear's are."""
    check_tensor("x", x)
    if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
        x, *params = cast_for_autocast(x.device.type, x, *params)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., in_features), got a 0-d tensor")
    return (x, *params)


def check_linear(weight_name: str, weight, bias_name: str, bias, x: torch.Tensor, in_features: int | None = None,
                 activation: str = "identity", in_features_source: str | None = None):
    """weight (out_features, in_features: x's last dimension unless given, `in_features_source`
    saying where it comes from) and bias (out_features,) or None, of x's dtype and on x's device; a
    gated activation's out_features are (gate, up) pairs."""
    if in_features is None:
        in_features, in_features_source = x.shape[-1], f"the last dimension of x, whose shape is {tuple(x.shape)}"
    check_tensor(weight_name, weight, dtypes=(x.dtype,), like="x")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape (out_features, in_features), got {tuple(weight.shape)}")
    if weight.shape[1] != in_features:
        # a mismatch of two arguments: name both, since either may be the wrong one
        raise ValueError(f"{weight_name} must have shape (out_features, {in_features}) ({in_features_source}), "
                         f"got {tuple(weight.shape)}")
    if activation in GATED and weight.shape[0] % 2:
        raise ValueError(f"{weight_name} must have an even number of rows for activation={activation!r} (the gate "
                         f"projection's, then the up projection's), got {tuple(weight.shape)}")
    check_device(weight_name, weight, x.device)
    if bias is not None:
        check_tensor(bias_name, bias, dtypes=(x.dtype,), like="x")
        check_shape(bias_name, bias, (weight.shape[0],), f"{weight_name}'s rows")
        check_device(bias_name, bias, x.device)
