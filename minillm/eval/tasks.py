"""Accuracy of a task-trained model on a synthetic task's test examples, and effective length."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.data.answers import Accuracy, accuracy
from minillm.data.synthetic import IGNORE
from minillm.eval.perplexity import MAX_ATTENTION_PAIRS
from minillm.eval.records import AccuracyRecord, EffectiveLengthRecord
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.scaling import Scaling

# ----------------------------------------------------------------------------------------------
# Accuracy of runs trained on a synthetic task (minillm.data.synthetic)


@dataclass
class TaskScore:
    """One model on one set of task examples: the counts of right answers and tokens, and the answer-only loss."""

    examples: int
    counts: Accuracy
    answer_loss: float  # mean cross-entropy of the answer tokens (nats)
    seconds: float

    def record(self, **setting) -> AccuracyRecord:
        """The AccuracyRecord of this score in `setting` (the model and the evaluation setting)."""
        exact_low, exact_high = self.counts.exact_match_interval()
        token_low, token_high = self.counts.token_accuracy_interval()
        return AccuracyRecord(examples=self.examples, answers=self.counts.answers, tokens=self.counts.tokens,
                              exact_match=self.counts.exact_match, exact_match_low=exact_low,
                              exact_match_high=exact_high, token_accuracy=self.counts.token_accuracy,
                              token_accuracy_low=token_low, token_accuracy_high=token_high,
                              answer_loss=self.answer_loss, seconds=self.seconds, **setting)


@torch.inference_mode()
def task_accuracy(model: Transformer, inputs: Tensor, targets: Tensor, answers: Tensor, *,
                  attention: "str | AttentionMethod" = "full", scaling: Optional[Scaling] = None, logn: bool = False,
                  batch_size: int = 4) -> TaskScore:
    """Exact match, token accuracy and answer-only loss of argmax predictions from one teacher-forced pass over
    examples (n, length) as minillm.data.answers.validation_set gives them; greedy decoding of an answer gives the
    same tokens when each is the argmax given the right ones before it, as the targets are.

    batch_size: examples per forward pass, at most; fewer for long ones, so that a pass never holds more than
    MAX_ATTENTION_PAIRS query-key pairs (see perplexity_at_length). The LM head reads the answer positions only.
    """
    device = next(model.parameters()).device
    method = attention_method(attention) if isinstance(attention, str) else attention
    length = inputs.shape[1]
    counts, loss_sum = Accuracy(0, 0, 0, 0), 0.0
    started = time.perf_counter()
    for rows in torch.arange(len(inputs)).split(max(1, min(batch_size, MAX_ATTENTION_PAIRS // length**2))):
        y = targets[rows]
        answer = y != IGNORE
        hidden = model.hidden_states(inputs[rows].to(device), attention=method, scaling=scaling,
                                     logn=logn)[answer.to(device)]
        logits = model.head(hidden).float().cpu()
        predictions = torch.full_like(y, IGNORE)  # only the answer positions are compared
        predictions[answer] = logits.argmax(-1)
        counts = counts + accuracy(predictions, y, answers[rows])
        loss_sum += float(F.cross_entropy(logits, y[answer], reduction="sum"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return TaskScore(len(inputs), counts, loss_sum / counts.tokens if counts.tokens else math.nan, round(seconds, 3))


def effective_length(records: list[AccuracyRecord], threshold: float,
                     min_reference: float = 0.0) -> Optional[int]:
    """The effective length of one run under one (scaling, attention): the longest evaluated length L such that the
    exact match at L and at every shorter evaluated length is at least threshold × the exact match at the training
    length (1x). RULER's notion (Hsieh et al. 2024, arXiv:2404.06654), whose bar is a fixed score (Llama-2-7B's at
    4k), is taken relative to the model's own score at its training length, as tasks differ in difficulty.

    A dip ends it: a length that recovers after a failing one does not count. Lengths not applicable (refused by
    the task, past the encoding's positions) are not evaluated lengths. None when the training length was not
    evaluated, when the exact match there is 0 or below min_reference (a run that did not learn the task has no
    length to keep: at 1 right answer in 256, a bar of 0.9/256 passes every length), or when a length shorter
    than the training length already fails.
    """
    measured = sorted((r for r in records if r.applicable and r.exact_match is not None), key=lambda r: r.length)
    lengths = [r.length for r in measured]
    if len(set(lengths)) < len(lengths):
        raise ValueError("effective_length: takes the records of one run under one scaling and attention, got two "
                         f"at one length ({sorted(n for n in set(lengths) if lengths.count(n) > 1)})")
    reference = next((r.exact_match for r in measured if r.length == r.trained_length), None)
    if not reference or reference < min_reference:
        return None
    bar = threshold * reference
    longest = None
    for r in measured:
        if r.exact_match < bar:
            break
        longest = r.length
    return longest


def effective_lengths(records: list[AccuracyRecord], threshold: float,
                      min_reference: float = 0.0) -> list[EffectiveLengthRecord]:
    """One EffectiveLengthRecord per run under each (scaling, attention) in `records`, in their order."""
    series: dict[tuple, list[AccuracyRecord]] = {}
    for r in records:
        key = (r.model, r.run, r.seed, r.trained_length, r.variant, r.task, r.method, r.attention)
        series.setdefault(key, []).append(r)
    out = []
    for key, group in series.items():
        measured = [r for r in group if r.applicable and r.exact_match is not None]
        reference = next((r.exact_match for r in measured if r.length == r.trained_length), None)
        out.append(EffectiveLengthRecord(*key, threshold=threshold, reference_exact_match=reference,
                                         effective_length=effective_length(group, threshold, min_reference),
                                         longest_length=max((r.length for r in measured), default=None),
                                         min_reference=min_reference))
    return out
