"""Using only the depth an ACN uses: `compress` turns "the first k blocks are enough" into a smaller,
faster model, for anything with `probe` (logits of every depth, (L+1, batch, classes)) and
`truncate(k)` (the first k blocks, parameters shared): the package's models and `acnify`'d ones.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Compression:
    """What `compress` measured and the model it kept."""
    accuracies: list          # percent, depth 0..L, on the held-out data given
    depth: int                # the smallest depth within `tolerance` points of the best
    tolerance: float
    model: nn.Module          # the truncated model (shares its parameters with the full one)
    parameters: tuple         # (full, truncated)
    latency_ms: tuple         # (full, truncated): median of repeated forwards of one batch, model's device

    @property
    def speedup(self) -> float:
        return self.latency_ms[0] / self.latency_ms[1]

    def __str__(self) -> str:
        best = max(self.accuracies)
        return (f"depth {self.depth} of {len(self.accuracies) - 1}: {self.accuracies[self.depth]:.1f}% "
                f"(best {best:.1f}%, tolerance {self.tolerance:g} pt); parameters {self.parameters[0]:,} -> "
                f"{self.parameters[1]:,}; latency {self.latency_ms[0]:.3f} -> {self.latency_ms[1]:.3f} ms "
                f"({self.speedup:.2f}x)")


def depth_accuracies(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 512) -> list:
    """Percent of `targets` that each depth's logits (model.probe) get right."""
    correct = None
    with torch.inference_mode():
        for start in range(0, len(targets), batch_size):
            logits = model.probe(inputs[start:start + batch_size])
            hits = (logits.argmax(-1) == targets[start:start + batch_size].to(logits.device)).sum(-1)
            correct = hits if correct is None else correct + hits
    return (100.0 * correct.double() / len(targets)).tolist()


def smallest_depth_within(accuracies: list, tolerance: float) -> int:
    best = max(accuracies)
    return next(k for k, accuracy in enumerate(accuracies) if accuracy >= best - tolerance)


def latency_ms(model: nn.Module, inputs: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward, in milliseconds (synchronized on a GPU)."""
    device = next(model.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize()
            start = time.perf_counter()
            model(inputs)
            synchronize()
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def compress(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, tolerance: float = 1.0,
             repeats: int = 20, timing_batch: int = 64) -> Compression:
    """Scores every depth of `model` on held-out (inputs, targets), keeps the smallest depth within
    `tolerance` points of the best, and measures parameters and latency of both models (the median
    of `repeats` forwards of the first `timing_batch` inputs). The model must offer probe and truncate."""
    for method in ("probe", "truncate"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model must have {method}() (the package's models, LongConnections-based or "
                            f"acnify'd ones), got {type(model).__name__}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 points, got {tolerance}")
    if len(inputs) != len(targets) or len(targets) == 0:
        raise ValueError(f"inputs and targets must be non-empty and of one length, got {len(inputs)} and "
                         f"{len(targets)}")
    was_training = model.training
    model.eval()
    try:
        accuracies = depth_accuracies(model, inputs, targets)
        depth = smallest_depth_within(accuracies, tolerance)
        truncated = model.truncate(depth)
        parameters = tuple(sum(p.numel() for p in m.parameters()) for m in (model, truncated))
        latency = tuple(latency_ms(m, inputs[:timing_batch], repeats) for m in (model, truncated))
    finally:
        model.train(was_training)
    return Compression(accuracies, depth, tolerance, truncated, parameters, latency)
