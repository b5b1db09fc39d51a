"""Config -> objects -> Trainer: the one place that touches Hydra and Lightning's wiring at run time."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from omegaconf import DictConfig, OmegaConf

from minillm.console import (
    Stopped,
    interrupt_at_step_end,
    quiet_libraries,
    received_signal,
    shares_console,
    signals_received,
)
from minillm.files import check_writable, write_atomic
from minillm.precision import resolve as resolve_precision
from minillm.registry import ConfigError
from minillm.runs import RunFolder
from minillm.train.config import RunConfig, TrainerConfig
from minillm.train.loggers import make_loggers
from minillm.train.resume import configure
from minillm.train.task import LanguageModelTask, NonFiniteLossError

log = logging.getLogger("minillm")


def load_data(run: RunConfig):
    """The run's data module (text or a synthetic task), set up for fitting; any failure to read the data names
    its setting."""
    from minillm.data.corpus import DataError
    from minillm.data.modules import data_module

    data = data_module(run.data, run.tokenizer, seq_len=run.model.context_length, seed=run.seed)
    try:
        data.prepare_data()
        data.setup("fit")
    except DataError:  # names its setting (data.*, tokenizer.path) already
        raise
    except ValueError as error:  # any other layer's failure: name the dataset
        raise ValueError(f"data.path={run.data.path!r}: {error}") from error
    return data


def stopped(signum: int, folder: RunFolder, step: Optional[int]) -> Stopped:
    """The Stopped a signal ends training with, saying what was kept: the last checkpoint and how to resume."""
    import torch

    name = signal.Signals(signum).name
    when = f"stopped by {name}" + (f" at step {step}" if step is not None else " before training started")
    if not folder.last_checkpoint.is_file():
        return Stopped(signum, f"{when}; no checkpoint was written, so nothing is kept")
    try:  # the step alone, memory-mapped: a scheduler's grace period is short
        saved = f" (step {torch.load(folder.last_checkpoint, mmap=True, weights_only=True)['global_step']})"
    except Exception:  # a checkpoint that does not load is named by the resume that tries it
        saved = ""
    return Stopped(signum, f"{when}; the run's last checkpoint is {folder.last_checkpoint}{saved}: resume with "
                           f"hydra.run.dir={folder.path} ckpt_path=last")


def train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train one model as `cfg` says; everything it writes goes under run_dir. Returns the summary.

    overrides: the command line's (Hydra's overrides.task), which a resume checks against the run's settings.
    A stop signal raises Stopped saying where the run can resume."""
    progress: dict[str, int] = {}  # the step reached, once training runs
    try:
        return _train(cfg, run_dir, overrides, progress)
    except Stopped as stop:
        raise stopped(stop.signum, RunFolder(run_dir), progress.get("step")) from None


def _train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str], progress: dict[str, int]) -> dict[str, Any]:
    started = time.time()
    if not cfg.get("verbose", False):
        quiet_libraries()
    check_writable(run_dir)
    folder = RunFolder(run_dir)
    folder.refuse_links("hydra.run.dir", "a run writes only its own folder")  # before anything is written
    run, resolved, resume = configure(cfg, run_dir, overrides)
    if resume is not None and resume.step >= run.trainer.max_steps:  # nothing to train: the run's files stay
        return {**folder.summary_values(), "finished": True, "steps": resume.step, "max_steps": run.trainer.max_steps}
    precision, precision_reason = resolve_precision(run.trainer.precision, _accelerator_device(run.trainer.accelerator))
    try:  # before the data: a device that is not there fails at once
        check_launch(L.Trainer(**trainer_kwargs(run, run_dir, precision), logger=False))
    except Exception as error:  # Lightning's MisconfigurationException and friends, one line naming the devices
        raise ConfigError(f"trainer.accelerator={run.trainer.accelerator!r} with trainer.devices="
                          f"{run.trainer.devices!r} and trainer.strategy={run.trainer.strategy!r}: "
                          f"{str(error).splitlines()[0]}") from error
    L.seed_everything(run.seed, workers=True, verbose=False)
    source = None
    if resume is None and run.init_from is not None:  # a fine-tuning: the source's shape, encoding, tokenizer
        from minillm.train.finetune import ImportedSource, from_source, load_source

        log.info("starting from init_from=%s", run.init_from)
        source = load_source(run.init_from)  # an imported model: its weights held from here (one float32 copy)
        run = from_source(run, source, overrides, folder.tokenizer)
        if isinstance(source, ImportedSource):  # its own tokenizer becomes the run's, read by the data from there
            write_atomic(folder.tokenizer, source.tokenizer_json())
    log.info("%s %s: %d steps of %d × %d tokens, in %s", "resuming" if resume else "training", run.model.label,
             run.trainer.max_steps, run.data.batch_size, run.model.context_length, run_dir)
    log.info("precision %s (%s)", precision, precision_reason)
    data = load_data(run)
    if run.init_from is None:
        run.model = dataclasses.replace(run.model, vocab_size=data.vocab_size)  # the tokenizer decides
    elif data.vocab_size > run.model.vocab_size:
        # A fine-tuning's vocabulary is its source's: an imported embedding may have rows past its tokenizer (Qwen2:
        # 151,936 rows for 151,665 tokens, and so do the runs fine-tuned from it), none of which the data asks for
        raise ConfigError(f"init_from: {run.tokenizer.path} has {data.vocab_size} tokens, the model of "
                          f"init_from={run.init_from} {run.model.vocab_size}: the tokenizer is not the model's")
    if resume is None:
        resolved = OmegaConf.to_container(OmegaConf.structured(run))
        data.save_tokenizer(folder.tokenizer)
    else:
        resume.check_model(run.model)
        if not folder.tokenizer.is_file():  # continued in another folder: it gets the tokenizer too
            data.save_tokenizer(folder.tokenizer)
    write_atomic(folder.config, OmegaConf.to_yaml(resolved))

    task = LanguageModelTask(run.model.to_dict(), dataclasses.asdict(run.optim), compile=run.trainer.compile,
                             peak_flops=run.trainer.peak_flops, max_bad_steps=run.trainer.max_bad_steps,
                             positions=dataclasses.asdict(run.sampler), seed=run.seed,
                             lora=dataclasses.asdict(run.lora) if run.lora.enabled else None)
    origin = {}
    if source is not None:  # before fit: LoRA's adapters (the task's configure_model) go on the loaded weights
        from minillm.train.finetune import load_weights

        load_weights(task.model, source)  # the source lets go of its copy
        origin = {"init_from_source": source.record()}
        write_atomic(folder.init_from, json.dumps(origin["init_from_source"], indent=2))  # before any step
    elif run.init_from is not None:  # resumed: the source as recorded, never imported again
        recorded = folder.source_record() or RunFolder.of_checkpoint(resume.checkpoint).source_record()
        if recorded is not None:
            origin = {"init_from_source": recorded}
            if not folder.init_from.is_file():  # continued in another folder: it records its source too
                write_atomic(folder.init_from, json.dumps(recorded, indent=2))
    resume_id = folder.wandb_run_id() if resume is not None else None  # the same W&B run, not a second one
    group = source.group() if source is not None else None
    used = {"precision_used": precision, "precision_reason": precision_reason}
    # A new run starts metrics.csv afresh (step 0 on), whatever a run killed before its first checkpoint left.
    loggers = make_loggers(run, run_dir, {**resolved, "data_fingerprint": data.fingerprint, **used, **origin}, resume_id,
                           resume.step if resume is not None else 0, group=group)
    # Built afresh: a strategy object (FSDP's) belongs to the one Trainer it was given to.
    trainer = L.Trainer(**trainer_kwargs(run, run_dir, precision), logger=loggers or False)
    earlier = signals_received()  # a signal before this fit (another run in the same process) is not this run's
    try:
        with interrupt_at_step_end(lambda: setattr(trainer, "should_stop", True)):
            trainer.fit(task, datamodule=data, ckpt_path=resume.checkpoint if resume is not None else None)
        if received_signal(earlier) is not None:  # Ctrl-C: fit ended at the step boundary it asked for
            raise Stopped(received_signal(earlier))
    except (SystemExit, Stopped) as stop:  # Lightning ends fit on SIGTERM with SIGTERMException (a SystemExit, 0)
        signum = stop.signum if isinstance(stop, Stopped) else received_signal(earlier)
        if signum is None:
            raise
        progress["step"] = trainer.global_step
        raise Stopped(signum) from None
    except NonFiniteLossError as error:  # say where to resume from: the checkpoints after a blow-up hold inf
        from minillm.train.checkpoints import last_good_checkpoint

        good = last_good_checkpoint(folder.checkpoints)
        where = (f"the last good checkpoint is {good[0]} (step {good[1]}); resume from it with "
                 f"ckpt_path={good[0]} and, e.g., a lower optim.lr" if good else
                 "no checkpoint with finite weights was written before it")
        raise NonFiniteLossError(f"{error}; {where}", step=error.step) from error
    if task.replica_spread:
        log.warning("the %d DDP replicas ended with different weights (largest difference of a parameter sum: "
                    "%g); the checkpoints hold rank 0's", trainer.world_size, task.replica_spread)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint = trainer.checkpoint_callback
    summary = {
        "run_dir": str(run_dir),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * run.data.batch_size * run.model.context_length * trainer.world_size,
        **task.parameter_counts(),  # parameters; trainable of total (the adapters alone under LoRA)
        "val_loss": metrics.get("val/loss"),
        "val_ppl": metrics.get("val/ppl"),
        "val_exact_match": metrics.get("val/exact_match"),  # synthetic tasks only
        "best_val_loss": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": checkpoint.best_model_path or None,
        "last_checkpoint": str(folder.last_checkpoint),
        "bad_steps": task.bad_steps,
        "world_size": trainer.world_size,
        "replica_spread": task.replica_spread,  # 0.0: every DDP rank ended with the same weights
        "wall_seconds": round(time.time() - started, 1),
        "data_fingerprint": data.fingerprint,
        "precision": precision,
        "precision_reason": precision_reason,
        **origin,
    }
    if trainer.is_global_zero:
        write_atomic(folder.summary, json.dumps(summary, indent=2, default=str))
    for logger in loggers:
        logger.finalize("success")
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # W&B writes its summary and config files only when the run ends
    if trainer.is_global_zero and folder.metrics.is_file():  # complete only once the CSV logger has finalised
        from minillm.train.curve import training_curve

        try:
            training_curve(folder.metrics, folder.curve_plot, data.fingerprint["tokens"]["unigram_entropy_nats"])
        except ValueError as error:  # a run too short to validate after a logged step: nothing to draw
            log.warning("no val_loss.png: %s", error)
    return summary


def trainer_kwargs(run: RunConfig, run_dir: Path, precision: str) -> dict[str, Any]:
    """Lightning Trainer's arguments for the run; `precision` is the resolved one (minillm.precision.resolve)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minillm.train.checkpoints import atomic_checkpoint_io
    from minillm.train.progress import progress_callbacks

    t = run.trainer
    folder = RunFolder(run_dir)
    best = ModelCheckpoint(dirpath=folder.checkpoints, filename=RunFolder.BEST, monitor="val/loss", mode="min",
                           save_top_k=1, save_last=True, auto_insert_metric_name=False,
                           enable_version_counter=False)
    # Both write last.ckpt, so it is always the newest save (best alone rewrites it only when val/loss improves).
    periodic = ModelCheckpoint(dirpath=folder.checkpoints, filename=RunFolder.STEP,
                               every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=-1, save_last=True,
                               auto_insert_metric_name=False, enable_version_counter=False)
    for callback in (best, periodic):
        callback.CHECKPOINT_NAME_LAST = RunFolder.LAST  # Lightning's default, named by the layout
    sharded = t.strategy == "fsdp"
    # Under FSDP the gradients' norm is clipped by ShardedGradientClipping (Lightning's FSDP precision refuses to)
    clipping = [ShardedGradientClipping(t.gradient_clip_val)] if sharded and t.gradient_clip_val else []
    return dict(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                strategy=fsdp_strategy(t) if sharded else t.strategy, precision=precision, max_steps=t.max_steps,
                val_check_interval=min(t.val_check_interval, t.max_steps),  # a short run still validates once
                check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
                log_every_n_steps=t.log_every_n_steps,
                gradient_clip_val=None if sharded else t.gradient_clip_val or None,
                callbacks=[best, periodic, *clipping, *progress_callbacks(lines=shares_console(), name=run_dir.name)],
                plugins=[atomic_checkpoint_io()], default_root_dir=str(run_dir),
                enable_model_summary=False)


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a Trainer whose devices and nodes are not the processes an outside launcher started (srun's tasks per
    node and nodes, torchrun's world): Lightning checks that only when it starts the processes itself, and a
    mismatch would give ranks past the data's replicas (rank 3 of 2) or a device index past the node's."""
    environment = getattr(trainer.strategy, "cluster_environment", None)  # none for a single device
    if environment is not None:
        environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)


def fsdp_strategy(trainer: TrainerConfig):
    """Lightning's FSDPStrategy (fully sharded data parallel, arXiv:2304.11277) for trainer=fsdp: each transformer
    Block one FSDP unit (its weights gathered for its forward and backward, freed after), checkpoints as full
    state dicts (one file with the model's own parameter names, which resume, evaluation and export read as any
    run's), and no casting of FSDP's own: the run's precision acts as under DDP (bf16-mixed is autocast over
    float32 weights, gradients reduced in float32), so a sharded run computes what a replicated one does."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from minillm.model.transformer import Block

    return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=trainer.sharding, state_dict_type="full",
                        activation_checkpointing_policy={Block} if trainer.activation_checkpointing else None,
                        mixed_precision=MixedPrecision())


class ShardedGradientClipping(L.Callback):
    """Clips the gradients by their global norm under FSDP, where each rank holds a shard of them: the root
    FSDP module's clip_grad_norm_ reduces the shards' norms across ranks first (torch.nn.utils.clip_grad_norm_
    on one rank's shard would clip by a part of the norm, and Lightning's FSDP precision refuses to clip)."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def _accelerator_device(accelerator: str):
    """The torch device a Lightning accelerator trains on (auto: a GPU if there is one)."""
    import torch

    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device({"gpu": "cuda"}.get(accelerator, accelerator))
