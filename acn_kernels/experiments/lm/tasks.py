"""The language tables' data sets as the trainer sees them: the byte-level grammar corpus and n-digit
addition (text.py), batches of (inputs, targets) and the held-out ones."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...depth import IGNORE_INDEX
from .. import text
from .rows import LanguageSettings


@dataclass
class Task:
    """A data set as the trainer sees it: batches of (inputs, targets), and the held-out ones."""
    name: str
    max_len: int
    batches: object                 # generator -> (inputs, targets)
    validation: tuple               # (inputs, targets)
    answers: torch.Tensor | None    # addition: the answer mask of the validation targets
    unigram_loss: float = 0.0       # the validation loss of the training targets' unigram distribution


def unigram_loss(train_targets: torch.Tensor, validation_targets: torch.Tensor) -> float:
    """Cross-entropy of the held-out targets under the training targets' token frequencies (add-one
    smoothed): the loss of a model that ignores its context."""
    counts = torch.bincount(train_targets[train_targets != IGNORE_INDEX].flatten(), minlength=text.VOCAB) + 1.0
    log_p = (counts / counts.sum()).log()
    held_out = validation_targets[validation_targets != IGNORE_INDEX]
    return -log_p[held_out].mean().item()


def corpus_task(settings: LanguageSettings) -> Task:
    split = text.load_corpus()
    held_out = text.windows(split.validation, settings.context, 128, torch.Generator().manual_seed(12345))

    def batches(generator):
        rows = text.windows(split.train, settings.context, settings.batch, generator)
        return rows[:, :-1], rows[:, 1:]
    # max_len: the whole window (context inputs and the last target), as compress takes it (as_labels)
    return Task("corpus", settings.context + 1, batches, (held_out[:, :-1], held_out[:, 1:]), None,
                unigram_loss(split.train, held_out[:, 1:]))


def addition_task(settings: LanguageSettings) -> Task:
    length = 3 * settings.digits + 4  # a+b=, the sum's digits and one more, and the newline
    train = text.encode_additions(text.addition_examples(20000, settings.digits, seed=1), length)
    held_out = text.encode_additions(text.addition_examples(512, settings.digits, seed=2), length)

    def answer_targets(data):
        targets = data.tokens[:, 1:].clone()
        targets[~data.answer] = IGNORE_INDEX  # trained and scored on the answer alone
        return data.tokens[:, :-1], targets

    inputs, targets = answer_targets(train)

    def batches(generator):
        rows = torch.randint(0, len(inputs), (settings.batch,), generator=generator)
        return inputs[rows], targets[rows]
    validation = answer_targets(held_out)
    return Task("addition", length, batches, validation, held_out.answer, unigram_loss(targets, validation[1]))


BUILT: dict = {}  # (settings, name) -> Task: each data set built once per process


def task_of(settings: LanguageSettings, name: str) -> Task:
    key = (repr(settings), name)
    if key not in BUILT:
        BUILT[key] = {"corpus": corpus_task, "addition": addition_task}[name](settings)
    return BUILT[key]


def as_labels(inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(input ids, labels) in Hugging Face's convention, which compress and depth_scores take, for
    next-token (inputs, targets): one more position (the last target; any token where it is ignored),
    the targets as the labels one position later."""
    last = targets[:, -1:].clamp(min=0)
    return torch.cat([inputs, last], 1), torch.cat([torch.full_like(last, IGNORE_INDEX), targets], 1)
