"""Evaluation records uploaded to W&B as tables and plots (offline without credentials)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minillm.eval.grouping import row_key
from minillm.eval.measurement import MEASUREMENTS, Table
from minillm.eval.records import Results


def _table(rows: list[dict]):
    import wandb

    columns = list(dict.fromkeys(k for r in rows for k in r))
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows], allow_mixed_types=True)


def _series_rows(table: Table) -> list[dict]:
    """The table's rows, each led by its series: the label of its record's table row (Setting.label), and the
    length where the plot's x axis is not the length (loss against position at each length)."""
    key = row_key([record for record, _ in table.rows])
    by_length = table.plot is not None and table.plot[1] != "length"
    return [{"series": key(record).label() + (f" @ {record.length}" if by_length else ""), **row}
            for record, row in table.rows]


def log_to_wandb(results: Results, out_dir: Path, project: str, group: Optional[str], mode: str) -> Path:
    """One evaluation run in the training runs' group (job_type eval_extrapolate), files under out_dir/wandb:
    a table of every measurement's records (extrapolation/<table>), a line plot against length (or position) per
    table that declares one, one line per series, and the PNGs. Returns the run's local folder."""
    import wandb

    run = wandb.init(project=project, group=group, job_type="eval_extrapolate", dir=str(out_dir), mode=mode,
                     settings=wandb.Settings(init_timeout=60, silent=True))
    for measurement in MEASUREMENTS.values():
        for table in measurement.tables(results):
            if not table.rows:
                continue
            logged = _table(_series_rows(table))
            run.log({f"extrapolation/{table.name}": logged})
            if table.plot is not None:
                key, x, y, title = table.plot
                run.log({f"extrapolation/{key}": wandb.plot.line(logged, x, y, stroke="series", title=title)})
    for image in sorted(out_dir.glob("*.png")):  # the figures write_report drew
        run.log({f"extrapolation/{image.stem}_png": wandb.Image(str(image))})
    folder = Path(run.dir).parent  # out_dir/wandb/<offline-|>run-<time>-<id>
    run.finish()
    return folder
