"""scripts/needle_misses.py end to end (subprocess): a needle run's misses counted by kind, a copy run refused."""

import os
import subprocess
import sys

from conftest import REPO

NEEDLE_RUN = ["data=synthetic", "data.task=needle", "model.context_length=64", "model.d_model=32", "model.n_layers=1",
              "model.n_heads=2", "data.batch_size=8", "data.val_windows=8", "trainer.max_steps=10",
              "trainer.val_check_interval=10", "trainer.checkpoint_every_n_steps=10", "logger=none"]


def run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_needle_is_counted_once_and_the_exact_match_follows_from_the_misses(tmp_path):
    trained = run("scripts/train.py", *NEEDLE_RUN, f"hydra.run.dir={tmp_path / 'needle'}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    done = run("scripts/needle_misses.py", str(tmp_path / "needle"), "--examples", "16")
    assert done.returncode == 0, done.stderr
    row = done.stdout.strip().splitlines()[-1].strip("|").split("|")
    assert row[0].strip() == "needle"
    counts = [tuple(int(n) for n in cell.split("/")) for cell in row[2:]]
    assert sum(n for _, n in counts) == 16 * 4  # 4 needles per window, each of one kind
    assert all(0 <= missed <= n for missed, n in counts)
    right = 64 - sum(missed for missed, _ in counts)
    assert row[1].strip() == f"{right / 64:.1%}"


def test_a_run_of_another_task_is_refused_in_one_line(synthetic_run):
    done = run("scripts/needle_misses.py", str(synthetic_run))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: ckpt: {synthetic_run} was not trained on the needle task"


def test_a_corrupt_checkpoint_is_refused_in_one_line(synthetic_run, tmp_path):
    run_dir = tmp_path / "broken"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = (synthetic_run / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("task: copy", "task: needle"))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    done = run("scripts/needle_misses.py", str(run_dir))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "last.ckpt" in done.stderr
