"""The step progress bar, in real Trainer runs on the CPU: its total is max_steps and its count the global
step, across epochs, validations and a resume from a checkpoint saved mid-run; status lines in its place where
the console is shared or is no terminal."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from minillm.model.config import ModelConfig
from minillm.train.config import OptimConfig
from minillm.console import shares_console
from minillm.train.progress import StepProgressBar, StepStatusLines, progress_callbacks
from minillm.train.task import LanguageModelTask

SEQ_LEN, BATCH, WINDOWS = 8, 4, 20  # 5 batches an epoch: 8 steps cross an epoch boundary
MAX_STEPS, SAVE_EVERY = 8, 4


class BarRecorder(Callback):
    """What the training bar holds when training starts and after each batch; the validation bar's look."""

    def __init__(self):
        self.at_start: tuple = ()
        self.after_batch: list[tuple] = []  # (n, total) after each batch
        self.text = ""  # the training bar as last drawn
        self.validation: list[tuple] = []  # (desc, bar_format) of the validation bars during training

    def on_train_start(self, trainer, pl_module):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.at_start = (getattr(bar, "desc", None), bar.n, bar.total, bar.initial)  # a disabled tqdm has no desc
        self.text = "" if bar.disable else str(bar)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.after_batch.append((bar.n, bar.total))
        self.text = "" if bar.disable else str(bar)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            bar = trainer.progress_bar_callback.val_progress_bar
            self.validation.append((bar.desc, bar.bar_format))


def windows() -> TensorDataset:
    stream = torch.arange(WINDOWS + SEQ_LEN + 1) % 16
    x = torch.stack([stream[s:s + SEQ_LEN] for s in range(WINDOWS)])
    return TensorDataset(x, torch.stack([stream[s + 1:s + SEQ_LEN + 1] for s in range(WINDOWS)]))


def fit(tmp_path, max_steps=MAX_STEPS, ckpt_path=None, bar=None, record=True, **trainer_kwargs):
    L.seed_everything(0)
    model = ModelConfig(vocab_size=16, context_length=SEQ_LEN, d_model=16, n_layers=1, n_heads=2)
    task = LanguageModelTask(model.to_dict(), dataclasses.asdict(OptimConfig(warmup_steps=2)), peak_flops=1e12)
    recorder = BarRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="step-{step}", save_top_k=-1,
                                  every_n_train_steps=SAVE_EVERY, auto_insert_metric_name=False)
    callbacks = [bar] if bar is not None else progress_callbacks()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=3,
                        check_val_every_n_epoch=None, limit_val_batches=2, logger=False, enable_model_summary=False,
                        callbacks=[*callbacks, *([recorder] if record else []), checkpoints], default_root_dir=tmp_path,
                        **trainer_kwargs)
    data = windows()
    trainer.fit(task, DataLoader(data, batch_size=BATCH, shuffle=True), DataLoader(data, batch_size=BATCH),
                ckpt_path=ckpt_path)
    return trainer, recorder


def test_progress_callbacks_are_one_step_bar_the_trainer_takes_as_its_own():
    callbacks = progress_callbacks()
    assert len(callbacks) == 1 and isinstance(callbacks[0], StepProgressBar)
    assert isinstance(callbacks[0], TQDMProgressBar)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks)
    assert trainer.progress_bar_callback is callbacks[0]  # in place of Lightning's default bar, not beside it
    with pytest.raises(MisconfigurationException, match="enable_progress_bar=False"):
        L.Trainer(accelerator="cpu", logger=False, callbacks=progress_callbacks(), enable_progress_bar=False)


@pytest.fixture(scope="module")
def fresh_and_resumed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    fresh = fit(folder)
    resumed = fit(folder / "resumed", ckpt_path=folder / "checkpoints" / f"step-{SAVE_EVERY}.ckpt")
    return fresh, resumed


def test_the_training_bar_counts_steps_to_max_steps_across_epochs(fresh_and_resumed):
    (trainer, recorder), _ = fresh_and_resumed
    assert trainer.global_step == MAX_STEPS and trainer.current_epoch >= 1  # the run crossed an epoch boundary
    assert recorder.at_start == ("step", 0, MAX_STEPS, 0)
    assert recorder.after_batch == [(step, MAX_STEPS) for step in range(1, MAX_STEPS + 1)]  # no restart at epoch 1
    assert recorder.text.startswith(f"step {MAX_STEPS}/{MAX_STEPS} 100%|")
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.desc, bar.n, bar.total) == ("step", MAX_STEPS, MAX_STEPS)


def test_a_resumed_run_starts_the_bar_at_its_checkpoint_step(fresh_and_resumed):
    _, (trainer, recorder) = fresh_and_resumed
    assert recorder.at_start == ("step", SAVE_EVERY, MAX_STEPS, SAVE_EVERY)
    assert recorder.text.startswith(f"step {MAX_STEPS}/{MAX_STEPS} 100%|")
    assert recorder.after_batch == [(step, MAX_STEPS) for step in range(SAVE_EVERY + 1, MAX_STEPS + 1)]
    assert trainer.global_step == MAX_STEPS


def test_validation_bars_are_lightnings(fresh_and_resumed):
    (_, recorder), _ = fresh_and_resumed
    assert len(recorder.validation) == 2 * 2  # validations after steps 3 and 6, two batches each
    assert set(recorder.validation) == {("Validation DataLoader 0: ", TQDMProgressBar.BAR_FORMAT)}


def test_without_max_steps_the_bar_counts_steps_without_a_total(tmp_path):
    trainer, recorder = fit(tmp_path, max_steps=-1, max_epochs=1)
    assert recorder.at_start == ("step", 0, None, 0)
    assert recorder.after_batch == [(step, None) for step in range(1, WINDOWS // BATCH + 1)]


def test_a_disabled_bar_draws_nothing_and_training_runs(tmp_path):
    bar = StepProgressBar()
    bar.disable()  # as Lightning does on every rank but 0
    trainer, recorder = fit(tmp_path, max_steps=2, bar=bar)
    assert trainer.global_step == 2 and bar.train_progress_bar.disable
    assert recorder.at_start == (None, 0, 2, 0) and recorder.text == ""
    assert recorder.after_batch == [(0, 2), (0, 2)]  # a disabled bar is never advanced


def test_progress_callbacks_choose_lines_for_a_shared_console():
    assert shares_console()  # pytest captures stdout: no terminal
    (lines,) = progress_callbacks(lines=True, name="1_rope-alibi")
    assert isinstance(lines, StepStatusLines)
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[lines])
    assert trainer.progress_bar_callback is lines  # no bar of Lightning's beside it


def test_status_lines_name_the_job_and_count_steps(tmp_path, capsys):
    lines = StepStatusLines("1_rope-alibi", every=0)  # a line after every step
    fit(tmp_path, max_steps=4, bar=lines, record=False)
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("[1_rope-alibi] step ")]
    # after each step, and once more after the validation at step 3 (val_check_interval=3)
    shown = [f"[1_rope-alibi] step {n}/4 ({n / 4:.0%})" for n in (1, 2, 3, 3, 4)]
    assert [line.split(",")[0] for line in steps] == shown
    assert "val/loss" in steps[3] and "steps/s" in steps[3]
    assert "\r" not in "".join(out) and "Validation" not in "".join(out)  # no bars
