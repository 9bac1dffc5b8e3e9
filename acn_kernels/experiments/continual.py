"""Continual learning, task-incremental: a data set split into tasks of disjoint classes, learnt one
after another by one model; at test (and in training) the prediction is restricted to the task's
classes. Naive fine-tuning, or Synaptic Intelligence (Zenke, Poole and Ganguli 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_tasks(labels: torch.Tensor, classes_per_task: int = 2) -> list[tuple[list[int], torch.Tensor]]:
    """[(classes, indices)] of consecutive class groups (0-1, 2-3, ...): every sample in one task."""
    classes = sorted(labels.unique().tolist())
    groups = [classes[i:i + classes_per_task] for i in range(0, len(classes), classes_per_task)]
    return [(group, torch.nonzero(torch.isin(labels, torch.tensor(group))).flatten()) for group in groups]


def restrict(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """The logits of the task's classes only (the others cannot be predicted)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[..., classes] = 0
    return logits + mask


class SynapticIntelligence:
    """Per parameter, the path integral w = -sum g * delta over a task's steps (g the task loss's
    gradient, delta the update); at the task's end the importance grows by w / (total change^2 + xi)
    and the anchor moves to the parameters reached; later tasks pay c * sum importance * (p - anchor)^2."""

    def __init__(self, parameters, c: float, xi: float):
        self.params = [p for p in parameters if p.requires_grad]
        self.c, self.xi = c, xi
        self.importance = [torch.zeros_like(p) for p in self.params]
        self.anchor = [p.detach().clone() for p in self.params]
        self.path = [torch.zeros_like(p) for p in self.params]
        self._before, self._grads = None, None

    def penalty(self) -> torch.Tensor:
        return self.c * sum((w * (p - a).square()).sum() for w, p, a in zip(self.importance, self.params, self.anchor))

    def record_gradients(self) -> None:
        """After the task loss's backward, before the penalty's: the g of the path integral."""
        self._grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._before = [p.detach().clone() for p in self.params]

    def after_step(self) -> None:
        for w, g, p, before in zip(self.path, self._grads, self.params, self._before):
            w -= g * (p.detach() - before)

    def end_task(self) -> None:
        for importance, w, p, anchor in zip(self.importance, self.path, self.params, self.anchor):
            importance += w / ((p.detach() - anchor).square() + self.xi)
            anchor.copy_(p.detach())
            w.zero_()


def task_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[int]) -> float:
    with torch.no_grad():
        return 100.0 * (restrict(model(x), classes).argmax(-1) == y).double().mean().item()


def learn_tasks(model: nn.Module, train, test, epochs: int, batch_size: int, lr: float,
                si: SynapticIntelligence | None, generator: torch.Generator) -> list[list[float]]:
    """Trains on each task in turn; returns R[i][j], the accuracy on task j after learning task i.
    `train` and `test` are [(classes, x, y)], one entry per task."""
    matrix = []
    for classes, x, y in train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                batch = order[start:start + batch_size].to(x.device)
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(restrict(model(x[batch]), classes), y[batch]).backward()
                if si is not None:
                    si.record_gradients()
                    si.penalty().backward()
                optimizer.step()
                if si is not None:
                    si.after_step()
        if si is not None:
            si.end_task()
        model.eval()
        matrix.append([task_accuracy(model, tx, ty, c) for c, tx, ty in test])
    return matrix


def average_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one."""
    return sum(matrix[-1]) / len(matrix[-1])


def average_forgetting(matrix: list[list[float]]) -> float:
    """Mean over the earlier tasks of the best accuracy ever reached on a task minus its final accuracy."""
    last = len(matrix) - 1
    drops = [max(matrix[i][j] for i in range(j, last + 1)) - matrix[last][j] for j in range(last)]
    return sum(drops) / len(drops)
