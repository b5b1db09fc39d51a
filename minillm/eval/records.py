"""What was measured (`Setting`), the record every measurement writes (`Record`, one per setting and length), and
`Results`, which holds them and reads and writes results.json. The record types live beside their measurements
(minillm.eval.measurement.MEASUREMENTS)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Optional, TypeVar

# ----------------------------------------------------------------------------------------------
# The setting


@dataclass(frozen=True)
class Setting:
    """Which model was read, and how: everything a record shares with the records of its series but its length.
    Hashable, so that table rows and plot series are Settings (or projections of one, see `row`).

    Columns of the CSV files and results.json: these fields in this order, the scaling written as `method`."""

    model: str = ""  # the model's label (model.cfg.label, or an imported model's name)
    run: str = ""  # the run folder's (or imported model's) name
    seed: int = 0
    trained_length: int = 0
    variant: str = ""  # the position encoding
    checkpoint: str = ""
    task: Optional[str] = None  # the synthetic task a run was trained on and is scored on; None: text
    scaling: str = "none"  # the frequency scaling at evaluation (minillm.positions.scaling.SCALINGS)
    factor: Optional[float] = None  # its factor at this length; None where the setting was not measured
    attention: str = "full"  # the attention method at evaluation (minillm.positions.methods.ATTENTION_METHODS)
    logn: bool = False  # queries scaled by max(1, log_L(i + 1)) (Qwen's log-n)
    stride: Optional[int] = None  # the perplexity windows' stride (text); None: non-overlapping windows

    @property
    def attention_label(self) -> str:
        """The attention column of the tables: 'full', or 'full+logn' where queries were scaled by log-n."""
        return self.attention + ("+logn" if self.logn else "")

    @property
    def series(self) -> "Setting":
        """This setting at every length: the factor (a function of the length) left out."""
        return dataclasses.replace(self, factor=None)

    def row(self, run: bool = False) -> "Setting":
        """The table row of this setting: model, training length, task, scaling and attention; the run's name too
        where run is True (two runs of one label and one seed are different models), else runs (seeds) share it."""
        return Setting(model=self.model, run=self.run if run else "", trained_length=self.trained_length,
                       task=self.task, scaling=self.scaling, attention=self.attention, logn=self.logn)

    def label(self) -> str:
        """'mqar / complex θ=10000 [run] / yarn / sliding': the task, the model, then what differs from plain
        evaluation (plot legends, W&B series)."""
        parts = [self.task] if self.task else []
        parts += [self.model if not self.run else f"{self.model} [{self.run}]"]
        parts += [self.scaling] if self.scaling != "none" else []
        parts += [self.attention_label] if self.attention_label != "full" else []
        return " / ".join(parts)

    def to_row(self) -> dict:
        """The setting's columns (the scaling named `method`)."""
        row = dataclasses.asdict(self)
        return {COLUMN.get(name, name): value for name, value in row.items()}

    @classmethod
    def from_row(cls, row: dict) -> "Setting":
        """The setting of a results.json row; rows written before Setting existed (attention 'full+logn', no
        variant or checkpoint for some records) read as they were meant."""
        values = {name: row[COLUMN.get(name, name)] for name in SETTING_FIELDS if COLUMN.get(name, name) in row}
        attention = values.get("attention", "full")
        if "logn" not in row and attention.endswith("+logn"):
            values.update(attention=attention.removesuffix("+logn"), logn=True)
        return cls(**values)


SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(Setting))
COLUMN = {"scaling": "method"}  # a field -> its column, where they differ
SETTING_COLUMNS = tuple(COLUMN.get(name, name) for name in SETTING_FIELDS)


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One measurement of one setting: its Setting, then what was measured. Each record type belongs to one
    measurement (minillm.eval.measurement), whose registered name is its `kind` and results.json's key."""

    setting: Setting
    kind: ClassVar[str] = ""  # set by register_measurement
    nested: ClassVar[tuple[str, ...]] = ()  # fields holding lists: in results.json, not in the CSV row

    def values(self) -> dict:
        """The measured fields (everything but the setting), nested lists (loss by position) included."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "setting"}

    def to_row(self) -> dict:
        """results.json's row: the setting's columns, then the measured fields."""
        return {**self.setting.to_row(), **self.values()}

    def csv_row(self) -> dict:
        """The CSV row: results.json's, without nested lists."""
        return {k: v for k, v in self.to_row().items() if k not in self.nested}

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        """A record from its results.json row; columns the record does not have (a newer writer's) are left out."""
        names = {f.name for f in dataclasses.fields(cls)} - {"setting"}
        return cls(Setting.from_row(row), **{k: v for k, v in row.items() if k in names and k not in SETTING_COLUMNS})

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The CSV columns: the setting's, then the measured fields but nested lists."""
        return SETTING_COLUMNS + tuple(f.name for f in dataclasses.fields(cls) if f.name not in {"setting", *cls.nested})


def _plain(value):
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return value


R = TypeVar("R", bound=Record)


@dataclass
class Results:
    """Everything one evaluation measured: the records of each measurement (by its name, in measuring order)."""

    records: dict[str, list[Record]] = field(default_factory=dict)
    precision: Optional[str] = None  # the dtype the models computed in ("float32", "bfloat16"), and why
    precision_reason: Optional[str] = None

    @classmethod
    def of_records(cls, records: Iterable[Record], precision: Optional[str] = None,
                   precision_reason: Optional[str] = None) -> "Results":
        results = cls(precision=precision, precision_reason=precision_reason)
        results.add(records)
        return results

    def add(self, records: Iterable[Record]) -> None:
        for r in records:
            self.records.setdefault(r.kind, []).append(r)

    def extend(self, other: "Results") -> None:
        for group in other.records.values():
            self.add(group)

    def of(self, record_type: type[R]) -> list[R]:
        """The records of one type, in the order measured."""
        return self.records.get(record_type.kind, [])

    def all(self) -> list[Record]:
        return [r for group in self.records.values() for r in group]

    def to_json(self) -> str:
        """{<measurement name>: [rows], ... (every registered measurement, in the registry's order),
        "precision": ..., "precision_reason": ...}; each row the record's Setting columns, then its values."""
        from minillm.eval.measurement import MEASUREMENTS

        data = {name: [r.to_row() for r in self.records.get(name, [])] for name in MEASUREMENTS}
        data.update(precision=self.precision, precision_reason=self.precision_reason)
        return json.dumps(data, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> "Results":
        """The Results that to_json wrote (or an older writer: see Setting.from_row)."""
        from minillm.eval.measurement import MEASUREMENTS

        data = json.loads(text)
        records = [measurement.record.from_row(row) for name, measurement in MEASUREMENTS.items()
                   for row in data.get(name, [])]
        return cls.of_records(records, data.get("precision"), data.get("precision_reason"))


def read_results(folder: Path) -> Results:
    """The records of an evaluation's results.json (minillm.eval.report.write_report) in `folder`."""
    return Results.from_json((Path(folder) / "results.json").read_text())
