"""Console: a failure is one line (stderr and the run's log) with exit 2 (128 + signum for a signal); it removes
what the command made and nothing it found; an output folder is held by one process."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from minillm.console import (STOP_SIGNALS, NewOutputFolders, OutputFolder, Stopped, catch_stop_signals,
                             check_overrides, fail, held_signals, quiet_libraries, rank_zero, received_signal,
                             unique_suffix)
from minillm.files import RunLog


def test_a_failure_removes_what_the_command_made_and_nothing_it_found(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "app.log").write_text("the user's\n")
    (run_dir / "notes").mkdir()
    output = OutputFolder(run_dir)
    with output:
        (run_dir / "train.log").write_text("")  # what this command wrote
        (run_dir / "checkpoints").mkdir()
        with pytest.raises(SystemExit) as exit_:
            fail(ValueError("data.path='x': no such file or folder"), output)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: data.path='x': no such file or folder\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["app.log", "notes"]  # found there: kept, even the log
    assert (run_dir / "app.log").read_text() == "the user's\n"


def test_a_failure_removes_a_folder_hydra_made_for_the_command(tmp_path, capsys):
    from omegaconf import OmegaConf

    run_dir = tmp_path / "new"
    NewOutputFolders().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    run_dir.mkdir()  # as Hydra does next
    output = OutputFolder(run_dir)
    assert output.made
    with output:
        (run_dir / "train.log").write_text("")
        with pytest.raises(SystemExit):
            fail(ValueError("x"), output)
    assert not run_dir.exists()


def test_a_failure_keeps_what_is_worth_keeping_and_logs_the_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    handler = RunLog(str(run_dir / "train.log"))
    logging.getLogger().addHandler(handler)
    try:
        with OutputFolder(run_dir, worth_keeping=lambda: True) as output:
            (run_dir / "config.yaml").write_text("seed: 0\n")
            with pytest.raises(SystemExit):
                fail(ValueError("rope.variant: the run was trained with 'alibi'"), output)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    assert (run_dir / "train.log").read_text().strip() == "error: rope.variant: the run was trained with 'alibi'"
    assert capsys.readouterr().err.count("\n") == 1
    assert not (run_dir / OutputFolder.LOCK).exists()  # given up


def test_a_held_folder_is_refused_naming_its_holder_and_left_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with OutputFolder(run_dir):
        holder = (run_dir / OutputFolder.LOCK).read_text().strip()
        assert holder.startswith(f"pid {os.getpid()} on ")
        second = OutputFolder(run_dir)
        with pytest.raises(ValueError, match=f"in use by {re.escape(holder)}; one folder holds one run at a time"):
            second.__enter__()
        second.discard()  # a refused process removes nothing
        assert (run_dir / OutputFolder.LOCK).exists()
    assert not (run_dir / OutputFolder.LOCK).exists()
    with OutputFolder(run_dir) as again:  # free again once given up
        assert again.held


def test_a_stop_signal_raises_stopped_and_exits_128_plus_its_number(tmp_path, capsys):
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        catch_stop_signals()
        with pytest.raises(Stopped) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert stop.value.signum == signal.SIGTERM and str(stop.value) == "stopped by SIGTERM"
        assert received_signal() == signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    with pytest.raises(SystemExit) as exit_:
        fail(Stopped(signal.SIGINT, "stopped by SIGINT; no results were written"))
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "error: stopped by SIGINT; no results were written\n"


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


def test_quiet_libraries_hides_the_bars_that_do_not_say_whether_to_show():
    """transformers' GGUF bar is tqdm(iterable, desc=...): hidden; minillm's and Lightning's pass disable."""
    code = ("import tqdm, tqdm.auto; from minillm.console import quiet_libraries; quiet_libraries(); "
            "print(tqdm.tqdm(range(3)).disable, tqdm.auto.tqdm(range(3)).disable, "
            "tqdm.tqdm(range(3), disable=False).disable)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True", "False"], done.stderr


def test_default_folders_differ_per_run_and_agree_across_the_ranks_of_one_launched_job(monkeypatch):
    for key in ("SLURM_NTASKS", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert len({unique_suffix() for _ in range(20)}) == 20  # runs started in the same second
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun's tasks: DDP ranks composing their own configs
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    first_job = {unique_suffix() for _ in range(5)}
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    assert len(first_job) == 1 and unique_suffix() not in first_job  # one folder per job, not per rank


def test_a_stop_signal_inside_held_signals_is_raised_at_their_end():
    """The results' swap is never cut in two: the signal is recorded, and Stopped raised once the stretch ends."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    finished = []
    try:
        catch_stop_signals()
        with pytest.raises(Stopped) as stop:
            with held_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the handler has run by now: it must not have raised here
                finished.append(True)
        assert finished == [True] and stop.value.signum == signal.SIGTERM
        with held_signals():  # nothing received meanwhile: nothing raised
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
