"""Fused ops, one per module: Triton kernels, their launchers and autograd Functions."""
from .accumulate_norm import accumulate_norm

__all__ = ["accumulate_norm"]
