"""How records are grouped into table rows and plot series (each a Setting: `Setting.row`), in the registries'
order, and the markdown cells every table shares."""

from __future__ import annotations

import math
from collections import defaultdict
from statistics import mean, stdev
from typing import Callable, Optional

from minillm.eval.records import Record, Setting
from minillm.positions.methods import ATTENTION_METHODS
from minillm.positions.scaling import SCALINGS

SCALING_ORDER = tuple(SCALINGS)  # none first, then the registry's order
ATTENTION_ORDER = tuple(ATTENTION_METHODS)  # full first, then the registry's order


def rank(value, order: tuple) -> tuple:
    """Known names in their order, then any other name alphabetically."""
    return (order.index(value), "") if value in order else (len(order), str(value))


def row_order(row: Setting) -> tuple:
    """Tasks, then models by label and training length, then scalings and attention methods as registered."""
    return (row.task or "", row.model, row.trained_length or 0, rank(row.scaling, SCALING_ORDER),
            rank(row.attention_label, ATTENTION_ORDER), row.run)


def row_key(records: list[Record]) -> Callable[[Record], Setting]:
    """The table row of a record: its setting's row (Setting.row), so that runs differing only in seed share it and
    are averaged; with the run's name where two runs of one row have one seed (different models: another size,
    another corpus)."""
    runs_by_seed: dict[Setting, dict] = defaultdict(lambda: defaultdict(set))
    for r in records:
        runs_by_seed[r.setting.row()][r.setting.seed].add(r.setting.run)
    clash = {row for row, by_seed in runs_by_seed.items() if any(len(runs) > 1 for runs in by_seed.values())}
    return lambda r: r.setting.row(run=r.setting.row() in clash)


def table_groups(records: list[Record]) -> dict[Setting, list[Record]]:
    """The rows of a table by length (perplexity, tail loss, accuracy): row (see row_key) -> its records, in
    row_order."""
    key = row_key(records)
    groups: dict[Setting, list] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return {row: groups[row] for row in sorted(groups, key=row_order)}


def model_name(row: Setting) -> str:
    """The model's label; with the run's name where the row keeps it (two runs of one label are different models)."""
    return row.model if not row.run else f"{row.model} [{row.run}]"


def mean_cell(values: list[Optional[float]]) -> str:
    """'12', or the mean ± std of several seeds '12 ± 2.8'; n/a where none is finite."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}" if values[0] < 1e4 else f"{values[0]:.2e}"
    return f"{mean(values):.3g} ± {stdev(values):.2g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def length_table(records: list, value, column: str) -> str:
    """Markdown: one row per series (model, training length, scaling, attention), `value(record)` per length in
    columns named `column.format(length)`, the mean ± std over seeds (n/a where none is finite)."""
    lengths = sorted({r.length for r in records})
    header = ["model", "trained", "scaling", "attention", "seeds"] + [column.format(n) for n in lengths]
    rows = []
    for row, group in table_groups(records).items():
        by_length: dict[int, list] = defaultdict(list)
        for r in group:
            by_length[r.length].append(value(r))
        seeds = len({r.setting.seed for r in group})
        rows.append([model_name(row), str(row.trained_length), row.scaling, row.attention_label, str(seeds)] +
                    [mean_cell(by_length.get(n, [])) for n in lengths])
    return markdown_table(header, rows)
