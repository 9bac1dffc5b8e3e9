"""Agreement with the reference: running an op and its reference on the same inputs, and the
dtype-scaled tolerance rule that the op tests and `cuda-host-check` both apply.

The rule: float32 results match the float64 reference within rtol (and atol = rtol x the largest
exact magnitude, at least 1), or, where eager PyTorch's own float32 error is larger (a reduction of
many cancelling terms: a gate's gradient), are at most twice that error plus the atol; for
float16/bfloat16 the op's largest error against the float64 reference is at most twice eager
PyTorch's (the reference run at the input precision) plus 2 eps x that magnitude.

A 0-dim parameter's gradient (a gate's) is one sum over every element of the inputs: its rounding
error is a random walk of sqrt(N) steps of the 16-bit operands' size, whatever the sum's value
(which can cancel to near zero), and eager's error is a single draw of that walk. Its magnitude is
therefore at least sqrt(N) (the inputs are unit-scale draws), so a lucky eager draw cannot fail a
kernel that is typically more accurate than eager, while a lost block of terms still does.
"""
from __future__ import annotations

import torch

EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _leaves(args, convert):
    return [convert(a).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def run(fn, args, out_grads=None, convert=lambda t: t.detach()):
    """(outputs, input grads, out_grads): fn(*leaves) and the gradients of every floating input
    for fixed output gradients (drawn at random on the first call; outputs without a gradient, such
    as statistics, compared forward only)."""
    leaves = _leaves(args, convert)
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if out_grads is None:
        out_grads = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outputs]
    differentiable = [(o, g.to(o.dtype)) for g, o in zip(out_grads, outputs) if o.requires_grad]  # not statistics
    wrt = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    grads = torch.autograd.grad([o for o, _ in differentiable], wrt, [g for _, g in differentiable],
                                allow_unused=True)
    return outputs, grads, out_grads


def mismatch(actual, exact, eager, dtype: torch.dtype, fp32_rtol: float, what: str,
             least_scale: float = 1.0) -> str | None:
    """Why `actual` breaks the rule, or None when it keeps it; the magnitude is at least `least_scale`."""
    if actual is None or exact is None:
        return None if actual is None and exact is None else f"{what}: one side has no gradient"
    if actual.shape != exact.shape:
        return f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if not torch.isfinite(actual).all():
        return f"{what}: non-finite values (an unwritten, NaN-poisoned element?)"
    if not exact.numel():
        return None
    scale = exact.abs().max().clamp(min=max(least_scale, 1.0)).item()
    deviation = (actual.double() - exact).abs()
    error = deviation.max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    if dtype == torch.float32:  # elementwise, as torch.testing.assert_close
        excess = (deviation - (fp32_rtol * scale + fp32_rtol * exact.abs())).max().item()
        if excess <= 0 or error <= 2 * eager_error + fp32_rtol * scale:
            return None
        return (f"{what}: error {error:.3g} beyond rtol = atol/scale = {fp32_rtol:g} and beyond twice eager's "
                f"{eager_error:.3g}")
    atol = 2 * EPS[dtype] * scale
    if error <= 2 * eager_error + atol:
        return None
    return f"{what}: kernel error {error:.3g} > 2 x eager error {eager_error:.3g} + atol {atol:.3g}"


def _least_scale(exact, dtype: torch.dtype, terms: int) -> float:
    """sqrt(terms) for a 16-bit op's 0-dim gradient (a sum over every element), else 1."""
    return terms ** 0.5 if exact is not None and exact.dim() == 0 and dtype != torch.float32 else 1.0


def compare_op(fused, reference, args, dtype: torch.dtype, fp32_rtol: float, **kwargs):
    """(problems, outputs, gradients): every way `fused(*args, **kwargs)` breaks the rule, forward
    and every gradient, against the float64 reference (empty when it agrees), and what it gave."""
    outs, grads, out_grads = run(lambda *a: fused(*a, **kwargs), args)
    exact_outs, exact_grads, _ = run(lambda *a: reference(*a, **kwargs), args, out_grads,
                                     convert=lambda t: t.detach().double())
    eager_outs, eager_grads, _ = run(lambda *a: reference(*a, **kwargs), args, out_grads)
    problems = [f"output {i}: dtype {o.dtype}, reference gives {g.dtype}"
                for i, (o, g) in enumerate(zip(outs, eager_outs)) if o.dtype != g.dtype]
    pairs = [(f"output {i}", o, e, g) for i, (o, e, g) in enumerate(zip(outs, exact_outs, eager_outs))]
    pairs += [(f"gradient {i}", o, e, g) for i, (o, e, g) in enumerate(zip(grads, exact_grads, eager_grads))]
    terms = max(a.numel() for a in args if isinstance(a, torch.Tensor))
    problems += [p for what, o, e, g in pairs
                 if (p := mismatch(o, e, g, dtype, fp32_rtol, what, _least_scale(e, dtype, terms))) is not None]
    return problems, outs, grads
