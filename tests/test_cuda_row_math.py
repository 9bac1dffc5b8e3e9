"""The CUDA kernels' row math (csrc/row_math.h), compiled for the host with g++ and run against the
reference: the arithmetic is exercised here even though the kernels cannot run without a GPU."""
import ctypes
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from acn_kernels import reference

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
ACTIVATIONS = list(reference.ACTIVATIONS)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.fail("the host harness needs a C++ compiler (g++)")
    library = tmp_path_factory.mktemp("harness") / "libacn_row_math.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{CSRC}", str(CSRC / "host_harness.cpp"),
                    "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def ptr(array: np.ndarray):
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy().astype(np.float32))


@pytest.mark.parametrize("norm", ("layernorm", "rmsnorm"))
@pytest.mark.parametrize("dim", (1, 17, 256))
def test_norm_rows_forward_and_backward_match_the_reference(harness, norm, dim):
    rows = 7
    v, w, b, dout = torch.randn(rows, dim) * 3, torch.randn(dim), torch.randn(dim), torch.randn(rows, dim)
    out, mean, rstd = (np.full(shape, np.nan, np.float32) for shape in ((rows, dim), (rows,), (rows,)))
    is_ln = norm == "layernorm"
    v_np, w_np, b_np = f32(v), f32(w), f32(b)
    harness.acn_norm_forward_rows(ptr(v_np), ptr(w_np), ptr(b_np), rows, dim, ctypes.c_float(1e-5), int(is_ln),
                                  ptr(out), ptr(mean), ptr(rstd))
    leaves = [t.double().requires_grad_() for t in (v, w, b)]
    expected = reference.apply_norm(*leaves, 1e-5, norm)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-5, atol=1e-5)

    dv, dw, db = (np.full(shape, np.nan, np.float32) for shape in ((rows, dim), (dim,), (dim,)))
    dout_np = f32(dout)
    harness.acn_norm_backward_rows(ptr(dout_np), ptr(v_np), ptr(w_np), ptr(mean), ptr(rstd), rows, dim, int(is_ln),
                                   ptr(dv), ptr(dw), ptr(db))
    grads = torch.autograd.grad(expected, leaves, dout.double())
    for actual, exact in zip((dv, dw, db), grads):
        np.testing.assert_allclose(actual, exact.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_their_gradients_match_the_reference(harness, activation):
    z = torch.randn(1001) * 4
    code = ACTIVATIONS.index(activation)
    h, grad = np.full(1001, np.nan, np.float32), np.full(1001, np.nan, np.float32)
    z_np = f32(z)
    harness.acn_activation(ptr(z_np), ctypes.c_long(1001), code, ptr(h))
    z64 = z.double().requires_grad_()
    expected = reference.ACTIVATIONS[activation](z64)
    np.testing.assert_allclose(h, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    saved = h if activation == "relu" else z_np  # what the forward keeps for act'
    harness.acn_activation_grad(ptr(np.ascontiguousarray(saved)), ctypes.c_long(1001), code, ptr(grad))
    (exact,) = torch.autograd.grad(expected.sum(), z64)
    np.testing.assert_allclose(grad, exact.numpy(), rtol=1e-5, atol=1e-5)
