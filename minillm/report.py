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

from minillm.attention import ATTENTION_METHODS
from minillm.evaluation import (AccuracyRecord, EffectiveLengthRecord, PasskeyRecord, PerplexityRecord, Results,
                                TailLossRecord, TheoryRecord)
from minillm.files import write_atomic
from minillm.scaling import SCALINGS

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


SCALING_ORDER = tuple(SCALINGS)  # none first, then the registry's order
ATTENTION_ORDER = tuple(ATTENTION_METHODS)  # full first, then the registry's order


def _rank(value, order: tuple) -> tuple:
    """Known names in their order, then any other name alphabetically."""
    return (order.index(value), "") if value in order else (len(order), str(value))


def _row_order(key: tuple) -> tuple:
    model, trained, method, attention, run = key
    return str(model), trained or 0, _rank(method, SCALING_ORDER), _rank(attention, ATTENTION_ORDER), str(run)


def _row_key(records: list, base):
    """The table row of a record: base(r) + (None,), so that runs differing only in seed share it and are averaged;
    base(r) + (run,) where two runs of one base have one seed (different models: another size, another corpus)."""
    runs_by_seed: dict[tuple, dict] = defaultdict(lambda: defaultdict(set))
    for r in records:
        runs_by_seed[base(r)][r.seed].add(r.run)
    clash = {key for key, by_seed in runs_by_seed.items() if any(len(runs) > 1 for runs in by_seed.values())}
    return lambda r: base(r) + (r.run if base(r) in clash else None,)


def table_groups(records: list[PerplexityRecord]) -> dict[tuple, list[PerplexityRecord]]:
    """The rows of the perplexity table: (model, trained length, scaling, attention, run) -> records (run: None
    where seeds are averaged, see _row_key)."""
    key = _row_key(records, lambda r: (r.model, r.trained_length, r.method, r.attention))
    groups: dict[tuple, list[PerplexityRecord]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(sorted(groups.items(), key=lambda item: _row_order(item[0])))


def model_name(model: str, run) -> str:
    """The model's label; with the run's name where two runs of one label are different models."""
    return model if run is None else f"{model} [{run}]"


def series_label(key: tuple) -> str:
    """'complex θ=10000 / yarn / sliding': the model, then what differs from plain evaluation."""
    model, _, method, attention, run = key
    parts = [model_name(model, run)]
    parts += [method] if method != "none" else []
    parts += [attention] if attention != "full" else []
    return " / ".join(parts)


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
    ordered = sorted(groups.items(), key=lambda item: (str(item[0][0]), _rank(item[0][1], SCALING_ORDER),
                                                       _rank(item[0][2], ATTENTION_ORDER), item[0][3]))
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


def tail_groups(tail: list[TailLossRecord]) -> dict[tuple, list[TailLossRecord]]:
    """(model, trained length, scaling, attention) -> records of every seed, in the perplexity table's order."""
    groups: dict[tuple, list[TailLossRecord]] = defaultdict(list)
    for r in tail:
        groups[(r.model, r.trained_length, r.method, r.attention)].append(r)
    return dict(sorted(groups.items(), key=lambda item: _row_order(item[0] + (None,))))


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


def _accuracy_base(r: "AccuracyRecord | EffectiveLengthRecord") -> tuple:
    return r.model, r.trained_length, r.task, r.method, r.attention


def accuracy_groups(records: list[AccuracyRecord], effective: list[EffectiveLengthRecord] = ()) -> \
        dict[tuple, tuple[list[AccuracyRecord], list[EffectiveLengthRecord]]]:
    """The rows of the accuracy table: (model, trained length, task, scaling, attention, run) -> the records of
    every seed and their effective lengths, seeds averaged as in the perplexity table (see _row_key)."""
    key = _row_key(records, _accuracy_base)
    groups: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
    for r in records:
        groups[key(r)][0].append(r)
    for e in effective:
        if key(e) in groups:
            groups[key(e)][1].append(e)

    def order(item) -> tuple:
        model, trained, task, method, attention, run = item[0]
        return (str(task),) + _row_order((model, trained, method, attention, run))

    return dict(sorted(groups.items(), key=order))


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


def _draw_lengths(ax, groups: dict[tuple, list[PerplexityRecord]], label) -> None:
    """One line per group: mean perplexity over seeds at each applicable length."""
    for key, group in groups.items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            if r.applicable and r.ppl is not None and math.isfinite(r.ppl):
                by_length[r.length].append(r.ppl)
        if by_length:
            lengths = sorted(by_length)
            ax.plot(lengths, [mean(by_length[n]) for n in lengths], marker="o", label=label(key))


def _length_axes(ax, records: list[PerplexityRecord], trained: list[int], title: str) -> None:
    from matplotlib import ticker

    for n in trained:
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity", title=title)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))  # not 2.96×10²
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xticks(sorted({r.length for r in records}))
    ax.yaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _panels(n: int, width: float = 6.0, height: float = 4.5):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot(records: list[PerplexityRecord], out_dir: Path) -> list[Path]:
    """The report's figures, each a grid of panels so that no panel holds more lines than it can show:

    ppl_vs_length.png     every model as trained (no inference-time scaling), one panel per attention pattern
    scaling_vs_length.png one panel per rotary model, one line per scaling method (first attention pattern);
                          only when scaling methods were evaluated
    loss_vs_position.png  every model as trained at its longest applicable length (first attention pattern)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table_groups(records)
    trained = sorted({r.trained_length for r in records if r.trained_length})
    attentions = sorted({key[3] for key in groups}, key=lambda a: _rank(a, ATTENTION_ORDER)) or ["full"]
    first = attentions[0]
    paths = []

    fig, axes = _panels(len(attentions))
    for ax, attention in zip(axes, attentions):
        plain = {k: g for k, g in groups.items() if k[2] == "none" and k[3] == attention}
        _draw_lengths(ax, plain, lambda key: model_name(key[0], key[4]))
        _length_axes(ax, records, trained, f"{attention} attention, no scaling (dotted: training length)")
    fig.tight_layout()
    paths.append(out_dir / "ppl_vs_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    scaled_models = sorted({(k[0], k[4]) for k in groups if k[2] != "none" and k[3] == first}, key=str)
    if scaled_models:
        fig, axes = _panels(len(scaled_models))
        for ax, (model, run) in zip(axes, scaled_models):
            methods = {k: g for k, g in groups.items() if k[0] == model and k[4] == run and k[3] == first}
            _draw_lengths(ax, methods, lambda key: key[2])
            _length_axes(ax, records, trained, f"{model_name(model, run)}, {first} attention")
        fig.tight_layout()
        paths.append(out_dir / "scaling_vs_length.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, group in groups.items():
        usable = [r for r in group if r.applicable and r.by_position]
        if key[2] != "none" or key[3] != first or not usable:
            continue
        longest = max(r.length for r in usable)
        by_start: dict[int, list] = defaultdict(list)
        for r in usable:
            if r.length == longest:
                for bucket in r.by_position:
                    by_start[bucket.position_start].append(bucket.loss)
        starts = sorted(by_start)
        ax.plot(starts, [mean(by_start[s]) for s in starts], label=f"{model_name(key[0], key[4])} @ {longest}")
    for n in trained:
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="position in window (bucket start)", ylabel="loss (nats)",
           title=f"Loss against position at the longest length, {first} attention (dotted: training length)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "loss_vs_position.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_tail(tail: list[TailLossRecord], out_dir: Path) -> Optional[Path]:
    """tail_loss.png: one panel per attention method, one line per model × scaling: the loss on the same last
    L tokens against the context length."""
    if not tail:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = tail_groups(tail)
    attentions = sorted({key[3] for key in groups}, key=lambda a: _rank(a, ATTENTION_ORDER))
    fig, axes = _panels(len(attentions))
    for ax, attention in zip(axes, attentions):
        for (model, _, method, at), group in groups.items():
            if at != attention:
                continue
            by_length: dict[int, list] = defaultdict(list)
            for r in group:
                by_length[r.length].append(r.loss)
            lengths = sorted(by_length)
            ax.plot(lengths, [mean(by_length[n]) for n in lengths], marker="o",
                    label=model if method == "none" else f"{model} / {method}")
        ax.set(xscale="log", xlabel="context read (tokens)", ylabel="loss on the last L tokens (nats)",
               title=f"{attention} attention: the same targets, more context")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(sorted({r.length for r in tail}))
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out_dir / "tail_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(records: list[AccuracyRecord], out_dir: Path) -> Optional[Path]:
    """accuracy_vs_length.png: one panel per task, one line per model × scaling × attention: the exact match (mean
    over seeds) against the length on a log2 axis, with a band (one seed: its Wilson 95% interval; several: their
    min–max), the training lengths dotted."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = accuracy_groups(records)
    tasks = sorted({key[2] for key in groups})
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for (model, _, of_task, method, attention, run), (group, _) in groups.items():
            if of_task != task:
                continue
            by_length: dict[int, list] = defaultdict(list)
            for r in group:
                if r.applicable and r.exact_match is not None:
                    by_length[r.length].append(r)
            if not by_length:
                continue
            lengths = sorted(by_length)
            centre = [mean(r.exact_match for r in by_length[n]) for n in lengths]
            if all(len(by_length[n]) == 1 for n in lengths):
                low = [by_length[n][0].exact_match_low for n in lengths]
                high = [by_length[n][0].exact_match_high for n in lengths]
            else:
                low = [min(r.exact_match for r in by_length[n]) for n in lengths]
                high = [max(r.exact_match for r in by_length[n]) for n in lengths]
            line, = ax.plot(lengths, centre, marker="o", label=series_label((model, None, method, attention, run)))
            ax.fill_between(lengths, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        for n in sorted({r.trained_length for r in records if r.task == task}):
            ax.axvline(n, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="evaluation length (tokens)", ylabel="exact match", ylim=(-0.02, 1.02),
               title=f"{task}: exact match (dotted: training length)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(sorted({r.length for r in records if r.task == task}))
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "accuracy_vs_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def _table(rows: list[dict]):
    import wandb

    columns = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)


def log_to_wandb(results: Results, out_dir: Path, project: str, group: Optional[str], mode: str) -> Path:
    """One evaluation run in the training runs' group (job_type eval_extrapolate), files under out_dir/wandb:
    tables of every number, line plots of perplexity and exact match against length (one line per model ×
    scaling × attention, and task) and the PNGs.
    Returns the run's local folder."""
    import wandb

    records, passkey, theory = results.perplexity, results.passkey, results.theory
    run = wandb.init(project=project, group=group, job_type="eval_extrapolate", dir=str(out_dir), mode=mode,
                     settings=wandb.Settings(init_timeout=60, silent=True))
    label = {id(r): series_label(key) for key, group_records in table_groups(records).items() for r in group_records}
    if records:
        rows = [{"series": label[id(r)], **row} for r, row in zip(records, flat_rows(records))]
        table = _table(rows)
        run.log({"extrapolation/perplexity": table,
                 "extrapolation/ppl_vs_length": wandb.plot.line(table, "length", "ppl", stroke="series",
                                                                title="Perplexity against length")})
    if results.accuracy:
        accuracy_rows = [{"series": f"{task} / {series_label((model, None, method, attention, run_name))}",
                          **dataclasses.asdict(r)}
                         for (model, _, task, method, attention, run_name), (series, _)
                         in accuracy_groups(results.accuracy).items() for r in series]
        atable = _table(accuracy_rows)
        run.log({"extrapolation/accuracy": atable,
                 "extrapolation/exact_match_vs_length": wandb.plot.line(atable, "length", "exact_match",
                                                                        stroke="series",
                                                                        title="Exact match against length")})
    if results.effective_length:
        run.log({"extrapolation/effective_length": _table([dataclasses.asdict(e) for e in results.effective_length])})
    positions = [{"series": f"{label[id(r)]} @ {r.length}", **row}
                 for r in records for row in position_rows([r])]
    if positions:
        ptable = _table(positions)
        run.log({"extrapolation/loss_by_position": ptable,
                 "extrapolation/loss_vs_position": wandb.plot.line(ptable, "position_start", "loss", stroke="series",
                                                                   title="Loss against position")})
    if passkey:
        run.log({"extrapolation/passkey": _table([dataclasses.asdict(p) for p in passkey])})
    if theory:
        run.log({"extrapolation/theory": _table([dataclasses.asdict(t) for t in theory])})
    if results.tail:
        tail_rows = [{"series": series_label(key + (None,)), **dataclasses.asdict(r)}
                     for key, group in tail_groups(results.tail).items() for r in group]
        ttable = _table(tail_rows)
        run.log({"extrapolation/tail_loss": ttable,
                 "extrapolation/tail_loss_vs_context": wandb.plot.line(ttable, "length", "loss", stroke="series",
                                                                       title="Loss on the last L tokens against context")})
    for image in sorted(out_dir.glob("*.png")):  # the figures write_report drew
        run.log({f"extrapolation/{image.stem}_png": wandb.Image(str(image))})
    folder = Path(run.dir).parent  # out_dir/wandb/<offline-|>run-<time>-<id>
    run.finish()
    return folder


def validation_curve(metrics_csv: Path) -> list[tuple[float, float]]:
    """(training tokens seen, val/loss) at each validation of a run's metrics.csv."""
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    # Validation rows carry no token count; every step trains on the same number of tokens.
    logged = next((r for r in rows if r.get("train/tokens")), None)
    points = []
    if logged is not None:
        per_step = float(logged["train/tokens"]) / (int(logged["step"]) + 1)
        points = sorted(((int(r["step"]) + 1) * per_step, float(r["val/loss"])) for r in rows if r.get("val/loss"))
    if not points:
        raise ValueError(f"{metrics_csv}: no rows with both val/loss and train/tokens")
    return points


def training_curve(metrics_csv: Path, out: Path, unigram_entropy: Optional[float] = None) -> Path:
    """The validation curve as a PNG, with the unigram entropy as the bar a model must get under to be
    using context at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = validation_curve(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([t / 1e6 for t, _ in points], [loss for _, loss in points], marker="o", label="validation loss")
    if unigram_entropy is not None:
        ax.axhline(unigram_entropy, color="grey", linestyle="--", label=f"unigram entropy {unigram_entropy:.2f}")
    ax.set(xlabel="training tokens seen (millions)", ylabel="loss (nats per token)", title="Validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
