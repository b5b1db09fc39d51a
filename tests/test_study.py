"""minillm.study: the context-extension report joins evaluation rows with the runs that produced them."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import yaml

from minillm.eval.passkey import PasskeyRecord
from minillm.eval.perplexity import PerplexityRecord, PositionBucket
from minillm.eval.records import Results, Setting, read_results
from minillm.eval.report import write_report
from minillm.eval.study import context_extension_report, read_run

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, name: str, scaling: str, init_from, seed: int, sampler: str = "contiguous",
             length: int = 256) -> Path:
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True)
    config = {"model": {"context_length": length}, "rope_scaling": {"type": scaling}, "positions": {"sampler": sampler},
              "init_from": init_from, "seed": seed}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "summary.json").write_text(json.dumps({"steps": 50, "tokens": 204800, "wall_seconds": 40.0 + seed}))
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["step", "train/loss", "val/loss"])
        writer.writeheader()
        writer.writerows([{"step": 9, "train/loss": 4.0 + seed, "val/loss": ""}, {"step": 19, "train/loss": "",
                                                                                  "val/loss": 3.9}])
    return folder


def write_results(folder: Path, rows: list[dict], passkey: list[PasskeyRecord] = ()) -> None:
    """results.json as an evaluation writes it: a perplexity record per row, and one that does not apply."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [PerplexityRecord(Setting(run=row["run"], seed=row["seed"], checkpoint=row["checkpoint"],
                                        scaling=row["method"]), row["length"], 1.0, row["ppl"]) for row in rows]
    records.append(dataclasses.replace(records[0], length=4096, loss=None, ppl=None, applicable=False, note="n/a"))
    (folder / "results.json").write_text(Results.of_records(records + list(passkey)).to_json())


def test_report_groups_runs_by_method_with_mean_and_spread(tmp_path):
    yarn = [make_run(tmp_path / "scaled", f"{s}_yarn", "yarn", "src", s) for s in (0, 1)]
    pose = make_run(tmp_path / "pose", "0_pose", "yarn", "src", 0, sampler="pose", length=64)
    scratch = make_run(tmp_path / "scratch", "0_scratch", "none", None, 0)
    finetuned = [{"length": 256, "ppl": ppl, "run": run.name, "seed": 0, "checkpoint": str(run / "checkpoints/best.ckpt"),
                  "method": "none"} for run, ppl in ((yarn[0], 10.0), (yarn[1], 12.0), (pose, 20.0), (scratch, 9.0))]
    inference = [{"length": 256, "ppl": ppl, "run": "src", "seed": s, "checkpoint": "sweep/src/checkpoints/best.ckpt",
                  "method": "yarn"} for s, ppl in ((0, 30.0), (1, 34.0))]
    write_results(tmp_path / "eval_finetuned", finetuned)
    write_results(tmp_path / "eval_inference", inference)

    report = context_extension_report(tmp_path)
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in report.splitlines()}
    assert "11.0 ± 1.4" in rows["YaRN", "fine-tuned"]  # mean of 10 and 12, sample standard deviation √2
    assert "32.0 ± 2.8" in rows["YaRN", "inference only"]
    assert "| 20.0 |" in rows["YaRN + PoSE", "fine-tuned"] and "| 9.0 |" in rows["scratch", "from scratch"]
    assert "| YaRN | 256 | 50 | 204,800 | 40 | 2 |" in report  # wall time: the mean of 40 and 41, rounded
    assert report.index("| scratch |") < report.index("| YaRN |") < report.index("| YaRN + PoSE |")


def test_read_run_names_the_method_and_reads_the_loss_curve(tmp_path):
    run = read_run(make_run(tmp_path, "r", "linear", "src", 1))
    assert (run.method, run.context_length, run.curve) == ("PI (linear)", 256, [(9, 5.0)])
    assert read_run(make_run(tmp_path, "d", "none", "src", 0)).method == "direct"


def test_script_writes_the_report_and_plots(tmp_path):
    run = make_run(tmp_path / "scaled", "0_linear", "linear", "src", 0)
    rows = [{"length": n, "ppl": 10.0 + n / 64, "run": run.name, "seed": 0, "checkpoint": str(run / "checkpoints/x.ckpt"),
             "method": "none"} for n in (64, 128)]
    write_results(tmp_path / "eval_finetuned", rows)
    write_results(tmp_path / "eval_inference", [{**r, "method": "linear"} for r in rows])
    # LongRoPE at inference, one evaluation per source (each with its own factors): joined to the inference rows
    for seed, ppl in ((0, 30.0), (1, 34.0)):
        write_results(tmp_path / "eval_inference_longrope" / f"seed-{seed}",
                      [{**rows[0], "method": "longrope", "run": f"src{seed}", "seed": seed, "ppl": ppl}])
    (tmp_path / "eval_finetuned" / "loss_vs_position.png").write_bytes(b"png")
    result = subprocess.run([sys.executable, "scripts/context_extension_report.py", str(tmp_path), str(tmp_path / "doc")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "doc" / "results.md").read_text() in result.stdout
    assert "| LongRoPE | inference only | 32.0 ± 2.8 | – |" in result.stdout  # both sources' rows, at 64 only
    assert "| PI (linear) | inference only | 11.0 | 12.0 |" in result.stdout  # eval_inference's rows are kept
    assert (tmp_path / "doc" / "loss_vs_position_finetuned.png").read_bytes() == b"png"
    assert not (tmp_path / "doc" / "loss_vs_position_inference.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc", "eval_finetuned", "eval_inference",
                                                           "eval_inference_longrope", "scaled"]  # nothing written
    missing = subprocess.run([sys.executable, "scripts/context_extension_report.py", str(tmp_path / "scaled"),
                              str(tmp_path / "doc")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
    assert "eval_inference" in missing.stderr and (tmp_path / "doc" / "results.md").read_text() in result.stdout
    assert (tmp_path / "doc" / "ppl_vs_length.png").stat().st_size > 0
    assert (tmp_path / "doc" / "finetune_loss.png").stat().st_size > 0


def test_report_reads_the_typed_records_write_report_writes(tmp_path):
    """results.json from minillm.eval.report (the evaluation's own writer): records come back typed, a record
    that does not apply is left out, and the passkey table joins the runs by checkpoint."""
    runs = [make_run(tmp_path / "scaled", f"{s}_linear", "linear", "src", s) for s in (0, 1)]
    finetuned = [PerplexityRecord(Setting(run=run.name, seed=s, checkpoint=str(run / "checkpoints" / "best.ckpt")),
                                  n, 1.0, 10.0 + s + n / 64, by_position=[PositionBucket(0, n, 1.0, n)])
                 for s, run in enumerate(runs) for n in (64, 128)]
    finetuned.append(PerplexityRecord(Setting(run=runs[0].name, checkpoint=str(runs[0] / "checkpoints" / "best.ckpt")),
                                      512, None, None, applicable=False, note="too long"))
    passkey = [PasskeyRecord(Setting("m", run.name, s, checkpoint=str(run / "checkpoints" / "best.ckpt")), 128, 0.5, 4,
                             0.25, -1.0 - s) for s, run in enumerate(runs)]
    write_report(Results.of_records(finetuned + passkey), tmp_path / "eval_finetuned")
    inference = [PerplexityRecord(Setting(run="src", checkpoint="sweep/src/checkpoints/best.ckpt", scaling="linear"),
                                  n, 1.0, 20.0) for n in (64, 128)]
    write_report(Results.of_records(inference), tmp_path / "eval_inference")

    read = read_results(tmp_path / "eval_finetuned")
    assert read.of(PerplexityRecord) == finetuned and read.of(PasskeyRecord) == passkey
    assert read.of(PerplexityRecord)[0].by_position == [PositionBucket(0, 64, 1.0, 64)]
    assert read.of(PerplexityRecord)[-1].applicable is False
    report = context_extension_report(tmp_path)
    assert "| method | protocol | ppl @ 64 | ppl @ 128 |" in report  # 512 did not apply: no column
    assert "| PI (linear) | fine-tuned | 11.5 ± 0.7 | 12.5 ± 0.7 |" in report
    assert "| PI (linear) | fine-tuned | -1.50 |" in report  # the mean of the two seeds' log-probabilities
