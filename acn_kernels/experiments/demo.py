"""`python -m acn_kernels demo`: does an ACN concentrate its accuracy in its first layers?

Trains the acn, residual and ffn twins of one model on scikit-learn's digits (1,797 real 8x8
images shipped with scikit-learn), on the CPU, then scores every depth k = 0..L through the shared
final norm and head (`model.probe`). The effective depth is the smallest k whose test accuracy is
within one point of that model's best.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..backend import resolve_backend
from ..models import CONNECTIVITIES, MLP, Mixer
from .._extras import require
from ..depth import compress, depth_accuracies, smallest_depth_within
from .data import load_digits_split
from .plots import pyplot, style

DEFAULTS = {"mlp": {"depth": 12, "epochs": 40}, "mixer": {"depth": 8, "epochs": 15}}
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WARMUP_FRACTION = 0.05


def build_model(name: str, depth: int, connectivity: str, backend: str = "auto") -> torch.nn.Module:
    if name == "mlp":
        return MLP(64, 64, depth, 10, connectivity=connectivity, backend=backend)
    return Mixer(8, 2, 1, 64, depth, token_dim=32, channel_dim=128, num_classes=10, connectivity=connectivity,
                 backend=backend)


def model_inputs(name: str, images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1) if name == "mlp" else images.unsqueeze(1)


def warmup_cosine(step: int, total: int) -> float:
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int,
          generator: torch.Generator, progress=None, after_epoch=None, after_step=None) -> float:
    """AdamW with warmup and cosine decay, as in the paper's Mixer setup; returns the last loss.
    `after_epoch(epoch, seconds)` is called after each epoch with the training time so far, and
    `after_step()` after each optimizer step, inside the timed loop (a ShrinkOnCompression's step)."""
    steps_per_epoch = math.ceil(len(labels) / BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, epochs * steps_per_epoch))
    loss, seconds = torch.tensor(float("nan")), 0.0
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for first in range(0, len(labels), BATCH_SIZE):
            batch = order[first:first + BATCH_SIZE]
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step()
        seconds += time.perf_counter() - start
        if after_epoch is not None:
            after_epoch(epoch, seconds)
        if progress is not None:
            progress.set_postfix(loss=f"{loss.item():.3f}")
            progress.update(1)
    return loss.item()


def format_table(results: dict[str, list[float]]) -> str:
    names = list(results)
    lines = ["depth k  " + "  ".join(f"{name:>9}" for name in names)]
    for k in range(len(next(iter(results.values())))):
        lines.append(f"{k:>7}  " + "  ".join(f"{results[name][k]:>8.1f}%" for name in names))
    lines.append("")
    for name in names:
        acc = results[name]
        k = smallest_depth_within(acc, 1.0)
        lines.append(f"{name:>9}: best {max(acc):.1f}%, full depth {acc[-1]:.1f}%, "
                     f"effective depth {k} of {len(acc) - 1} (within 1 point of best)")
    return "\n".join(lines)


def save_plot(results: dict[str, list[float]], title: str, path: str) -> None:
    plt = pyplot("demo", "the demo's plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, acc in results.items():
        ax.plot(range(len(acc)), acc, label=f"{name} (effective depth {smallest_depth_within(acc, 1.0)})",
                **style(name))
    ax.set_xlabel("depth k (blocks used)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(model_name: str = "mlp", depth: int | None = None, epochs: int | None = None,
             seed: int = 0, plot: str | None = None, backend: str = "auto") -> int:
    tqdm = require("tqdm", "demo", "the demo").tqdm

    depth = depth or DEFAULTS[model_name]["depth"]
    epochs = epochs or DEFAULTS[model_name]["epochs"]
    plot = plot or f"acn_demo_{model_name}.png"
    train_x, train_y, test_x, test_y = load_digits_split(seed)
    train_inputs, test_inputs = model_inputs(model_name, train_x), model_inputs(model_name, test_x)
    print(f"digits: {len(train_y)} train / {len(test_y)} test images; {model_name}, depth {depth}, "
          f"{epochs} epochs, seed {seed}, CPU, backend {resolve_backend(backend, torch.device('cpu'))}")
    results, models = {}, {}
    for connectivity in CONNECTIVITIES:
        torch.manual_seed(seed)
        models[connectivity] = model = build_model(model_name, depth, connectivity, backend)
        with tqdm(total=epochs, desc=f"{connectivity:>8}", unit="epoch", leave=True) as progress:
            train(model, train_inputs, train_y, epochs, torch.Generator().manual_seed(seed), progress)
        results[connectivity] = depth_accuracies(model.eval(), test_inputs, test_y)
    print("\nTest accuracy when only the first k blocks are used (shared final norm and head):")
    print(format_table(results))
    print("\nacn compressed to its effective depth (compress; latency of a forward of 64 test images):")
    print(compress(models["acn"], test_inputs, test_y, tolerance=1.0, repeats=10))
    save_plot(results, f"{model_name}, depth {depth}, digits", plot)
    print(f"\nplot written to {plot}")
    return 0
