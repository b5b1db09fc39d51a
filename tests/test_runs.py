"""minillm.runs.RunFolder: the run folder's layout named once, each file read once (one evaluation loads each
checkpoint once and parses each config.yaml once)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from minillm.data.config import DataConfig
from minillm.data.synthetic import MQAR
from minillm.data.tokens import train_tokenizer
from minillm.eval.config import EvalConfig
from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.runs import CheckpointError, Run, RunFolder, find_runs
from minillm.tracking import LoggerConfig

TASK = {"seed": 2, "logger": {"group": "tasks"},
        "data": {"path": "synthetic", "task": "mqar",
                 "tasks": {"mqar": {"num_keys": 8, "num_values": 8, "tokens_per_pair": 8, "power_a": 0.01,
                                    "show_values": True}}}}


def save_run(folder: Path, model: Transformer, settings: dict, step: int = 7) -> Path:
    """A run folder as training writes it: checkpoints/last.ckpt (with an optimizer state) and config.yaml."""
    (folder / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}, "global_step": step,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(4)}}}]},
               folder / "checkpoints" / "last.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    return folder


def model(vocab_size: int, context_length: int = 16) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=16, n_layers=1,
                                   n_heads=2)).eval()


def text_run(folder: Path, root: Path) -> Path:
    """A text run whose tokenizer and documents are real (a .jsonl of 200 documents, some held out)."""
    texts = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(60 + i % 40)) for i in range(200)]
    documents = root / "docs.jsonl"
    documents.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=2)
    save_run(folder, model(tokenizer.get_vocab_size()),
             {"seed": 1, "logger": {"group": None},
              "data": {"path": str(documents), "cache_dir": str(root / "cache"), "val_fraction": 0.2}})
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# ----------------------------------------------------------------------------------------------
# The layout


def test_the_layout_names_each_file_of_a_run_folder(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert (run.name, run.config, run.tokenizer) == ("run", tmp_path / "run" / "config.yaml",
                                                     tmp_path / "run" / "tokenizer.json")
    assert run.best_checkpoint == tmp_path / "run" / "checkpoints" / "best.ckpt"
    assert run.last_checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert [p.name for p in (run.summary, run.metrics, run.init_from, run.curve_plot, run.log, run.wandb)] == \
           ["summary.json", "metrics.csv", "init_from.json", "val_loss.png", "train.log", "wandb"]
    assert RunFolder.STEP.format(step=150) + ".ckpt" == "step-000150.ckpt"


def test_the_run_folder_of_a_checkpoint(tmp_path):
    assert RunFolder.of_checkpoint(tmp_path / "run" / "checkpoints" / "step-000010.ckpt") == RunFolder(tmp_path / "run")
    assert RunFolder.of_checkpoint(str(tmp_path / "loose.ckpt")).path == tmp_path  # outside a run folder: its folder


def test_best_or_last_and_run_files(tmp_path):
    run = RunFolder(tmp_path)
    assert run.best_or_last() is None and not run.has_run_files()
    run.checkpoints.mkdir()
    run.last_checkpoint.write_bytes(b"")
    assert run.best_or_last() == run.last_checkpoint
    run.best_checkpoint.write_bytes(b"")
    assert run.best_or_last() == run.best_checkpoint
    run.config.write_text("seed: 0\n")
    assert not run.has_run_files()
    run.tokenizer.write_text("{}")
    assert run.has_run_files()


# ----------------------------------------------------------------------------------------------
# Each file read once


@pytest.fixture
def reads(monkeypatch) -> collections.Counter:
    """Counts torch.load and OmegaConf.load calls by the file they read."""
    counts: collections.Counter = collections.Counter()
    torch_load, omegaconf_load = torch.load, OmegaConf.load

    def counted_torch_load(f, *args, **kwargs):
        counts[Path(f)] += 1
        return torch_load(f, *args, **kwargs)

    def counted_omegaconf_load(f):
        counts[Path(f)] += 1
        return omegaconf_load(f)

    monkeypatch.setattr(torch, "load", counted_torch_load)
    monkeypatch.setattr(OmegaConf, "load", counted_omegaconf_load)
    return counts


def test_a_run_reads_its_files_once(tmp_path, reads):
    folder = save_run(tmp_path / "run", model(MQAR(num_keys=8, num_values=8, tokens_per_pair=8).vocab_size), TASK)
    [run] = find_runs(folder)
    assert run == Run(folder / "checkpoints" / "last.ckpt", folder) and run.folder == folder
    assert (run.seed, run.wandb_group, run.step) == (2, "tasks", 7)
    assert run.task == MQAR(num_keys=8, num_values=8, tokens_per_pair=8, power_a=0.01, show_values=True)
    assert run.model_config.vocab_size == run.task.vocab_size and run.settings["data"]["task"] == "mqar"
    assert set(run.weights) == set(model(run.task.vocab_size).state_dict())  # the optimizer state is not kept
    assert reads == {run.config: 1, run.checkpoint: 1}
    first = run.load_model()
    assert reads[run.checkpoint] == 1 and not first.training
    assert all(torch.equal(v, model(run.task.vocab_size).state_dict()[k]) for k, v in first.state_dict().items())
    run.load_model()  # the weights went into the first model: a second one reads the file again
    assert reads[run.checkpoint] == 2


def test_a_folder_without_config_has_no_settings_task_or_group(tmp_path):
    run = RunFolder(tmp_path)
    assert (run.settings, run.task, run.wandb_group, run.summary_values(), run.source_record()) == \
           ({}, None, None, {}, None)


def test_a_bad_task_names_the_config_and_a_bad_checkpoint_the_file(tmp_path):
    folder = save_run(tmp_path / "run", model(64), {**TASK, "data": {**TASK["data"], "task": "nope"}})
    [run] = find_runs(folder)
    with pytest.raises(ValueError, match=rf"^ckpt: {run.config}: data.task"):
        run.task
    run.checkpoint.write_bytes(b"not a checkpoint")
    fresh = Run(run.checkpoint, folder)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {fresh.checkpoint} is corrupt, truncated"):
        fresh.model_config


def test_one_evaluation_loads_each_checkpoint_once_and_parses_each_config_once(tmp_path, reads):
    """A sweep of a text run and a task run, passkey off: every check before measuring (source_config), the
    model, its task or its documents, its seed and the report come from one torch.load and one OmegaConf.load."""
    from minillm.eval.run import evaluate

    sweep = tmp_path / "sweep"
    task = MQAR(num_keys=8, num_values=8, tokens_per_pair=8)
    save_run(sweep / "0_task", model(task.vocab_size), TASK)
    text_run(sweep / "1_text", tmp_path)
    cfg = OmegaConf.structured(EvalConfig(ckpt=str(sweep), lengths=[16, 32], scalings=["none"], passkey_trials=0,
                                          task_examples=4, max_documents=1, buckets=2, device="cpu",
                                          logger=LoggerConfig(kind="none"),
                                          data=DataConfig(cache_dir=str(tmp_path / "eval_cache"))))
    files = evaluate(cfg, tmp_path / "eval")
    data = json.loads(files["json"].read_text())
    assert {r["run"] for r in data["perplexity"]} == {"1_text"} and {r["run"] for r in data["accuracy"]} == {"0_task"}
    assert {r["seed"] for r in data["perplexity"]} == {1} and {r["seed"] for r in data["accuracy"]} == {2}
    assert not (tmp_path / "cache").exists() and any((tmp_path / "eval_cache" / "tokens").iterdir())  # ours, not the run's
    runs = {name: RunFolder(sweep / name) for name in ("0_task", "1_text")}
    assert {path: n for path, n in reads.items() if path.suffix in (".ckpt", ".yaml")} == \
           {**{run.config: 1 for run in runs.values()}, **{run.last_checkpoint: 1 for run in runs.values()}}
