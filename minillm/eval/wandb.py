"""Evaluation records uploaded to W&B as tables and plots (offline without credentials)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from minillm.eval.grouping import accuracy_groups, series_label, table_groups, tail_groups
from minillm.eval.records import Results
from minillm.eval.report import flat_rows, position_rows


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
