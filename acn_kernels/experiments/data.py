"""The data sets of the experiments, all generated or shipped offline."""
from __future__ import annotations

import torch

from .._extras import require


def load_digits_split(seed: int):
    """(train_x, train_y, test_x, test_y): pixels scaled to [0, 1], a stratified 75/25 split."""
    datasets = require("sklearn.datasets", "demo", "the digits data")
    train_test_split = require("sklearn.model_selection", "demo", "the digits data").train_test_split

    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=0.25, random_state=seed,
                                           stratify=digits.target)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
