"""Randomized cases of every op on every backend this machine runs: the Triton kernels (under the
interpreter here; the GEMM ops on the "cublas" path too) and the CUDA kernels (through the host
layer), drawn by hypothesis from acn_kernels.tools.cases: widths 1..4097 with every path's edges below
it (1..20000 under the fuzz profile), 1..64 rows, 1..132 SMs, sm_80 and sm_90, aligned and shifted
pointers, every dtype, running-sum dtype and option; forward and every gradient against the float64
reference, outputs NaN-poisoned.

CI runs a derandomized budget per op (the "ci" profile); `HYPOTHESIS_PROFILE=fuzz
ACN_KERNELS_FUZZ_EXAMPLES=1000 pytest tests/test_randomized.py --hypothesis-seed=0` runs 1000 per op
and backend at a fixed seed."""
import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, note, settings, strategies as st

from acn_kernels import ops
from acn_kernels.ops import _common
from acn_kernels.tools.cases import (CI_MAX_WIDTH, DEPTH_CHUNK_ROWS, GEMM_OPS, KERNEL_OPS, MAX_WIDTH, case_inputs,
                                    depth_loss, draw_case)
from acn_kernels.tools.cuda_host_check import HostKernels, HostOps, public_ops, run_case, toolchain

from op_harness import DEVICE, check_op

FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
WIDEST = MAX_WIDTH if FUZZING else CI_MAX_WIDTH


def budget(ci_examples: int):
    """ci_examples per test in CI; the fuzz profile's count when fuzzing."""
    return settings(max_examples=settings.default.max_examples if FUZZING else ci_examples)


def drawn_case(data, op):
    case = draw_case(op, lambda low, high: data.draw(st.integers(low, high)),
                     lambda options: data.draw(st.sampled_from(options)), WIDEST)
    note(str(case))
    return case


def shifted(t):
    """t's values one element past its storage's start, so no pointer is 16-byte aligned."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


def triton_op(name):
    op = getattr(ops, name)
    if name == "hybrid_accumulate_norm":  # the long weight positional, as case_inputs gives it
        return lambda x, f, y, gate, w, b, long_weight, **k: op(x, f, y, gate, w, b, long_weight=long_weight, **k)
    if name == "depth_cross_entropy":
        return depth_loss(op, chunk_rows=DEPTH_CHUNK_ROWS)
    return op


def check_random_case(op, data, backend):
    case = drawn_case(data, op)
    reference, args, kwargs = case_inputs(case)
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    if case.shift:
        args = tuple(shifted(a) for a in args)
    # the interpreter launches backward programs for the case's SM count; a GPU for its own
    sms = mock.patch.object(_common, "sm_count", lambda device: case.sm_count) if DEVICE == "cpu" \
        else contextlib.nullcontext()
    with mock.patch.dict(os.environ, {"ACN_KERNELS_POISON": "1"}), sms:
        check_op(triton_op(op), reference, args, case.dtype, backend=backend, **kwargs)


@pytest.mark.parametrize("op", KERNEL_OPS + GEMM_OPS)
@budget(6)
@given(data=st.data())
def test_triton_kernels_on_random_cases(op, data):
    check_random_case(op, data, "triton")


@pytest.mark.parametrize("op", ("linear_act_accumulate", *GEMM_OPS))
@budget(6)
@given(data=st.data())
def test_cublas_path_on_random_cases(op, data):
    """cuBLAS's GEMMs and the Triton elementwise kernels around them (auto's default for these ops)."""
    check_random_case(op, data, "cublas")


@pytest.fixture(scope="module")
def host():
    found = toolchain()
    if isinstance(found, str):
        pytest.skip(f"cuda-host-check cannot run here: {found}")
    kernels = HostKernels.load()
    return kernels, public_ops(HostOps(kernels))


@pytest.mark.parametrize("op", KERNEL_OPS)
@budget(8)
@given(data=st.data())
def test_cuda_kernels_on_random_cases(op, data, host):
    result = run_case(*host, drawn_case(data, op))
    assert not result.problems, "; ".join(result.problems[:8])
