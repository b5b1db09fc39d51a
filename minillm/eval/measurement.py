"""The measurement contract: what the loop (minillm.eval.loop) hands a measurement for one setting, what it gives
back, and how the report shows it. Each measurement is one class under `@register_measurement("name")`; the loop,
results.json, the CSV files, the markdown report and W&B take every member of MEASUREMENTS from here, in the
registry's order (minillm/eval/__init__.py imports the modules that hold them, in the report's order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Optional

from minillm.eval.config import EvalConfig
from minillm.eval.records import SETTING_COLUMNS, Record, Results, Setting
from minillm.positions.methods import AttentionMethod
from minillm.positions.scaling import Scaling
from minillm.registry import Registry, require

if TYPE_CHECKING:
    from minillm.eval.sources import Subject
    from minillm.model.transformer import Transformer

MEASUREMENTS = Registry("measurements")  # name (results.json's key) -> Measurement class, in the report's order


def register_measurement(name: str):
    """Class decorator: file a Measurement under `name`, which names its records' kind too."""
    def add(cls: type["Measurement"]) -> type["Measurement"]:
        shared = sorted({f.name for f in dataclasses.fields(cls.record)} & set(SETTING_COLUMNS))
        require(not shared, "measurements", f"{name}: {cls.record.__name__} repeats the Setting's columns {shared} "
                                            f"(results.json and the CSV files are flat)")
        MEASUREMENTS.register(name)(cls)
        cls.record.kind = name
        return cls

    return add


@dataclass
class Plan:
    """The settings one model is read at, (scaling × attention × length), and why some cannot be measured."""

    lengths: list[int]  # every length of the plan (text: those its documents reach), ascending
    scalings: list[str]
    served: dict[str, AttentionMethod]  # the attention methods the model can serve, by name, in the config's order
    refused: dict[str, str]  # attention method -> why the model cannot serve it
    unreachable: dict[int, str] = field(default_factory=dict)  # length -> why (the task refuses it, the encoding stops)

    @property
    def reachable(self) -> list[int]:
        return [n for n in self.lengths if n not in self.unreachable]

    def note(self, attention: str, length: int) -> Optional[str]:
        """Why (attention, length) cannot be measured; None where it can."""
        return self.refused.get(attention) or self.unreachable.get(length)


@dataclass
class Reading:
    """One setting handed to a measurement: `model` read at `length` under `attention`, `scaling` and the setting's
    log-n; pass `read` to the measuring functions (perplexity_at_length, task_accuracy, ...)."""

    model: "Transformer"
    setting: Setting
    length: int
    attention: AttentionMethod
    scaling: Scaling

    @property
    def read(self) -> dict:
        return dict(attention=self.attention, scaling=self.scaling, logn=self.setting.logn)


@dataclass
class Table:
    """One CSV file (and W&B table) of records: the setting's columns, then the measurement's; a row per record (or
    several: loss by position)."""

    name: str  # W&B's table name; write_report's files key is name + "_csv"
    file: Optional[str]  # the CSV file's name; None: W&B only (the records are in results.json too)
    columns: tuple[str, ...]
    rows: list[tuple[Record, dict]]  # each row with the record it comes from (its series in W&B)
    plot: Optional[tuple[str, str, str, str]] = None  # W&B line plot: (key, x column, y column, title)


class Measurement:
    """One kind of measurement: its record type, which models it applies to, how it measures one setting (or derives
    its records from the others once a model is done), and its section, tables and figures in the report.

    The loop makes one instance per model (`__init__` prepares what every setting shares: tokens, prompts) and
    calls, for each (scaling, attention, length) of the plan, `measure` where the setting can be measured and
    `does_not_apply` where it cannot; settings whose rotary frequencies are equal are measured once (rotary_key)."""

    name: ClassVar[str]
    record: ClassVar[type[Record]]
    kinds: ClassVar[tuple[str, ...]] = ("text",)  # "text": a model read on documents; "task": scored on its task
    csv: ClassVar[Optional[str]] = None  # the records' CSV file (header only when none); None: results.json only

    def __init__(self, subject: "Subject", plan: Plan, config: EvalConfig):
        self.subject, self.plan, self.config = subject, plan, config

    @classmethod
    def applies(cls, subject: "Subject", config: EvalConfig) -> bool:
        """Whether this model gets this measurement (its kind; a config switch; a rotary encoding)."""
        return ("text" if subject.task is None else "task") in cls.kinds

    @classmethod
    def cells(cls, plan: Plan, trained_length: int, config: EvalConfig) -> int:
        """How many cells (table entries, each measured) this will measure for a model of `plan`, said before the
        evaluation starts: one per setting where it measures settings, none where it only derives records."""
        measures = cls.measure is not Measurement.measure
        return len(plan.scalings) * len(plan.served) * len(plan.reachable) if measures else 0

    def measure(self, reading: Reading) -> list[Record]:
        """The records of one setting that can be measured."""
        return []

    def does_not_apply(self, setting: Setting, length: int, note: str) -> list[Record]:
        """The records of a setting that cannot be measured, saying why (none: the setting is left out)."""
        return []

    def derive(self, results: Results) -> list[Record]:
        """Records computed once the plan is done, from this model's records (effective length) or from the model
        alone (RoPE theory)."""
        return []

    # ------------------------------------------------------------------------------------------
    # The report

    @classmethod
    def tables(cls, results: Results) -> list[Table]:
        """The CSV files and W&B tables of this measurement's records."""
        records = results.of(cls.record)
        return [Table(cls.name, cls.csv, cls.record.columns(), [(r, r.csv_row()) for r in records])]

    @classmethod
    def heading(cls, records: list[Record]) -> Optional[str]:
        """The title of the report's section on these records; None: no section."""
        return None

    @classmethod
    def table(cls, records: list[Record], results: Results) -> str:
        """The markdown table of the section (results: every record, for tables that join another kind)."""
        return ""

    @classmethod
    def section(cls, results: Results) -> Optional[str]:
        """The report's markdown section ('## heading\\n\\n' and the table) where there are records; None: none."""
        records = results.of(cls.record)
        title = cls.heading(records) if records else None
        return None if title is None else f"## {title}\n\n" + cls.table(records, results)

    @classmethod
    def figures(cls, results: Results, out_dir: Path) -> list[Path]:
        """The PNGs drawn into out_dir."""
        return []
