"""One process, one folder: a failed command removes only what it made, one output folder is held by one process,
an evaluation replaces a results folder whole or not at all, a signal ends a run with a line saying what was kept,
links in a run folder are refused, a failed start blocks nothing, and Hydra's own errors are one line. Real
processes throughout (scripts/train.py, scripts/eval_extrapolate.py)."""

from __future__ import annotations

import csv
import fcntl
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from test_train_script import REPO, RESULT_LINE, SMALL, assert_ok, small_run, summary
from test_train_script import cache_dir, env, shared, small_corpus  # noqa: F401  (fixtures of the script tests)

LOCK = ".minillm.lock"
EVAL_FAST = ["logger=csv", "max_documents=1", "buckets=4", "lengths=[32]", "scalings=[none]", "passkey_trials=0",
             "tail_loss=false"]


def script(env: dict, name: str, *args: str, cwd: Path = REPO) -> SimpleNamespace:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    return SimpleNamespace(rc=done.returncode, out=done.stdout, err=done.stderr)


def one_line(result: SimpleNamespace, status: int = 2) -> str:
    """The single stderr line of a failed command, checked to be one `error:` line with the given exit status."""
    assert result.rc == status, f"exit {result.rc}\n{result.out[-2000:]}\n{result.err[-3000:]}"
    assert result.err.count("\n") == 1 and result.err.startswith("error: "), result.err
    return result.err.strip()


def start(env: dict, name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / name), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"exit {process.returncode} before {path.name} appeared\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.01)


def finish(process: subprocess.Popen) -> SimpleNamespace:
    out, err = process.communicate(timeout=300)
    return SimpleNamespace(rc=process.returncode, out=out, err=err)


def logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def results(folder: Path) -> dict[str, bytes]:
    """An evaluation folder's results: its files but the log."""
    return {name: data for name, data in tree(folder).items() if not name.endswith(".log")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env, cache_dir, small_corpus) -> Path:
    """A finished small text run (6 steps, checkpoints at 3 and 6, metrics.csv), copied by the tests that change it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert_ok(small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "logger=csv"))
    return run_dir


# ----------------------------------------------------------------------------------------------
# 1. A failed command removes what it made, never what it found


@pytest.mark.slow
def test_a_failed_command_keeps_a_folder_it_did_not_make(tmp_path, env, cache_dir, small_corpus):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "app.log").write_text("x\n")
    result = small_run(env, cache_dir, keep, f"data.path={small_corpus}", "optim.warmup_steps=-1")
    assert one_line(result) == "error: optim.warmup_steps: must be >= 0, got -1"
    assert tree(keep) == {"app.log": b"x\n"}  # the folder, its file, and nothing of the failed run
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(script(env, "eval_extrapolate.py", f"ckpt={tmp_path / 'missing'}", f"hydra.run.dir={empty}"))
    assert empty.is_dir() and not any(empty.iterdir())  # a folder the user made stays, even empty
    made = tmp_path / "made"
    one_line(small_run(env, cache_dir, made, f"data.path={small_corpus}", "optim.warmup_steps=-1"))
    assert not made.exists()  # the folder the command made goes with it


# ----------------------------------------------------------------------------------------------
# 3. One output folder, one process


@pytest.mark.slow
def test_a_folder_held_by_a_live_process_is_refused_naming_the_holder(tmp_path, env, cache_dir, small_corpus,
                                                                    trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = tree(run_dir)
    with open(run_dir / LOCK, "w") as holder:  # as a running training holds it
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("pid 4242 on somehost since 2026-01-01 00:00:00\n")
        holder.flush()
        result = small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "logger=csv", "ckpt_path=last",
                           "trainer.max_steps=9")
    assert one_line(result) == (f"error: hydra.run.dir={str(run_dir)!r}: in use by pid 4242 on somehost since "
                                f"2026-01-01 00:00:00; one folder holds one run at a time: wait for it to end, or "
                                f"choose another folder")
    assert {k: v for k, v in tree(run_dir).items() if k != LOCK} == before  # nothing written, nothing removed


@pytest.mark.slow
def test_two_resumes_of_one_run_at_once_one_trains_the_other_is_refused(tmp_path, env, cache_dir, small_corpus,
                                                                        trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", f"data.path={small_corpus}",
            "logger=csv", "trainer.log_every_n_steps=1", "ckpt_path=last", "trainer.max_steps=60",
            "trainer.checkpoint_every_n_steps=30", "trainer.val_check_interval=30"]
    first = start(env, "train.py", *args)
    wait_for(run_dir / LOCK, first)
    second = finish(start(env, "train.py", *args))
    line = one_line(second)
    assert line.startswith(f"error: hydra.run.dir={str(run_dir)!r}: in use by pid {first.pid} on ")
    assert_ok(finish(first))
    assert summary(run_dir)["steps"] == 60
    steps = logged_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] >= 50  # each step once, in order
    assert not (run_dir / LOCK).exists()  # given up at the end


@pytest.mark.slow
def test_two_trainings_started_together_with_the_default_folder_get_two_folders(tmp_path, env, cache_dir,
                                                                                small_corpus):
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"data.path={small_corpus}", "logger=none",
            "trainer.max_steps=2"]
    runs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args, f"seed={seed}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    results = [finish(run) for run in runs]
    for result in results:
        assert_ok(result)
    folders = sorted((tmp_path / "outputs" / "train").iterdir())
    assert len(folders) == 2 and {Path(RESULT_LINE.search(r.out)[3]).name for r in results} == {f.name for f in folders}
    assert sorted(int(f.joinpath("config.yaml").read_text().split("seed: ")[1].split()[0]) for f in folders) == [1, 2]


# ----------------------------------------------------------------------------------------------
# 2. An evaluation replaces a results folder whole, or not at all


@pytest.mark.slow
def test_an_occupied_results_folder_is_refused_and_overwrite_replaces_it_whole(tmp_path, env, trained):
    out = tmp_path / "eval"
    assert script(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={out}", *EVAL_FAST).rc == 0
    (out / "scaling_vs_length.png").write_bytes(b"an older evaluation's plot")
    results_before = results(out)
    refused = script(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={out}", *EVAL_FAST)
    assert one_line(refused).startswith(f"error: hydra.run.dir={str(out)!r}: already holds results (")
    assert one_line(refused).endswith("evaluate into another folder, or pass overwrite=true to replace them")
    assert results(out) == results_before  # the log has the refusal's line, the results are untouched
    replaced = script(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={out}", *EVAL_FAST,
                      "overwrite=true")
    assert replaced.rc == 0, replaced.err
    assert not (out / "scaling_vs_length.png").exists()  # nothing of the old results beside the new
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder, no lock left
    report = (out / "report.md").read_text()
    assert "stride: None" not in report and "non-overlapping windows" in report
    # overwrite replaces an evaluation's results only, never a training run
    run_copy = tmp_path / "run"
    shutil.copytree(trained, run_copy)
    line = one_line(script(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={run_copy}", *EVAL_FAST,
                           "overwrite=true"))
    assert "holds files that are not an evaluation's results" in line and tree(run_copy) == tree(trained)


# ----------------------------------------------------------------------------------------------
# 4. Signals


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_training_says_where_to_resume(tmp_path, env, cache_dir, small_corpus, signum):
    """Both stop at a step boundary (Lightning's handling of SIGTERM; Ctrl-C asks the trainer for the same), so
    every file is whole: metrics.csv parses row by row, and the checkpoint named loads."""
    run_dir = tmp_path / "run"
    process = start(env, "train.py", *SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
                    f"data.path={small_corpus}", "logger=csv", "trainer.max_steps=100000",
                    "trainer.checkpoint_every_n_steps=2", "trainer.val_check_interval=1000")
    wait_for(run_dir / "checkpoints" / "step-000002.ckpt", process)
    process.send_signal(signum)
    result = finish(process)
    line = one_line(result, 128 + signum)
    step = int(line.split(" at step ")[1].split(";")[0])
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= saved <= step < 100000
    if signum == signal.SIGINT or (run_dir / "metrics.csv").exists():  # SIGTERM: Lightning flushes no rows
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows and all(int(row["step"]) <= step for row in rows)
    assert line == (f"error: stopped by {signal.Signals(signum).name} at step {step}; the run's last checkpoint is "
                    f"{run_dir / 'checkpoints' / 'last.ckpt'} (step {saved}): resume with hydra.run.dir={run_dir} "
                    f"ckpt_path=last")
    assert not (run_dir / "summary.json").exists()
    assert line in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_before_the_first_checkpoint_leaves_no_folder(tmp_path, env, cache_dir, small_corpus):
    run_dir = tmp_path / "run"
    process = start(env, "train.py", *SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}",
                    f"data.path={small_corpus}", "logger=csv", "trainer.max_steps=100000",
                    "trainer.checkpoint_every_n_steps=100000", "trainer.val_check_interval=1000")
    wait_for(run_dir / "config.yaml", process)
    process.send_signal(signal.SIGTERM)
    line = one_line(finish(process), 128 + signal.SIGTERM)
    assert line.startswith("error: stopped by SIGTERM")
    assert line.endswith("no checkpoint was written, so nothing is kept")
    assert not run_dir.exists()


@pytest.mark.slow
def test_ctrl_c_during_evaluation_is_one_line_and_keeps_the_old_results(tmp_path, env, trained):
    out = tmp_path / "eval"
    assert script(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={out}", *EVAL_FAST).rc == 0
    before = results(out)
    process = start(env, "eval_extrapolate.py", f"ckpt={trained}", f"hydra.run.dir={out}", "logger=csv",
                    "overwrite=true", "lengths=[32,64,128,256,512,1024,2048,4096]", "max_documents=8")
    log, deadline = out / "eval_extrapolate.log", time.monotonic() + 120
    while log.read_text().count("measuring") < 2:  # the first evaluation's line, then this one's
        assert process.poll() is None and time.monotonic() < deadline, finish(process)
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # into the measurements
    result = finish(process)
    line = one_line(result, 128 + signal.SIGINT)
    assert line.startswith("error: stopped by SIGINT") and "Traceback" not in result.err
    assert results(out) == before  # the old results, whole
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# 5. Links in a run folder; 13. a failed start blocks nothing


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train.log", "metrics.csv"])
def test_a_link_in_a_run_folder_is_refused_before_anything_is_written(name, tmp_path, env, cache_dir, small_corpus,
                                                                      trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's\n")
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(outside)
    result = small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "logger=csv", "ckpt_path=last",
                       "trainer.max_steps=9")
    assert one_line(result) == (f"error: hydra.run.dir: {run_dir / name} is a symbolic link (to {outside}); "
                                f"a run writes only its own folder: replace the link with the file it points to")
    assert outside.read_text() == "not the run's\n"
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == (trained / "checkpoints" / "last.ckpt").read_bytes()


@pytest.mark.slow
def test_a_start_that_fails_before_its_first_checkpoint_leaves_nothing_in_the_way(tmp_path, env, cache_dir,
                                                                                 small_corpus, trained):
    run_dir = tmp_path / "run"
    common = (f"data.path={small_corpus}", "logger=csv")
    line = one_line(small_run(env, cache_dir, run_dir, *common, "optim.lr=1e30", "trainer.max_bad_steps=0"))
    assert "non-finite" in line or "nan" in line.lower()
    assert not run_dir.exists()  # config.yaml, tokenizer.json, train.log, metrics.csv: all its own, all gone
    assert_ok(small_run(env, cache_dir, run_dir, *common))  # the same folder, the fixed command

    # A start killed outright (SIGKILL) before its first checkpoint leaves config.yaml and rows without a
    # checkpoint: a resume says there is nothing to resume and to start afresh, and a fresh start takes the folder.
    dead = tmp_path / "dead"
    dead.mkdir()
    shutil.copy(trained / "config.yaml", dead / "config.yaml")
    shutil.copy(trained / "metrics.csv", dead / "metrics.csv")
    line = one_line(small_run(env, cache_dir, dead, *common, "ckpt_path=last"))
    assert line.endswith("stopped before its first checkpoint, so there is nothing to resume; start it afresh "
                         "there (the same command without ckpt_path)")
    assert_ok(small_run(env, cache_dir, dead, *common, "trainer.log_every_n_steps=1"))
    assert logged_steps(dead) == list(range(6))  # the new run's rows only


# ----------------------------------------------------------------------------------------------
# 11/12. Hydra's own errors, one line


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("optim.lr=fast", "error: optim.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
    ("seed=1e30", "error: seed=1e30: Value '1e+30' of type 'float' could not be converted to Integer"),
    ("rope=banana", "error: In 'config': Could not find 'rope/banana'"),
    ("ckpt=x", "error: Could not override 'ckpt': Key 'ckpt' not in 'RunConfig'"),
])
def test_hydras_errors_are_one_line_naming_the_setting(override, expected, env):
    assert one_line(script(env, "train.py", override)) == expected


@pytest.mark.slow
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, env):
    (tmp_path / "file").write_text("")
    for name, args in (("train.py", []), ("eval_extrapolate.py", ["ckpt=x"])):
        result = script(env, name, f"hydra.run.dir={tmp_path / 'file' / 'run'}", *args)
        assert one_line(result) == (f"error: hydra.run.dir={str(tmp_path / 'file' / 'run')!r}: the output folder "
                                    f"cannot be made (Not a directory)")
