"""Tables, plots and W&B upload for evaluation records; measures nothing itself."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

ROW_KEYS = ("model", "method", "attention")  # what one table row compares; seeds are averaged within it


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def flat_rows(records: list[dict]) -> list[dict]:
    """One row per (run, method, attention, length), without the nested per-position losses."""
    return [{k: v for k, v in r.items() if k != "by_position"} for r in records]


def position_rows(records: list[dict]) -> list[dict]:
    return [{**{k: r[k] for k in ("model", "run", "seed", "method", "attention", "length")}, **bucket}
            for r in records for bucket in r.get("by_position", [])]


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}" if values[0] < 1e4 else f"{values[0]:.2e}"
    return f"{mean(values):.3g} ± {stdev(values):.2g}"


def perplexity_table(records: list[dict]) -> str:
    """Markdown: perplexity per length (mean ± std over seeds), one row per model × method × attention."""
    lengths = sorted({r["length"] for r in records})
    cells: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    seeds: dict[tuple, set] = defaultdict(set)
    for r in records:
        key = tuple(r[k] for k in ROW_KEYS)
        cells[key][r["length"]].append(r["ppl"] if r.get("applicable", True) else None)
        seeds[key].add(r.get("seed"))
    header = ["model", "scaling", "attention", "seeds"] + [f"ppl @ {n}" for n in lengths]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(cells):
        lines.append("| " + " | ".join([*key, str(len(seeds[key]))] + [_fmt(cells[key][n]) for n in lengths]) + " |")
    return "\n".join(lines)


def passkey_table(rows: list[dict]) -> str:
    """Markdown: exact-match accuracy and mean key log-probability per model × method × length."""
    if not rows:
        return ""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["method"], r["length"])].append(r)
    lines = ["| model | scaling | length | trials | exact match | key log-prob (nats) |", "|---|---|---|---|---|---|"]
    for (model, method, length), group in sorted(groups.items()):
        trials = sum(g["trials"] for g in group)
        accuracy = sum(g["exact_match"] * g["trials"] for g in group) / trials
        logprob = sum(g["key_logprob"] * g["trials"] for g in group) / trials
        lines.append(f"| {model} | {method} | {length} | {trials} | {accuracy:.0%} | {logprob:.2f} |")
    return "\n".join(lines)


def theory_table(theory: list[dict]) -> str:
    if not theory:
        return ""
    lines = ["| model | rotary dim | θ | critical dim (Liu 2023) | T_extra | eval length | min base (Men 2024) | predicted |",
             "|---|---|---|---|---|---|---|---|"]
    for t in theory:
        lines.append(f"| {t['model']} | {t['rotary_dim']} | {t['theta']:g} | {t['critical_dim']} | "
                     f"{t['extrapolation_bound']:.0f} | {t['length']} | {t['min_base']:.3g} | "
                     f"{'ok' if t['theta'] >= t['min_base'] else 'base too small'} |")
    return "\n".join(lines)


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """ppl_vs_length.png and loss_vs_position.png (at the longest length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    series: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("applicable", True) and r["ppl"] is not None and math.isfinite(r["ppl"]):
            series[tuple(r[k] for k in ROW_KEYS)][r["length"]].append(r["ppl"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, by_length in sorted(series.items()):
        lengths = sorted(by_length)
        ax.plot(lengths, [mean(by_length[n]) for n in lengths], marker="o", label=" / ".join(k for k in key if k not in ("none", "full")) or key[0])
    trained = sorted({r["trained_length"] for r in records})
    for n in trained:
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="evaluation length (tokens)", ylabel="perplexity",
           title="Perplexity against length (dotted: training length)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "ppl_vs_length.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    longest = max(r["length"] for r in records)
    fig, ax = plt.subplots(figsize=(8, 5))
    curves: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["length"] == longest and r.get("applicable", True):
            for b in r["by_position"]:
                curves[tuple(r[k] for k in ROW_KEYS)][b["position_start"]].append(b["loss"])
    for key, by_start in sorted(curves.items()):
        starts = sorted(by_start)
        ax.plot(starts, [mean(by_start[s]) for s in starts], label=" / ".join(k for k in key if k not in ("none", "full")) or key[0])
    for n in trained:
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="position in window (bucket start)", ylabel="loss (nats)",
           title=f"Loss against position at length {longest} (dotted: training length)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / "loss_vs_position.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(records: list[dict], passkey: list[dict], theory: list[dict], out_dir: Path,
                 header: str = "") -> dict[str, Path]:
    """Every number as JSON and CSV, the tables as markdown, the plots as PNG; each file written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "positions_csv": out_dir / "loss_by_position.csv",
        "passkey_csv": out_dir / "passkey.csv",
        "markdown": out_dir / "report.md",
    }
    _atomic_write(files["json"], json.dumps({"perplexity": records, "passkey": passkey, "theory": theory},
                                            indent=1, default=str))
    _atomic_write(files["csv"], _csv(flat_rows(records)))
    _atomic_write(files["positions_csv"], _csv(position_rows(records)))
    _atomic_write(files["passkey_csv"], _csv(passkey))
    sections = [header, "## Perplexity against evaluation length\n", perplexity_table(records)]
    if passkey:
        sections += ["\n## Passkey retrieval\n", passkey_table(passkey)]
    if theory:
        sections += ["\n## RoPE theory beside the measurement\n", theory_table(theory)]
    sections += ["\n![perplexity against length](ppl_vs_length.png)\n",
                 "![loss against position](loss_vs_position.png)\n"]
    _atomic_write(files["markdown"], "\n".join(sections) + "\n")
    for path in plot(records, out_dir):
        files[path.stem] = path
    return files


def log_to_wandb(records: list[dict], passkey: list[dict], out_dir: Path, project: str,
                 group: Optional[str], mode: str) -> None:
    """One evaluation run in the training runs' group: tables of every number and the two line plots."""
    import wandb

    run = wandb.init(project=project, group=group, job_type="eval_extrapolate", dir=str(out_dir), mode=mode,
                     settings=wandb.Settings(init_timeout=60, silent=True))
    rows = flat_rows(records)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
    run.log({"extrapolation/perplexity": table,
             "extrapolation/ppl_vs_length": wandb.plot.line(table, "length", "ppl", title="Perplexity against length")})
    positions = position_rows(records)
    if positions:
        pcols = list(positions[0])
        run.log({"extrapolation/loss_by_position": wandb.Table(columns=pcols, data=[[r[c] for c in pcols] for r in positions])})
    if passkey:
        kcols = list(passkey[0])
        run.log({"extrapolation/passkey": wandb.Table(columns=kcols, data=[[r[c] for c in kcols] for r in passkey])})
    for image in ("ppl_vs_length", "loss_vs_position"):
        if (out_dir / f"{image}.png").is_file():
            run.log({f"extrapolation/{image}_png": wandb.Image(str(out_dir / f"{image}.png"))})
    run.finish()
