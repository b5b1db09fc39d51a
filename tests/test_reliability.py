"""Reliability: a NaN loss stops (or skips) with a clear message, checkpoints are written atomically, a corrupt
checkpoint fails naming a good one, a run killed with SIGKILL resumes to the same weights, DDP runs on the CPU,
fuzzed overrides and dataset files fail naming the culprit, and a full disk or read-only folder loses nothing."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose
from hydra.errors import ConfigCompositionException, OverrideParseException
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from minillm.runs import CheckpointError, load_checkpoint
from minillm.train.checkpoints import CheckpointWriteError, atomic_checkpoint_io, last_good_checkpoint
from minillm.data.config import DataConfig, TokenizerConfig
from minillm.model.config import ModelConfig
from minillm.train.config import OptimConfig, RunConfig
from minillm.console import check_overrides
from minillm.train.resume import resolve_checkpoint
from minillm.precision import resolve as resolve_precision
from minillm.registry import ConfigError
from minillm.train.run import load_data, trainer_kwargs
from minillm.registry import to_run_config
from minillm.train.task import LanguageModelTask, NonFiniteLossError
from test_train_script import REPO, RESULT_LINE, SMALL, assert_ok, compose_run, hydra_conf, small_run, summary
from test_train_script import cache_dir, env, shared, small_corpus  # noqa: F401  (fixtures of the script tests)


def finished_small_run(tmp_path: Path, env, cache_dir, small_corpus) -> tuple[Path, tuple[str, ...], Path]:
    """A completed small run: its folder, the overrides it ran with, its checkpoint folder."""
    run_dir = tmp_path / "run"
    common = (f"data.path={small_corpus}", "logger=none")
    assert_ok(small_run(env, cache_dir, run_dir, *common))
    return run_dir, common, run_dir / "checkpoints"


def state(path: Path) -> dict[str, torch.Tensor]:
    """The weights as saved, finite or not (load_checkpoint refuses non-finite ones)."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state(path).values() if t.is_floating_point())


def step_of(path: Path) -> int:
    return int(re.fullmatch(r"step-(\d+)\.ckpt", path.name)[1])


# ----------------------------------------------------------------------------------------------
# Non-finite loss


@pytest.mark.slow
def test_non_finite_loss_stops_the_script_naming_the_step_and_the_last_good_checkpoint(tmp_path, env, cache_dir,
                                                                                        small_corpus):
    run_dir = tmp_path / "run"
    # lr=1e30: the first update throws the weights to ~1e28 and the next ones overflow them; once the weights
    # are inf every loss is NaN, so the one skip allowed is used and the second bad step stops the run.
    result = small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "logger=none", "optim.lr=1e30",
                       "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=1", "trainer.max_bad_steps=1")
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    stop = re.search(r"^error: train/loss is (?:nan|inf|-inf) at step (\d+): stopped after 2 non-finite step\(s\), "
                     r"more than trainer\.max_bad_steps=1 allows; the last good checkpoint is (\S+) \(step (\d+)\); "
                     r"resume from it with ckpt_path=\2 ", result.err, re.M)
    assert stop, result.err
    step, good, good_step = int(stop[1]), Path(stop[2]), int(stop[3])
    assert not (run_dir / "summary.json").exists()
    # The checkpoint named is the newest whose weights are finite; those after it (the blow-up) are not.
    assert good.parent == run_dir / "checkpoints" and good.name == f"step-{good_step:06d}.ckpt"
    assert all_finite(good) and load_checkpoint(good)["global_step"] == good_step <= step
    newer = [p for p in (run_dir / "checkpoints").glob("step-*.ckpt") if step_of(p) > good_step]
    assert newer and not any(all_finite(p) for p in newer)


def tiny_task(max_bad_steps: int) -> LanguageModelTask:
    model = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2)
    return LanguageModelTask(model.to_dict(), vars(OptimConfig(warmup_steps=0)), peak_flops=1e12,
                             max_bad_steps=max_bad_steps)


class WeightsPerStep(L.Callback):
    """A copy of every parameter after each optimizer step, by global step."""

    def __init__(self):
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]


def fit_with_nan_at(task: LanguageModelTask, bad: set[int], max_steps: int = 6) -> WeightsPerStep:
    """Train on random tokens, the loss multiplied by NaN at the global steps in `bad`."""
    clean = task.model.loss
    task.model.loss = lambda x, y, positions=None: clean(x, y, positions) * (math.nan if task.global_step in bad else 1.0)
    tokens = torch.randint(0, 64, (12, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)
    weights = WeightsPerStep()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[weights])
    trainer.fit(task, train_dataloaders=loader)
    return weights


def test_bad_steps_within_the_allowance_are_skipped_without_an_update():
    task = tiny_task(max_bad_steps=2)
    weights = fit_with_nan_at(task, bad={2, 4}).after
    assert task.bad_steps == 2 and task.global_step == 6
    for step in (2, 4):  # the step after a bad one starts from the same weights: nothing was updated
        assert all(torch.equal(a, b) for a, b in zip(weights[step], weights[step + 1]))
    for step in (1, 3, 5):  # good steps do update
        assert not all(torch.equal(a, b) for a, b in zip(weights[step], weights[step + 1]))
    assert all(bool(torch.isfinite(p).all()) for p in task.parameters())


def test_one_bad_step_more_than_allowed_stops_naming_the_step():
    task = tiny_task(max_bad_steps=2)
    with pytest.raises(NonFiniteLossError, match=r"^train/loss is nan at step 3: stopped after 3 non-finite "
                                                 r"step\(s\), more than trainer\.max_bad_steps=2 allows$") as error:
        fit_with_nan_at(task, bad={1, 2, 3})
    assert error.value.step == 3 and isinstance(error.value, ValueError)  # scripts/train.py exits 2 on it


def test_bad_step_count_survives_a_checkpoint():
    task, restored = tiny_task(max_bad_steps=3), tiny_task(max_bad_steps=3)
    task.bad_steps = 2
    checkpoint = {}
    task.on_save_checkpoint(checkpoint)
    restored.on_load_checkpoint(checkpoint)
    assert restored.bad_steps == 2


def test_negative_max_bad_steps_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^trainer\.max_bad_steps: must be >= 0, got -1$"):
        compose_run("trainer.max_bad_steps=-1")


# ----------------------------------------------------------------------------------------------
# Atomic checkpoints; corrupt checkpoints on resume


def fake_checkpoint(step: int, value: float = 1.0) -> dict:
    """The keys minillm.checkpoint.load_checkpoint checks, with one weight."""
    return {"state_dict": {"model.w": torch.full((4,), value)}, "hyper_parameters": {"model": {}},
            "global_step": step}


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    io_plugin, path = atomic_checkpoint_io(), tmp_path / "last.ckpt"
    io_plugin.save_checkpoint(fake_checkpoint(1), path)

    def disk_full(fd):  # the bytes went to the page cache; the disk refuses them when they are flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    expected = rf"^checkpoint {re.escape(str(path))} could not be written \(No space left on device\); the previous"
    with pytest.raises(CheckpointWriteError, match=expected + " last.ckpt is unchanged$"):
        io_plugin.save_checkpoint(fake_checkpoint(2, 2.0), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file is gone


KILL_MID_WRITE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from minillm.train.checkpoints import atomic_checkpoint_io
from test_reliability import fake_checkpoint
io_plugin = atomic_checkpoint_io()
io_plugin.save_checkpoint(fake_checkpoint(1), {path!r})
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed with the new bytes written, not yet renamed
io_plugin.save_checkpoint(fake_checkpoint(2, 2.0), {path!r})
"""


def test_a_kill_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    script = KILL_MID_WRITE.format(tests=str(REPO / "tests"), path=str(path))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert load_checkpoint(path)["global_step"] == 1 and torch.equal(state(path)["model.w"], torch.ones(4))
    (partial,) = tmp_path.glob(".last.ckpt.partial")  # the torn write, under a name nothing takes for a checkpoint
    assert load_checkpoint(partial)["global_step"] == 2
    atomic_checkpoint_io().save_checkpoint(fake_checkpoint(3), path)  # the next save replaces the leftover
    assert load_checkpoint(path)["global_step"] == 3 and not partial.exists()


def test_last_good_checkpoint_skips_corrupt_and_non_finite_files(tmp_path):
    io_plugin, now = atomic_checkpoint_io(), time.time()
    for step, value in ((1, 1.0), (2, 2.0), (3, math.inf)):
        io_plugin.save_checkpoint(fake_checkpoint(step, value), tmp_path / f"step-{step:06d}.ckpt")
    (tmp_path / "step-000004.ckpt").write_bytes((tmp_path / "step-000002.ckpt").read_bytes()[:200])  # truncated
    (tmp_path / "last.ckpt").write_bytes((tmp_path / "step-000002.ckpt").read_bytes())
    for age, name in enumerate(["last", "step-000004", "step-000003", "step-000002", "step-000001"]):
        os.utime(tmp_path / f"{name}.ckpt", (now - age, now - age))
    assert last_good_checkpoint(tmp_path) == (tmp_path / "step-000002.ckpt", 2)  # a stable name over last.ckpt
    assert last_good_checkpoint(tmp_path, skip=tmp_path / "step-000002.ckpt") == (tmp_path / "last.ckpt", 2)
    os.utime(tmp_path / "step-000001.ckpt", (now + 1, now + 1))  # newest now, and good
    assert last_good_checkpoint(tmp_path) == (tmp_path / "step-000001.ckpt", 1)
    assert last_good_checkpoint(tmp_path / "missing") is None


def test_resolving_a_corrupt_checkpoint_names_the_newest_good_one(tmp_path):
    folder = tmp_path / "checkpoints"
    io_plugin = atomic_checkpoint_io()
    io_plugin.save_checkpoint(fake_checkpoint(3), folder / "step-000003.ckpt")
    io_plugin.save_checkpoint(fake_checkpoint(6), folder / "last.ckpt")
    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:300])
    with pytest.raises(CheckpointError, match=rf"^ckpt_path: checkpoint {re.escape(str(folder / 'last.ckpt'))} is "
                                              rf"corrupt, truncated .*; the newest checkpoint that loads is "
                                              rf"{re.escape(str(folder / 'step-000003.ckpt'))} \(step 3\)"):
        resolve_checkpoint("last", tmp_path)
    (folder / "step-000003.ckpt").unlink()
    with pytest.raises(CheckpointError, match=rf"; no other checkpoint in {re.escape(str(folder))} loads$"):
        resolve_checkpoint(str(folder / "last.ckpt"), tmp_path)


@pytest.mark.slow
def test_resume_from_a_truncated_last_checkpoint_names_it_and_the_good_one(tmp_path, env, cache_dir, small_corpus):
    run_dir, common, folder = finished_small_run(tmp_path, env, cache_dir, small_corpus)
    assert not list(folder.glob(".*"))  # every write was renamed into place
    last = folder / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 6
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a kill mid-write without atomic saves

    result = small_run(env, cache_dir, run_dir, *common, "ckpt_path=last", "trainer.max_steps=9")
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    assert f"error: ckpt_path: checkpoint {last} is corrupt, truncated or not a PyTorch checkpoint" in result.err
    (named,) = re.findall(r"the newest checkpoint that loads is (\S+) \(step 6\)", result.err)
    assert Path(named).parent == folder and Path(named).name in ("step-000006.ckpt", "best.ckpt")
    assert load_checkpoint(named)["global_step"] == 6


# ----------------------------------------------------------------------------------------------
# Exact resume after SIGKILL


LONG = ("trainer.max_steps=150", "trainer.checkpoint_every_n_steps=10", "trainer.val_check_interval=50",
        "logger=none")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env, cache_dir, small_corpus) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert_ok(small_run(env, cache_dir, run_dir, *LONG, f"data.path={small_corpus}"))
    return run_dir


def run_until(marker: Path, env: dict, args: list[str], timeout: float = 240) -> int:
    """Start scripts/train.py ARGS, SIGKILL it as soon as `marker` exists, return its exit status."""
    process = subprocess.Popen([sys.executable, "scripts/train.py", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended (exit {process.wait()}) before {marker.name} was written")
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    return process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [20, 80])
def test_resume_after_sigkill_ends_bitwise_equal_to_an_uninterrupted_run(kill_after, tmp_path, env, cache_dir,
                                                                        small_corpus, uninterrupted):
    run_dir = tmp_path / "run"
    args = [*SMALL, f"data.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *LONG, f"data.path={small_corpus}"]
    folder = run_dir / "checkpoints"
    assert run_until(folder / f"step-{kill_after:06d}.ckpt", env, args) == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    killed_at = load_checkpoint(folder / "last.ckpt")["global_step"]
    assert kill_after - 10 <= killed_at < 150  # last.ckpt is whole: the newest save, or the one before it

    assert_ok(small_run(env, cache_dir, run_dir, *LONG, f"data.path={small_corpus}", "ckpt_path=last"))
    assert summary(run_dir)["steps"] == 150
    # Same batches (TrainWindows resumes by batch index), same optimizer and schedule state, one thread on the
    # CPU: nothing differs, so the weights and AdamW's moments match to the bit.
    resumed, reference = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
                          for d in (run_dir, uninterrupted))
    assert resumed["global_step"] == reference["global_step"] == 150
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    assert all(torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])
    for mine, theirs in zip(resumed["optimizer_states"][0]["state"].values(),
                            reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert resumed["TextDataModule"] == reference["TextDataModule"] == {"batches_consumed": 150}


# ----------------------------------------------------------------------------------------------
# DDP on the CPU


@pytest.mark.slow
def test_ddp_on_cpu_reads_interleaved_batches_and_keeps_the_replicas_equal(tmp_path, env, cache_dir, small_corpus):
    common = (f"data.path={small_corpus}", "logger=none", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4",
              "optim.warmup_steps=0",  # full steps from the start, so that different batches show
              "trainer.precision=32-true")  # the gap below is float32 rounding
    ddp = small_run(env, cache_dir, tmp_path / "ddp", *common, "trainer=ddp_cpu", "data.batch_size=2")
    assert_ok(ddp)
    assert len(RESULT_LINE.findall(ddp.out)) == 1  # rank 1 runs the script too, but only rank 0 reports
    done = summary(tmp_path / "ddp")
    assert done["world_size"] == 2 and done["steps"] == 4 and done["tokens"] == 4 * 2 * 32 * 2
    assert done["replica_spread"] == 0.0  # both ranks ended with the same weights (all-gathered parameter sums)
    ddp_ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert ddp_ckpt["TextDataModule"] == {"batches_consumed": 8}

    # Rank r reads batches r, r + 2, ...: together the ranks' batches of 2 are the samples of one process's
    # batches of 4, so DDP's averaged gradients match that run's, and not a run where both ranks read the same.
    for name, batch_size in (("one", 4), ("half", 2)):
        assert_ok(small_run(env, cache_dir, tmp_path / name, *common, f"data.batch_size={batch_size}"))
    one, half = (state(tmp_path / n / "checkpoints" / "last.ckpt") for n in ("one", "half"))
    gap = max(float((ddp_ckpt["state_dict"][k] - one[k]).abs().max()) for k in one)
    apart = max(float((half[k] - one[k]).abs().max()) for k in one)
    # Not bitwise: the all-reduce adds the two ranks' mean gradients, one process sums the four rows in one
    # mean, and Adam's first steps (update ~ lr · g/|g|) magnify that rounding. Measured: gap ~2e-6, apart ~1e-2.
    assert gap < 1e-4 and apart > 1e-3, (gap, apart)


# ----------------------------------------------------------------------------------------------
# Fuzzing: overrides (in-process composition) and dataset files


SETTINGS = ["trainer.max_steps", "trainer.max_bad_steps", "trainer.val_check_interval", "trainer.precision",
            "trainer.devices", "trainer.gradient_clip_val", "trainer.checkpoint_every_n_steps", "trainer.peak_flops",
            "trainer.limit_val_batches", "trainer.strategy", "optim.eps", "optim.lr", "optim.beta1", "optim.min_lr_ratio",
            "optim.warmup_steps", "model.d_model", "model.n_heads",
            "model.n_kv_heads", "model.n_layers", "model.ffn", "model.norm_eps", "model.attn_dropout",
            "data.batch_size", "data.val_fraction", "data.max_documents", "tokenizer.vocab_size", "rope.theta",
            "rope.rotary_dim", "logger.kind", "logger.mode", "seed", "ckpt_path"]
VALUES = st.one_of(st.integers(-3, 600).map(str), st.integers(-10**12, 10**12).map(str),
                   st.floats(-2, 2).map(repr), st.floats().map(repr),
                   st.sampled_from(["nan", "inf", "-inf", "null", "[]", "{}", "[1,2]", "true", "0", "-1", "''",
                                    "${oops}", "1e400", "0x10", "gpu", "ddp", "16-mixed", "auto", "gelu"]),
                   st.text(st.characters(codec="utf-8"), max_size=10))
KEYS = st.one_of(st.sampled_from(SETTINGS), st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True))
OVERRIDES = st.lists(st.tuples(st.sampled_from(SETTINGS), VALUES), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.one_of(OVERRIDES, OVERRIDES, OVERRIDES, st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=2)))
@example(overrides=[("trainer.devices", "abc")])
@example(overrides=[("trainer.devices", "3265949860")])  # on CPU a process per count: refused past the cores
@example(overrides=[("trainer.precision", "8")])
@example(overrides=[("model.d_model", "48"), ("model.n_heads", "5")])
@example(overrides=[("trainer.max_steps", "[")])  # Hydra's grammar error names only the "[": ours quotes the override
@example(overrides=[("trainer.max_steps", "'")])
@example(overrides=[("trainer.max_steps", "\n")])
def test_fuzzed_overrides_compose_or_fail_naming_the_setting(overrides):
    keys = [key for key, _ in overrides]
    names = [key.split(".")[-1] for key in keys]
    with hydra_conf():
        try:
            cfg = compose("config", overrides=[f"{key}={value}" for key, value in overrides])
        except OverrideParseException:  # Hydra's grammar: the scripts refuse it first, quoting the override
            stderr = io.StringIO()
            with pytest.raises(SystemExit) as exit_status, contextlib.redirect_stderr(stderr):
                check_overrides([f"{key}={value}" for key, value in overrides])
            assert exit_status.value.code == 2 and stderr.getvalue().count("\n") == 1
            assert any(f"override '{key}=" in stderr.getvalue() for key in keys), stderr.getvalue()
            event("rejected by the override grammar")
            return
        except ConfigCompositionException as error:  # unknown key or wrong type: Hydra names the full key
            assert any(key in str(error) for key in keys), str(error)
            event("rejected by Hydra against the schema")
            return
    try:
        run = to_run_config(cfg)
    except ConfigError as error:  # our checks: "<setting>: <why>", the setting overridden or the one it clashes with
        message = str(error)
        assert re.match(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*: ", message), message
        assert any(name in message for name in names), message
        event("rejected by a dataclass check")
        return
    event("accepted")
    assert isinstance(run, RunConfig)
    if any(key.startswith("trainer.") for key in keys) and run.trainer.accelerator == "cpu":
        with tempfile.TemporaryDirectory() as folder:  # accepted: Lightning's Trainer must accept it too
            precision, _ = resolve_precision(run.trainer.precision, torch.device("cpu"))
            L.Trainer(**trainer_kwargs(run, Path(folder), precision), logger=False)


def random_file_bytes(kind: str):
    """Random bytes, or random bytes inside the shape the format expects."""
    raw = st.binary(max_size=3000)
    shaped = {"jsonl": raw.map(lambda b: b'{"text": "' + b + b'"}\n'),
              "json": raw.map(lambda b: b'[{"text": "' + b + b'"}]'),
              "parquet": raw.map(lambda b: b"PAR1" + b + b"PAR1"),
              "txt": st.text(max_size=500).map(str.encode)}[kind]
    return st.one_of(raw, shaped)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), kind=st.sampled_from(["txt", "jsonl", "json", "parquet"]), files=st.integers(1, 3))
@example(data=None, kind="jsonl", files=1)
def test_fuzzed_dataset_file_loads_or_fails_naming_the_file(data, kind, files):
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus"
        corpus.mkdir()
        for i in range(files):  # one .txt file is one document: the split needs two, hence up to three files
            content = b'{"text": "\xc1 not utf-8"}\n' if data is None else data.draw(random_file_bytes(kind))
            (corpus / f"part{i}.{kind}").write_bytes(content)
        path = corpus / f"part0.{kind}" if files == 1 else corpus
        run = RunConfig(model=ModelConfig(context_length=8, d_model=32, n_layers=1, n_heads=2),
                        data=DataConfig(path=str(path), cache_dir=str(Path(folder) / "cache"), val_fraction=0.5),
                        tokenizer=TokenizerConfig(vocab_size=260, min_frequency=1))
        try:
            dm = load_data(run)
        except (ValueError, FileNotFoundError) as error:
            assert f"data.path={str(path)!r}" in str(error), str(error)
            event(f"{kind}: {str(error).split(': ', 1)[1][:40]}")
            return
    event(f"{kind}: loaded")
    assert len(dm.train_tokens) > 9 and len(dm.val_tokens) >= 9


# ----------------------------------------------------------------------------------------------
# Faults for real, where this machine allows them: a small tmpfs is a full disk, an immutable folder (chattr +i)
# refuses writes even to root. Elsewhere these two skip, saying why; the plugin's own tests above run anywhere.


@contextmanager
def full_disk(folder: Path, size: int):
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def immutable(folder: Path):
    locked = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if locked.returncode != 0:
        pytest.skip(f"cannot make a folder immutable here: {locked.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def assert_checkpoints_intact(folder: Path) -> list[str]:
    """Every checkpoint left loads, and no partial write is left behind."""
    names = sorted(p.name for p in folder.iterdir())
    assert names and all(name.endswith(".ckpt") for name in names), names
    for name in names:
        load_checkpoint(folder / name)
    return names


@pytest.mark.slow
def test_full_disk_exits_naming_the_checkpoint_and_loses_none_already_written(tmp_path, env, cache_dir, small_corpus,
                                                                             uninterrupted):
    size = (uninterrupted / "checkpoints" / "step-000010.ckpt").stat().st_size  # the same model: the same size
    # Step 3 needs room for step-3, best, last and a second last being written: 4 checkpoints. Step 6 adds a
    # fifth: 4.5 lets step 3 through and fills the disk during step 6.
    with full_disk(tmp_path / "disk", int(4.5 * size)) as disk:
        run_dir = disk / "run"
        result = small_run(env, cache_dir, run_dir, f"data.path={small_corpus}", "logger=none")
        assert result.rc == 2 and "Traceback" not in result.err, result.err
        failed = re.search(rf"^error: checkpoint {re.escape(str(run_dir / 'checkpoints'))}/(\S+) could not be "
                           rf"written \(No space left on device\)", result.err, re.M)
        assert failed, result.err
        names = assert_checkpoints_intact(run_dir / "checkpoints")
        assert {"step-000003.ckpt", "best.ckpt", "last.ckpt"} <= set(names)
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] in (3, 6)
        assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_read_only_checkpoint_folder_exits_naming_it_and_keeps_the_checkpoints(tmp_path, env, cache_dir, small_corpus):
    run_dir, common, folder = finished_small_run(tmp_path, env, cache_dir, small_corpus)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with immutable(folder):
        result = small_run(env, cache_dir, run_dir, *common, "ckpt_path=last", "trainer.max_steps=9")
    assert result.rc == 2 and "Traceback" not in result.err, result.err
    assert f"error: checkpoint {folder / 'step-000009.ckpt'} could not be written (Operation not permitted)" \
        in result.err, result.err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing lost, nothing torn
