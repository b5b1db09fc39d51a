"""How records are grouped into table rows and plot series, in the registries' order."""

from __future__ import annotations

from collections import defaultdict

from minillm.eval.records import AccuracyRecord, EffectiveLengthRecord, PerplexityRecord, TailLossRecord
from minillm.positions.methods import ATTENTION_METHODS
from minillm.positions.scaling import SCALINGS

SCALING_ORDER = tuple(SCALINGS)  # none first, then the registry's order
ATTENTION_ORDER = tuple(ATTENTION_METHODS)  # full first, then the registry's order


def rank(value, order: tuple) -> tuple:
    """Known names in their order, then any other name alphabetically."""
    return (order.index(value), "") if value in order else (len(order), str(value))


def _row_order(key: tuple) -> tuple:
    model, trained, method, attention, run = key
    return str(model), trained or 0, rank(method, SCALING_ORDER), rank(attention, ATTENTION_ORDER), str(run)


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


def tail_groups(tail: list[TailLossRecord]) -> dict[tuple, list[TailLossRecord]]:
    """(model, trained length, scaling, attention) -> records of every seed, in the perplexity table's order."""
    groups: dict[tuple, list[TailLossRecord]] = defaultdict(list)
    for r in tail:
        groups[(r.model, r.trained_length, r.method, r.attention)].append(r)
    return dict(sorted(groups.items(), key=lambda item: _row_order(item[0] + (None,))))


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
