"""Loggers: W&B's mode from the credentials at hand, the run's tags, a metrics.csv that a resume appends to."""

from __future__ import annotations

import csv

import pytest

from minillm.tracking import LoggerConfig
from minillm.train.config import RunConfig
from minillm.train.loggers import make_loggers, run_tags
from minillm.tracking import wandb_mode
from minillm.positions.base import POSITION_ENCODINGS, position_config


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return tmp_path


def test_wandb_mode_is_online_only_with_credentials(no_credentials, monkeypatch):
    assert wandb_mode("auto") == "offline"
    (no_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    (no_credentials / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"
    (no_credentials / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "key")
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled" and wandb_mode("offline") == "offline"


def test_run_tags_name_the_encoding_and_scaling():
    assert run_tags(RunConfig(logger=LoggerConfig(tags=["sweep"]))) == \
        ["rope=complex", "scaling=none", "theta=10000", "xpos=off", "sweep"]
    assert run_tags(RunConfig(rope=position_config("alibi"))) == ["rope=alibi", "scaling=none"]


@pytest.mark.parametrize("name", list(POSITION_ENCODINGS))
def test_run_tags_carry_each_encodings_own_tags(name):
    rope = position_config(name)
    tags = run_tags(RunConfig(rope=rope))
    assert tags == [f"rope={name}", "scaling=none", *rope.tags()]
    assert any(tag.startswith("theta=") for tag in tags) == rope.is_rotary


def test_metrics_csv_keeps_its_rows_when_a_resumed_run_logs_again(tmp_path):
    run = RunConfig(logger=LoggerConfig(kind="csv"))
    first, = make_loggers(run, tmp_path, config={})
    first.log_metrics({"train/loss": 3.0}, step=0)
    first.finalize("success")
    second, = make_loggers(run, tmp_path, config={})  # a resume builds its loggers afresh
    second.log_metrics({"train/loss": 2.5}, step=1)
    second.finalize("success")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "3.0"), ("1", "2.5")]
    assert make_loggers(RunConfig(logger=LoggerConfig(kind="none")), tmp_path, config={}) == []
