"""Shared test settings: one torch thread per test process (pytest -n 2 already uses both cores); the
synthetic-task run that the training and evaluation script tests share."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
# Copying 8 of 8 symbols in 16 tokens: a 2-layer d_model=32 model is at 100% exact match by step 100.
SYNTHETIC_RUN = ["data=synthetic", "data.task=copy", "data.tasks.copy.num_symbols=8", "model.context_length=16",
                 "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.batch_size=16",
                 "data.val_windows=64", "trainer.max_steps=150", "trainer.val_check_interval=50",
                 "trainer.checkpoint_every_n_steps=150", "logger=csv"]


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    """A copy-task run of scripts/train.py trained to high accuracy, once per session (xdist workers share it)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = (tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()) / "synthetic_run"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "train.lock")):
        if not (root / "result.json").exists():
            env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
            env.update(HOME=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, "scripts/train.py", *SYNTHETIC_RUN, f"hydra.run.dir={root / 'run'}"],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            (root / "result.json").write_text(json.dumps({"rc": done.returncode, "err": done.stderr[-4000:]}))
    result = json.loads((root / "result.json").read_text())
    assert result["rc"] == 0, result["err"]
    return root / "run"
