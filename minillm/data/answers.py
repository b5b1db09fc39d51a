"""Batches of a synthetic task's examples by seed and split, and their scoring: answer loss, exact match and token accuracy with Wilson intervals."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from minillm.data.synthetic import IGNORE, TaskConfig
from minillm.registry import require

SPLITS = {"train": 0, "validation": 1, "test": 2}  # independent random streams under one seed


# ----------------------------------------------------------------------------------------------
# Deterministic batches


def example_generator(seed: int, index: int, split: str = "train") -> torch.Generator:
    """The generator of sample `index`: a hash of (seed, split, index), the same on every machine and call order."""
    require(split in SPLITS, "split", f"got {split!r}, expected one of {sorted(SPLITS)}")
    state = np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class Batch(NamedTuple):
    inputs: Tensor  # (batch, length) int64
    targets: Tensor  # (batch, length) int64, IGNORE except at answers
    answers: Tensor  # (batch, length) int64, the answer each target belongs to, -1 elsewhere


def examples(task: TaskConfig, length: int, batch_size: int, seed: int, index: int, split: str = "train") -> Batch:
    """Batch `index`: samples index·batch_size .. (index + 1)·batch_size − 1 of the split's stream, stacked."""
    task.check_length(length)
    samples = [task.sample(length, example_generator(seed, i, split))
               for i in range(index * batch_size, (index + 1) * batch_size)]
    return Batch(torch.stack([s.inputs for s in samples]), torch.stack([s.targets for s in samples]),
                 torch.stack([s.answers for s in samples]))


def batch(task: TaskConfig, length: int, batch_size: int, seed: int, index: int,
          split: str = "train") -> tuple[Tensor, Tensor]:
    """(inputs, targets) of batch `index`, a pure function of its arguments (so a resumed run sees the same)."""
    return tuple(examples(task, length, batch_size, seed, index, split)[:2])


def validation_set(task: TaskConfig, length: int, count: int, seed: int, split: str = "validation") -> TensorDataset:
    """`count` fixed examples (inputs, targets, answers) at `length`, from a stream the training batches never use."""
    return TensorDataset(*examples(task, length, count, seed, 0, split))


# ----------------------------------------------------------------------------------------------
# Loss and accuracy


def answer_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over answer tokens only (IGNORE targets drop out)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE)


def answer_ids(targets: Tensor, answer_length: int) -> Tensor:
    """The answer map of targets whose answers are all `answer_length` tokens: the k-th run of that many
    non-IGNORE targets of a row, in reading order, is answer k (what `Example.answers` holds)."""
    answer = targets != IGNORE
    ids = torch.div(torch.cumsum(answer.long(), dim=-1) - 1, answer_length, rounding_mode="floor")
    return torch.where(answer, ids, -1)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927; Brown, Cai & DasGupta 2001): (0, 1) without trials."""
    if trials == 0:
        return 0.0, 1.0
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Accuracy:
    """Counts of right answers (every token right) and right answer tokens."""

    answers: int
    answers_correct: int
    tokens: int
    tokens_correct: int

    @property
    def exact_match(self) -> float:
        return self.answers_correct / self.answers if self.answers else float("nan")

    @property
    def token_accuracy(self) -> float:
        return self.tokens_correct / self.tokens if self.tokens else float("nan")

    def exact_match_interval(self, z: float = 1.96) -> tuple[float, float]:
        return wilson_interval(self.answers_correct, self.answers, z)

    def token_accuracy_interval(self, z: float = 1.96) -> tuple[float, float]:
        # Tokens of one answer are not independent: this interval is too narrow where errors cluster.
        return wilson_interval(self.tokens_correct, self.tokens, z)

    def __add__(self, other: "Accuracy") -> "Accuracy":
        return Accuracy(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def accuracy(logits_or_predictions: Tensor, targets: Tensor, answers: Tensor) -> Accuracy:
    """Exact match per answer and per-token accuracy of argmax predictions; logits (..., length, vocab) or
    predicted ids (..., length), targets and answers (..., length) as `examples` gives them."""
    predictions = logits_or_predictions
    if predictions.is_floating_point():
        predictions = predictions.argmax(dim=-1)
    require(predictions.shape == targets.shape == answers.shape, "accuracy",
             f"predictions {tuple(predictions.shape)}, targets {tuple(targets.shape)} and answers "
             f"{tuple(answers.shape)} must have one shape")
    answer = answers >= 0
    require(bool(torch.equal(answer, targets != IGNORE)), "accuracy",
             "answers and targets disagree on which positions are answers")
    wrong = (predictions != targets) & answer
    rows = answers.reshape(-1, answers.shape[-1])
    groups = rows.max().item() + 1 if answer.any() else 1
    group = (torch.arange(len(rows))[:, None] * groups + rows)[rows >= 0]
    errors = torch.zeros(len(rows) * groups, dtype=torch.int64)
    errors.index_add_(0, group, wrong.reshape(rows.shape)[rows >= 0].long())
    present = torch.zeros(len(rows) * groups, dtype=torch.bool)
    present[group] = True
    return Accuracy(answers=int(present.sum()), answers_correct=int((present & (errors == 0)).sum()),
                    tokens=int(answer.sum()), tokens_correct=int((answer & ~wrong).sum()))
