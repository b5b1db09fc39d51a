"""The console progress display: training counts optimizer steps towards trainer.max_steps, across epochs and
resumes; a bar on a terminal of its own, a status line now and then where the console is shared or no terminal."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """One training bar for the whole run, reading `step {global_step}/{max_steps}`; validation bars are Lightning's."""

    # Training stops at max_steps with unlimited epochs, so Lightning's bar (per epoch, "Epoch 30/9" after a
    # resume) counts the wrong thing. This one lives from on_train_start to on_train_end and shows the step;
    # `leave` is therefore moot for it. Only the training bar gets this format: "step 40/1000  4%|█| ...".
    TRAIN_BAR_FORMAT = ("{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| "
                        "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="step", position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=self.TRAIN_BAR_FORMAT, unit="step")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)  # max_steps=-1: no step limit
        # A run resumed at step N starts at N; tqdm's rate and ETA count from `initial`, the steps taken here.
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        if not bar.disable:
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: a run folder has one run
        return metrics

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        pass  # an epoch ends where the data does, not where the run does: the bar goes on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step  # global_step counts this batch's step already
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class StepStatusLines(ProgressBar):
    """No bars: one line every `every` seconds of training and one after each validation, prefixed with the
    job's name: "[1_rope-alibi] step 40/1000 (4%), 2.1 steps/s, train/loss 3.214, val/loss 3.402".

    For a console that bars would garble: several jobs of a parallel launcher drawing over each other, or output
    that is a file or a scheduler's log, where each redraw of a bar becomes another line."""

    def __init__(self, name: str = "", every: float = 30.0):
        super().__init__()
        self.prefix = f"[{name}] " if name else ""
        self.every = every  # seconds between two lines while training
        self.enabled = True
        self._started = self._last = 0.0
        self._first_step = 0

    def disable(self) -> None:
        self.enabled = False  # as Lightning does on every rank but 0

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._first_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.every or trainer.global_step == trainer.max_steps:
            self.status(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.status(trainer, pl_module)

    def status(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the status line (rank 0 only)."""
        if not self.enabled:
            return
        self._last = now = time.monotonic()
        step, total = trainer.global_step, trainer.max_steps
        line = f"{self.prefix}step {step}" + (f"/{total} ({step / total:.0%})" if total > 0 else "")
        if now > self._started and step > self._first_step:
            line += f", {(step - self._first_step) / (now - self._started):.3g} steps/s"
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        print(", ".join([line, *shown]), file=sys.stdout, flush=True)


def progress_callbacks(lines: bool = False, name: str = "") -> list[Callback]:
    """The progress callbacks a training run adds to its Trainer (which keeps enable_progress_bar=True): the step
    bar, or with lines=True (a shared console or none: minillm.console.shares_console) status lines named `name`."""
    return [StepStatusLines(name) if lines else StepProgressBar()]
