"""The specification: every fused op written in plain PyTorch, differentiable by autograd.

It imports nothing that it checks. Each function computes in the dtype it is given (so float64
inputs give the exact answer the tests measure against) and follows the same dtype rules as the
fused ops: y_out keeps y's dtype, every other output keeps x's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

NORMS = ("layernorm", "rmsnorm")
NORMALIZE = ("input", "sum")
def swiglu(z: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for z = [gate | up] along the last dimension (Llama's MLP): half z's width."""
    gate, up = z.chunk(2, dim=-1)
    return F.silu(gate) * up


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "identity": lambda z: z,
    "swiglu": swiglu,
}


def apply_norm(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float, kind: str) -> torch.Tensor:
    """LayerNorm or RMSNorm over the last dimension by PyTorch's own kernels, so the reference
    backend is what eager PyTorch does: LayerNorm takes a 16-bit input with float32 parameters as
    it is; RMSNorm (no mixed-dtype kernel) computes in float32. Float64 inputs stay float64."""
    shape = (v.shape[-1],)
    if weight.dtype != v.dtype:  # the mixed kernels take float32 parameters; float64 wants float64
        param_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        weight, bias = weight.to(param_dtype), (bias.to(param_dtype) if bias is not None else None)
    if kind == "layernorm":
        return F.layer_norm(v, shape, weight, bias, eps)
    compute = torch.promote_types(v.dtype, torch.float32)
    out = F.rms_norm(v.to(compute), shape, weight.to(compute), eps)
    return out if bias is None else out + bias.to(compute)


def accumulate(y: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """y + x in y's dtype; the chain's start (y is None) is x itself."""
    return x if y is None else (y + x).to(y.dtype)


def accumulate_norm(x, y, weight, bias=None, *, eps=1e-5, norm="layernorm", normalize="input"):
    """(y_out, out): y_out = y + x, out = norm(x) or norm(y_out) in x's dtype."""
    y_out = accumulate(y, x)
    source = x if normalize == "input" else y_out
    return y_out, apply_norm(source, weight, bias, eps, norm).to(x.dtype)


def hybrid_accumulate_norm(x, f, y, gate, weight, bias=None, *, long_weight=None, eps=1e-5, norm="layernorm"):
    """(x_next, y_out, out): x_next = gate * x + f (the short path), y_out = y + long_weight * f (the
    long path; 1 without a long weight), out = norm(x_next), in x's dtype; y_out in y's (f's without y)."""
    x_next = (gate * x + f).to(x.dtype)
    term = f if long_weight is None else (long_weight * f).to(f.dtype)
    return x_next, accumulate(y, term), apply_norm(x_next, weight, bias, eps, norm).to(x.dtype)


def linear_act_accumulate(x, weight, bias, y, *, activation="gelu"):
    """(h, y_out): h = act(x @ weight.T + bias), y_out = y + h (swiglu: weight's rows are the gate's,
    then the up projection's, and h half their count wide)."""
    h = ACTIVATIONS[activation](F.linear(x, weight, bias))
    return h, accumulate(y, h)


def linear(x, weight, bias=None):
    """x @ weight.T + bias."""
    return F.linear(x, weight, bias)


def feed_forward(x, w1, b1, w2, b2, *, activation="gelu"):
    """act(x @ w1.T + b1) @ w2.T + b2."""
    return F.linear(ACTIVATIONS[activation](F.linear(x, w1, b1)), w2, b2)


def probe_norm(xs, weight, bias=None, *, eps=1e-5, norm="layernorm"):
    """norm(y_k) for k = 0..L, where y_k = xs[0] + ... + xs[k]; shape of xs."""
    outs, y = [], None
    for x in xs:
        y = accumulate(y, x)
        outs.append(apply_norm(y, weight, bias, eps, norm).to(x.dtype))
    return torch.stack(outs)


class ExitStatistics(NamedTuple):
    """Each exit's (E,) float32 statistics over its counted rows (0 where none): the token accuracy (the
    argmax is the target; the lower index on a tie, as torch.argmax), the agreement of its argmax with the
    last exit's (the acceptance of a greedy self-speculative draft at that depth) and the mean entropy."""
    accuracy: torch.Tensor
    agreement: torch.Tensor
    entropy: torch.Tensor


def exit_param(param: torch.Tensor | None, exit: int) -> torch.Tensor | None:
    """A norm parameter shared by every exit (D,), or exit's row of a per-exit one (E, D)."""
    return param if param is None or param.dim() == 1 else param[exit]


def depth_cross_entropy(states, targets, norm_weight, norm_bias, head_weight, *, weights=None, head_bias=None,
                        ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, norm="layernorm", eps=1e-5,
                        statistics=False):
    """(loss, per_exit), with statistics (loss, per_exit, ExitStatistics): every exit's mean next-token
    loss through one final norm and head, every logit materialized. states (E, ..., D), targets (...)
    shared by every exit or (E, ...) one set an exit (multi-token prediction), the norm's weight and bias
    (D,) or one an exit (E, D): for exit e, logits = head(norm_e(states[e])) (in float32, float64 for
    float64 states), capped as softcap tanh(logits / softcap) where given; per counted row (target !=
    ignore_index), with lse the log-partition,

        (1 - s) (lse - logit_target) + s (lse - mean(logits)) + z_loss lse^2      (s = label_smoothing)

    per_exit[e] the mean over exit e's counted rows (0 without any), detached, float32; loss = sum_e
    weights[e] per_exit[e], weights uniform 1/E by default."""
    exits = states.shape[0]
    compute = torch.promote_types(states.dtype, torch.float32)
    if norm_weight.dim() == 1 and (norm_bias is None or norm_bias.dim() == 1):
        hidden = apply_norm(states, norm_weight, norm_bias, eps, norm)
    else:
        hidden = torch.stack([apply_norm(states[e], exit_param(norm_weight, e), exit_param(norm_bias, e), eps, norm)
                              for e in range(exits)])
    logits = F.linear(hidden.to(compute), head_weight.to(compute), None if head_bias is None else head_bias.to(compute))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.flatten(1, -2)                                   # (E, N, V)
    shared = targets.dim() == states.dim() - 2
    rows = targets.flatten().long().expand(exits, -1) if shared else targets.reshape(exits, -1).long()
    counted = rows != ignore_index
    counts = counted.sum(-1).clamp(min=1)
    lse = torch.logsumexp(logits, -1)
    target_logit = logits.gather(-1, torch.where(counted, rows, 0)[..., None])[..., 0]  # ignore_index: any integer
    losses = (1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logits.mean(-1)) \
        + z_loss * lse ** 2
    per_exit = (losses * counted).sum(-1) / counts
    weights = torch.full((exits,), 1.0 / exits, dtype=compute, device=states.device) if weights is None \
        else weights.detach().to(device=states.device, dtype=compute)  # a schedule's, not learned
    loss = (weights * per_exit).sum(), per_exit.detach().float()
    if not statistics:
        return loss
    with torch.no_grad():
        argmax = logits.argmax(-1)
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        means = [((value * counted).sum(-1) / counts).float()
                 for value in (argmax == rows, argmax == argmax[-1], entropy)]
    return (*loss, ExitStatistics(*means))
