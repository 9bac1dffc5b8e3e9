"""Backend choice, in one place.

    "reference"  pure PyTorch (`acn_kernels.reference`), any device
    "triton"     the fused Triton kernels: CUDA tensors, or CPU tensors under Triton's interpreter
    "cuda"       the CUDA C++ extension acn_kernels._C (built with ACN_KERNELS_BUILD_CUDA=1), CUDA tensors
    "auto"       on CUDA tensors, per op, the backend `bench` measured faster on that GPU family
                 (AUTO_TABLE; Triton where the table says nothing, which is everywhere until a GPU
                 run fills it, and Triton where it says "cuda" but the extension is not built)
                 on CPU tensors Triton only when the interpreter is on, the reference otherwise
                 (the documented CPU path, not a fallback)

Triton decides at decoration time whether a kernel is compiled or interpreted, so the
interpreter counts as on only if TRITON_INTERPRET=1 was set before acn_kernels was imported.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from ._validation import check_choice

BACKENDS = ("auto", "reference", "triton", "cuda")

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# Read once, at import, because that is when the kernels are decorated.
TRITON_INTERPRETED = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


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
# A100 and its kin, sm_9x: H100/H200). It lists only what a GPU run of `bench` measured: the CUDA
# kernels where they beat Triton. Empty until this project gets a GPU run (none yet).
AUTO_TABLE: dict[str, dict[str, str]] = {}
OPS = ("accumulate_norm", "hybrid_accumulate_norm", "probe_norm", "linear_act_accumulate", "feed_forward", "linear")


def gpu_family(device: torch.device) -> str:
    return f"sm_{torch.cuda.get_device_capability(device)[0]}x"


def auto_backends(device: torch.device) -> dict[str, str]:
    """{op: backend} that backend="auto" runs on this CUDA device."""
    measured = AUTO_TABLE.get(gpu_family(device), {})
    return {op: "cuda" if measured.get(op) == "cuda" and CUDA_EXTENSION is not None else "triton" for op in OPS}


def resolve_backend(backend: str, device: torch.device, op: str | None = None) -> str:
    """Returns "reference", "triton" or "cuda" for `op` on tensors on `device`, or raises with what
    to do. Without an op, "auto" on a GPU whose table picks different backends for different ops
    says "mixed" (fused, per op)."""
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
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package: pip install triton")
        if device.type != "cuda" and not TRITON_INTERPRETED:
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; to run the Triton "
                "kernels on the CPU set TRITON_INTERPRET=1 before importing acn_kernels, "
                "or use backend='reference'")
        return "triton"
    if device.type == "cuda":
        if not TRITON_AVAILABLE:
            warnings.warn("backend='auto': triton is not installed, CUDA tensors use the reference path",
                          stacklevel=3)
            return "reference"
        choices = auto_backends(device)
        if op is not None:
            return choices[op]
        kinds = set(choices.values())
        return kinds.pop() if len(kinds) == 1 else "mixed"
    return "triton" if TRITON_INTERPRETED else "reference"
