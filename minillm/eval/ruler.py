"""RULER (Hsieh et al. 2024, arXiv:2404.06654) as a measurement: each model's samples (minillm.data.ruler) drawn
once, greedy decoding with the KV cache at every setting, RULER's string-match scores with Wilson intervals, the
average over tasks and its effective length; their records, table and plot."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Callable, Optional

import torch

from minillm.data.ruler import RULER_TASKS, RulerDoesNotFit, RulerSample, cached_ruler_samples, score
from minillm.eval.effective import Cell, EffectiveLength, effective_length, effective_length_text
from minillm.eval.grouping import markdown_table, model_name, row_key, row_order
from minillm.eval.measurement import Measurement, Reading, Table, register_measurement
from minillm.eval.records import Record, Results, Setting
from minillm.model.transformer import Transformer

log = logging.getLogger("minillm")

AVERAGE = "average"  # the ruler_task of the records that average every task at one length (RULER's "Avg.")

# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class RulerRecord(Record):
    """One RULER task (or the average over the tasks measured) at one setting and length: the mean of RULER's score
    per sample (string_match_all: the share of a sample's answers found in its output; string_match_part: 1 if any
    is) with its Wilson 95% interval, and what the prompts cost. The measured fields are None where the setting does
    not apply (see note)."""

    ruler_task: str  # minillm.data.ruler.RULER_TASKS' name, or "average"
    length: int  # the token budget: prompt and answer tokens together
    samples: int = 0  # the samples scored (the average: every task's together)
    score: Optional[float] = None  # mean score per sample, in [0, 1] (the average: the mean of the tasks' scores)
    score_low: Optional[float] = None  # Wilson 95% interval of the score over `samples`
    score_high: Optional[float] = None
    prompt_tokens: Optional[float] = None  # mean prompt tokens per sample (chat template included)
    new_tokens: Optional[float] = None  # mean tokens generated per sample (up to EOS or the task's limit)
    chat: bool = False  # the prompts went through the tokenizer's chat template
    applicable: bool = True  # False: the prompt does not fit, the encoding cannot reach the length (see note)
    note: Optional[str] = None
    seconds: float = 0.0  # decoding the cell's samples (the average: every task's)
    predictions: list = field(default_factory=list)  # each sample's decoded output, in order
    sample_scores: list = field(default_factory=list)  # each sample's score (paired comparisons across settings)

    nested = ("predictions", "sample_scores")

    def cell(self) -> Cell:
        return Cell(self.length, self.score, self.samples)


@dataclass
class RulerEffectiveRecord(Record):
    """The effective length (minillm.eval.effective) of one model under one setting (setting.series: every length)
    from its RULER average: the longest length up to which every length keeps the bar, with its interval."""

    effective_length: Optional[int]
    effective_low: Optional[int] = None  # the effective length of the averages' Wilson 95% lower bounds
    effective_high: Optional[int] = None  # ... of their upper bounds
    bar: Optional[float] = None  # the score each length up to it keeps; None: no bar (no score at the trained length)
    threshold: float = 0.85  # the relative rule's share of the score at the training length
    absolute: Optional[float] = None  # the fixed bar it was held to (RULER's 0.856); None: the relative rule
    reference_score: Optional[float] = None  # the average at the training length; None: not measured there
    shortest_length: Optional[int] = None  # an effective length None is shorter than this
    longest_length: Optional[int] = None  # an effective length equal to this is a lower bound
    samples: int = 0  # the fewest samples behind the average at any length

    @property
    def found(self) -> EffectiveLength:
        return EffectiveLength(self.effective_length, self.effective_low, self.effective_high, self.bar,
                               self.reference_score, self.shortest_length, self.longest_length, self.samples)


# ----------------------------------------------------------------------------------------------
# Prompts and decoding


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's JSON: the samples' cache key (a haystack fitted to one tokenizer's counts)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


@dataclass
class Prompting:
    """How one model's prompts become tokens: a completion prompt with the tokenizer's own special tokens (a
    Llama's BOS), or a chat turn, whose template writes them itself (as transformers' apply_chat_template)."""

    tokenizer: object  # a tokenizers.Tokenizer
    wrap: Optional[Callable[[str], str]] = None  # the chat template's render; None: completion prompts

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.wrap is None).ids

    def count(self, text: str) -> int:
        return len(self.encode(text))


@torch.inference_mode()
def ruler_answer(model: Transformer, prompt: list[int], max_new_tokens: int, stop_token: Optional[int],
                 read: dict) -> list[int]:
    """The tokens greedy decoding (with the KV cache, under `read`: scaling, attention, log-n) appends to `prompt`,
    up to max_new_tokens, the stop token (EOS) left out."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], device=device)
    new = model.generate(idx, max_new_tokens, temperature=0, stop_token=stop_token, **read)[0, len(prompt):].tolist()
    return new[:new.index(stop_token)] if stop_token in new else new


def ruler_cell(model: Transformer, prompting: Prompting, task: str, samples: list[RulerSample],
               stop_token: Optional[int], read: dict, setting: Setting, length: int) -> RulerRecord:
    """Every sample of one (task, length) decoded and scored as RULER scores it; the cell's record."""
    predictions, scores, prompt_tokens, new_tokens = [], [], [], []
    started = time.perf_counter()  # each sample's tokens come back to the CPU: the clock sees the device's work
    for sample in samples:
        prompt = prompting.encode(sample.input)
        new = ruler_answer(model, prompt, sample.max_new_tokens, stop_token, read)
        predictions.append(prompting.tokenizer.decode(new))
        scores.append(float(score(sample, predictions[-1])))
        prompt_tokens.append(len(prompt))
        new_tokens.append(len(new))
    record = RulerRecord(setting, task, length, len(samples), mean(scores), prompt_tokens=mean(prompt_tokens),
                         new_tokens=mean(new_tokens), chat=prompting.wrap is not None,
                         seconds=round(time.perf_counter() - started, 3), predictions=predictions,
                         sample_scores=scores)
    record.score_low, record.score_high = record.cell().interval()
    return record


def averages(records: list[RulerRecord], tasks: list[str]) -> list[RulerRecord]:
    """RULER's average: per setting and length, the mean of the tasks' scores where every one of `tasks` was
    measured (a length some task cannot fit has no average); its interval over the samples of every task."""
    cells: dict[tuple[Setting, int], dict[str, RulerRecord]] = defaultdict(dict)
    for r in records:
        if r.ruler_task != AVERAGE:
            cells[r.setting, r.length][r.ruler_task] = r
    out = []
    for (setting, length), by_task in cells.items():
        measured = [by_task[t] for t in tasks if t in by_task and by_task[t].applicable]
        if len(measured) < len(tasks):
            missing = [t for t in tasks if t not in by_task or not by_task[t].applicable]
            out.append(RulerRecord(setting, AVERAGE, length, applicable=False,
                                   note=f"not every task was measured at {length} tokens ({', '.join(missing)})"))
            continue
        record = RulerRecord(setting, AVERAGE, length, sum(r.samples for r in measured),
                             mean(r.score for r in measured), prompt_tokens=mean(r.prompt_tokens for r in measured),
                             new_tokens=mean(r.new_tokens for r in measured), chat=measured[0].chat,
                             seconds=round(sum(r.seconds for r in measured), 3))
        record.score_low, record.score_high = record.cell().interval()
        out.append(record)
    return out


def ruler_effective_lengths(records: list[RulerRecord], tasks: list[str], threshold: float,
                            absolute: Optional[float], min_reference: float = 0.0) -> list[RulerEffectiveRecord]:
    """One RulerEffectiveRecord per setting series in `records`, from the average over `tasks` (one task: its own
    score): RULER's rule (minillm.eval.effective.effective_length), relative to that score at the training length
    (none below min_reference there), or absolute."""
    scored = AVERAGE if len(tasks) > 1 else tasks[0]
    series: dict[Setting, list[RulerRecord]] = defaultdict(list)
    for r in records:
        if r.ruler_task == scored:
            series[r.setting.series].append(r)
    out = []
    for setting, group in series.items():
        found = effective_length([r.cell() for r in group if r.applicable], trained_length=setting.trained_length,
                                 threshold=threshold, absolute=absolute, min_reference=min_reference)
        out.append(RulerEffectiveRecord(setting, found.length, found.low, found.high, found.bar, threshold, absolute,
                                        found.reference, found.shortest, found.longest, found.samples))
    return out


# ----------------------------------------------------------------------------------------------
# The measurements


@register_measurement("ruler")
class RulerMeasurement(Measurement):
    """config.ruler's tasks, config.ruler_samples samples per (task, length) drawn once per model from config.seed
    (cached under data.cache_dir/ruler by the tokenizer's hash) and shared by every setting, so settings compare on
    the same prompts. The haystacks' prose is the model's documents (a run's validation documents, an imported
    model's config.data), decoded. A prompt that does not fit its length is a record saying so, never truncated."""

    record = RulerRecord
    csv = "ruler.csv"

    @classmethod
    def applies(cls, subject, config) -> bool:
        return super().applies(subject, config) and bool(config.ruler)

    @classmethod
    def cells(cls, plan, trained_length, config) -> int:
        """One cell per (setting, task), each of config.ruler_samples prompts decoded."""
        return super().cells(plan, trained_length, config) * len(config.ruler)

    def __init__(self, subject, plan, config):
        super().__init__(subject, plan, config)
        chat = subject.chat_template
        if config.ruler_chat == "always" and chat is None:
            raise ValueError(f"ruler_chat: always, but the tokenizer of {subject.setting.run} has no chat template "
                             f"(ruler_chat=auto reads such a model with completion prompts)")
        wrap = chat.render if chat is not None and config.ruler_chat != "never" else None
        self.prompting = Prompting(subject.tokenizer, wrap)
        self.haystack = [subject.tokenizer.decode(doc.tolist()) for doc in subject.documents]
        self.samples: dict[tuple[str, int], "list[RulerSample] | str"] = {}  # (task, length) -> samples or why none

    def samples_at(self, task: str, length: int) -> "list[RulerSample] | str":
        """The samples of (task, length), drawn at first use; the reason where the prompt does not fit."""
        if (task, length) not in self.samples:
            config = self.config
            try:
                self.samples[task, length] = cached_ruler_samples(
                    task, length, self.prompting.count, self.haystack, config.ruler_samples, config.seed,
                    wrap=self.prompting.wrap, cache_dir=Path(config.data.cache_dir).expanduser(),
                    tokenizer_hash=tokenizer_hash(self.subject.tokenizer))
            except RulerDoesNotFit as error:
                log.warning("ruler %s at length %d skipped for %s: %s", task, length, self.subject.setting.run, error)
                self.samples[task, length] = str(error)
        return self.samples[task, length]

    def measure(self, reading: Reading) -> list[RulerRecord]:
        records = []
        for task in self.config.ruler:
            samples = self.samples_at(task, reading.length)
            if isinstance(samples, str):
                records.append(RulerRecord(reading.setting, task, reading.length, applicable=False, note=samples))
                continue
            records.append(ruler_cell(reading.model, self.prompting, task, samples, self.subject.stop_token,
                                      reading.read, reading.setting, reading.length))
        return records

    def does_not_apply(self, setting: Setting, length: int, note: str) -> list[RulerRecord]:
        return [RulerRecord(setting, task, length, applicable=False, note=note) for task in self.config.ruler]

    def derive(self, results: Results) -> list[RulerRecord]:
        return averages(results.of(RulerRecord), list(self.config.ruler)) if len(self.config.ruler) > 1 else []

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        """ruler.csv (every record); for W&B, one table per task (and the average), each plotted against length."""
        records = results.of(cls.record)
        tables = [Table(cls.name, cls.csv, cls.record.columns(), [(r, r.csv_row()) for r in records])]
        for task in dict.fromkeys(r.ruler_task for r in records):
            rows = [(r, r.csv_row()) for r in records if r.ruler_task == task]
            plot = (f"ruler_{task}_vs_length", "length", "score", f"RULER {task}: score against length")
            tables.append(Table(f"ruler_{task}", None, cls.record.columns(), rows, plot=plot))
        return tables

    @classmethod
    def heading(cls, records: list[RulerRecord]) -> str:
        return "RULER against evaluation length"

    @classmethod
    def table(cls, records: list[RulerRecord], results: Results) -> str:
        return ruler_section(records, results.of(RulerEffectiveRecord))

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        from minillm.eval.plots import plot_ruler

        records = results.of(cls.record)
        return [plot_ruler(records, out_dir)] if records else []


@register_measurement("ruler_effective")
class RulerEffectiveMeasurement(Measurement):
    """The effective length of each (scaling, attention) of a model from its RULER average (shown in the RULER
    table); with one task, from that task's score."""

    record = RulerEffectiveRecord

    @classmethod
    def applies(cls, subject, config) -> bool:
        return super().applies(subject, config) and bool(config.ruler)

    def derive(self, results: Results) -> list[RulerEffectiveRecord]:
        return ruler_effective_lengths(results.of(RulerRecord), list(self.config.ruler),
                                       self.config.effective_threshold, self.config.effective_absolute,
                                       self.config.effective_min_exact_match)


# ----------------------------------------------------------------------------------------------
# The report's table


def _score_cell(records: list[RulerRecord]) -> str:
    """One run: '85% [70%–93%]', with its Wilson 95% interval; several: '80% (72%–88%)', their mean, min–max;
    n/a where none was measured."""
    measured = [r for r in records if r.applicable and r.score is not None]
    if not measured:
        return "n/a"
    if len(measured) == 1:
        r = measured[0]
        return f"{r.score:.0%} [{r.score_low:.0%}–{r.score_high:.0%}]"
    scores = [r.score for r in measured]
    return f"{mean(scores):.0%} ({min(scores):.0%}–{max(scores):.0%})"


def _effective_cell(effective: list[RulerEffectiveRecord]) -> str:
    """One run: '256 [128–512]' (minillm.eval.effective.effective_length_text); several: their min–max."""
    if len(effective) == 1:
        return effective_length_text(effective[0].found)
    known = sorted(e.effective_length for e in effective if e.effective_length is not None)
    return "n/a" if not known else (str(known[0]) if known[0] == known[-1] else f"{known[0]}–{known[-1]}")


def ruler_table(records: list[RulerRecord], effective: list[RulerEffectiveRecord] = ()) -> str:
    """Markdown: a row per model × scaling × attention × task (the registry's order, then the average), the score
    per length, and on each series' last row the effective length."""
    if not records:
        return ""
    key = row_key(records)
    lengths = sorted({r.length for r in records})
    groups: dict[tuple[Setting, str], list[RulerRecord]] = defaultdict(list)
    for r in records:
        groups[key(r), r.ruler_task].append(r)
    effective_of: dict[Setting, list[RulerEffectiveRecord]] = defaultdict(list)
    for e in effective:
        effective_of[key(e)].append(e)
    order = [*RULER_TASKS, AVERAGE]
    header = ["model", "trained", "scaling", "attention", "task", "samples"] + [f"@ {n}" for n in lengths] + \
             ["effective length"]
    rows = []
    settings = sorted({row for row, _ in groups}, key=row_order)
    for row in settings:
        tasks = sorted((t for r, t in groups if r == row), key=order.index)
        for task in tasks:
            group = groups[row, task]
            by_length: dict[int, list[RulerRecord]] = defaultdict(list)
            for r in group:
                by_length[r.length].append(r)
            samples = sorted({r.samples for r in group if r.applicable})
            last = task == tasks[-1]
            rows.append([model_name(row), str(row.trained_length), row.scaling, row.attention_label, task,
                         "/".join(map(str, samples)) or "0"] + [_score_cell(by_length.get(n, [])) for n in lengths] +
                        [_effective_cell(effective_of[row]) if last and effective_of[row] else ""])
    return markdown_table(header, rows)


def ruler_section(records: list[RulerRecord], effective: list[RulerEffectiveRecord]) -> str:
    """The RULER table with a paragraph saying how it was measured and how to read it."""
    chat = sorted({"chat template" if r.chat else "completion prompts" for r in records if r.applicable})
    relative = sorted({e.threshold for e in effective if e.absolute is None})
    absolute = sorted({e.absolute for e in effective if e.absolute is not None})
    bars = [f"{' / '.join(f'{t:.0%}' for t in relative)} of the average at the training length"] if relative else []
    bars += [f"an average of {' / '.join(f'{a:.1%}' for a in absolute)} (RULER's fixed bar)"] if absolute else []
    rule = (f" Effective length: the longest length up to which every length's average keeps {' or '.join(bars)} "
            f"(RULER, Hsieh et al. 2024, arXiv:2404.06654); [interval]: the same rule on the averages' Wilson 95% "
            f"bounds; ≥: the longest length measured, <: even the shortest fails.") if bars else ""
    return (f"RULER's tasks (NVIDIA/RULER), greedy decoding with the KV cache ({', '.join(chat) or 'none measured'}), "
            f"scored per sample as RULER scores them (string_match_all / string_match_part), the same samples at "
            f"every setting. Each cell: the mean score with its Wilson 95% interval [in brackets] over the samples "
            f"(several runs: their mean, min–max in parentheses); n/a: the prompt does not fit the length, or the "
            f"encoding cannot reach it (results.json says why). average: the mean over the tasks where each was "
            f"measured.{rule}\n\n" + ruler_table(records, effective))
