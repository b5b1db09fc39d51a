"""Study reports that join evaluation results with the runs behind them: context extension by fine-tuning, and
LongPPL against the synthetic tasks' effective length across a study's encodings."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minillm.eval.longppl import LongPPLRecord
from minillm.eval.passkey import PasskeyRecord
from minillm.eval.perplexity import PerplexityRecord
from minillm.eval.records import read_results
from minillm.eval.tasks import EffectiveLengthRecord
from minillm.runs import RunFolder

SCALING_NAMES = {"none": "none", "linear": "PI (linear)", "ntk": "NTK-aware", "yarn": "YaRN", "llama3": "Llama 3",
                 "longrope": "LongRoPE", "dynamic_ntk": "dynamic NTK", "dynamic_yarn": "dynamic YaRN"}


@dataclass
class TrainedRun:
    """What a run folder says of how it was trained: its method, length, cost and loss curve."""

    folder: Path
    method: str  # 'YaRN', 'YaRN + PoSE', 'direct', 'scratch', ...
    context_length: int
    seed: int
    steps: int
    tokens: int
    wall_seconds: float
    curve: list[tuple[int, float]]  # (step, train/loss)


def read_run(folder: str | Path) -> TrainedRun:
    run = RunFolder(folder)
    config, summary = run.settings, json.loads(run.summary.read_text())
    scaling = str(config["rope_scaling"]["type"])
    sampler = str((config.get("positions") or {}).get("sampler", "contiguous"))
    if config.get("init_from") is None:
        method = "scratch"
    elif scaling == "none":
        method = "direct"
    else:
        method = SCALING_NAMES.get(scaling, scaling) + (" + PoSE" if sampler == "pose" else "")
    curve = []
    if run.metrics.is_file():
        with open(run.metrics, newline="") as f:
            curve = [(int(row["step"]), float(row["train/loss"])) for row in csv.DictReader(f)
                     if row.get("train/loss") not in (None, "")]
    return TrainedRun(run.path, method, int(config["model"]["context_length"]), int(config["seed"]),
                      int(summary["steps"]), int(summary["tokens"]), float(summary["wall_seconds"]), curve)


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


ORDER = ("scratch", "none", "direct", "PI (linear)", "NTK-aware", "YaRN", "Llama 3", "LongRoPE", "YaRN + PoSE")


def _protocol(method: str, finetuned: bool) -> str:
    if not finetuned:
        return "source, no scaling" if method == "none" else "inference only"
    return "from scratch" if method == "scratch" else "fine-tuned"


def _perplexities(folder: Path) -> tuple[dict[str, TrainedRun], dict[tuple[str, str], dict[int, list[float]]]]:
    """The trained runs behind eval_finetuned (by folder), and every (method, protocol) -> length -> ppl of seeds."""
    finetuned = [r for r in read_results(folder / "eval_finetuned").of(PerplexityRecord) if r.applicable]
    inference = [r for r in read_results(folder / "eval_inference").of(PerplexityRecord) if r.applicable]
    folders = {r.setting.checkpoint: RunFolder.of_checkpoint(r.setting.checkpoint).path for r in finetuned}
    trained = {str(path): read_run(path) for path in dict.fromkeys(folders.values())}
    ppl: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in finetuned:
        method = trained[str(folders[r.setting.checkpoint])].method
        ppl[method, _protocol(method, True)][r.length].append(r.ppl)
    for r in inference:
        method = SCALING_NAMES.get(r.setting.scaling, r.setting.scaling)
        ppl[method, _protocol(method, False)][r.length].append(r.ppl)
    return trained, ppl


def context_extension_report(folder: Path) -> str:
    """Markdown: perplexity at each length of every fine-tuned model beside its method at inference only and the
    from-scratch run; passkey log-probability; training cost. folder: `make context-extension`'s output."""
    trained, ppl = _perplexities(folder)
    lengths = sorted({n for points in ppl.values() for n in points})
    rank = {name: i for i, name in enumerate(ORDER)}
    keys = sorted(ppl, key=lambda k: (rank.get(k[0], len(ORDER)), k[1] != "fine-tuned"))
    lines = ["| method | protocol | " + " | ".join(f"ppl @ {n}" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for method, protocol in keys:
        cells = [_cell(ppl[method, protocol].get(n, [])) for n in lengths]
        lines.append(f"| {method} | {protocol} | " + " | ".join(cells) + " |")

    cost: dict[str, list[TrainedRun]] = defaultdict(list)
    for run in trained.values():
        cost[run.method].append(run)
    lines += ["", "| method | window | steps | tokens | wall time per run (s) | seeds |", "|---|---|---|---|---|---|"]
    for method in sorted(cost, key=lambda m: rank.get(m, len(ORDER))):
        group = cost[method]
        lines.append(f"| {method} | {group[0].context_length} | {group[0].steps} | {group[0].tokens:,} | "
                     f"{statistics.fmean(r.wall_seconds for r in group):.0f} | {len(group)} |")

    passkey = _passkey(folder, trained)
    if passkey:
        lines += ["", passkey]
    return "\n".join(lines) + "\n"


def _passkey(folder: Path, trained: dict[str, TrainedRun]) -> Optional[str]:
    """Mean log-probability of the passkey's tokens (nats) per method and length: exact match is 0 at this size."""
    values: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for finetuned, name in ((True, "eval_finetuned"), (False, "eval_inference")):
        for r in read_results(folder / name).of(PasskeyRecord):
            # by checkpoint, as the perplexities: two methods' runs may share a folder name
            method = trained[str(RunFolder.of_checkpoint(r.setting.checkpoint).path)].method if finetuned else \
                SCALING_NAMES.get(r.setting.scaling, r.setting.scaling)
            values[method, _protocol(method, finetuned)][r.length].append(r.key_logprob)
    if not values:
        return None
    lengths = sorted({n for v in values.values() for n in v})
    rank = {name: i for i, name in enumerate(ORDER)}
    lines = ["| method | protocol | " + " | ".join(f"passkey log p @ {n}" for n in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for method, protocol in sorted(values, key=lambda k: (rank.get(k[0], len(ORDER)), k[1] != "fine-tuned")):
        cells = []
        for n in lengths:
            got = values[method, protocol].get(n, [])
            cells.append(f"{statistics.fmean(got):.2f}" if got else "–")
        lines.append(f"| {method} | {protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_context_extension(folder: Path, out: Path) -> list[Path]:
    """ppl_vs_length.png (fine-tuned and inference-only, per method) and finetune_loss.png (train/loss against
    step, mean over seeds) in out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    trained, series = _perplexities(folder)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for (method, protocol), points in sorted(series.items()):
        xs = sorted(points)
        colour = colours.setdefault(method, f"C{len(colours)}")
        ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", color=colour,
                linestyle=":" if protocol in ("inference only", "source, no scaling") else "-",
                label=f"{method} ({protocol})")
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
           title="Trained (solid) vs the 64-token source scaled at inference (dotted)")
    ax.set_xticks(sorted({n for p in series.values() for n in p}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    lengths_png = out / "ppl_vs_length.png"
    fig.savefig(lengths_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
    for run in trained.values():
        if run.method != "scratch":
            curves[run.method].append(run.curve)
    for i, (method, group) in enumerate(sorted(curves.items())):
        steps = sorted({s for curve in group for s, _ in curve})
        means = [statistics.fmean([loss for curve in group for s, loss in curve if s == step]) for step in steps]
        ax.plot(steps, means, label=method, color=colours.get(method, f"C{i}"))
    ax.set(xlabel="fine-tuning step", ylabel="train loss (nats)", title="Fine-tuning loss (mean of 3 seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curve_png = out / "finetune_loss.png"
    fig.savefig(curve_png, dpi=120)
    plt.close(fig)
    return [lengths_png, curve_png]


# ----------------------------------------------------------------------------------------------
# LongPPL against effective length across the encodings of a study (issue 34)


@dataclass
class Correlation:
    """LongPPL at one length against the effective length, across encodings: one (encoding, LongPPL, effective
    length) pair each, with the rank (Spearman) and linear (Pearson) correlation of the n pairs."""

    length: int
    pairs: list[tuple[str, float, int]]  # (encoding label, LongPPL, effective length), by encoding
    left_out: dict[str, str]  # encoding -> why it has no pair (no key token, no effective length, one run only)
    spearman: Optional[float]  # None: fewer than 3 pairs, or a constant side
    pearson: Optional[float]

    @property
    def n(self) -> int:
        return len(self.pairs)


def _pearson(x: list[float], y: list[float]) -> Optional[float]:
    """Pearson's r; None below 3 pairs (2 points always fall on a line) or where one side is constant."""
    if len(x) < 3 or len(set(x)) == 1 or len(set(y)) == 1:
        return None
    return statistics.correlation(x, y)


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given the mean of the ranks they span (Spearman's rho with ties)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _one_per_encoding(records: list, kind: str) -> dict[str, list]:
    """Records by encoding label (Setting.model); two runs of one encoding are refused by name."""
    by_label: dict[str, list] = defaultdict(list)
    runs: dict[str, set] = defaultdict(set)
    for r in records:
        by_label[r.setting.model].append(r)
        runs[r.setting.model].add(r.setting.run)
    for label, names in runs.items():
        if len(names) > 1:
            raise ValueError(f"study: {label} has {len(names)} {kind} runs ({', '.join(sorted(names))}): the "
                             f"correlation takes one per encoding")
    return by_label


def longppl_effective_correlation(longppl: list[LongPPLRecord], effective: list[EffectiveLengthRecord], length: int,
                                  scaling: str = "none", attention: str = "full") -> Correlation:
    """LongPPL at `length` of each encoding's text run against the effective length of its task run, under one
    (scaling, attention label): encodings matched by label (Setting.model), one text and one task run each.
    An encoding is left out, with the reason, where it has no LongPPL there (no key token, not measured) or no
    effective length (did not learn the task). An effective length at the longest length measured is a lower bound
    and enters as it is."""
    def selected(r) -> bool:
        return r.setting.scaling == scaling and r.setting.attention_label == attention

    at_length = [r for r in longppl if selected(r) and r.length == length]
    # The paper compares models on the key tokens of one fixed evaluator; a model that picks its own keys keeps only
    # tokens it already predicts (log-probability above beta), so its LongPPL is below e^-beta whatever it is.
    judges = sorted({(r.evaluator, r.short, r.alpha, r.beta) for r in at_length})
    if any(judge[0] == "itself" for judge in judges):
        raise ValueError("longppl_evaluator: the study's text runs picked their own key tokens; correlate LongPPL "
                         "measured with one longppl_evaluator shared by every run")
    if len(judges) > 1:
        raise ValueError(f"longppl_evaluator: the study's text runs were measured with different key-token settings "
                         f"(evaluator, short, alpha, beta) {judges}: measure them with one")
    texts = _one_per_encoding(at_length, "text")
    tasks = _one_per_encoding([r for r in effective if selected(r)], "task")
    pairs, left_out = [], {}
    for label in sorted(set(texts) | set(tasks)):
        values = [r.longppl for r in texts.get(label, []) if r.applicable and r.longppl is not None]
        known = [r.effective_length for r in tasks.get(label, []) if r.effective_length is not None]
        if label not in texts or label not in tasks:
            left_out[label] = f"no {'task' if label in texts else 'text'} run"
        elif not values:
            left_out[label] = texts[label][0].note or f"no LongPPL at {length}"
        elif not known:
            task = tasks[label][0]
            left_out[label] = "no effective length (the task was not learned)" if task.bar is None else \
                f"no effective length (the shortest length, {task.shortest_length}, already fails)"
        else:
            pairs.append((label, values[0], known[0]))
    x, y = [p[1] for p in pairs], [float(p[2]) for p in pairs]
    return Correlation(length, pairs, left_out, _pearson(_ranks(x), _ranks(y)), _pearson(x, y))


def correlation_table(correlations: list[Correlation]) -> str:
    """Markdown: one row per length, with n and both coefficients ('n/a' where undefined), then the pairs."""
    def coefficient(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    lines = ["| length | n | Spearman ρ | Pearson r | left out |", "|---|---|---|---|---|"]
    for c in correlations:
        left = "; ".join(f"{label}: {why}" for label, why in c.left_out.items()) or "–"
        lines.append(f"| {c.length} | {c.n} | {coefficient(c.spearman)} | {coefficient(c.pearson)} | {left} |")
    lines += ["", "| encoding | length | LongPPL | effective length |", "|---|---|---|---|"]
    lines += [f"| {label} | {c.length} | {value:.3g} | {effective} |" for c in correlations
              for label, value, effective in c.pairs]
    return "\n".join(lines) + "\n"


def longppl_correlation_report(text_folder: Path, task_folder: Path, lengths: Optional[list[int]] = None,
                               scaling: str = "none", attention: str = "full") -> str:
    """The correlation table from two evaluations' results.json: text runs with longppl=true, and the task runs
    of the same encodings; lengths None: every length LongPPL was measured at."""
    longppl = read_results(text_folder).of(LongPPLRecord)
    effective = read_results(task_folder).of(EffectiveLengthRecord)
    lengths = lengths or sorted({r.length for r in longppl})
    return correlation_table([longppl_effective_correlation(longppl, effective, n, scaling, attention)
                              for n in lengths])
