"""Report files, tables and the W&B upload, from hand-made evaluation records."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import pytest

from minillm.eval.report import write_report
from minillm.eval.grouping import table_groups
from minillm.eval.longppl import LongPPLRecord
from minillm.eval.measurement import MEASUREMENTS
from minillm.eval.passkey import PasskeyRecord, passkey_table
from minillm.eval.perplexity import PerplexityRecord, PositionBucket, perplexity_table
from minillm.eval.records import SETTING_COLUMNS, Results, Setting, read_results
from minillm.eval.ruler import RulerEffectiveRecord, RulerRecord
from minillm.eval.tail import TailLossRecord
from minillm.eval.tasks import AccuracyRecord, accuracy_section, accuracy_table, effective_lengths
from minillm.eval.theory import TheoryRecord
from minillm.eval.wandb import log_to_wandb
from minillm.train.curve import training_curve, validation_curve
from minillm.data.answers import wilson_interval

PERPLEXITY_COLUMNS, PASSKEY_COLUMNS = PerplexityRecord.columns(), PasskeyRecord.columns()
TAIL_COLUMNS, ACCURACY_COLUMNS = TailLossRecord.columns(), AccuracyRecord.columns()

PNG = b"\x89PNG\r\n\x1a\n"


def setting(run: str, seed: int, *, model: str = "complex θ=10000", method: str = "none", attention: str = "full",
            logn: bool = False, trained: int = 32, task: str | None = None, factor: float | None = None) -> Setting:
    return Setting(model, run, seed, trained, model.split()[0], f"/runs/{run}/checkpoints/best.ckpt", task=task,
                   scaling=method, factor=factor, attention=attention, logn=logn)


def record(run: str, seed: int, length: int, ppl: float | None, *, model: str = "complex θ=10000",
           method: str = "none", attention: str = "full", logn: bool = False, trained: int = 32,
           applicable: bool = True) -> PerplexityRecord:
    """One record shaped as minillm.eval.loop.evaluate writes them."""
    if not applicable:
        return PerplexityRecord(setting(run, seed, model=model, method=method, attention=attention, logn=logn,
                                        trained=trained), length, None, None, applicable=False,
                                note=f"learned positions stop at {trained}")
    loss = math.log(ppl)
    return PerplexityRecord(setting(run, seed, model=model, method=method, attention=attention, logn=logn,
                                    trained=trained, factor=max(1.0, length / trained)),
                            length, loss, ppl, loss_beyond_train=loss + 0.1 if length > trained else None, tokens=512,
                            seconds=0.01, peak_memory_mb=300.0,
                            by_position=[PositionBucket(0, length // 2, loss - 0.1, 256),
                                         PositionBucket(length // 2, length, loss + 0.1, 256)])


@pytest.fixture
def records() -> list[PerplexityRecord]:
    rows = []
    for length in (32, 64):
        for seed, ppl in ((0, 10.0), (1, 14.0)):  # two seeds of one model: one row, mean ± std
            rows.append(record(f"complex_seed{seed}", seed, length, ppl * length / 32))
            rows.append(record(f"complex_seed{seed}", seed, length, ppl, method="yarn"))
        rows.append(record("learned", 0, length, 12.0 if length == 32 else None, model="learned",
                           applicable=length == 32))
    return rows


@pytest.fixture
def passkey() -> list[PasskeyRecord]:
    return [PasskeyRecord(setting("complex_seed0", 0), 64, depth, 10, accuracy, -3.5)
            for depth, accuracy in ((0.1, 0.2), (0.9, 0.6))]


@pytest.fixture
def theory() -> list[TheoryRecord]:
    return [TheoryRecord(setting(f"complex_seed{seed}", seed), length, 16, 10000.0, 4, 63.0, base, supported)
            for seed in (0, 1) for length, base, supported in ((32, 208.5, 32), (64, 2.77e4, 55))]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_write_report_writes_every_file_with_its_columns(records, passkey, theory, tmp_path):
    results = Results.of_records(records + passkey + theory)
    files = write_report(results, tmp_path / "out", header="# Length extrapolation\n")
    out = tmp_path / "out"
    assert {path.name for path in files.values()} == {"results.json", "results.csv", "loss_by_position.csv",
                                                      "passkey.csv", "tail_loss.csv", "accuracy.csv", "longppl.csv",
                                                      "ruler.csv",
                                                      "report.md",
                                                      "ppl_vs_length.png", "scaling_vs_length.png",
                                                      "loss_vs_position.png"}
    assert all(path.parent == out and path.is_file() for path in files.values())
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files

    data = json.loads((out / "results.json").read_text())
    first = data["perplexity"][0]  # a flat row: the setting's columns, then the measurement's
    assert list(first) == list(PERPLEXITY_COLUMNS[:-2]) + ["by_position", "applicable", "note"]
    assert {k: first[k] for k in SETTING_COLUMNS} == {
        "model": "complex θ=10000", "run": "complex_seed0", "seed": 0, "trained_length": 32, "variant": "complex",
        "checkpoint": "/runs/complex_seed0/checkpoints/best.ckpt", "task": None, "method": "none", "factor": 1.0,
        "attention": "full", "logn": False, "stride": None}
    assert (first["length"], first["ppl"], first["tokens"]) == (32, 10.0, 512)
    assert set(data) == {*MEASUREMENTS, "precision", "precision_reason"} >= \
        {"perplexity", "passkey", "theory", "tail", "accuracy", "effective_length", "longppl"}
    assert data["precision"] == results.precision
    assert data["perplexity"][0]["by_position"][0]["tokens"] == 256 and data["accuracy"] == []
    assert read_results(out) == results  # the same records back, each with its Setting

    columns, rows = read_csv(out / "results.csv")
    assert columns[:len(SETTING_COLUMNS)] == list(SETTING_COLUMNS)  # the setting, then the measurement
    assert {"model", "run", "seed", "trained_length", "method", "attention", "logn", "stride", "factor", "applicable",
            "length", "loss", "ppl", "loss_beyond_train", "tokens", "seconds", "peak_memory_mb", "note"} <= set(columns)
    assert "by_position" not in columns and len(rows) == len(records)
    learned_64 = next(r for r in rows if r["model"] == "learned" and r["length"] == "64")
    assert learned_64["applicable"] == "False" and learned_64["ppl"] == ""

    columns, rows = read_csv(out / "loss_by_position.csv")
    assert columns == list(SETTING_COLUMNS) + ["length", "position_start", "position_end", "loss", "tokens"]
    assert len(rows) == sum(len(r.by_position) for r in records)

    columns, rows = read_csv(out / "passkey.csv")
    assert columns == list(PASSKEY_COLUMNS) and len(rows) == 2
    assert read_csv(out / "accuracy.csv") == (list(ACCURACY_COLUMNS), [])  # no task-trained runs
    assert "Task accuracy" not in (out / "report.md").read_text()

    for image in ("ppl_vs_length.png", "scaling_vs_length.png", "loss_vs_position.png"):
        assert (out / image).read_bytes()[:8] == PNG
        assert f"]({image})" in (out / "report.md").read_text()


def tail(seed: int, length: int, loss: float, attention: str = "full", logn: bool = False) -> TailLossRecord:
    return TailLossRecord(setting(f"complex_seed{seed}", seed, attention=attention, logn=logn), length, 32, loss, 256)


def test_tail_loss_table_csv_and_figure(tmp_path):
    records = [tail(seed, length, loss + seed * 0.2, attention)
               for seed in (0, 1) for attention in ("full", "self_extend")
               for length, loss in ((32, 4.0), (64, 3.8), (128, 4.4 if attention == "full" else 3.7))]
    files = write_report(Results.of_records(records), tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "## Loss on the last 32 tokens against the context read (ReRoPE's protocol)" in lines
    assert "| model | trained | scaling | attention | seeds | context 32 | context 64 | context 128 |" in lines
    assert "| complex θ=10000 | 32 | none | full | 2 | 4.1 ± 0.14 | 3.9 ± 0.14 | 4.5 ± 0.14 |" in lines
    assert "| complex θ=10000 | 32 | none | self_extend | 2 | 4.1 ± 0.14 | 3.9 ± 0.14 | 3.8 ± 0.14 |" in lines
    columns, rows = read_csv(tmp_path / "tail_loss.csv")
    assert columns == list(TAIL_COLUMNS) and len(rows) == 12
    assert files["tail_loss"].read_bytes()[:8] == PNG and "](tail_loss.png)" in (tmp_path / "report.md").read_text()


def test_scaling_figure_only_when_scalings_were_evaluated(records, tmp_path):
    plain = [r for r in records if r.setting.scaling == "none"]
    files = write_report(Results.of_records(plain), tmp_path)
    assert "scaling_vs_length" not in files and not (tmp_path / "scaling_vs_length.png").exists()
    assert "scaling_vs_length" not in (tmp_path / "report.md").read_text()


def test_markdown_averages_seeds_and_marks_what_does_not_apply(records, passkey, theory, tmp_path):
    write_report(Results.of_records(records + passkey + theory), tmp_path)
    text = (tmp_path / "report.md").read_text()
    lines = text.splitlines()
    assert "| model | trained | scaling | attention | seeds | ppl @ 32 | ppl @ 64 |" in lines
    # Seeds 0 and 1 of one model: ppl 10 and 14 at 32 tokens -> 12 ± 2.8; 20 and 28 at 64 -> 24 ± 5.7.
    assert "| complex θ=10000 | 32 | none | full | 2 | 12 ± 2.8 | 24 ± 5.7 |" in lines
    assert "| complex θ=10000 | 32 | yarn | full | 2 | 12 ± 2.8 | 12 ± 2.8 |" in lines
    assert "| learned | 32 | none | full | 1 | 12 | n/a |" in lines
    # Passkey: accuracy per depth and overall; theory: one row per model and length, whatever the seeds.
    assert "| complex θ=10000 | none | full | 64 | 20 | 20% | 60% | 40% | -3.50 |" in lines
    theory_lines = [line for line in lines if line.startswith("| complex θ=10000 | 16 |")]
    assert len(theory_lines) == 2
    assert theory_lines[0].endswith("| 32 | ok |") and theory_lines[1].endswith("| 55 | base too small |")


def test_runs_sharing_a_label_and_a_seed_are_not_averaged():
    """Two different models that print the same label (another size, another corpus) keep a row each."""
    records = [record("small", 0, 32, 10.0), record("large", 0, 32, 20.0)]
    groups = table_groups(records)
    assert [row.run for row in groups] == ["large", "small"]
    table = perplexity_table(records)
    assert "| complex θ=10000 [small] | 32 | none | full | 1 | 10 |" in table
    assert "| complex θ=10000 [large] | 32 | none | full | 1 | 20 |" in table


def test_empty_passkey_gives_a_header_only_csv_and_no_section(records, tmp_path):
    write_report(Results.of_records(records), tmp_path)
    assert (tmp_path / "passkey.csv").read_text().strip() == ",".join(PASSKEY_COLUMNS)
    text = (tmp_path / "report.md").read_text()
    assert "Passkey" not in text and "RoPE theory" not in text


def test_plots_survive_records_with_nothing_to_draw(tmp_path):
    """Only not-applicable rows (a learned model evaluated past its table): files still written."""
    records = [record("learned", 0, 64, None, model="learned", applicable=False)]
    files = write_report(Results.of_records(records), tmp_path)
    assert files["ppl_vs_length"].read_bytes()[:8] == PNG
    assert "| learned | 32 | none | full | 1 | n/a |" in (tmp_path / "report.md").read_text()


def test_log_to_wandb_offline_writes_a_local_run(records, passkey, theory, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    results = Results.of_records(records + passkey + theory)
    write_report(results, tmp_path)
    folder = log_to_wandb(results, tmp_path, project="minillm-test", group="sweep", mode="offline")
    assert folder.parent == tmp_path / "wandb" and folder.name.startswith("offline-run-")
    assert list(folder.glob("run-*.wandb"))


def test_training_curve_from_a_metrics_csv(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,train/tokens,val/loss\n"
                       "0,9,6.0,4096.0,\n0,19,5.0,8192.0,\n0,19,,,4.5\n0,39,,,4.0\n")
    # 409.6 tokens per step, read off the training row: validations after steps 20 and 40.
    assert validation_curve(metrics) == [(8192.0, 4.5), (16384.0, 4.0)]
    out = training_curve(metrics, tmp_path / "curve.png", unigram_entropy=5.5)
    assert out.read_bytes()[:8] == PNG
    metrics.write_text("epoch,step,train/loss,train/tokens,val/loss\n0,9,6.0,4096.0,\n")
    with pytest.raises(ValueError, match="no rows with both val/loss and train/tokens"):
        training_curve(metrics, tmp_path / "none.png")


def test_tables_order_lengths_by_value_and_scalings_as_registered():
    records = [record("run", 0, 32, 10.0, method=method) for method in ("yarn", "linear", "none")]
    rows = [line.split(" | ")[2] for line in perplexity_table(records).splitlines()[2:]]
    assert rows == ["none", "linear", "yarn"]
    passkey = [PasskeyRecord(Setting("m", "r", scaling=method, attention=attention), length, 0.5, 1, 0.0, -1.0)
               for method in ("yarn", "none") for attention in ("sinks", "full") for length in (1024, 64)]
    cells = [line.split(" | ")[1:4] for line in passkey_table(passkey).splitlines()[2:]]
    assert cells == [[m, a, n] for m in ("none", "yarn") for a in ("full", "sinks") for n in ("64", "1024")]


# ----------------------------------------------------------------------------------------------
# Task accuracy


def accuracy(run: str, seed: int, length: int, right: int | None, *, model: str = "complex θ=10000",
             task: str = "mqar", method: str = "none", trained: int = 64, answers: int = 40) -> AccuracyRecord:
    """One record shaped as minillm.eval.loop.measure writes them for a task-trained run; right=None: the task refuses it."""
    of = setting(run, seed, model=model, method=method, trained=trained, task=task)
    if right is None:
        return AccuracyRecord(of, length, applicable=False, note="data.tasks.mqar.num_keys: too many pairs")
    low, high = wilson_interval(right, answers)
    return AccuracyRecord(dataclasses.replace(of, factor=max(1.0, length / trained)), length, examples=10,
                          answers=answers, tokens=answers, exact_match=right / answers, exact_match_low=low,
                          exact_match_high=high, token_accuracy=right / answers, token_accuracy_low=low,
                          token_accuracy_high=high, answer_loss=1.0 - right / answers, seconds=0.01)


@pytest.fixture
def task_records() -> list[AccuracyRecord]:
    right = {0: {64: 40, 128: 38, 256: 20, 512: None}, 1: {64: 36, 128: 34, 256: 33, 512: None}}
    rows = [accuracy(f"mqar_seed{seed}", seed, n, r) for seed, by_length in right.items() for n, r in by_length.items()]
    rows += [accuracy("alibi", 0, n, r, model="alibi") for n, r in ((64, 20), (128, 20), (256, 19), (512, 18))]
    rows += [accuracy("flip", 0, n, r, task="flipflop") for n, r in ((64, 0), (128, 0))]  # nothing right at 1x
    return rows


def test_accuracy_table_csv_json_and_figure(task_records, tmp_path):
    effective = effective_lengths(task_records, 0.9)
    results = Results.of_records(task_records + effective)
    files = write_report(results, tmp_path, header="# Length extrapolation\n")
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "## Task accuracy against evaluation length" in lines
    assert "| model | trained | task | scaling | attention | seeds | EM @ 64 | EM @ 128 | EM @ 256 | EM @ 512 | " \
           "effective length |" in lines
    # seed 0: 100%, 95%, 50%; seed 1: 90%, 85%, 82.5% -> means 95%, 90%, 66%; effective 128 and 256 (of 0.9 × 1x)
    assert "| complex θ=10000 | 64 | mqar | none | full | 2 | 95% (90%–100%) | 90% (85%–95%) | " \
           "66% (50%–82%) | n/a | 128–≥256 |" in lines
    # one seed: its Wilson interval; it held its 1x score to the longest length measured; the effective length's
    # interval: every lower bound (35%, 35%, 33%, 31%) is under the bar 45%, every upper bound above it
    assert "| alibi | 64 | mqar | none | full | 1 | 50% [35%–65%] | 50% [35%–65%] | 48% [33%–63%] | " \
           "45% [31%–60%] | ≥512 [<64–≥512] |" in lines
    assert "| complex θ=10000 | 64 | flipflop | none | full | 1 | 0% [0%–9%] | 0% [0%–9%] | n/a | n/a | " \
           "n/a |" in lines  # nothing right at the training length: no effective length
    assert any("at least 90% of the exact match at the training length" in line for line in lines)
    assert not any("Perplexity" in line for line in lines)  # task-trained runs only: no empty perplexity section

    columns, rows = read_csv(tmp_path / "accuracy.csv")
    assert columns == list(ACCURACY_COLUMNS) and len(rows) == len(task_records)
    refused = next(r for r in rows if r["run"] == "mqar_seed0" and r["length"] == "512")
    assert refused["applicable"] == "False" and refused["exact_match"] == "" and "num_keys" in refused["note"]
    assert float(next(r for r in rows if r["run"] == "alibi" and r["length"] == "512")["exact_match"]) == 18 / 40
    assert read_csv(tmp_path / "results.csv") == (list(PERPLEXITY_COLUMNS), [])  # header only

    data = json.loads(files["json"].read_text())
    assert data["accuracy"] == [{**r.setting.to_row(), **r.values()} for r in task_records]
    assert {(e["run"], e["task"], e["effective_length"]) for e in data["effective_length"]} == \
        {("mqar_seed0", "mqar", 128), ("mqar_seed1", "mqar", 256), ("alibi", "mqar", 512), ("flip", "flipflop", None)}
    assert read_results(tmp_path) == results

    assert {"accuracy_vs_length", "accuracy_csv"} <= set(files)
    assert not {"ppl_vs_length", "loss_vs_position", "scaling_vs_length"} & set(files)
    assert files["accuracy_vs_length"].read_bytes()[:8] == PNG
    assert "](accuracy_vs_length.png)" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "ppl_vs_length.png").exists()


def test_tasks_with_several_tokens_per_answer_get_a_token_accuracy_table(task_records):
    # A copy run: 2 answers of 32 tokens, 0 right whole, 48 of 64 tokens right at 1x; 16 of 64 at 2x.
    copy = [dataclasses.replace(accuracy("copy", 0, n, 0, task="copy", answers=2), tokens=64, token_accuracy=t / 64,
                                token_accuracy_low=wilson_interval(t, 64)[0], token_accuracy_high=wilson_interval(t, 64)[1])
            for n, t in ((64, 48), (128, 16))]
    section = accuracy_section(task_records + copy, effective_lengths(task_records + copy, 0.9))
    assert "Accuracy per answer token, for the tasks whose answers have several (copy)" in section
    lines = section.splitlines()
    assert "| model | trained | task | scaling | attention | seeds | token acc. @ 64 | token acc. @ 128 |" in lines
    assert "| complex θ=10000 | 64 | copy | none | full | 1 | 75% [63%–84%] | 25% [16%–37%] |" in lines
    assert sum(line.startswith("| model |") for line in lines) == 2  # mqar's one-token answers: no second table
    assert "Accuracy per answer token" not in accuracy_section(task_records, [])


def test_accuracy_rows_order_tasks_then_models_and_keep_clashing_runs_apart(task_records):
    """Two runs of one label, task and seed are different models: a row each, named by run."""
    records = task_records + [accuracy("other", 0, 64, 10)]
    rows = [line.split(" | ")[:3] for line in accuracy_table(records).splitlines()[2:]]
    assert rows == [["| complex θ=10000", "64", "flipflop"], ["| alibi", "64", "mqar"],
                    ["| complex θ=10000 [mqar_seed0]", "64", "mqar"],
                    ["| complex θ=10000 [mqar_seed1]", "64", "mqar"],
                    ["| complex θ=10000 [other]", "64", "mqar"]]
    assert accuracy_table([]) == ""


def test_a_report_with_text_and_task_runs_has_both_sections(records, task_records, tmp_path):
    files = write_report(Results.of_records(records + task_records), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.index("## Perplexity against evaluation length") < text.index("## Task accuracy against")
    assert "| complex θ=10000 | 32 | none | full | 2 | 12 ± 2.8 | 24 ± 5.7 |" in text.splitlines()
    assert {"ppl_vs_length", "accuracy_vs_length"} <= set(files)
    # no effective-length records given: the column says so rather than guessing
    assert "| alibi | 64 | mqar | none | full | 1 | 50% [35%–65%] | 50% [35%–65%] | 48% [33%–63%] | " \
           "45% [31%–60%] | n/a |" in text.splitlines()


def test_log_to_wandb_offline_with_task_accuracy_only(task_records, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    results = Results.of_records(task_records + effective_lengths(task_records, 0.9))
    write_report(results, tmp_path)
    folder = log_to_wandb(results, tmp_path, project="minillm-test", group=None, mode="offline")
    assert folder.parent == tmp_path / "wandb" and list(folder.glob("run-*.wandb"))


# ----------------------------------------------------------------------------------------------
# Settings and results.json


def test_logn_is_a_setting_field_and_its_label_is_computed_from_it(tmp_path):
    """log-n is Setting.logn; the tables show it as 'full+logn', and a results.json written before Setting existed
    (attention 'full+logn', no logn column) reads back as logn=True."""
    scaled = setting("r", 0, attention="sliding", logn=True)
    assert (scaled.attention, scaled.logn, scaled.attention_label) == ("sliding", True, "sliding+logn")
    assert setting("r", 0).attention_label == "full"
    records = [record("r", 0, 32, 10.0, logn=True), tail(0, 32, 4.0, "self_extend", logn=True)]
    write_report(Results.of_records(records), tmp_path)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert "| complex θ=10000 | 32 | none | full+logn | 1 | 10 |" in lines
    assert "| complex θ=10000 | 32 | none | self_extend+logn | 1 | 4 |" in lines
    _, rows = read_csv(tmp_path / "results.csv")
    assert (rows[0]["attention"], rows[0]["logn"]) == ("full", "True")  # the data: the method and the switch apart

    old = {"model": "m", "run": "r", "seed": 1, "method": "yarn", "attention": "full+logn", "length": 64}
    assert Setting.from_row(old) == Setting("m", "r", 1, scaling="yarn", attention="full", logn=True)
    assert Setting.from_row({**old, "attention": "full"}).logn is False


def test_results_json_round_trip_of_every_measurement(records, passkey, theory, task_records, tmp_path):
    """write_report then read_results gives back equal Results: every record type with its Setting, nested
    positions, None and infinite values, the precision."""
    infinite = dataclasses.replace(records[0], ppl=math.inf, loss=800.0)
    measured = records + [infinite] + passkey + theory + [tail(0, 32, 4.0, logn=True)] + task_records + \
        effective_lengths(task_records, 0.9, min_reference=0.5) + \
        [LongPPLRecord(setting("r", 0), 64, 3, 100, 0.03, 20.0, 10.0, 32, 2.0, -2.0),
         LongPPLRecord(setting("r", 0), 32, 0, 100, 0.0, None, 9.0, 32, 2.0, -2.0, note="no key token")] + \
        [RulerRecord(setting("r", 0), "vt", 64, 2, 0.5, 0.09, 0.91, 60.0, 5.0, predictions=["a", "b"],
                     sample_scores=[1.0, 0.0]),
         RulerRecord(setting("r", 0), "vt", 32, applicable=False, note="does not fit"),
         RulerEffectiveRecord(setting("r", 0), None, None, 64, 0.45, 0.9, None, 0.5, 64, 64, 2)]
    results = Results.of_records(measured, precision="bfloat16", precision_reason="asked for")
    assert {type(r).kind for r in results.all()} == set(MEASUREMENTS)  # every measurement in it
    write_report(results, tmp_path)
    back = read_results(tmp_path)
    assert back == results
    assert back.of(PerplexityRecord)[0].by_position == records[0].by_position
    assert back.of(PerplexityRecord)[len(records)].ppl == math.inf
    assert all(isinstance(r.setting, Setting) for r in back.all())
