"""Accuracy of a task-trained model on a synthetic task's test examples, and effective length: the functions, their
records and measurements."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.data.answers import Accuracy, accuracy, validation_set
from minillm.data.synthetic import IGNORE
from minillm.eval.effective import EffectiveLength, effective_length as effective_length_of_cells, effective_length_text
from minillm.eval.grouping import markdown_table, model_name, row_key, row_order
from minillm.eval.measurement import Measurement, Reading, Table, register_measurement
from minillm.eval.perplexity import MAX_ATTENTION_PAIRS
from minillm.eval.records import Record, Results, Setting
from minillm.model.transformer import Transformer
from minillm.positions.methods import AttentionMethod, attention_method
from minillm.positions.scaling import Scaling

# ----------------------------------------------------------------------------------------------
# Accuracy of runs trained on a synthetic task (minillm.data.synthetic)


@dataclass
class AccuracyRecord(Record):
    """A run trained on a synthetic task (setting.task), at one setting and length on the task's test examples: exact
    match per answer and accuracy per answer token, each with its Wilson 95% interval, and the answer-only loss.
    The measured fields are None where the setting does not apply (see note)."""

    length: int
    examples: int = 0
    answers: int = 0
    tokens: int = 0  # answer tokens
    exact_match: Optional[float] = None
    exact_match_low: Optional[float] = None
    exact_match_high: Optional[float] = None
    token_accuracy: Optional[float] = None
    token_accuracy_low: Optional[float] = None
    token_accuracy_high: Optional[float] = None
    answer_loss: Optional[float] = None  # mean cross-entropy of the answer tokens (nats)
    applicable: bool = True  # False: the task refuses this length or the encoding cannot reach it (see note)
    note: Optional[str] = None
    seconds: float = 0.0


@dataclass
class EffectiveLengthRecord(Record):
    """The effective length (see `effective_length_of`) of one run under one setting (setting.series: every length),
    with its interval from the Wilson intervals of the exact match per length (minillm.eval.effective)."""

    threshold: float
    reference_exact_match: Optional[float]  # the exact match at the training length; None: not evaluated there
    effective_length: Optional[int]
    longest_length: Optional[int]  # the longest length measured: an effective length equal to it is a lower bound
    min_reference: float = 0.0  # below this exact match at the training length, effective_length is None
    effective_low: Optional[int] = None  # the effective length of the exact matches' Wilson 95% lower bounds
    effective_high: Optional[int] = None  # ... of their upper bounds
    bar: Optional[float] = None  # the exact match each length up to it keeps; None: none (see effective_length_of)
    absolute: Optional[float] = None  # the fixed bar it was held to (RULER's rule); None: threshold × the 1x score
    shortest_length: Optional[int] = None  # the shortest length measured: an effective length None is shorter
    samples: int = 0  # the fewest answers behind the exact match at any length measured

    @property
    def found(self) -> EffectiveLength:
        return EffectiveLength(self.effective_length, self.effective_low, self.effective_high, self.bar,
                               self.reference_exact_match, self.shortest_length, self.longest_length, self.samples)


@dataclass
class TaskScore:
    """One model on one set of task examples: the counts of right answers and tokens, and the answer-only loss."""

    examples: int
    counts: Accuracy
    answer_loss: float  # mean cross-entropy of the answer tokens (nats)
    seconds: float

    def record(self, setting: Setting, length: int) -> AccuracyRecord:
        """The AccuracyRecord of this score in `setting` at `length`."""
        exact_low, exact_high = self.counts.exact_match_interval()
        token_low, token_high = self.counts.token_accuracy_interval()
        return AccuracyRecord(setting, length, examples=self.examples, answers=self.counts.answers, tokens=self.counts.tokens,
                              exact_match=self.counts.exact_match, exact_match_low=exact_low,
                              exact_match_high=exact_high, token_accuracy=self.counts.token_accuracy,
                              token_accuracy_low=token_low, token_accuracy_high=token_high,
                              answer_loss=self.answer_loss, seconds=self.seconds)


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


def effective_length_of(records: list[AccuracyRecord], threshold: float, min_reference: float = 0.0,
                        absolute: Optional[float] = None) -> EffectiveLength:
    """The effective length, with its interval, of one run under one (scaling, attention) from its exact match per
    length (minillm.eval.effective.effective_length: threshold × the exact match at the training length, or the
    absolute bar; min_reference: the training length's exact match a run needs). Lengths not applicable (refused by
    the task, past the encoding's positions) are not evaluated lengths."""
    measured = [r for r in records if r.applicable and r.exact_match is not None]
    trained = measured[0].setting.trained_length if measured else None
    return effective_length_of_cells(((r.length, r.exact_match, r.answers) for r in measured), trained_length=trained,
                     threshold=threshold, absolute=absolute, min_reference=min_reference)


def effective_length(records: list[AccuracyRecord], threshold: float, min_reference: float = 0.0,
                     absolute: Optional[float] = None) -> Optional[int]:
    """The effective length (see effective_length_of) without its interval; None where undefined."""
    return effective_length_of(records, threshold, min_reference, absolute).length


def effective_lengths(records: list[AccuracyRecord], threshold: float, min_reference: float = 0.0,
                      absolute: Optional[float] = None) -> list[EffectiveLengthRecord]:
    """One EffectiveLengthRecord per run under each setting (its series: every length) in `records`, in their
    order."""
    series: dict[Setting, list[AccuracyRecord]] = {}
    for r in records:
        series.setdefault(r.setting.series, []).append(r)
    out = []
    for setting, group in series.items():
        found = effective_length_of(group, threshold, min_reference, absolute)
        out.append(EffectiveLengthRecord(setting, threshold=threshold, reference_exact_match=found.reference,
                                         effective_length=found.length, longest_length=found.longest,
                                         min_reference=min_reference, effective_low=found.low,
                                         effective_high=found.high, bar=found.bar, absolute=absolute,
                                         shortest_length=found.shortest, samples=found.samples))
    return out


# ----------------------------------------------------------------------------------------------
# The measurements


@register_measurement("accuracy")
class AccuracyMeasurement(Measurement):
    """task_accuracy of a run trained on a synthetic task on config.task_examples examples of the task's test stream
    (never seen in training or validation) at each setting; not applicable (with the reason) where the task refuses
    the length or the encoding cannot reach it."""

    record = AccuracyRecord
    kinds = ("task",)
    csv = "accuracy.csv"

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        self.examples: dict[int, tuple[Tensor, ...]] = {}  # length -> the test examples, drawn once for every setting

    def measure(self, reading: Reading) -> list[AccuracyRecord]:
        length = reading.length
        if length not in self.examples:
            self.examples[length] = validation_set(self.subject.task, length, self.config.task_examples,
                                                   self.config.seed, split="test").tensors
        score = task_accuracy(reading.model, *self.examples[length], **reading.read,
                              batch_size=self.config.batch_size)
        return [score.record(reading.setting, length)]

    def does_not_apply(self, setting: Setting, length: int, note: str) -> list[AccuracyRecord]:
        return [AccuracyRecord(setting, length, applicable=False, note=note)]

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        [table] = super().tables(results)
        table.plot = ("exact_match_vs_length", "length", "exact_match", "Exact match against length")
        return [table]

    @classmethod
    def heading(cls, records: list[AccuracyRecord]) -> str:
        return "Task accuracy against evaluation length"

    @classmethod
    def table(cls, records: list[AccuracyRecord], results: Results) -> str:
        return accuracy_section(records, results.of(EffectiveLengthRecord))

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        from minillm.eval.plots import plot_accuracy

        records = results.of(cls.record)
        return [plot_accuracy(records, out_dir)] if records else []


@register_measurement("effective_length")
class EffectiveLengthMeasurement(Measurement):
    """The effective length of each (scaling, attention) of a run, from its accuracy records (shown in the accuracy
    table's last column)."""

    record = EffectiveLengthRecord
    kinds = ("task",)

    def derive(self, results: Results) -> list[EffectiveLengthRecord]:
        return effective_lengths(results.of(AccuracyRecord), self.config.effective_threshold,
                                 self.config.effective_min_exact_match, self.config.effective_absolute)


# ----------------------------------------------------------------------------------------------
# Tables


def accuracy_groups(records: list[AccuracyRecord], effective: list[EffectiveLengthRecord] = ()) -> \
        dict[Setting, tuple[list[AccuracyRecord], list[EffectiveLengthRecord]]]:
    """The rows of the accuracy table: row (see minillm.eval.grouping.row_key) -> the records of every seed and
    their effective lengths."""
    key = row_key(records)
    rows: dict[Setting, list[AccuracyRecord]] = defaultdict(list)
    for r in records:
        rows[key(r)].append(r)
    effective_of: dict[Setting, list[EffectiveLengthRecord]] = defaultdict(list)
    for e in effective:
        effective_of[key(e)].append(e)
    return {row: (rows[row], effective_of[row]) for row in sorted(rows, key=row_order)}


def _exact_match_cell(records: list[AccuracyRecord], metric: str = "exact_match") -> str:
    """One seed: '97% [89%–99%]', with its Wilson 95% interval; several: '95% (91%–98%)', their mean, min–max.
    metric: exact_match or token_accuracy."""
    measured = [r for r in records if r.applicable and getattr(r, metric) is not None]
    if not measured:
        return "n/a"
    if len(measured) == 1:
        r = measured[0]
        return f"{getattr(r, metric):.0%} [{getattr(r, f'{metric}_low'):.0%}–{getattr(r, f'{metric}_high'):.0%}]"
    values = [getattr(r, metric) for r in measured]
    return f"{mean(values):.0%} ({min(values):.0%}–{max(values):.0%})"


def _effective_cell(effective: list[EffectiveLengthRecord]) -> str:
    """One seed: '256 [128–512]', with its interval (minillm.eval.effective.effective_length_text); several: the
    seeds' min–max '128–512'; '≥1024' where it reached the longest length measured; n/a where undefined (and the
    count of seeds it is defined for, when only some)."""
    known = [e for e in effective if e.effective_length is not None]
    if len(effective) == 1 and effective[0].bar is not None:
        return effective_length_text(effective[0].found)
    if not known:
        return "n/a"
    text = {e.effective_length: ("≥" if e.effective_length == e.longest_length else "") + str(e.effective_length)
            for e in known}
    lo, hi = min(text), max(text)
    cell = text[lo] if lo == hi else f"{text[lo]}–{text[hi]}"
    return cell if len(known) == len(effective) else f"{cell} ({len(known)}/{len(effective)} seeds)"


def accuracy_table(records: list[AccuracyRecord], effective: list[EffectiveLengthRecord] = (),
                   metric: str = "exact_match") -> str:
    """Markdown: exact match (or token accuracy) per length (see _exact_match_cell) and, for exact match, the
    effective length, per model × task × scaling × attention; n/a where the task or the encoding does not reach
    the length."""
    if not records:
        return ""
    lengths = sorted({r.length for r in records})
    short = {"exact_match": "EM", "token_accuracy": "token acc."}[metric]
    header = ["model", "trained", "task", "scaling", "attention", "seeds"] + [f"{short} @ {n}" for n in lengths] + \
             (["effective length"] if metric == "exact_match" else [])
    rows = []
    for row, (group, effective_of) in accuracy_groups(records, effective).items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            by_length[r.length].append(r)
        cells = [model_name(row), str(row.trained_length), row.task, row.scaling, row.attention_label,
                 str(len({r.setting.seed for r in group}))]
        cells += [_exact_match_cell(by_length.get(n, []), metric) for n in lengths]
        if metric == "exact_match":
            cells.append(_effective_cell(effective_of))
        rows.append(cells)
    return markdown_table(header, rows)


def _effective_rule(effective: list[EffectiveLengthRecord]) -> str:
    """The paragraph's sentence on how the effective length was found."""
    thresholds = sorted({e.threshold for e in effective if e.absolute is None})
    absolutes = sorted({e.absolute for e in effective if e.absolute is not None})
    floors = sorted({e.min_reference for e in effective if e.absolute is None})
    bars = ([f"{' / '.join(f'{t:.0%}' for t in thresholds)} of the exact match at the training length (n/a: below "
             f"{' / '.join(f'{m:.0%}' for m in floors)} there, a run that did not learn the task)"] if thresholds
            else []) + ([f"an exact match of {' / '.join(f'{a:.1%}' for a in absolutes)} (RULER's fixed bar)"]
                        if absolutes else [])
    samples = sorted({e.samples for e in effective if e.bar is not None})
    return (f" Effective length (RULER, Hsieh et al. 2024, arXiv:2404.06654): the longest length up to which every "
            f"length measured keeps at least {' or '.join(bars)}; ≥: the longest length measured, <: even the "
            f"shortest fails. One seed's [interval]: the same rule applied to every length's Wilson 95% lower and "
            f"upper bound" + (f" ({' / '.join(map(str, samples))} answers per length)." if samples else ".")
            if bars else "")


def accuracy_section(records: list[AccuracyRecord], effective: list[EffectiveLengthRecord]) -> str:
    """The accuracy table with a paragraph saying how to read it."""
    examples = sorted({r.examples for r in records if r.applicable})
    rule = _effective_rule(effective)
    section = (f"Exact match per answer on {' / '.join(map(str, examples)) or 'no'} test examples per length: one "
               f"seed with its Wilson 95% interval [in brackets], several as their mean with the seeds' min–max "
               f"(in parentheses).{rule}\n\n" + accuracy_table(records, effective))
    # Answers of several tokens (a copy, a needle's value): exact match is all or nothing, the tokens say how far.
    several = [r for r in records if r.applicable and r.tokens > r.answers]
    if several:
        tasks = sorted({r.setting.task for r in several})
        section += (f"\n\nAccuracy per answer token, for the tasks whose answers have several ({', '.join(tasks)}); "
                    f"its interval treats the tokens of one answer as independent, so it is too narrow where errors "
                    f"cluster.\n\n" + accuracy_table([r for r in records if r.setting.task in tasks],
                                                     metric="token_accuracy"))
    return section
