"""Running a fused op against its reference with the dtype-scaled tolerance rule of
acn_kernels.tools.agreement (issue 3), on this machine's device."""
from __future__ import annotations

import pytest
import torch

from acn_kernels.tools.agreement import compare_op, run  # noqa: F401 - run is the tests' helper too

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The fused backends every op test runs on; the CUDA extension's only where a GPU is.
FUSED_BACKENDS = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# The GEMM ops' also run on "cublas" (cuBLAS and Triton's elementwise kernels; the norm ops' is "triton").
GEMM_BACKENDS = [*FUSED_BACKENDS, pytest.param("cublas", id="cublas")]
FP32_RTOL = 1e-5 if DEVICE == "cpu" else 1e-4  # the interpreter is exact fp32; GPUs reorder sums


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def check_op(fused, reference, args, dtype, backend="triton", **kwargs):
    """A fused backend ("triton" or "cuda") against the float64 reference, forward and every gradient."""
    problems, outs, grads = compare_op(lambda *a, **k: fused(*a, backend=backend, **k), reference, args, dtype,
                                       FP32_RTOL, **kwargs)
    assert not problems, "; ".join(problems)
    return outs, grads
