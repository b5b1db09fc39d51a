"""An evaluation's files: results.json, every measurement's CSV files, the markdown report and its figures, each
from the measurements' own tables (minillm.eval.measurement); measures nothing itself."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from minillm.eval.measurement import MEASUREMENTS
from minillm.eval.records import Results
from minillm.files import write_atomic


def csv_text(rows: list[dict], columns: tuple[str, ...] = ()) -> str:
    """CSV of `rows` (columns: `columns`, then any other key of the rows in order of appearance); just the header
    when there are no rows."""
    columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    if not columns:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def markdown(results: Results, header: str = "", figures: list[Path] = ()) -> str:
    """The report: `header`, each measurement's section in the registry's order, then the figures."""
    sections = [section for measurement in MEASUREMENTS.values()
                if (section := measurement.section(results)) is not None]
    parts = [header] + [("\n" if i else "") + section for i, section in enumerate(sections)]
    parts += [f"\n![{path.stem.replace('_', ' ')}]({path.name})\n" for path in figures]
    return "\n".join(parts) + "\n"


def write_report(results: Results, out_dir: Path, header: str = "") -> dict[str, Path]:
    """Every number as JSON and CSV, the tables as markdown, the plots as PNG; each file written atomically.

    results.json (Results.to_json: each record's setting columns, then its values; read back by read_results);
    one CSV per measurement table with a file (results.csv and loss_by_position.csv: perplexity; accuracy.csv;
    tail_loss.csv; passkey.csv), flat: the setting's columns, then the measurement's; each written, header only
    when it has no rows; report.md; the measurements' PNGs. Returns the files by key: "json", "markdown",
    <table>_csv, and each figure by its stem.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "results.json"}
    write_atomic(files["json"], results.to_json())
    for measurement in MEASUREMENTS.values():
        for table in measurement.tables(results):
            if table.file is not None:
                files[f"{table.name}_csv"] = out_dir / table.file
                write_atomic(files[f"{table.name}_csv"], csv_text([row for _, row in table.rows], table.columns))
    figures = [path for measurement in MEASUREMENTS.values() for path in measurement.figures(results, out_dir)]
    files["markdown"] = out_dir / "report.md"
    write_atomic(files["markdown"], markdown(results, header, figures))
    files.update({path.stem: path for path in figures})
    return files
