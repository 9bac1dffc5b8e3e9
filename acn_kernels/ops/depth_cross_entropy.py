"""depth_cross_entropy: every exit's next-token loss through one shared final norm and head, without
the logits.

Math: states is (E, ..., D), the hidden states at E exits (an ACN's running sums y_k), targets (...)
the next tokens. For exit e and row n (N rows an exit, R = E N in all), with s the label smoothing:

    h      = norm(states[e, n])                     layernorm or rmsnorm, the final norm
    c      = W h + b, capped: softcap tanh(c / softcap) where softcap is given      (V logits)
    lse    = log sum_j exp(c_j)
    loss   = (1 - s)(lse - c_target) + s (lse - mean_j c_j) + z_loss lse^2       (counted rows only)
    per_exit[e] = sum_n loss / count,   total = sum_e weights[e] per_exit[e]

and the gradient of the total with respect to the logits, before the cap,

    dc     = (weights[e] / count) (p (1 + 2 z_loss lse) - (1 - s) onehot(target) - s / V),  p = exp(c - lse)
    dlogit = dc (1 - (c / softcap)^2)               (the tanh's derivative, where capped)

consumed at once: dh = dlogit W, dW += dlogit^T h, db += sum dlogit, and dh through the norm's
backward into dstates and the norm's weight and bias. The rows are one queue of all exits' rows, cut
into chunks of `chunk_rows`: at most one chunk of logits (chunk_rows x V, float32) lives at a time,
never the (E, N, V) logits and log-probabilities that eager PyTorch keeps for backward. Forward
computes the gradients with the loss (they are what backward returns, scaled by the loss's gradient);
under torch.no_grad(), or where nothing needs a gradient, it computes the loss alone.

Bytes (float32 logits never leave the chunk; A = R D elements of states' size, W = V D of the head's):

    forward   reads states A, the head W once per chunk (R / chunk_rows times; from cache where it fits)
              writes dstates A, dW and db in float32 (4 V D + 4 V), the norm's gradients
    backward  scales the saved gradients: reads and writes each once

against eager PyTorch's (E N V) float32 logits written, read by the log-softmax, their gradient written
and read again: 4 x 4 R V bytes beyond the inputs.

The chunk loop is PyTorch (its GEMMs on cuBLAS on a GPU, BLAS on a CPU, on every backend: "cublas"
is "triton" here); the row work (the cap, the online log-sum-exp, the target logit, smoothing, z-loss
and the gradient written in place) is one kernel: Triton's (backend "triton"; "auto" where the fused
ops run, on float32 and 16-bit states), its CUDA twin in csrc/depth_cross_entropy.cu ("cuda", the
extension's `cross_entropy_rows`), or the same in PyTorch ("chunked"; "auto" on a CPU and for
float64). Row kernel bytes per logit: 4 read for the loss alone; 8 read and 4 written with the gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._validation import check_choice, check_real
from ..backend import TRITON_INTERPRETED, check_triton, resolve_backend
from ._common import check_device, check_eps, check_norm_kind, check_tensor, first_order, new_buffer

CHUNK_ELEMENTS = 1 << 23  # logits a chunk holds on a CPU: 32 MiB of float32
BACKENDS = ("auto", "reference", "chunked", "triton", "cublas", "cuda")
ROW_BLOCK = 1024  # logits a program walks at a time in the row kernel


def chunk_rows_for(rows: int, vocab: int, dim: int, device: torch.device) -> int:
    """Rows a chunk takes by default. On a GPU, Liger-Kernel's rule: about as many logits as the states
    have elements (rows / ceil(V / D), to a power of two), so that the head's five passes a chunk (its
    reads by three GEMMs, dW's read and write) stay below the chunk's own logit traffic (GPT-2 at 8192
    tokens x 13 exits: 2048 rows, 412 MB of logits); on a CPU, CHUNK_ELEMENTS logits (the peak that the
    loss bench measures). At least one row either way."""
    if device.type == "cuda":
        return triton.next_power_of_2(max(1, -(-rows // -(-vocab // dim))))
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def check_arguments(states, targets, norm_weight, norm_bias, head_weight, weights, head_bias, ignore_index,
                    label_smoothing, z_loss, softcap, norm, eps, chunk_rows) -> None:
    """Every argument named with the expected and the actual value (see the module docstring)."""
    check_tensor("states", states, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if states.dim() < 2 or states.shape[0] == 0 or states.shape[-1] == 0:
        raise ValueError(f"states must have shape (exits >= 1, ..., D >= 1), got {tuple(states.shape)}")
    exits, dim = states.shape[0], states.shape[-1]
    lead = tuple(states.shape[1:-1])
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool or tuple(targets.shape) != lead:
        got = f"dtype {targets.dtype} and shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) \
            else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of shape {lead} (states' shape without the exits and "
                         f"the width), got {got}")
    check_device("targets", targets, states.device, like="states")
    check_tensor("head_weight", head_weight, (states.dtype, torch.float32) if states.dtype != torch.float64
                 else (torch.float64,), like=f"states' {states.dtype}")
    if head_weight.dim() != 2 or head_weight.shape[1] != dim or head_weight.shape[0] == 0:
        raise ValueError(f"head_weight must have shape (vocabulary >= 1, {dim}) (states' width), got "
                         f"{tuple(head_weight.shape)}")
    check_device("head_weight", head_weight, states.device, like="states")
    vocab = head_weight.shape[0]
    for name, value, length, source in (("norm_weight", norm_weight, dim, "states' width"),
                                        ("norm_bias", norm_bias, dim, "states' width"),
                                        ("head_bias", head_bias, vocab, "head_weight's rows")):
        if value is None and name != "norm_weight":
            continue
        check_tensor(name, value, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if tuple(value.shape) != (length,):
            raise ValueError(f"{name} must have shape ({length},) ({source}), got {tuple(value.shape)}")
        check_device(name, value, states.device, like="states")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or tuple(weights.shape) != (exits,):
            got = f"dtype {weights.dtype} and shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) \
                else type(weights).__name__
            raise ValueError(f"weights must be a floating-point tensor of shape ({exits},) (one per exit of states, "
                             f"{tuple(states.shape)}), got {got}")
        if weights.device not in (states.device, torch.device("cpu")):  # a schedule's, made on the CPU, is taken
            raise ValueError(f"weights must be on {states.device} like states, or on the CPU, got {weights.device}")
        if torch.compiler.is_compiling():  # a value check would break the graph: checked on the device instead
            torch._assert_async((torch.isfinite(weights) & (weights >= 0)).all(), "weights must be finite and >= 0")
        elif not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    if torch.compiler.is_compiling():
        torch._assert_async(((targets == ignore_index) | ((targets >= 0) & (targets < vocab))).all(),
                            f"targets must be in [0, {vocab}) or ignore_index")
        return check_options(label_smoothing, z_loss, softcap, norm, eps, chunk_rows)
    counted = targets[targets != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= vocab):
        raise ValueError(f"targets must be in [0, {vocab}) (head_weight's rows) or ignore_index={ignore_index}, got "
                         f"values in [{counted.min().item()}, {counted.max().item()}]")
    check_options(label_smoothing, z_loss, softcap, norm, eps, chunk_rows)


def check_options(label_smoothing, z_loss, softcap, norm, eps, chunk_rows) -> None:
    check_real("label_smoothing", label_smoothing, "a real number in [0, 1)", minimum=0)
    if label_smoothing >= 1:
        raise ValueError(f"label_smoothing must be a real number in [0, 1), got {label_smoothing!r}")
    check_real("z_loss", z_loss, "a real number >= 0 (the weight of lse^2)", minimum=0)
    if softcap is not None:
        check_real("softcap", softcap, "None or a positive real number (logits = softcap tanh(logits / softcap))",
                   minimum=0)
        if softcap == 0 or softcap == float("inf"):
            raise ValueError(f"softcap must be None or a positive finite real number, got {softcap!r}")
    check_norm_kind(norm)
    check_eps(eps)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an integer >= 1, got {chunk_rows!r}")


# ----------------------------------------------------------------------------- the chunked path

def plain_rows(logits: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, needs_grad: bool) -> tuple:
    """triton_rows in PyTorch: (loss per row, lse) of logits (rows, V), the logits' buffer then holding
    their gradient (scale x loss's) where needs_grad."""
    capped = torch.tanh(logits / softcap) if softcap else None
    rows_logits = capped * softcap if softcap else logits
    counted = rows_targets != ignore_index
    rows_targets = torch.where(counted, rows_targets, 0)  # ignore_index may be any integer, in the vocabulary or not
    losses, lse = chunk_losses(rows_logits, rows_targets, counted, label_smoothing, z_loss)
    if needs_grad:
        grad = logits_grad_(rows_logits, lse, rows_targets, scale * counted, label_smoothing, z_loss)
        if softcap:
            logits.copy_(grad.mul_(1 - capped.square_()))
    return losses, lse


def chunk_losses(logits: torch.Tensor, rows_targets: torch.Tensor, counted: torch.Tensor, label_smoothing: float,
                 z_loss: float) -> tuple:
    """(loss per row (0 where not counted), lse) of capped logits (rows, V), targets in [0, V)."""
    lse = torch.logsumexp(logits, -1)
    target_logit = logits.gather(-1, rows_targets[:, None])[:, 0]
    losses = (1 - label_smoothing) * (lse - target_logit) + z_loss * lse ** 2
    if label_smoothing:
        losses = losses + label_smoothing * (lse - logits.mean(-1))
    return losses * counted, lse


def logits_grad_(logits: torch.Tensor, lse: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor,
                 label_smoothing: float, z_loss: float) -> torch.Tensor:
    """The gradient of the rows' weighted loss with respect to the capped logits, in logits' buffer:
    q = p - (1 - s) onehot - s / V first, then z-loss's p 2 z lse as q (1 + c) + ((1 - s) onehot + s / V) c,
    c = 2 z lse (p (1 + c) - 1 would cancel where p is near 1: a vocabulary of one)."""
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(-1, rows_targets[:, None], torch.full_like(lse, -(1 - label_smoothing))[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / grad.shape[-1])
    if z_loss:
        c = 2 * z_loss * lse
        grad.mul_((1 + c)[:, None]).scatter_add_(-1, rows_targets[:, None], ((1 - label_smoothing) * c)[:, None])
        if label_smoothing:
            grad.add_((label_smoothing / grad.shape[-1] * c)[:, None])
    return grad.mul_(scale[:, None])


def normalize(x: torch.Tensor, eps: float, is_layernorm: bool) -> tuple:
    """(x normalized over its last dimension, 1 / its standard deviation (or root mean square) per row)."""
    if is_layernorm:
        x = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x * rstd, rstd


def normalize_backward(g: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor, is_layernorm: bool) -> torch.Tensor:
    """The input's gradient of `normalize`, from g, the gradient of its output (times the norm's weight)."""
    g = g - normed * (g * normed).mean(-1, keepdim=True)
    if is_layernorm:
        g = g - g.mean(-1, keepdim=True)
    return g * rstd


@triton.jit
def capped_logits(raw, softcap, HAS_SOFTCAP: tl.constexpr):
    """softcap tanh(raw / softcap) (tanh as 2 sigmoid(2x) - 1), or raw."""
    if HAS_SOFTCAP:
        return softcap * (2.0 * tl.sigmoid(2.0 * raw / softcap) - 1.0)
    return raw


@triton.jit
def cross_entropy_rows_kernel(logits_ptr, stride, targets_ptr, scale_ptr, loss_ptr, lse_ptr, vocab, ignore_index,
                              label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr,
                              NEEDS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One row of float32 logits a program: its capped logits' log-sum-exp (online over BLOCK-wide
    tiles), target logit and mean, its loss; with NEEDS_GRAD a second walk writes the gradient of
    scale x loss with respect to the raw logits in place (see the module docstring)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    target = tl.load(targets_ptr + row)
    running_max = tl.full([], float("-inf"), tl.float32)
    exp_sum = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    target_logit = tl.zeros([], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        c = capped_logits(tl.load(base + cols, mask=mask, other=0.0), softcap, HAS_SOFTCAP)
        block_max = tl.max(tl.where(mask, c, float("-inf")), 0)
        new_max = tl.maximum(running_max, block_max)
        exp_sum = exp_sum * tl.exp(running_max - new_max) + tl.sum(tl.where(mask, tl.exp(c - new_max), 0.0), 0)
        running_max = new_max
        total += tl.sum(tl.where(mask, c, 0.0), 0)
        target_logit += tl.sum(tl.where(cols == target, c, 0.0), 0)
    lse = running_max + tl.log(exp_sum)
    counted = target != ignore_index
    loss = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - total / vocab) \
        + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if NEEDS_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr + row), 0.0)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            c = capped_logits(tl.load(base + cols, mask=mask, other=0.0), softcap, HAS_SOFTCAP)
            p = tl.exp(c - lse)  # p - onehot, then z-loss's term: p (1 + 2 z lse) - 1 cancels where p is near 1
            grad = p - label_smoothing / vocab - tl.where(cols == target, 1.0 - label_smoothing, 0.0) \
                + p * (2.0 * z_loss * lse)
            grad = grad * scale
            if HAS_SOFTCAP:
                capped_unit = c / softcap
                grad = grad * (1.0 - capped_unit * capped_unit)
            tl.store(base + cols, grad, mask=mask)


def row_launch(block: int) -> tuple:
    """(BLOCK, num_warps) of the row kernel for rows of `block` logits: 128 to ROW_BLOCK wide (a tiny
    vocabulary masked), 4 to 8 logits a thread, so that every thread loads 16 bytes at a time."""
    block = max(128, min(ROW_BLOCK, triton.next_power_of_2(block)))
    return block, max(1, min(4, block // 256))


def triton_rows(logits: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
                label_smoothing: float, z_loss: float, softcap: float, needs_grad: bool) -> tuple:
    """(loss per row, lse) of float32 logits (rows, V) by the Triton row kernel; with needs_grad the
    logits become their gradient (scale x loss's), in place."""
    rows, vocab = logits.shape
    block, num_warps = row_launch(vocab)
    losses = new_buffer((rows,), torch.float32, logits.device)
    lse = new_buffer((rows,), torch.float32, logits.device)
    cross_entropy_rows_kernel[(rows,)](logits, logits.stride(0), rows_targets.contiguous(), scale.contiguous(),
                                       losses, lse, vocab, ignore_index, label_smoothing, z_loss, softcap or 1.0,
                                       HAS_SOFTCAP=bool(softcap), NEEDS_GRAD=needs_grad, BLOCK=block,
                                       num_warps=num_warps)
    return losses, lse


def cuda_rows(logits: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
              label_smoothing: float, z_loss: float, softcap: float, needs_grad: bool) -> tuple:
    """triton_rows by the CUDA extension's kernel (csrc/depth_cross_entropy.cu)."""
    return torch.ops.acn_kernels_cuda.cross_entropy_rows(logits, rows_targets, scale, ignore_index, label_smoothing,
                                                         z_loss, softcap, needs_grad)


ROW_KERNELS = {"chunked": plain_rows, "triton": triton_rows, "cuda": cuda_rows}


@torch.library.custom_op("acn_kernels::depth_cross_entropy_chunked", mutates_args=())
def depth_cross_entropy_chunked(states: torch.Tensor, targets: torch.Tensor, norm_weight: torch.Tensor,
                                norm_bias: Optional[torch.Tensor], head_weight: torch.Tensor,
                                head_bias: Optional[torch.Tensor], weights: torch.Tensor, ignore_index: int,
                                label_smoothing: float, z_loss: float, softcap: float, is_layernorm: bool, eps: float,
                                chunk_rows: int, needs_grad: bool, row_kernel: str) -> tuple[
                                    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor, torch.Tensor]:
    """(loss, per_exit, dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias): the gradients of
    the loss (empty without needs_grad, or for an absent bias). softcap 0: no cap. The row work by
    ROW_KERNELS[row_kernel]."""
    row_work = ROW_KERNELS[row_kernel]
    with torch.autocast(states.device.type, enabled=False):  # float32 logits and sums, whatever autocast says
        return chunked_loss(states, targets, norm_weight, norm_bias, head_weight, head_bias, weights, ignore_index,
                            label_smoothing, z_loss, softcap, is_layernorm, eps, chunk_rows, needs_grad, row_work)


def chunked_loss(states, targets, norm_weight, norm_bias, head_weight, head_bias, weights, ignore_index,
                 label_smoothing, z_loss, softcap, is_layernorm, eps, chunk_rows, needs_grad, row_work) -> tuple:
    """depth_cross_entropy_chunked's work, the row work by `row_work` (triton_rows or plain_rows)."""
    exits, dim = states.shape[0], states.shape[-1]
    compute = torch.promote_types(states.dtype, torch.float32)
    rows_of_states = states.reshape(-1, dim)
    per_exit_rows = rows_of_states.shape[0] // exits
    all_targets = targets.reshape(-1).long().repeat(exits)  # any integer dtype, as the row work indexes with them
    count = max(int((targets != ignore_index).sum()), 1)
    row_scale = (weights.to(compute) / count).repeat_interleave(per_exit_rows)
    head = head_weight.to(compute)
    bias = None if head_bias is None else head_bias.to(compute)
    per_exit = torch.zeros(exits, dtype=torch.float64, device=states.device)  # a sum of many chunks' rows
    exit_of_row = torch.arange(exits, device=states.device).repeat_interleave(per_exit_rows)
    grads = [states.new_empty(0) for _ in range(5)]  # distinct tensors: a custom op's outputs must not alias
    if needs_grad:
        # the parameters' gradients are sums over every chunk: the vectors in float64, the head's in groups
        vector = dict(dtype=torch.float64, device=states.device)
        grads = [new_buffer(states.shape, states.dtype, states.device), torch.zeros(dim, **vector),
                 torch.zeros(dim, **vector) if norm_bias is not None else grads[2],
                 GroupedSum(head, -(-rows_of_states.shape[0] // chunk_rows), chunk_rows),
                 torch.zeros(bias.shape, **vector) if bias is not None else grads[4]]
        dstates_rows = grads[0].view(-1, dim)
    weight = norm_weight.to(compute)
    shift = None if norm_bias is None else norm_bias.to(compute)
    for start in range(0, rows_of_states.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        normed, rstd = normalize(rows_of_states[rows].to(compute), eps, is_layernorm)
        hidden = normed * weight if shift is None else torch.addcmul(shift, normed, weight)
        logits = torch.nn.functional.linear(hidden, head, bias)
        losses, _ = row_work(logits, all_targets[rows], row_scale[rows], ignore_index, label_smoothing, z_loss,
                             softcap, needs_grad)
        per_exit.index_add_(0, exit_of_row[rows], losses.double())
        if not needs_grad:
            continue
        dlogits = logits  # the row work left the logits' gradient in their buffer
        grads[3].addmm_(dlogits.t(), hidden)
        if bias is not None:
            grads[4].add_(dlogits.sum(0, dtype=torch.float64))
        dhidden = dlogits @ head
        grads[1].add_((dhidden * normed).sum(0, dtype=torch.float64))
        if shift is not None:
            grads[2].add_(dhidden.sum(0, dtype=torch.float64))
        dstates_rows[rows] = normalize_backward(dhidden * weight, normed, rstd, is_layernorm)
    per_exit /= count
    loss = (weights.double() * per_exit).sum().to(compute)
    if needs_grad:
        grads[3] = grads[3].total()
        grads[1:] = [g.to(p.dtype) if g.numel() else g
                     for g, p in zip(grads[1:], (norm_weight, norm_bias, head_weight, head_bias))]
    return (loss, per_exit.float(), *grads)


class GroupedSum:
    """A (V, D) sum of one GEMM's product per chunk, kept as addmm_ accumulates it; where the chunks
    outnumber a chunk's rows (a small chunk_rows: the defaults give few chunks of many rows) the products
    go into a group of about sqrt(chunks), and each full group into the total, so that the float32 sum
    rounds about 2 sqrt(chunks) times, not once a chunk (one more (V, D) buffer, then)."""

    def __init__(self, like: torch.Tensor, chunks: int, chunk_rows: int):
        self.sum = torch.zeros_like(like)
        self.group_size = round(chunks ** 0.5) if chunks > chunk_rows else chunks
        self.group = torch.zeros_like(like) if self.group_size < chunks else None
        self.in_group = 0

    def addmm_(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.group is None:
            self.sum.addmm_(a, b)
            return
        self.group.addmm_(a, b)
        self.in_group += 1
        if self.in_group == self.group_size:
            self.sum.add_(self.group)
            self.group.zero_()
            self.in_group = 0

    def total(self) -> torch.Tensor:
        return self.sum if self.group is None or not self.in_group else self.sum.add_(self.group)


@depth_cross_entropy_chunked.register_fake
def depth_cross_entropy_chunked_fake(states, targets, norm_weight, norm_bias, head_weight, head_bias, weights,
                                     ignore_index, label_smoothing, z_loss, softcap, is_layernorm, eps, chunk_rows,
                                     needs_grad, row_kernel):
    compute = torch.promote_types(states.dtype, torch.float32)
    loss, per_exit = states.new_empty((), dtype=compute), states.new_empty(states.shape[0], dtype=torch.float32)
    shapes = [states.shape, norm_weight.shape, None if norm_bias is None else norm_bias.shape, head_weight.shape,
              None if head_bias is None else head_bias.shape]
    dtypes = [states.dtype, norm_weight.dtype, None if norm_bias is None else norm_bias.dtype, head_weight.dtype,
              None if head_bias is None else head_bias.dtype]
    return (loss, per_exit, *(states.new_empty(shape if needs_grad and shape is not None else (0,),
                                               dtype=dtype if needs_grad and dtype is not None else states.dtype)
                              for shape, dtype in zip(shapes, dtypes)))


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.has_norm_bias, ctx.has_head_bias = inputs[3] is not None, inputs[5] is not None
    ctx.set_materialize_grads(False)


def backward(ctx, dloss, *_unused):
    """The gradients forward computed, scaled by the loss's (a scalar)."""
    dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias = ctx.saved_tensors
    if dloss is None or not dstates.numel():
        return (None,) * 16
    scaled = [g * dloss.to(g.dtype) for g in (dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias)]
    return (scaled[0], None, scaled[1], scaled[2] if ctx.has_norm_bias else None, scaled[3],
            scaled[4] if ctx.has_head_bias else None, *(None,) * 10)


depth_cross_entropy_chunked.register_autograd(first_order("depth_cross_entropy", backward), setup_context=setup_context)


def depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, *, weights=None, head_bias=None,
                        ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, norm="layernorm", eps=1e-5,
                        backend="auto", chunk_rows=None):
    """(loss, per_exit): every exit's mean next-token loss through one final norm and head (see the
    module docstring), the loss the weighted sum (weights: (E,), uniform 1/E by default), per_exit (E,)
    float32 and detached. chunk_rows rows of logits at a time (by default 32 MiB of them): backend
    "triton" (or "cublas": the GEMMs are cuBLAS's on every path) with the Triton row kernel, "cuda"
    with its CUDA twin (the extension, CUDA tensors), "chunked" with the row work in PyTorch, "auto"
    Triton's where the fused ops run (a GPU, or Triton's interpreter) on float32 and 16-bit states,
    else the chunked path; "reference" is the specification, which materializes every logit."""
    check_arguments(states, targets, norm_weight, norm_bias, head_weight, weights, head_bias, ignore_index,
                    label_smoothing, z_loss, softcap, norm, eps, chunk_rows)
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return reference.depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, weights=weights,
                                             head_bias=head_bias, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                             norm=norm, eps=eps)
    return run_forward(depth_cross_entropy_chunked, states, targets, norm_weight, norm_bias, head_weight, weights,
                       head_bias, ignore_index, label_smoothing, z_loss, softcap, norm, eps, chunk_rows,
                       row_kernel_for(backend, states))


def row_kernel_for(backend: str, states: torch.Tensor) -> str:
    """The ROW_KERNELS entry a backend runs (see depth_cross_entropy), checked for the states' device."""
    if backend == "auto":  # the Triton row kernel where the fused ops run (a GPU, or Triton's interpreter)
        fused = (states.device.type == "cuda" or TRITON_INTERPRETED) and states.dtype != torch.float64
        return "triton" if fused else "chunked"
    if backend == "chunked":
        return backend
    if backend == "cuda":
        resolve_backend("cuda", states.device)
    else:
        check_triton(backend, states.device)
    check_tensor("states", states)  # float32 and 16-bit states, as the fused ops take
    return "cuda" if backend == "cuda" else "triton"


def run_forward(forward_op, states, targets, norm_weight, norm_bias, head_weight, weights, head_bias, ignore_index,
                label_smoothing, z_loss, softcap, norm, eps, chunk_rows, row_kernel):
    """(loss, per_exit) from a registered chunked op (or its twin in cuda-host-check)."""
    if weights is None:
        weights = torch.full((states.shape[0],), 1.0 / states.shape[0], device=states.device)
    differentiable = [t for t in (states, norm_weight, norm_bias, head_weight, head_bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    dim = states.shape[-1]
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(states.numel() // dim, head_weight.shape[0], dim,
                                                                    states.device)
    loss, per_exit, *_ = forward_op(
        states, targets, norm_weight, norm_bias, head_weight, head_bias, weights.detach(), int(ignore_index),
        float(label_smoothing), float(z_loss), float(softcap or 0.0), norm == "layernorm", float(eps), int(rows),
        needs_grad, row_kernel)
    return loss, per_exit.detach()


def traffic_bound(states, targets, norm_weight, norm_bias, head_weight, weights=None, head_bias=None, *,
                  chunk_rows=None, **options) -> tuple[int, int]:
    """The module docstring's bytes as the chunk loop moves them, (forward, backward), R rows, C chunks,
    c bytes of the compute dtype (float32, or float64 for float64 states):

        logits        6 R V 4       written by the GEMM, read and rewritten by the row kernel, read by
                                    dW's GEMM, db's sum and dh's GEMM
        head          C 5 (V D + V) c   per chunk: the three GEMMs' reads, dW's read and write (bias alike)
        normalized    48 R D c      the norm, its backward and the GEMMs' reads of a chunk's rows
        per row       64 R          targets, scale, loss, lse, the exit of each row, the checks
        conversions   2 (V D + R D) c   16-bit head and states to the compute dtype

    and backward scales what forward computed: reads and writes each gradient once (2 x their bytes)."""
    dim = states.shape[-1]
    rows, vocab = states.numel() // dim, head_weight.shape[0]
    c = 8 if states.dtype == torch.float64 else 4
    chunk = chunk_rows or chunk_rows_for(rows, vocab, dim, states.device)
    chunks = -(-rows // chunk)
    params = [t for t in (norm_weight, norm_bias, head_weight, head_bias) if t is not None]
    forward = 6 * rows * vocab * 4 + chunks * 5 * (vocab * dim + vocab) * c + 48 * rows * dim * c + 64 * rows \
        + 2 * (vocab * dim + rows * dim) * c + sum(4 * t.numel() * c for t in params)
    gradients = states.numel() * states.element_size() + sum(t.numel() * t.element_size() for t in params)
    return forward, 2 * gradients + 64
