"""Tables, plots and W&B upload for evaluation records; measures nothing itself."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

from minillm.eval.grouping import (
    ATTENTION_ORDER,
    SCALING_ORDER,
    accuracy_groups,
    model_name,
    rank,
    table_groups,
    tail_groups,
)
from minillm.eval.plots import plot, plot_accuracy, plot_tail
from minillm.eval.records import (
    AccuracyRecord,
    EffectiveLengthRecord,
    PasskeyRecord,
    PerplexityRecord,
    Results,
    TailLossRecord,
    TheoryRecord,
)
from minillm.files import write_atomic

PERPLEXITY_COLUMNS = tuple(f.name for f in dataclasses.fields(PerplexityRecord) if f.name != "by_position")
POSITION_COLUMNS = ("model", "run", "seed", "method", "attention", "length", "position_start", "position_end", "loss",
                    "tokens")
PASSKEY_COLUMNS = tuple(f.name for f in dataclasses.fields(PasskeyRecord))
TAIL_COLUMNS = tuple(f.name for f in dataclasses.fields(TailLossRecord))
ACCURACY_COLUMNS = tuple(f.name for f in dataclasses.fields(AccuracyRecord))


def flat_rows(records: list[PerplexityRecord]) -> list[dict]:
    """One row per (run, method, attention, length), without the nested per-position losses."""
    return [{k: v for k, v in dataclasses.asdict(r).items() if k != "by_position"} for r in records]


def position_rows(records: list[PerplexityRecord]) -> list[dict]:
    return [{"model": r.model, "run": r.run, "seed": r.seed, "method": r.method, "attention": r.attention,
             "length": r.length, **dataclasses.asdict(bucket)} for r in records for bucket in r.by_position]


def _csv(rows: list[dict], columns: tuple[str, ...] = ()) -> str:
    """CSV of `rows` (columns: the union of their keys, in order of appearance); just the header when empty."""
    columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    if not columns:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _fmt(values: list[Optional[float]]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}" if values[0] < 1e4 else f"{values[0]:.2e}"
    return f"{mean(values):.3g} ± {stdev(values):.2g}"


def perplexity_table(records: list[PerplexityRecord]) -> str:
    """Markdown: perplexity per length (mean ± std over seeds); n/a where the model cannot run that long."""
    lengths = sorted({r.length for r in records})
    header = ["model", "trained", "scaling", "attention", "seeds"] + [f"ppl @ {n}" for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, group in table_groups(records).items():
        model, trained, method, attention, run = key
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            by_length[r.length].append(r.ppl if r.applicable else None)
        seeds = len({r.seed for r in group})
        cells = [model_name(model, run), str(trained), method, attention, str(seeds)] + [_fmt(by_length.get(n, [])) for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def passkey_table(rows: list[PasskeyRecord]) -> str:
    """Markdown: exact-match accuracy per depth and overall, and the mean key log-probability, per
    model × scaling × attention × length (seeds pooled)."""
    if not rows:
        return ""
    depths = sorted({r.depth for r in rows})
    groups: dict[tuple, list[PasskeyRecord]] = defaultdict(list)
    for r in rows:
        groups[(r.model, r.method, r.attention, r.length)].append(r)
    header = ["model", "scaling", "attention", "length", "trials"] + [f"depth {d:g}" for d in depths] + \
             ["exact match", "key log-prob (nats)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ordered = sorted(groups.items(), key=lambda item: (str(item[0][0]), rank(item[0][1], SCALING_ORDER),
                                                       rank(item[0][2], ATTENTION_ORDER), item[0][3]))
    for (model, method, attention, length), group in ordered:
        trials = sum(g.trials for g in group)
        per_depth = []
        for depth in depths:
            at = [g for g in group if g.depth == depth]
            n = sum(g.trials for g in at)
            per_depth.append(f"{sum(g.exact_match * g.trials for g in at) / n:.0%}" if n else "n/a")
        accuracy = sum(g.exact_match * g.trials for g in group) / trials
        logprob = sum(g.key_logprob * g.trials for g in group) / trials
        lines.append("| " + " | ".join([model, method, attention, str(length), str(trials), *per_depth,
                                        f"{accuracy:.0%}", f"{logprob:.2f}"]) + " |")
    return "\n".join(lines)


def tail_table(tail: list[TailLossRecord]) -> str:
    """Markdown: the loss on each document's last L tokens (L = training length) against the context read
    before and with them (mean ± std over seeds); falling along a row means the extra context helps."""
    if not tail:
        return ""
    lengths = sorted({r.length for r in tail})
    header = ["model", "trained", "scaling", "attention", "seeds"] + [f"context {n}" for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, trained, method, attention), group in tail_groups(tail).items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            by_length[r.length].append(r.loss)
        cells = [model, str(trained), method, attention, str(len({r.seed for r in group}))]
        lines.append("| " + " | ".join(cells + [_fmt(by_length.get(n, [])) for n in lengths]) + " |")
    return "\n".join(lines)


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
    """'256', or the seeds' min–max '128–512'; '≥1024' where it reached the longest length measured; n/a where
    undefined (and the count of seeds it is defined for, when only some)."""
    known = [e for e in effective if e.effective_length is not None]
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, trained, task, method, attention, run), (group, effective_of) in \
            accuracy_groups(records, effective).items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            by_length[r.length].append(r)
        cells = [model_name(model, run), str(trained), task, method, attention, str(len({r.seed for r in group}))]
        cells += [_exact_match_cell(by_length.get(n, []), metric) for n in lengths]
        if metric == "exact_match":
            cells.append(_effective_cell(effective_of))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_section(records: list[AccuracyRecord], effective: list[EffectiveLengthRecord]) -> str:
    """The accuracy table with a paragraph saying how to read it."""
    examples = sorted({r.examples for r in records if r.applicable})
    thresholds = sorted({e.threshold for e in effective})
    floors = sorted({e.min_reference for e in effective})
    rule = (f" Effective length (RULER, Hsieh et al. 2024, arXiv:2404.06654, against the model's own score): the "
            f"longest length up to which every length measured keeps at least "
            f"{' / '.join(f'{t:.0%}' for t in thresholds)} of the exact match at the training length; ≥: the "
            f"longest length measured; n/a: below {' / '.join(f'{m:.0%}' for m in floors)} at the training "
            f"length, a run that did not learn the task." if thresholds else "")
    section = (f"Exact match per answer on {' / '.join(map(str, examples)) or 'no'} test examples per length: one "
               f"seed with its Wilson 95% interval [in brackets], several as their mean with the seeds' min–max "
               f"(in parentheses).{rule}\n\n" + accuracy_table(records, effective))
    # Answers of several tokens (a copy, a needle's value): exact match is all or nothing, the tokens say how far.
    several = [r for r in records if r.applicable and r.tokens > r.answers]
    if several:
        tasks = sorted({r.task for r in several})
        section += (f"\n\nAccuracy per answer token, for the tasks whose answers have several ({', '.join(tasks)}); "
                    f"its interval treats the tokens of one answer as independent, so it is too narrow where errors "
                    f"cluster.\n\n" + accuracy_table([r for r in records if r.task in tasks], metric="token_accuracy"))
    return section


def theory_table(theory: list[TheoryRecord]) -> str:
    """Markdown: the critical dimension (Liu et al. 2023) and the base bound (Men et al. 2024) per model and
    length. predicted: 'ok' when the model's base keeps B(m) ≥ 0 up to the length (supported_length when
    the record has it, else θ ≥ the minimum base)."""
    if not theory:
        return ""
    lines = ["| model | rotary dim | θ | critical dim (Liu 2023) | T_extra | eval length | min base (Men 2024) | "
             "base supports (Men 2024) | predicted |", "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for t in theory:
        key = (t.model, t.rotary_dim, t.theta, t.trained_length, t.length)
        if key in seen:  # one row for all seeds of a model
            continue
        seen.add(key)
        ok = t.supported_length >= t.length
        lines.append(f"| {t.model} | {t.rotary_dim} | {t.theta:g} | {t.critical_dim} | "
                     f"{t.extrapolation_bound:.0f} | {t.length} | {t.min_base:.3g} | "
                     f"{t.supported_length} | {'ok' if ok else 'base too small'} |")
    return "\n".join(lines)


def write_report(results: Results, out_dir: Path, header: str = "") -> dict[str, Path]:
    """Every number as JSON and CSV, the tables as markdown, the plots as PNG; each file written atomically.

    results.json: {"perplexity": records (with by_position), "passkey": ..., "theory": ..., "accuracy": ...,
    "effective_length": ..., "precision": the dtype computed in, "precision_reason": why}; results.csv: one row per perplexity record; loss_by_position.csv: one row per record
    and position bucket; passkey.csv: one row per (run, scaling, length, depth); tail_loss.csv: one row per (run,
    scaling, attention, context length); accuracy.csv: one row per accuracy record (runs trained on a synthetic
    task); report.md; the PNGs of plot(), plot_tail() and plot_accuracy(). Every CSV is written, header only when
    it has no rows; the perplexity section and figures are left out of an evaluation of task-trained runs only.
    """
    records, passkey, theory, tail = results.perplexity, results.passkey, results.theory, results.tail
    task_records = results.accuracy
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "positions_csv": out_dir / "loss_by_position.csv",
        "passkey_csv": out_dir / "passkey.csv",
        "tail_csv": out_dir / "tail_loss.csv",
        "accuracy_csv": out_dir / "accuracy.csv",
        "markdown": out_dir / "report.md",
    }
    write_atomic(files["json"], json.dumps(dataclasses.asdict(results), indent=1, default=str))
    write_atomic(files["csv"], _csv(flat_rows(records), PERPLEXITY_COLUMNS))
    write_atomic(files["positions_csv"], _csv(position_rows(records), POSITION_COLUMNS))
    write_atomic(files["passkey_csv"], _csv([dataclasses.asdict(p) for p in passkey], PASSKEY_COLUMNS))
    write_atomic(files["tail_csv"], _csv([dataclasses.asdict(t) for t in tail], TAIL_COLUMNS))
    write_atomic(files["accuracy_csv"], _csv([dataclasses.asdict(a) for a in task_records], ACCURACY_COLUMNS))
    text = bool(records) or not task_records  # an evaluation of nothing still says so in an empty perplexity table
    sections = [header]
    if text:
        sections += ["## Perplexity against evaluation length\n", perplexity_table(records)]
    if task_records:
        sections += [("\n" if text else "") + "## Task accuracy against evaluation length\n",
                     accuracy_section(task_records, results.effective_length)]
    if tail:
        sections += [f"\n## Loss on the last {tail[0].targets} tokens against the context read (ReRoPE's protocol)\n",
                     tail_table(tail)]
    if passkey:
        sections += ["\n## Passkey retrieval\n", passkey_table(passkey)]
    if theory:
        sections += ["\n## RoPE theory beside the measurement\n", theory_table(theory)]
    figures = (plot(records, out_dir) if text else []) + \
        [path for path in (plot_accuracy(task_records, out_dir), plot_tail(tail, out_dir)) if path is not None]
    sections += [f"\n![{path.stem.replace('_', ' ')}]({path.name})\n" for path in figures]
    write_atomic(files["markdown"], "\n".join(sections) + "\n")
    files.update({path.stem: path for path in figures})
    return files
