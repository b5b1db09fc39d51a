"""Console: a failure is one line (stderr and the run's log) with exit 2, and leaves no empty run folder."""

from __future__ import annotations

import logging

import pytest

from minillm.console import check_overrides, fail, quiet_libraries, rank_zero
from minillm.files import RunLog


def test_a_failure_in_an_empty_run_folder_removes_it(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("")  # what Hydra's log handler may have created
    with pytest.raises(SystemExit) as exit_:
        fail(ValueError("data.path='x': no such file or folder"), run_dir)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: data.path='x': no such file or folder\n"
    assert not run_dir.exists()


def test_a_failure_in_a_run_folder_keeps_it_and_logs_the_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    handler = RunLog(str(run_dir / "train.log"))
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(SystemExit):
            fail(ValueError("rope.variant: the run was trained with 'alibi'"), run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    assert (run_dir / "train.log").read_text().strip() == "error: rope.variant: the run was trained with 'alibi'"
    assert capsys.readouterr().err.count("\n") == 1


def test_quiet_libraries_leaves_minillm_lines_only(monkeypatch):
    monkeypatch.setattr("warnings.filters", [])  # restored after the test
    monkeypatch.setenv("WANDB_SILENT", "false")  # kept (setdefault), and restored after
    levels = {name: logging.getLogger(name).level for name in ("lightning.pytorch", "minillm")}
    try:
        quiet_libraries()
        assert logging.getLogger("lightning.pytorch").level == logging.ERROR
        assert logging.getLogger("minillm").level == levels["minillm"]
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert rank_zero()


@pytest.mark.parametrize("override, group", [("model.rope.theta=5", "rope"), ("model.rope=xpos", "rope"),
                                             ("+model.rope_scaling.factor=2", "rope_scaling")])
def test_the_encoding_has_one_slot_and_the_models_copy_is_refused_in_one_line(override, group, capsys):
    with pytest.raises(SystemExit) as exit_:
        check_overrides(["trainer.max_steps=3", override])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == \
        f"error: model.{group}: set the top-level {group} group instead (e.g. {group}.<field>=...)\n"
    check_overrides([f"{group}.factor=2", "model.d_model=64"])  # the top-level groups and other model settings pass
