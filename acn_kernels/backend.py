"""Backend choice, in one place.

    "reference"  pure PyTorch (`acn_kernels.reference`), any device
    "triton"     the fused Triton kernels, GEMMs included: CUDA tensors, or CPU tensors under
                 Triton's interpreter
    "cublas"     the Triton kernels with every GEMM on cuBLAS (torch.matmul): `linear` is F.linear,
                 and the GEMM ops (`linear_act_accumulate`, `feed_forward`) take cuBLAS's z (bias
                 included) and one Triton elementwise kernel for the activation and the running sum,
                 and one for the activation's backward (the CUDA extension's design, without building it); the norm
                 ops run their Triton kernels. Where Triton runs.
    "cuda"       the CUDA C++ extension acn_kernels._C (built with ACN_KERNELS_BUILD_CUDA=1), CUDA tensors
    "auto"       on CUDA tensors, per op, the backend `bench` measured fastest on that GPU family
                 (AUTO_TABLE); where it has measured nothing, the default: Triton for the norm ops,
                 "cublas" for the GEMM ops (a GEMM even 10% slower than cuBLAS would undo what the
                 fusion saves in a transformer step, and the Triton GEMM has not been timed on a GPU).
                 Under Triton's interpreter, CPU tensors get those defaults too; otherwise the
                 reference (the documented CPU path, not a fallback)

Triton decides at decoration time whether a kernel is compiled or interpreted, so the
interpreter counts as on only if TRITON_INTERPRET=1 was set before acn_kernels was imported.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ._validation import check_choice

BACKENDS = ("auto", "reference", "triton", "cublas", "cuda")

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# Read once, at import, because that is when the kernels are decorated.
TRITON_INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
if TRITON_INTERPRETED:
    from ._interpreter import skip_repeated_patches

    skip_repeated_patches()


def _load_cuda_extension():
    """(module, None) when acn_kernels._C imports (it registers torch.ops.acn_kernels_cuda), else (None, why)."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, "acn_kernels._C is not there"
    try:
        from . import _C
    except ImportError as error:  # built against another torch, or CUDA libraries missing
        return None, f"acn_kernels._C does not load: {error}"
    return _C, None


CUDA_EXTENSION, CUDA_EXTENSION_ERROR = _load_cuda_extension()
BUILD_HINT = ("build it on a machine with a CUDA compiler and a CUDA build of torch: "
              "ACN_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .")


# backend="auto" on CUDA tensors: {GPU family: {op: backend}}, the family as "sm_<major>x" (sm_8x:
# A100 and its kin, sm_9x: H100/H200). It lists only what a GPU run of `bench` measured (the fastest
# of triton, cublas and cuda per op). Empty until this project gets a GPU run (none yet).
AUTO_TABLE: dict[str, dict[str, str]] = {}
GEMM_OPS = ("linear_act_accumulate", "feed_forward", "linear")
OPS = ("accumulate_norm", "hybrid_accumulate_norm", "probe_norm", *GEMM_OPS)


def default_backend(op: str) -> str:
    """What "auto" runs where nothing is measured: cuBLAS for the GEMMs, Triton for the rest."""
    return "cublas" if op in GEMM_OPS else "triton"


def gpu_family(device: torch.device) -> str:
    return f"sm_{torch.cuda.get_device_capability(device)[0]}x"


def auto_choices(device: torch.device) -> dict[str, tuple[str, str]]:
    """{op: (backend, why)} that backend="auto" runs on this device (a GPU, or the interpreter)."""
    measured = AUTO_TABLE.get(gpu_family(device), {}) if device.type == "cuda" else {}
    choices = {}
    for op in OPS:
        if op not in measured:
            choices[op] = default_backend(op), "default: not measured on this GPU family"
        elif measured[op] == "cuda" and CUDA_EXTENSION is None:
            choices[op] = default_backend(op), "default: measured cuda, but the extension is not built"
        else:
            choices[op] = measured[op], "measured by bench"
    return choices


def auto_backends(device: torch.device) -> dict[str, str]:
    """{op: backend} that backend="auto" runs on this device."""
    return {op: backend for op, (backend, _) in auto_choices(device).items()}


def check_triton(backend: str, device: torch.device) -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"backend={backend!r} needs the triton package: pip install triton")
    if device.type != "cuda" and not TRITON_INTERPRETED:
        raise ValueError(
            f"backend={backend!r} needs CUDA tensors, got tensors on {device}; to run the Triton "
            "kernels on the CPU set TRITON_INTERPRET=1 before importing acn_kernels, "
            "or use backend='reference'")


def resolve_backend(backend: str, device: torch.device, op: str | None = None) -> str:
    """Returns "reference", "triton", "cublas" or "cuda" for `op` on tensors on `device`, or raises
    with what to do ("cublas" names the norm ops' Triton kernels "triton"). Without an op, the
    backend of the whole model: "auto" whose choices differ per op says "mixed" (fused, per op)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "reference":
        return "reference"
    if backend == "cuda":
        if CUDA_EXTENSION is None:
            raise RuntimeError(f"backend='cuda' needs the CUDA extension acn_kernels._C, which is not built here "
                               f"({CUDA_EXTENSION_ERROR}); {BUILD_HINT}")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
        return "cuda"
    if backend in ("triton", "cublas"):
        check_triton(backend, device)
        return "triton" if backend == "cublas" and op is not None and op not in GEMM_OPS else backend
    if device.type != "cuda" and not TRITON_INTERPRETED:
        return "reference"
    if not TRITON_AVAILABLE:
        warnings.warn("backend='auto': triton is not installed, CUDA tensors use the reference path", stacklevel=3)
        return "reference"
    choices = auto_backends(device)
    if op is not None:
        return choices[op]
    kinds = set(choices.values())
    return kinds.pop() if len(kinds) == 1 else "mixed"
