"""`python -m acn_kernels info`: versions and which backends this machine can run."""
from __future__ import annotations

import platform

import torch

from .versions import __version__
from .backend import (AUTO_TABLE, CUDA_EXTENSION, CUDA_EXTENSION_ERROR, OPS, TRITON_AVAILABLE, TRITON_INTERPRETED,
                      auto_choices, default_backend)


def _triton_version() -> str:
    if not TRITON_AVAILABLE:
        return "not installed"
    import triton
    return triton.__version__


def _cuda_extension() -> str:
    if CUDA_EXTENSION is None:
        return f"not built ({CUDA_EXTENSION_ERROR})"
    return f"built for sm_{', sm_'.join(CUDA_EXTENSION.compiled_archs().split(','))}"


def _gpu() -> str:
    if not torch.cuda.is_available():
        return "none"
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def print_info() -> int:
    rows = [
        ("acn_kernels", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "CPU build"),
        ("triton", _triton_version()),
        ("triton interpreter", "on (TRITON_INTERPRET=1)" if TRITON_INTERPRETED else "off"),
        ("CUDA extension", _cuda_extension()),
        ("GPU", _gpu()),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print_auto_table()
    return 0


def print_auto_table() -> None:
    """What backend="auto" runs per op on CUDA tensors, and why: AUTO_TABLE's measured choices by GPU
    family, the defaults elsewhere (cublas for the GEMM ops, triton for the rest), and this GPU's."""
    families = sorted(AUTO_TABLE)
    here = auto_choices(torch.device("cuda")) if torch.cuda.is_available() else None
    header = ["op", *families, "unmeasured GPUs", *(["this GPU", "why"] if here else [])]
    print('\nbackend="auto" on CUDA tensors, per op (AUTO_TABLE: measured by `bench` on a GPU; '
          f"{'empty: no GPU run yet' if not families else ', '.join(families)}; elsewhere the default: cuBLAS "
          "for the GEMM ops until a GPU run times the Triton GEMM against it, Triton for the norm ops):")
    print("  ".join(f"{h:<22}" for h in header))
    for op in OPS:
        cells = [op, *(AUTO_TABLE[f].get(op, default_backend(op)) for f in families), default_backend(op),
                 *(here[op] if here else ())]
        print("  ".join(f"{c:<22}" for c in cells))
