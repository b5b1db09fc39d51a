"""The console progress bar: training counts optimizer steps towards trainer.max_steps, across epochs and resumes."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
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


def progress_callbacks() -> list[Callback]:
    """The progress callbacks a training run adds to its Trainer (which keeps enable_progress_bar=True)."""
    return [StepProgressBar()]
