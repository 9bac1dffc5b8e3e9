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
extension's `cross_entropy_rows`, and its split pass's `cross_entropy_statistics` and
`cross_entropy_gradient`), or the same in PyTorch ("chunked"; "auto" on a CPU and for
float64). Row kernel bytes per logit: 4 read for the loss alone; 8 read and 4 written with the gradient.

Per exit: targets (E, ...) give exit e its own targets (multi-token prediction: exit e predicts the
token e + 1 ahead through the shared head), norm weights and biases (E, D) its own final norm
(DeepSeek-V3's MTP modules). Statistics (statistics=True), each exit's mean over its counted rows:
accuracy [argmax c = target], agreement [argmax c = the last exit's argmax c] (the acceptance of a
greedy self-speculative draft at that depth) and entropy lse - sum_j p_j c_j, from the same pass (the
split one below: the statistics kernel reads each row's logits once, the gradient kernel once more).

Vocabulary-parallel over a group of T ranks (tp_group, or head_weight a DTensor sharded on its rows):
rank r holds the head's rows [r P / T, (r + 1) P / T), P the vocabulary padded up to a multiple of T
(Megatron's layout; a DTensor's rows are torch.chunk's, ceil(V / T) a rank); rows past vocab_size are
padding, their logits never formed, their gradient zero. A rank forms its chunk's logits over its own
rows, and the whole vocabulary's row statistics come from TWO collectives a chunk, whatever E is:

    MAX  each row's maximum m (the first chunk's also checks that the ranks' slices tile [0, V))
    SUM  each row's sum exp(c - m), sum exp(c - m)(c - m), target logit (0 where another rank holds the
         target), sum c (the label smoothing's): 4 values a row
    MIN  with statistics only: the argmax's column among the ranks holding m (ties to the lower index,
         as torch.argmax breaks them)

then each rank writes its columns' gradient with the whole lse. The head's gradients stay local; dstates
and the norm's gradients (partial sums over the vocabulary) are summed once a call, in one all-reduce
(with sequence_parallel: the states all-gathered over dimension 1 in forward, their gradient
reduce-scattered back, the norm's all-reduced). Sent per rank and chunk of C rows, c bytes of the
compute dtype: 5 C c (+ 8 C with statistics); per call E N D c + the norm's. Megatron's
vocabulary-parallel cross-entropy called once per exit: 3 collectives an exit (3 E C 4 bytes) and each
exit's (N, V / T) logits alive for backward.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .. import reference
from ..reference import ExitStatistics
from .._validation import check_bool, check_choice, check_real
from ..backend import TRITON_INTERPRETED, check_triton, resolve_backend
from . import _vocabulary
from ._common import check_device, check_eps, check_norm_kind, check_tensor, first_order, new_buffer

CHUNK_ELEMENTS = 1 << 23  # logits a chunk holds on a CPU: 32 MiB of float32
BACKENDS = ("auto", "reference", "chunked", "triton", "cublas", "cuda")
ROW_BLOCK = 1024  # logits a program walks at a time in the row kernel
GROUPED_ABOVE = 256  # chunks beyond which the head's gradient is summed in groups (GroupedSum)


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
                    label_smoothing, z_loss, softcap, norm, eps, chunk_rows, vocab_size, tokens=1) -> None:
    """Every argument named with the expected and the actual value (see the module docstring); head_weight
    this rank's rows of a vocabulary of vocab_size, states this rank's 1 / tokens of dimension 1."""
    check_tensor("states", states, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if states.dim() < 2 or states.shape[0] == 0 or states.shape[-1] == 0:
        raise ValueError(f"states must have shape (exits >= 1, ..., D >= 1), got {tuple(states.shape)}")
    exits, dim = states.shape[0], states.shape[-1]
    if tokens > 1 and states.dim() < 3:
        raise ValueError(f"states must have shape (exits, tokens' share, ..., D) with sequence_parallel=True, got "
                         f"{tuple(states.shape)}")
    lead = (states.shape[1] * tokens, *states.shape[2:-1]) if tokens > 1 else tuple(states.shape[1:-1])
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool or tuple(targets.shape) not in (lead, (exits, *lead)):
        got = f"dtype {targets.dtype} and shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) \
            else type(targets).__name__
        raise ValueError(f"targets must be an integer tensor of shape {lead} (states' shape without the exits and "
                         f"the width: every exit's) or {(exits, *lead)} (one an exit), got {got}")
    check_device("targets", targets, states.device, like="states")
    check_tensor("head_weight", head_weight, (states.dtype, torch.float32) if states.dtype != torch.float64
                 else (torch.float64,), like=f"states' {states.dtype}")
    if head_weight.dim() != 2 or head_weight.shape[1] != dim:
        raise ValueError(f"head_weight must have shape (vocabulary rows, {dim}) (states' width), got "
                         f"{tuple(head_weight.shape)}")
    check_device("head_weight", head_weight, states.device, like="states")
    for name, value, shapes, source in (("norm_weight", norm_weight, ((dim,), (exits, dim)), "states' width"),
                                        ("norm_bias", norm_bias, ((dim,), (exits, dim)), "states' width"),
                                        ("head_bias", head_bias, ((head_weight.shape[0],),), "head_weight's rows")):
        if value is None and name != "norm_weight":
            continue
        check_tensor(name, value, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if tuple(value.shape) not in shapes:
            expected = " or ".join(str(shape) for shape in shapes)
            raise ValueError(f"{name} must have shape {expected} ({source}{', or one an exit' * (len(shapes) > 1)}), "
                             f"got {tuple(value.shape)}")
        check_device(name, value, states.device, like="states")
    check_weights(weights, exits, states)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
    check_options(label_smoothing, z_loss, softcap, norm, eps, chunk_rows)
    if torch.compiler.is_compiling():  # a value check would break the graph: checked on the device instead
        torch._assert_async(((targets == ignore_index) | ((targets >= 0) & (targets < vocab_size))).all(),
                            f"targets must be in [0, {vocab_size}) or ignore_index")
        return
    counted = targets[targets != ignore_index]
    if counted.numel() and (counted.min() < 0 or counted.max() >= vocab_size):
        raise ValueError(f"targets must be in [0, {vocab_size}) (the vocabulary) or ignore_index={ignore_index}, got "
                         f"values in [{counted.min().item()}, {counted.max().item()}]")


def check_weights(weights, exits: int, states: torch.Tensor) -> None:
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or tuple(weights.shape) != (exits,):
        got = f"dtype {weights.dtype} and shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) \
            else type(weights).__name__
        raise ValueError(f"weights must be a floating-point tensor of shape ({exits},) (one per exit of states, "
                         f"{tuple(states.shape)}), got {got}")
    if weights.device not in (states.device, torch.device("cpu")):  # a schedule's, made on the CPU, is taken
        raise ValueError(f"weights must be on {states.device} like states, or on the CPU, got {weights.device}")
    if torch.compiler.is_compiling():
        torch._assert_async((torch.isfinite(weights) & (weights >= 0)).all(), "weights must be finite and >= 0")
    elif not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, got {weights.tolist()}")


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


# ----------------------------------------------------------------------------- the row work

def capped(logits: torch.Tensor, softcap: float) -> tuple:
    """(the capped logits, tanh(logits / softcap) or None): the cap's value and what its derivative needs."""
    if not softcap:
        return logits, None
    unit = torch.tanh(logits / softcap)
    return unit * softcap, unit


def plain_rows(logits: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
               label_smoothing: float, z_loss: float, softcap: float, needs_grad: bool) -> tuple:
    """triton_rows in PyTorch: (loss per row, lse) of logits (rows, V), the logits' buffer then holding
    their gradient (scale x loss's) where needs_grad."""
    rows_logits, unit = capped(logits, softcap)
    counted = rows_targets != ignore_index
    rows_targets = torch.where(counted, rows_targets, 0)  # ignore_index may be any integer, in the vocabulary or not
    lse = torch.logsumexp(rows_logits, -1)
    target_logit = rows_logits.gather(-1, rows_targets[:, None])[:, 0]
    losses = row_losses(lse, target_logit, rows_logits.sum(-1), logits.shape[-1], label_smoothing, z_loss) * counted
    if needs_grad:
        hits = counted.to(lse.dtype)
        set_logits_grad(logits, rows_logits, unit, lse, rows_targets, hits, scale * hits, label_smoothing, z_loss,
                        logits.shape[-1])
    return losses, lse


def row_losses(lse, target_logit, total, vocab: int, label_smoothing: float, z_loss: float) -> torch.Tensor:
    """Each row's loss from its log-partition, target logit and logits' sum (the module docstring's)."""
    losses = (1 - label_smoothing) * (lse - target_logit) + z_loss * lse ** 2
    return losses + label_smoothing * (lse - total / vocab) if label_smoothing else losses


def set_logits_grad(logits, rows_logits, unit, lse, rows_targets, hits, scale, label_smoothing: float, z_loss: float,
                    vocab: int) -> None:
    """logits' buffer becomes the gradient of the rows' scaled loss with respect to the raw logits, from
    the capped ones (rows_logits, possibly logits itself), `hits` 1 where the row's target is among these
    columns: q = p - (1 - s) onehot - s / V first, then z-loss's p 2 z lse as q (1 + c) + ((1 - s) onehot
    + s / V) c, c = 2 z lse (p (1 + c) - 1 would cancel where p is near 1: a vocabulary of one), then the
    cap's derivative 1 - tanh^2."""
    grad = rows_logits.sub_(lse[:, None]).exp_()
    onehot = (-(1 - label_smoothing) * hits)[:, None]
    grad.scatter_add_(-1, rows_targets[:, None], onehot)
    if label_smoothing:
        grad.sub_(label_smoothing / vocab)
    if z_loss:
        c = 2 * z_loss * lse
        grad.mul_((1 + c)[:, None]).scatter_add_(-1, rows_targets[:, None], -onehot * c[:, None])
        if label_smoothing:
            grad.add_((label_smoothing / vocab * c)[:, None])
    grad.mul_(scale[:, None])
    if unit is not None:
        logits.copy_(grad.mul_(1 - unit.square_()))


STATISTICS_SLICES = 8  # exp(c - m) formed for an eighth of a chunk's rows at a time: not a chunk-sized buffer


def plain_statistics(logits: torch.Tensor, local_targets: torch.Tensor, softcap: float, entropy: bool) -> tuple:
    """triton_statistics in PyTorch, exp(c - m) a slice of rows at a time (without `entropy` its column is
    0 and one slice-sized buffer fewer is held)."""
    c, _ = capped(logits, softcap)
    peak, argmax = c.max(-1)  # the first of equal maxima, as torch.argmax
    here = local_targets >= 0
    target_logit = c.gather(-1, torch.where(here, local_targets, 0)[:, None])[:, 0] * here
    exp_sum, entropy_sum = torch.empty_like(peak), torch.zeros_like(peak)
    step = max(1, -(-c.shape[0] // STATISTICS_SLICES))
    for start in range(0, c.shape[0], step):
        rows = slice(start, start + step)
        shifted = c[rows] - peak[rows, None]
        if entropy:
            e = shifted.exp()
            exp_sum[rows], entropy_sum[rows] = e.sum(-1), e.mul_(shifted).sum(-1)
        else:
            exp_sum[rows] = shifted.exp_().sum(-1)
    return torch.stack([peak, exp_sum, entropy_sum, target_logit, c.sum(-1)], 1), argmax


def plain_gradient(logits: torch.Tensor, local_targets: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                   label_smoothing: float, z_loss: float, softcap: float, vocab_size: int) -> None:
    """triton_gradient in PyTorch."""
    rows_logits, unit = capped(logits, softcap)
    here = local_targets >= 0
    set_logits_grad(logits, rows_logits, unit, lse, torch.where(here, local_targets, 0), here.to(lse.dtype), scale,
                    label_smoothing, z_loss, vocab_size)


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
def walk_row(base, vocab, target, softcap, HAS_SOFTCAP: tl.constexpr, STATISTICS: tl.constexpr,
             BLOCK: tl.constexpr):
    """One walk over a row's vocab logits at base, online over BLOCK-wide tiles: (the capped logits'
    maximum m, sum exp(c - m), with STATISTICS sum exp(c - m)(c - m) (else 0), sum c, the target's
    logit (0 where the target is not among these columns), with STATISTICS the first maximum's column
    (else 0))."""
    running_max = tl.full([], float("-inf"), tl.float32)
    exp_sum = tl.zeros([], tl.float32)
    entropy_sum = tl.zeros([], tl.float32)
    total = tl.zeros([], tl.float32)
    target_logit = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        c = capped_logits(tl.load(base + cols, mask=mask, other=0.0), softcap, HAS_SOFTCAP)
        masked = tl.where(mask, c, float("-inf"))
        block_max = tl.max(masked, 0)
        new_max = tl.maximum(running_max, block_max)
        rescale = tl.exp(running_max - new_max)
        e = tl.where(mask, tl.exp(c - new_max), 0.0)
        if STATISTICS:
            shift = tl.where(exp_sum > 0.0, running_max - new_max, 0.0)  # where nothing is summed yet, -inf x 0
            entropy_sum = rescale * (entropy_sum + shift * exp_sum) + tl.sum(e * (c - new_max), 0)
            best = tl.where(block_max > running_max, start + tl.argmax(masked, 0), best)  # the first of maxima
        exp_sum = exp_sum * rescale + tl.sum(e, 0)
        running_max = new_max
        total += tl.sum(tl.where(mask, c, 0.0), 0)
        target_logit += tl.sum(tl.where(cols == target, c, 0.0), 0)
    return running_max, exp_sum, entropy_sum, total, target_logit, best


@triton.jit
def store_row_gradient(base, vocab, target, lse, scale, smoothing_vocab, label_smoothing, z_loss, softcap,
                       HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """A row's logits (vocab of them at base) become the gradient of scale x its loss with respect to the
    raw logits: (p - (1 - s) onehot - s / V + p 2 z lse) scale, times the cap's derivative."""
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        c = capped_logits(tl.load(base + cols, mask=mask, other=0.0), softcap, HAS_SOFTCAP)
        p = tl.exp(c - lse)  # p - onehot, then z-loss's term: p (1 + 2 z lse) - 1 cancels where p is near 1
        grad = p - label_smoothing / smoothing_vocab - tl.where(cols == target, 1.0 - label_smoothing, 0.0) \
            + p * (2.0 * z_loss * lse)
        grad = grad * scale
        if HAS_SOFTCAP:
            capped_unit = c / softcap
            grad = grad * (1.0 - capped_unit * capped_unit)
        tl.store(base + cols, grad, mask=mask)


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
    running_max, exp_sum, _, total, target_logit, _ = walk_row(base, vocab, target, softcap, HAS_SOFTCAP, False,
                                                               BLOCK)
    lse = running_max + tl.log(exp_sum)
    counted = target != ignore_index
    loss = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - total / vocab) \
        + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if NEEDS_GRAD:
        scale = tl.where(counted, tl.load(scale_ptr + row), 0.0)
        store_row_gradient(base, vocab, target, lse, scale, vocab, label_smoothing, z_loss, softcap, HAS_SOFTCAP,
                           BLOCK)


@triton.jit
def cross_entropy_statistics_kernel(logits_ptr, stride, targets_ptr, stats_ptr, argmax_ptr, vocab, softcap,
                                    HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """One row of float32 logits a program, read once (walk_row): its capped logits' maximum m, sum of
    exp(c - m), sum of exp(c - m) (c - m) (the entropy's), target logit (0 where the target is not among
    these columns: target -1) and sum into stats (rows, 5); the first maximum's column into argmax."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    target = tl.load(targets_ptr + row)
    running_max, exp_sum, entropy_sum, total, target_logit, best = walk_row(base, vocab, target, softcap,
                                                                            HAS_SOFTCAP, True, BLOCK)
    out = stats_ptr + row * 5
    tl.store(out, running_max)
    tl.store(out + 1, exp_sum)
    tl.store(out + 2, entropy_sum)
    tl.store(out + 3, target_logit)
    tl.store(out + 4, total)
    tl.store(argmax_ptr + row, best.to(tl.int64))


@triton.jit
def cross_entropy_gradient_kernel(logits_ptr, stride, targets_ptr, scale_ptr, lse_ptr, vocab, vocab_size,
                                  label_smoothing, z_loss, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """One row of float32 logits a program becomes its gradient, given the row's log-partition over the
    whole vocabulary (vocab_size words; these are vocab of them) and its scale (0 for an uncounted row)."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    store_row_gradient(base, vocab, tl.load(targets_ptr + row), tl.load(lse_ptr + row), tl.load(scale_ptr + row),
                       vocab_size, label_smoothing, z_loss, softcap, HAS_SOFTCAP, BLOCK)


def row_launch(block: int) -> tuple:
    """(BLOCK, num_warps) of the row kernels for rows of `block` logits: 128 to ROW_BLOCK wide (a tiny
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


def triton_statistics(logits: torch.Tensor, local_targets: torch.Tensor, softcap: float, entropy: bool) -> tuple:
    """((rows, 5) float32: each row's capped maximum m, sum of exp(c - m), sum of exp(c - m)(c - m),
    target logit (0 where its target is -1: not among these columns) and logits' sum; (rows,) its first
    maximum's column) of float32 logits (rows, V), V >= 1, read once (the entropy's sum always: it
    costs registers, not memory)."""
    rows, vocab = logits.shape
    block, num_warps = row_launch(vocab)
    stats = new_buffer((rows, 5), torch.float32, logits.device)
    argmax = new_buffer((rows,), torch.int64, logits.device)
    cross_entropy_statistics_kernel[(rows,)](logits, logits.stride(0), local_targets.contiguous(), stats, argmax,
                                             vocab, softcap or 1.0, HAS_SOFTCAP=bool(softcap), BLOCK=block,
                                             num_warps=num_warps)
    return stats, argmax


def triton_gradient(logits: torch.Tensor, local_targets: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                    label_smoothing: float, z_loss: float, softcap: float, vocab_size: int) -> None:
    """float32 logits (rows, V) become the gradient of their rows' scaled loss, given each row's
    log-partition over the whole vocabulary (of vocab_size words)."""
    rows, vocab = logits.shape
    block, num_warps = row_launch(vocab)
    cross_entropy_gradient_kernel[(rows,)](logits, logits.stride(0), local_targets.contiguous(), scale.contiguous(),
                                           lse.contiguous(), vocab, vocab_size, label_smoothing, z_loss,
                                           softcap or 1.0, HAS_SOFTCAP=bool(softcap), BLOCK=block,
                                           num_warps=num_warps)


def cuda_rows(logits: torch.Tensor, rows_targets: torch.Tensor, scale: torch.Tensor, ignore_index: int,
              label_smoothing: float, z_loss: float, softcap: float, needs_grad: bool) -> tuple:
    """triton_rows by the CUDA extension's kernel (csrc/depth_cross_entropy.cu)."""
    return torch.ops.acn_kernels_cuda.cross_entropy_rows(logits, rows_targets, scale, ignore_index, label_smoothing,
                                                         z_loss, softcap, needs_grad)


def cuda_statistics(logits: torch.Tensor, local_targets: torch.Tensor, softcap: float, entropy: bool) -> tuple:
    """triton_statistics by the CUDA extension's kernel."""
    return torch.ops.acn_kernels_cuda.cross_entropy_statistics(logits, local_targets, softcap)


def cuda_gradient(logits: torch.Tensor, local_targets: torch.Tensor, scale: torch.Tensor, lse: torch.Tensor,
                  label_smoothing: float, z_loss: float, softcap: float, vocab_size: int) -> None:
    """triton_gradient by the CUDA extension's kernel."""
    torch.ops.acn_kernels_cuda.cross_entropy_gradient(logits, local_targets, scale, lse, vocab_size, label_smoothing,
                                                      z_loss, softcap)


class RowKernels(NamedTuple):
    """A backend's row work: `rows` the fused pass (loss and gradient in one program a row), `statistics`
    and `gradient` the split one (the statistics, then, once the group has summed them, the gradient)."""
    rows: Callable
    statistics: Callable
    gradient: Callable


ROW_KERNELS = {"chunked": RowKernels(plain_rows, plain_statistics, plain_gradient),
               "triton": RowKernels(triton_rows, triton_statistics, triton_gradient),
               "cuda": RowKernels(cuda_rows, cuda_statistics, cuda_gradient)}


class LossOptions(NamedTuple):
    """The library op's scalar arguments, as the chunk loop reads them."""
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float  # 0: no cap
    is_layernorm: bool
    eps: float
    chunk_rows: int
    needs_grad: bool
    group_name: str  # "": one process
    vocab_size: int
    vocab_offset: int
    statistics: bool
    sequence_parallel: bool


@torch.library.custom_op("acn_kernels::depth_cross_entropy_chunked", mutates_args=())
def depth_cross_entropy_chunked(states: torch.Tensor, targets: torch.Tensor, norm_weight: torch.Tensor,
                                norm_bias: Optional[torch.Tensor], head_weight: torch.Tensor,
                                head_bias: Optional[torch.Tensor], weights: torch.Tensor, ignore_index: int,
                                label_smoothing: float, z_loss: float, softcap: float, is_layernorm: bool, eps: float,
                                chunk_rows: int, needs_grad: bool, group_name: str, vocab_size: int,
                                vocab_offset: int, statistics: bool, sequence_parallel: bool,
                                row_kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per_exit, statistics, dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias): the
    statistics (E, 3) (accuracy, agreement, entropy; empty without `statistics`), the gradients of the
    loss (empty without needs_grad, or for an absent bias). The row work by ROW_KERNELS[row_kernel]."""
    options = LossOptions(ignore_index, label_smoothing, z_loss, softcap, is_layernorm, eps, chunk_rows, needs_grad,
                          group_name, vocab_size, vocab_offset, statistics, sequence_parallel)
    with torch.autocast(states.device.type, enabled=False):  # float32 logits and sums, whatever autocast says
        return chunked_loss(states, targets, norm_weight, norm_bias, head_weight, head_bias, weights, options,
                            ROW_KERNELS[row_kernel])


class Rows(NamedTuple):
    """The row queue: every exit's rows of states, their targets, which are counted, each row's exit and
    scale (its exit's weight over its exit's counted rows), each exit's count."""
    states: torch.Tensor
    targets: torch.Tensor
    counted: torch.Tensor
    exit: torch.Tensor
    scale: torch.Tensor
    counts: torch.Tensor

    @staticmethod
    def of(states, targets, weights, ignore_index: int, compute: torch.dtype) -> "Rows":
        exits, dim = states.shape[0], states.shape[-1]
        rows_of_states = states.reshape(-1, dim)
        per_exit_rows = rows_of_states.shape[0] // exits
        rows_targets = targets.reshape(-1).long()  # any integer dtype, as the row work indexes with them
        if rows_targets.numel() != rows_of_states.shape[0]:  # every exit's targets
            rows_targets = rows_targets.repeat(exits)
        counted = rows_targets != ignore_index
        counts = counted.view(exits, -1).sum(1).clamp_(min=1)
        exit_of_row = torch.arange(exits, device=states.device).repeat_interleave(per_exit_rows)
        scale = (weights.to(compute) / counts).repeat_interleave(per_exit_rows)
        return Rows(rows_of_states, rows_targets, counted, exit_of_row, scale, counts)


def chunked_loss(states, targets, norm_weight, norm_bias, head_weight, head_bias, weights, options: LossOptions,
                 kernels: RowKernels) -> tuple:
    """depth_cross_entropy_chunked's work with the row work of `kernels`: the fused pass in one process
    without statistics, else the split one (split_rows)."""
    group = _vocabulary.group_named(options.group_name)
    local_states = states
    if options.sequence_parallel:
        states = _vocabulary.gather_tokens(states, group)
    exits = states.shape[0]
    compute = torch.promote_types(states.dtype, torch.float32)
    rows = Rows.of(states, targets, weights, options.ignore_index, compute)
    words = _vocabulary.Slice(options.vocab_offset, head_weight.shape[0], options.vocab_size).words
    head = head_weight[:words].to(compute)  # the padding rows' logits are never formed: their gradient is 0
    bias = None if head_bias is None else head_bias[:words].to(compute)
    losses = torch.empty(rows.targets.shape, dtype=compute, device=states.device)
    split = SplitRows(rows, options, group, kernels, compute, head_weight.shape[0]) \
        if group is not None or options.statistics else None
    grads = Gradients(states, norm_weight, norm_bias, head, bias, options, compute, partial=group is not None) \
        if options.needs_grad else None
    weight = norm_weight.to(compute)
    shift = None if norm_bias is None else norm_bias.to(compute)
    for start in range(0, rows.states.shape[0], options.chunk_rows):
        chunk = slice(start, start + options.chunk_rows)
        exit_of_row = rows.exit[chunk]
        normed, rstd = normalize(rows.states[chunk].to(compute), options.eps, options.is_layernorm)
        row_weight = exit_rows(weight, exit_of_row)
        hidden = normed * row_weight if shift is None else torch.addcmul(exit_rows(shift, exit_of_row), normed,
                                                                         row_weight)
        logits = chunk_logits(hidden, head, bias)
        if split is None:
            losses[chunk] = kernels.rows(logits, rows.targets[chunk], rows.scale[chunk], options.ignore_index,
                                         options.label_smoothing, options.z_loss, options.softcap,
                                         options.needs_grad)[0]
        else:
            losses[chunk] = split(logits, chunk)
        if grads is not None:  # the row work left the logits' gradient in their buffer
            grads.add_chunk(logits, hidden, normed, rstd, row_weight, exit_of_row, chunk)
        del logits  # freed before the next chunk's are formed: one chunk of logits alive at a time, not two
    per_exit = losses.view(exits, -1).sum(1, dtype=torch.float64) / rows.counts
    loss = (weights.double() * per_exit).sum().to(compute)
    statistics = split.statistics(exits) if options.statistics else states.new_empty(0, dtype=torch.float32)
    gradients = grads.total(group, options.sequence_parallel, norm_weight, norm_bias, head_weight, head_bias) \
        if grads is not None else [local_states.new_empty(0) for _ in range(5)]  # distinct: outputs must not alias
    return (loss, per_exit.float(), statistics, *gradients)


CPU_LOGIT_COLUMNS = 8192


def chunk_logits(hidden: torch.Tensor, head: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A chunk's logits, hidden @ head^T + bias. On a CPU, CPU_LOGIT_COLUMNS words at a time: the BLAS
    packs a panel of the head's transpose across every column of a call (measured: 32 MiB beside a 32 MiB
    chunk of 32064 words), which would be the loop's peak; on a GPU one GEMM."""
    if hidden.device.type != "cpu" or head.shape[0] <= CPU_LOGIT_COLUMNS:
        return torch.nn.functional.linear(hidden, head, bias)
    logits = hidden.new_empty(hidden.shape[0], head.shape[0])
    for start in range(0, head.shape[0], CPU_LOGIT_COLUMNS):
        words = slice(start, start + CPU_LOGIT_COLUMNS)
        if bias is None:
            torch.mm(hidden, head[words].t(), out=logits[:, words])
        else:
            torch.addmm(bias[words], hidden, head[words].t(), out=logits[:, words])
    return logits


def exit_rows(param: torch.Tensor, exit_of_row: torch.Tensor) -> torch.Tensor:
    """A norm parameter shared by every exit (D,), or each row's exit's of a per-exit one (E, D)."""
    return param if param.dim() == 1 else param[exit_of_row]


def add_rows(total: torch.Tensor, values: torch.Tensor, exit_of_row: torch.Tensor) -> None:
    """values (rows, D) summed into total: (D,) over every row, (E, D) each row into its exit's."""
    if total.dim() == 1:
        total.add_(values.sum(0, dtype=torch.float64))
    else:
        total.index_add_(0, exit_of_row, values.double())


class SplitRows:
    """The split row pass over a chunk: the statistics kernel reads each row's logits once, the group sums
    them in TWO all-reduces (every row's maximum, MAX; the rescaled exp-sums, entropy sums, target logits
    and logits' sums, SUM; a third, MIN, of the argmax's column with `statistics`), the losses follow on
    the rows, and the gradient kernel writes the logits' gradient with the whole vocabulary's lse. With
    no group the same without the collectives."""

    def __init__(self, rows: Rows, options: LossOptions, group, kernels: RowKernels, compute: torch.dtype,
                 head_rows: int):
        self.rows, self.options, self.group, self.kernels, self.head_rows = rows, options, group, kernels, head_rows
        self.first = group is not None
        size = rows.targets.shape[0]
        self.argmax = torch.empty(size, dtype=torch.int64, device=rows.targets.device) if options.statistics else None
        self.entropy = torch.empty(size, dtype=compute, device=rows.targets.device) if options.statistics else None

    def __call__(self, logits: torch.Tensor, chunk: slice) -> torch.Tensor:
        o, rows = self.options, self.rows
        counted = rows.counted[chunk]
        local = rows.targets[chunk] - o.vocab_offset
        local_targets = torch.where(counted & (local >= 0) & (local < logits.shape[1]), local, -1)
        if logits.shape[1]:
            stats, argmax = self.kernels.statistics(logits, local_targets, o.softcap, o.statistics)
        else:  # a rank holding only padding: nothing of any row
            stats = logits.new_tensor([float("-inf"), 0, 0, 0, 0]).expand(logits.shape[0], 5).contiguous()
            argmax = local_targets.new_zeros(logits.shape[0])
        peak = self.reduced_maximum(stats[:, 0])
        rescale = torch.exp(stats[:, 0] - peak)
        shift = torch.where(stats[:, 1] > 0, stats[:, 0] - peak, 0)
        sums = torch.stack([rescale * stats[:, 1], rescale * (stats[:, 2] + shift * stats[:, 1]), stats[:, 3],
                            stats[:, 4]], 1)
        if self.group is not None:
            _vocabulary.all_reduce(sums, dist.ReduceOp.SUM, self.group)
        exp_sum, entropy_sum, target_logit, total = sums.unbind(1)
        lse = peak + exp_sum.log()
        losses = row_losses(lse, target_logit, total, o.vocab_size, o.label_smoothing, o.z_loss) * counted
        if o.statistics:
            self.entropy[chunk] = exp_sum.log() - entropy_sum / exp_sum
            self.argmax[chunk] = self.reduced_argmax(argmax, stats[:, 0], peak)
        if o.needs_grad and logits.shape[1]:
            self.kernels.gradient(logits, local_targets, rows.scale[chunk] * counted, lse, o.label_smoothing,
                                  o.z_loss, o.softcap, o.vocab_size)
        return losses

    def reduced_maximum(self, peak: torch.Tensor) -> torch.Tensor:
        """Every row's maximum over the group's logits (the first call checks the group's slices in the same
        collective)."""
        if self.group is None:
            return peak
        world = dist.get_world_size(self.group)
        if not self.first:
            return _vocabulary.all_reduce(peak.clone(), dist.ReduceOp.MAX, self.group)
        self.first = False
        split = _vocabulary.Slice(self.options.vocab_offset, self.head_rows, self.options.vocab_size)
        layout = _vocabulary.layout_entries(split, world, dist.get_rank(self.group), peak.dtype, peak.device)
        reduced = _vocabulary.all_reduce(torch.cat([peak, layout]), dist.ReduceOp.MAX, self.group)
        _vocabulary.check_layout(reduced[peak.shape[0]:], world)
        return reduced[:peak.shape[0]]

    def reduced_argmax(self, argmax: torch.Tensor, peak_here: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
        """Each row's first maximum's vocabulary index: the lowest index among the ranks holding the maximum."""
        index = argmax + self.options.vocab_offset
        if self.group is None:
            return index
        candidates = torch.where(peak_here == peak, index, torch.iinfo(torch.int64).max)
        return _vocabulary.all_reduce(candidates, dist.ReduceOp.MIN, self.group)

    def statistics(self, exits: int) -> torch.Tensor:
        """(E, 3) float32: each exit's accuracy, agreement with the last exit's argmax, mean entropy."""
        rows = self.rows
        argmax = self.argmax.view(exits, -1)
        counted = rows.counted.view(exits, -1)
        values = (argmax == rows.targets.view(exits, -1), argmax == argmax[-1], self.entropy.view(exits, -1))
        sums = torch.stack([torch.where(counted, value, 0).sum(1, dtype=torch.float64) for value in values], 1)
        return (sums / rows.counts[:, None]).float()


class Gradients:
    """The chunks' gradients as they add up: dstates's rows written (in the compute dtype where they are
    partial sums over the group's slices of the vocabulary, summed once at the end, in place: a buffer
    with room for the norm's gradients behind them, so that one all-reduce takes all, without a copy of
    dstates), the norm's weight and bias in float64, the head's weight in groups (GroupedSum), its bias
    in float64."""

    def __init__(self, states, norm_weight, norm_bias, head, bias, options: LossOptions, compute: torch.dtype,
                 partial: bool):
        vector = dict(dtype=torch.float64, device=states.device)
        self.head, self.is_layernorm, self.states_dtype = head, options.is_layernorm, states.dtype
        norms = norm_weight.numel() + (0 if norm_bias is None else norm_bias.numel())
        self.flat = new_buffer(states.numel() + norms, compute, states.device) if partial else None
        self.dstates = self.flat[:states.numel()].view(states.shape) if partial \
            else new_buffer(states.shape, states.dtype, states.device)
        self.dnorm_weight = torch.zeros(norm_weight.shape, **vector)
        self.dnorm_bias = None if norm_bias is None else torch.zeros(norm_bias.shape, **vector)
        self.dhead = GroupedSum(head, -(-self.dstates[..., 0].numel() // options.chunk_rows))
        self.dbias = None if bias is None else torch.zeros(bias.shape, **vector)

    def add_chunk(self, dlogits, hidden, normed, rstd, row_weight, exit_of_row, chunk: slice) -> None:
        self.dhead.addmm_(dlogits.t(), hidden)
        if self.dbias is not None:
            self.dbias.add_(dlogits.sum(0, dtype=torch.float64))
        dhidden = dlogits @ self.head
        add_rows(self.dnorm_weight, dhidden * normed, exit_of_row)
        if self.dnorm_bias is not None:
            add_rows(self.dnorm_bias, dhidden, exit_of_row)
        rows = self.dstates.view(-1, self.dstates.shape[-1])
        rows[chunk] = normalize_backward(dhidden * row_weight, normed, rstd, self.is_layernorm)

    def total(self, group, sequence_parallel: bool, norm_weight, norm_bias, head_weight, head_bias) -> list:
        """[dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias] (empty for an absent bias), each
        in its input's dtype and shape: over a group, the partial sums summed in one all-reduce (or the
        states' reduce-scattered over the sequence, and the norm's all-reduced)."""
        dhead = padded(self.dhead.total(), head_weight.shape[0])
        dbias = None if self.dbias is None else padded(self.dbias, head_bias.shape[0])
        dstates, norms = self.dstates, [g for g in (self.dnorm_weight, self.dnorm_bias) if g is not None]
        if group is not None:
            dstates, norms = summed_over(group, self.flat, dstates, norms, sequence_parallel)
        grads = [dstates, norms[0], norms[1] if len(norms) > 1 else None, dhead, dbias]
        like = (norm_weight.dtype, None if norm_bias is None else norm_bias.dtype, head_weight.dtype,
                None if head_bias is None else head_bias.dtype)
        return [dstates.new_empty(0) if g is None else g.to(dtype)
                for g, dtype in zip(grads, (self.states_dtype, *like))]


def padded(grad: torch.Tensor, rows: int) -> torch.Tensor:
    """A gradient of the head's word rows, with zero rows for its padding."""
    if grad.shape[0] == rows:
        return grad
    return torch.cat([grad, grad.new_zeros((rows - grad.shape[0], *grad.shape[1:]))])


def summed_over(group, flat: torch.Tensor, dstates: torch.Tensor, norms: list, sequence_parallel: bool) -> tuple:
    """The group's sums of the partial gradients, dstates the head of `flat` and the norm's copied behind
    it: all in one all-reduce of `flat` in place, or, for sequence-parallel states, dstates
    reduce-scattered back to each rank's tokens and the norm's all-reduced."""
    tail = flat[dstates.numel():]
    torch.cat([g.flatten() for g in norms], out=tail)
    if sequence_parallel:
        dstates = _vocabulary.scatter_token_grad(dstates, group)
        _vocabulary.all_reduce(tail, dist.ReduceOp.SUM, group)
    else:
        _vocabulary.all_reduce(flat, dist.ReduceOp.SUM, group)
    sizes = [g.numel() for g in norms]
    return dstates, [g.view(n.shape).clone() for g, n in zip(tail.split(sizes), norms)]  # outputs never alias


class GroupedSum:
    """A (V, D) sum of one GEMM's product per chunk, kept as addmm_ accumulates it; past GROUPED_ABOVE
    chunks (a small chunk_rows) the products go into a group of about sqrt(chunks), and each full group
    into the total, so that the float32 sum rounds about 2 sqrt(chunks) times, not once a chunk (one
    more (V, D) buffer, then). Measured against float64 (1800 rows of tests/test_depth_cross_entropy.py's
    sizes): 225 chunks added one by one give 0.7x eager PyTorch's float32 error in the head's gradient,
    600 chunks up to 2.2x."""

    def __init__(self, like: torch.Tensor, chunks: int):
        self.sum = torch.zeros_like(like)
        self.group_size = round(chunks ** 0.5) if chunks > GROUPED_ABOVE else chunks
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
                                     needs_grad, group_name, vocab_size, vocab_offset, statistics, sequence_parallel,
                                     row_kernel):
    compute = torch.promote_types(states.dtype, torch.float32)
    exits = states.shape[0]
    loss, per_exit = states.new_empty((), dtype=compute), states.new_empty(exits, dtype=torch.float32)
    stats = states.new_empty((exits, 3) if statistics else (0,), dtype=torch.float32)
    grads = [(states, states)] + [(p, p) for p in (norm_weight, norm_bias, head_weight, head_bias)]
    return (loss, per_exit, stats, *(states.new_empty(like.shape if needs_grad and like is not None else (0,),
                                                      dtype=like.dtype if needs_grad and like is not None
                                                      else states.dtype)
                                     for like, _ in grads))


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])
    ctx.has_norm_bias, ctx.has_head_bias = inputs[3] is not None, inputs[5] is not None
    ctx.set_materialize_grads(False)


def backward(ctx, dloss, *_unused):
    """The gradients forward computed, scaled by the loss's (a scalar) in place: no second copy of the
    states' and the head's gradients at the peak (a second backward through the same graph meets
    autograd's own error for a saved tensor modified in place, never a wrong gradient)."""
    grads = ctx.saved_tensors
    if dloss is None or not grads[0].numel():
        return (None,) * 21
    dstates, dnorm_weight, dnorm_bias, dhead_weight, dhead_bias = (g.mul_(dloss.to(g.dtype)) for g in grads)
    return (dstates, None, dnorm_weight, dnorm_bias if ctx.has_norm_bias else None, dhead_weight,
            dhead_bias if ctx.has_head_bias else None, *(None,) * 15)


depth_cross_entropy_chunked.register_autograd(first_order("depth_cross_entropy", backward), setup_context=setup_context)


def depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, *, weights=None, head_bias=None,
                        ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, norm="layernorm", eps=1e-5,
                        backend="auto", chunk_rows=None, statistics=False, tp_group=None, vocab_size=None,
                        sequence_parallel=False):
    """(loss, per_exit), or (loss, per_exit, ExitStatistics) with statistics=True: every exit's mean
    next-token loss through one final norm and head (see the module docstring), the loss the weighted sum
    (weights: (E,), uniform 1/E by default), per_exit (E,) float32 and detached; targets (...) for every
    exit or (E, ...) one set an exit, the norm's weight and bias (D,) or (E, D). chunk_rows rows of
    logits at a time (by default 32 MiB of them): backend "triton" (or "cublas": the GEMMs are cuBLAS's
    on every path) with the Triton row kernels, "cuda" with the fused one's CUDA twin (the extension,
    CUDA tensors; one process, no statistics), "chunked" with the row work in PyTorch, "auto" Triton's
    where the fused ops run (a GPU, or Triton's interpreter) on float32 and 16-bit states, else the
    chunked path; "reference" is the specification, which materializes every logit.

    Over a tensor-parallel group (tp_group, or head_weight a DTensor sharded on its rows): head_weight
    and head_bias are this rank's rows of the vocabulary (ops/_vocabulary.py: Megatron's layout, rows
    past vocab_size padding), states whole on every rank, or this rank's share of dimension 1 with
    sequence_parallel=True (gathered in forward, the gradient reduce-scattered); the loss, per_exit
    and statistics are the whole vocabulary's on every rank, the head's gradients this rank's rows."""
    tensors, group, global_rows, sharded = _vocabulary.local_tensors(
        dict(states=states, norm_weight=norm_weight, norm_bias=norm_bias, head_weight=head_weight,
             head_bias=head_bias), tp_group)
    states, norm_weight, norm_bias, head_weight, head_bias = tensors.values()
    check_bool("statistics", statistics)
    check_bool("sequence_parallel", sequence_parallel)
    sequence_parallel = sequence_parallel or sharded
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be None or a torch.distributed ProcessGroup, got {type(group).__name__}")
    if sequence_parallel and group is None:
        raise ValueError("sequence_parallel=True needs tp_group (the group whose ranks hold the tokens' shares)")
    world = 1 if group is None else dist.get_world_size(group)
    if not isinstance(head_weight, torch.Tensor) or head_weight.dim() != 2:
        check_tensor("head_weight", head_weight)
        raise ValueError(f"head_weight must have shape (vocabulary rows, D), got {tuple(head_weight.shape)}")
    split = _vocabulary.slice_of(group, head_weight.shape[0], vocab_size, global_rows)
    check_arguments(states, targets, norm_weight, norm_bias, head_weight, weights, head_bias, ignore_index,
                    label_smoothing, z_loss, softcap, norm, eps, chunk_rows, split.vocab_size,
                    tokens=world if sequence_parallel else 1)
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        if group is not None:
            raise ValueError("tp_group must be None for backend='reference', which runs in one process")
        return reference.depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, weights=weights,
                                             head_bias=head_bias, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                             norm=norm, eps=eps, statistics=statistics)
    row_kernel = row_kernel_for(backend, states)
    return run_forward(depth_cross_entropy_chunked, states, targets, norm_weight, norm_bias, head_weight, weights,
                       head_bias, ignore_index, label_smoothing, z_loss, softcap, norm, eps, chunk_rows, row_kernel,
                       statistics=statistics, group=group, split=split, sequence_parallel=sequence_parallel)


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
                label_smoothing, z_loss, softcap, norm, eps, chunk_rows, row_kernel, *, statistics=False, group=None,
                split=None, sequence_parallel=False):
    """(loss, per_exit[, ExitStatistics]) from a registered chunked op (or its twin in cuda-host-check)."""
    if weights is None:
        weights = torch.full((states.shape[0],), 1.0 / states.shape[0], device=states.device,
                             dtype=torch.promote_types(states.dtype, torch.float32))  # 1/3 in float64 for float64
    split = split or _vocabulary.Slice(0, head_weight.shape[0], head_weight.shape[0])
    differentiable = [t for t in (states, norm_weight, norm_bias, head_weight, head_bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    dim = states.shape[-1]
    rows = chunk_rows if chunk_rows is not None else chunk_rows_for(states.numel() // dim, split.words, dim,
                                                                    states.device)
    loss, per_exit, stats, *_ = forward_op(
        states, targets, norm_weight, norm_bias, head_weight, head_bias, weights.detach(), int(ignore_index),
        float(label_smoothing), float(z_loss), float(softcap or 0.0), norm == "layernorm", float(eps), int(rows),
        needs_grad, _vocabulary.name_of(group), split.vocab_size, split.offset, statistics, sequence_parallel,
        row_kernel)
    if not statistics:
        return loss, per_exit.detach()
    return loss, per_exit.detach(), ExitStatistics(*stats.unbind(1))


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
