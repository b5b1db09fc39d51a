"""PNG plots of evaluation records: perplexity against length, tail loss, LongPPL, task accuracy, RULER scores."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Optional

from minillm.eval.grouping import ATTENTION_ORDER, model_name, rank, table_groups
from minillm.eval.records import Setting

if TYPE_CHECKING:
    from minillm.eval.longppl import LongPPLRecord
    from minillm.eval.perplexity import PerplexityRecord
    from minillm.eval.ruler import RulerRecord
    from minillm.eval.tail import TailLossRecord
    from minillm.eval.tasks import AccuracyRecord


def _draw_lengths(ax, groups: dict[Setting, list["PerplexityRecord"]], label, value: str = "ppl") -> None:
    """One line per group: the mean of `value` (perplexity) over seeds at each applicable length where it is known."""
    for row, group in groups.items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            measured = getattr(r, value)
            if r.applicable and measured is not None and math.isfinite(measured):
                by_length[r.length].append(measured)
        if by_length:
            lengths = sorted(by_length)
            ax.plot(lengths, [mean(by_length[n]) for n in lengths], marker="o", label=label(row))


def _length_axes(ax, records: list["PerplexityRecord"], trained: list[int], title: str) -> None:
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


def plot(records: list["PerplexityRecord"], out_dir: Path) -> list[Path]:
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
    trained = sorted({r.setting.trained_length for r in records if r.setting.trained_length})
    attentions = sorted({row.attention_label for row in groups}, key=lambda a: rank(a, ATTENTION_ORDER)) or ["full"]
    first = attentions[0]
    paths = []

    fig, axes = _panels(len(attentions))
    for ax, attention in zip(axes, attentions):
        plain = {row: g for row, g in groups.items() if row.scaling == "none" and row.attention_label == attention}
        _draw_lengths(ax, plain, model_name)
        _length_axes(ax, records, trained, f"{attention} attention, no scaling (dotted: training length)")
    fig.tight_layout()
    paths.append(out_dir / "ppl_vs_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # the models with a scaling under the first attention method: (label, run) where the run is kept
    scaled_models = sorted({(row.model, row.run) for row in groups
                            if row.scaling != "none" and row.attention_label == first})
    if scaled_models:
        fig, axes = _panels(len(scaled_models))
        for ax, (model, run) in zip(axes, scaled_models):
            methods = {row: g for row, g in groups.items()
                       if row.model == model and row.run == run and row.attention_label == first}
            _draw_lengths(ax, methods, lambda row: row.scaling)
            _length_axes(ax, records, trained, f"{model_name(Setting(model=model, run=run))}, {first} attention")
        fig.tight_layout()
        paths.append(out_dir / "scaling_vs_length.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for row, group in groups.items():
        usable = [r for r in group if r.applicable and r.by_position]
        if row.scaling != "none" or row.attention_label != first or not usable:
            continue
        longest = max(r.length for r in usable)
        by_start: dict[int, list] = defaultdict(list)
        for r in usable:
            if r.length == longest:
                for bucket in r.by_position:
                    by_start[bucket.position_start].append(bucket.loss)
        starts = sorted(by_start)
        ax.plot(starts, [mean(by_start[s]) for s in starts], label=f"{model_name(row)} @ {longest}")
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


def plot_longppl(records: list["LongPPLRecord"], out_dir: Path) -> Optional[Path]:
    """longppl_vs_length.png: LongPPL (left) and the perplexity on the same windows (right) against the length, one
    line per model × scaling × attention (mean over seeds), lengths with no key token left out of the left panel."""
    if not any(r.longppl is not None for r in records):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table_groups(records)
    trained = sorted({r.setting.trained_length for r in records if r.setting.trained_length})
    fig, axes = _panels(2)
    for ax, value, title in zip(axes, ("longppl", "ppl"), ("LongPPL: the key tokens", "perplexity: every target")):
        _draw_lengths(ax, groups, lambda row: row.label(), value)
        _length_axes(ax, records, trained, f"{title} (dotted: training length)")
    fig.tight_layout()
    path = out_dir / "longppl_vs_length.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tail(tail: list["TailLossRecord"], out_dir: Path) -> Optional[Path]:
    """tail_loss.png: one panel per attention method, one line per model × scaling: the loss on the same last
    L tokens against the context length."""
    if not tail:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = table_groups(tail)
    attentions = sorted({row.attention_label for row in groups}, key=lambda a: rank(a, ATTENTION_ORDER))
    fig, axes = _panels(len(attentions))
    for ax, attention in zip(axes, attentions):
        for row, group in groups.items():
            if row.attention_label != attention:
                continue
            by_length: dict[int, list] = defaultdict(list)
            for r in group:
                by_length[r.length].append(r.loss)
            lengths = sorted(by_length)
            ax.plot(lengths, [mean(by_length[n]) for n in lengths], marker="o",
                    label=model_name(row) if row.scaling == "none" else f"{model_name(row)} / {row.scaling}")
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


def _score_panels(panels: dict[str, dict[str, list[tuple[int, float, float, float]]]], trained: dict[str, list[int]],
                  ylabel: str, path: Path) -> Path:
    """One panel per title, one line per label: (length, centre, low, high) points, the centre against the length on
    a log2 axis with a band from low to high, the panel's training lengths dotted; scores as percentages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = _panels(len(panels))
    for ax, (title, lines) in zip(axes, panels.items()):
        for label, points in lines.items():
            lengths, centre, low, high = zip(*sorted(points))
            line, = ax.plot(lengths, centre, marker="o", label=label)
            ax.fill_between(lengths, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        for n in trained[title]:
            ax.axvline(n, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="evaluation length (tokens)", ylabel=ylabel, ylim=(-0.02, 1.02),
               title=f"{title}: {ylabel} (dotted: training length)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(sorted({n for points in lines.values() for n, *_ in points}))
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(1.0))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _band(group: list, value: str) -> list[tuple[int, float, float, float]]:
    """(length, mean, low, high) of `value` per applicable length: one run's Wilson 95% interval (value_low,
    value_high), several runs' min–max."""
    by_length: dict[int, list] = defaultdict(list)
    for r in group:
        if r.applicable and getattr(r, value) is not None:
            by_length[r.length].append(r)
    points = []
    for n, at in sorted(by_length.items()):
        values = [getattr(r, value) for r in at]
        if len(at) == 1:
            points.append((n, values[0], getattr(at[0], f"{value}_low"), getattr(at[0], f"{value}_high")))
        else:
            points.append((n, mean(values), min(values), max(values)))
    return points


def plot_accuracy(records: list["AccuracyRecord"], out_dir: Path) -> Optional[Path]:
    """accuracy_vs_length.png: one panel per task, one line per model × scaling × attention: the exact match (mean
    over seeds) against the length on a log2 axis, with a band (one seed: its Wilson 95% interval; several: their
    min–max), the training lengths dotted."""
    if not records:
        return None
    panels: dict[str, dict[str, list]] = defaultdict(dict)
    for row, group in table_groups(records).items():
        points = _band(group, "exact_match")
        if points:
            panels[row.task][dataclasses.replace(row, task=None).label()] = points
    tasks = sorted({row.task for row in table_groups(records)})
    trained = {task: sorted({r.setting.trained_length for r in records if r.setting.task == task}) for task in tasks}
    return _score_panels({task: panels.get(task, {}) for task in tasks}, trained, "exact match",
                         out_dir / "accuracy_vs_length.png")


def plot_ruler(records: list["RulerRecord"], out_dir: Path) -> Optional[Path]:
    """ruler_vs_length.png: one panel per RULER task (the registry's order, then the average), one line per model ×
    scaling × attention: the score against the length on a log2 axis with a band (one run: its Wilson 95%
    interval; several: their min–max), the training lengths dotted."""
    if not records:
        return None
    from minillm.data.ruler import RULER_TASKS
    from minillm.eval.ruler import AVERAGE

    order = [*RULER_TASKS, AVERAGE]
    tasks = sorted({r.ruler_task for r in records}, key=order.index)
    trained = sorted({r.setting.trained_length for r in records if r.setting.trained_length})
    panels: dict[str, dict[str, list]] = {task: {} for task in tasks}
    for task in tasks:
        for row, group in table_groups([r for r in records if r.ruler_task == task]).items():
            points = _band(group, "score")
            if points:
                panels[task][row.label()] = points
    return _score_panels(panels, {task: trained for task in tasks}, "score", out_dir / "ruler_vs_length.png")
