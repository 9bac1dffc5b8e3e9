"""Running a fused op and its reference on the same inputs, and the dtype-scaled tolerance rule.

The rule (issue 3): fp32 results must match the float64 reference tightly; for fp16/bf16 the
kernel's max error against the float64 reference may be at most twice the error of eager PyTorch
(the reference run at the input precision) plus a small atol scaled by the dtype's epsilon.
"""
from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The fused backends every op test runs on; the CUDA extension's only where a GPU is.
FUSED_BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
FP32_RTOL = 1e-5 if DEVICE == "cpu" else 1e-4  # the interpreter is exact fp32; GPUs reorder sums
EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def _leaves(args, convert):
    return [convert(a).requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def run(fn, args, out_grads=None, convert=lambda t: t.detach()):
    """(outputs, input grads, out_grads): fn(*leaves) and the gradients of every floating input
    for fixed output gradients (drawn at random on the first call)."""
    leaves = _leaves(args, convert)
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if out_grads is None:
        out_grads = [randn(*o.shape, dtype=o.dtype) for o in outputs]
    grads_in = [g.to(o.dtype) for g, o in zip(out_grads, outputs)]
    wrt = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    grads = torch.autograd.grad(outputs, wrt, grads_in, allow_unused=True)
    return outputs, grads, out_grads


def assert_matches(actual: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten, NaN-poisoned element?)"
    if dtype == torch.float32:
        scale = exact.abs().max().clamp(min=1.0).item()
        torch.testing.assert_close(actual.double(), exact, rtol=FP32_RTOL, atol=FP32_RTOL * scale, msg=what)
        return
    kernel_err = (actual.double() - exact).abs().max().item()
    eager_err = (eager.double() - exact).abs().max().item()
    atol = 2 * EPS[dtype] * exact.abs().max().clamp(min=1.0).item()
    assert kernel_err <= 2 * eager_err + atol, (
        f"{what}: kernel error {kernel_err:.3g} > 2 x eager error {eager_err:.3g} + atol {atol:.3g}")


def check_op(fused, reference, args, dtype, backend="triton", **kwargs):
    """A fused backend ("triton" or "cuda") against the float64 reference, forward and every gradient."""
    outs, grads, out_grads = run(lambda *a: fused(*a, backend=backend, **kwargs), args)
    exact_outs, exact_grads, _ = run(lambda *a: reference(*a, **kwargs), args, out_grads,
                                     convert=lambda t: t.detach().double())
    eager_outs, eager_grads, _ = run(lambda *a: reference(*a, **kwargs), args, out_grads)
    for i, (o, e, g) in enumerate(zip(outs, exact_outs, eager_outs)):
        assert o.dtype == g.dtype, f"output {i}: dtype {o.dtype}, reference gives {g.dtype}"
        assert_matches(o, e, g, dtype, f"output {i}")
    for i, (o, e, g) in enumerate(zip(grads, exact_grads, eager_grads)):
        assert_matches(o, e, g, dtype, f"gradient {i}")
    return outs, grads
