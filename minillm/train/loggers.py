"""Where metrics go: run_dir/metrics.csv (appended to on resume) and W&B (offline without credentials)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from minillm.tracking import wandb_mode
from minillm.train.config import RunConfig

log = logging.getLogger("minillm")


def run_tags(run: RunConfig) -> list[str]:
    """W&B tags: the encoding and its own settings' tags, the scaling, the sampler, fine-tuning, logger.tags."""
    rope, scaling = run.rope, run.rope_scaling
    tags = [f"rope={rope.variant}", f"scaling={scaling.type}", *rope.tags()]
    if run.positions.name != "contiguous":
        tags.append(f"positions={run.positions.name}")
    if run.init_from is not None:  # a fine-tuning: its method is its scaling and positions
        tags.append("finetuned")
    return tags + list(run.logger.tags)


def _appending_csv_logger(run_dir: Path, resume_step: Optional[int] = None):
    """Lightning's CSVLogger writing run_dir/metrics.csv, except that a resumed run appends to the rows
    it already has instead of deleting them (the stock writer starts the file afresh).

    resume_step: the step of the checkpoint resumed from. Rows logged at that step or later describe training
    the resume replaces (a resume from best.ckpt, behind last.ckpt): they are dropped, so that the file
    holds each step once, as an uninterrupted run's would."""
    import csv
    import io

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from minillm.files import write_atomic

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if not os.path.isfile(self.metrics_file_path):
                return
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys, rows = list(reader.fieldnames or []), list(reader)
            kept = [row for row in rows if resume_step is None or int(row["step"]) < resume_step]
            if len(kept) < len(rows):
                out = io.StringIO()
                writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
                write_atomic(Path(self.metrics_file_path), out.getvalue())

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=str(run_dir), name="", version="")


def make_loggers(run: RunConfig, run_dir: Path, config: dict, resume_id: Optional[str] = None,
                 resume_step: Optional[int] = None, group: Optional[str] = None) -> list:
    """CSV (run_dir/metrics.csv) and, for logger.kind=wandb, W&B; resume_id continues that W&B run, and
    resume_step (the checkpoint's step) is where metrics.csv continues. group: the W&B group when
    logger.group is unset (a fine-tuning's: its source's)."""
    from lightning.pytorch.loggers import WandbLogger

    if run.logger.kind == "none":
        return []
    loggers: list = [_appending_csv_logger(run_dir, resume_step)]  # run_dir/metrics.csv
    if run.logger.kind == "wandb":
        import wandb

        mode = wandb_mode(run.logger.mode)
        settings = wandb.Settings(init_timeout=60, silent=True)
        resume = {"id": resume_id, "resume": "allow"} if resume_id else {}

        def start(mode: str) -> WandbLogger:
            logger = WandbLogger(project=run.logger.project, group=run.logger.group or group, tags=run_tags(run),
                                 save_dir=str(run_dir), mode=mode, settings=settings, config=config, **resume)
            logger._wandb_init.pop("anonymous", None)  # Lightning passes None, which W&B warns has no effect
            logger.experiment  # start now, so a failure to reach W&B falls back here and not mid-run
            return logger

        try:
            wandb_logger = start(mode)
        except Exception as error:  # any failure of the service: keep training, offline
            log.warning("W&B %s start failed (%s); logging offline to %s", mode, error, run_dir / "wandb")
            wandb_logger = start("offline")
        loggers.append(wandb_logger)
    return loggers
