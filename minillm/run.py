"""Config -> objects -> Trainer: the one place that touches Hydra and Lightning's wiring at run time."""

from __future__ import annotations

import dataclasses
import json
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minillm.files import write_atomic
from minillm.config import RunConfig

from minillm.task import LanguageModelTask, NonFiniteLossError

log = logging.getLogger("minillm")


class ConfigError(ValueError):
    """A configuration that composed but does not make sense; the message names the setting."""


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Hydra's tree -> the validated dataclasses (each __post_init__ checks its own fields)."""
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:  # our ValueError may arrive wrapped; unwrap it for a clean message
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(str(error.__cause__).splitlines()[0]) from error
        # OmegaConf's own (e.g. "Interpolation key 'x' not found") names the setting on a later line: lead with it.
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key}: {str(error).splitlines()[0]}" if key else str(error).splitlines()[0]) from error
    except ValueError as error:  # a dataclass's __post_init__ check, raised as is: it names the setting
        raise ConfigError(str(error).splitlines()[0]) from error


def run_tags(run: RunConfig) -> list[str]:
    rope, scaling = run.rope, run.rope_scaling
    tags = [f"rope={rope.variant}", f"scaling={scaling.type}"]
    if rope.is_rotary:
        tags += [f"theta={rope.theta:g}", f"xpos={rope.xpos_scale_base or 'off'}"]
    return tags + list(run.logger.tags)


def wandb_mode(requested: str) -> str:
    """auto: online only with credentials (an API key or a netrc entry), so a laptop never waits on a login."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def _appending_csv_logger(run_dir: Path):
    """Lightning's CSVLogger writing run_dir/metrics.csv, except that a resumed run appends to the rows
    it already has instead of deleting them (the stock writer starts the file afresh)."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if os.path.isfile(self.metrics_file_path):
                with open(self.metrics_file_path, newline="") as f:
                    self.metrics_keys = next(csv.reader(f), [])

    class AppendingCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self) -> ExperimentWriter:
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=str(run_dir), name="", version="")


def make_loggers(run: RunConfig, run_dir: Path, config: dict) -> list:
    from lightning.pytorch.loggers import WandbLogger

    if run.logger.kind == "none":
        return []
    loggers: list = [_appending_csv_logger(run_dir)]  # run_dir/metrics.csv
    if run.logger.kind == "wandb":
        import wandb

        mode = wandb_mode(run.logger.mode)
        settings = wandb.Settings(init_timeout=60, silent=True)
        wandb_logger = WandbLogger(project=run.logger.project, group=run.logger.group, tags=run_tags(run),
                                   save_dir=str(run_dir), mode=mode, settings=settings, config=config)
        try:
            wandb_logger.experiment  # start now, so a failure to reach W&B falls back here and not mid-run
        except Exception as error:  # any failure of the service: keep training, offline
            log.warning("W&B %s start failed (%s); logging offline to %s", mode, error, run_dir / "wandb")
            wandb_logger = WandbLogger(project=run.logger.project, group=run.logger.group, tags=run_tags(run),
                                       save_dir=str(run_dir), mode="offline", config=config)
        loggers.append(wandb_logger)
    return loggers


def resolve_checkpoint(ckpt_path: Optional[str], run_dir: Path) -> Optional[str]:
    """'last' -> this run folder's last checkpoint; a run folder -> its last; a file -> itself.
    The file must load: a corrupt one fails here, naming the newest checkpoint beside it that does load."""
    from minillm.checkpoint import CheckpointError, last_good_checkpoint, load_checkpoint

    if ckpt_path is None:
        return None
    path = run_dir if ckpt_path == "last" else Path(ckpt_path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise ConfigError(f"ckpt_path: no checkpoint at {path} (to resume a run, start it again in its folder: "
                          f"hydra.run.dir=<run folder> ckpt_path=last)")
    try:
        load_checkpoint(path)
    except CheckpointError as error:
        good = last_good_checkpoint(path.parent, skip=path)
        hint = (f"the newest checkpoint that loads is {good[0]} (step {good[1]}): resume from it with "
                f"ckpt_path={good[0]}" if good else f"no other checkpoint in {path.parent} loads")
        raise CheckpointError(f"ckpt_path: {error}; {hint}") from error
    return str(path)


def load_data(run: RunConfig):
    """The run's TextDataModule, set up for fitting; any failure to read the data names data.path."""
    from minillm.data import TextDataModule

    data = TextDataModule(run.data, run.tokenizer, seq_len=run.model.context_length, seed=run.seed)
    try:
        data.prepare_data()
        data.setup("fit")
    except ValueError as error:  # every data failure names the dataset, whichever layer noticed it
        if isinstance(error, UnicodeDecodeError):  # pyarrow checks UTF-8 only when a string is read
            detail = (f"data.text_field={run.data.text_field!r} holds bytes that are not UTF-8 text "
                      f"({error.reason} at byte {error.start})")
        elif f"data.path={run.data.path!r}" in str(error):
            raise
        else:
            detail = str(error)
        raise ValueError(f"data.path={run.data.path!r}: {detail}") from error
    return data


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train one model as `cfg` says; everything it writes goes under run_dir. Returns the summary."""
    started = time.time()
    run = to_run_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_checkpoint(run.ckpt_path, run_dir)  # before the data: a wrong path fails at once
    L.seed_everything(run.seed, workers=True)

    data = load_data(run)
    run.model = dataclasses.replace(run.model, vocab_size=data.vocab_size)  # the tokenizer decides
    data.save_tokenizer(run_dir)
    resolved = OmegaConf.to_container(OmegaConf.structured(run))
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(resolved))

    task = LanguageModelTask(run.model.to_dict(), dataclasses.asdict(run.optim), compile=run.trainer.compile,
                             peak_flops=run.trainer.peak_flops, max_bad_steps=run.trainer.max_bad_steps)
    loggers = make_loggers(run, run_dir, {**resolved, "data_fingerprint": data.fingerprint})
    trainer = L.Trainer(**trainer_kwargs(run, run_dir), logger=loggers or False)
    try:
        trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    except NonFiniteLossError as error:  # say where to resume from: the checkpoints after a blow-up hold inf
        from minillm.checkpoint import last_good_checkpoint

        good = last_good_checkpoint(run_dir / "checkpoints")
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
        "parameters": task.model.num_params(exclude_embeddings=False),
        "val_loss": metrics.get("val/loss"),
        "val_ppl": metrics.get("val/ppl"),
        "best_val_loss": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": checkpoint.best_model_path or None,
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "bad_steps": task.bad_steps,
        "world_size": trainer.world_size,
        "replica_spread": task.replica_spread,  # 0.0: every DDP rank ended with the same weights
        "wall_seconds": round(time.time() - started, 1),
        "data_fingerprint": data.fingerprint,
    }
    if trainer.is_global_zero:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    for logger in loggers:
        logger.finalize("success")
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # W&B writes its summary and config files only when the run ends
    metrics_csv = run_dir / "metrics.csv"  # complete only once the CSV logger has finalised
    if trainer.is_global_zero and metrics_csv.is_file():
        from minillm.report import training_curve

        try:
            training_curve(metrics_csv, run_dir / "val_loss.png", data.fingerprint["tokens"]["unigram_entropy_nats"])
        except ValueError as error:  # a run too short to validate after a logged step: nothing to draw
            log.warning("no val_loss.png: %s", error)
    return summary


def trainer_kwargs(run: RunConfig, run_dir: Path) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minillm.checkpoint import atomic_checkpoint_io

    t = run.trainer
    best = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_top_k=1, save_last=True, auto_insert_metric_name=False,
                           enable_version_counter=False)
    # Both write last.ckpt, so it is always the newest save (best alone rewrites it only when val/loss improves).
    periodic = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}",
                               every_n_train_steps=t.checkpoint_every_n_steps, save_top_k=-1, save_last=True,
                               auto_insert_metric_name=False, enable_version_counter=False)
    return dict(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                precision=t.precision, max_steps=t.max_steps,
                val_check_interval=min(t.val_check_interval, t.max_steps),  # a short run still validates once
                check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
                log_every_n_steps=t.log_every_n_steps, gradient_clip_val=t.gradient_clip_val or None,
                callbacks=[best, periodic], plugins=[atomic_checkpoint_io()], default_root_dir=str(run_dir),
                enable_model_summary=False)


def _device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def model_label(rope, scaling) -> str:
    """A short name for what a model was trained with: 'complex θ=1e+04', 'xpos', 'alibi', ..."""
    if not rope.is_rotary:
        return rope.variant
    label = f"{rope.variant} θ={rope.theta:g}"
    if rope.xpos_scale_base is not None:
        label = f"xpos({rope.variant}) γ={rope.xpos_scale_base:g}"
    if rope.rotary_dim is not None:
        label += f" r={rope.rotary_dim}"
    if scaling.type != "none":
        label += f" +{scaling.type}×{scaling.factor:g}"
    return label


def _passkey_rows(model, tokenizer, filler, lengths: list[int], methods: list[str], config, meta: dict) -> list[dict]:
    """Passkey retrieval at each (scaling, length, depth); a length too short for the prompt is skipped."""
    import numpy as np

    from minillm import evaluation as ev

    rng = np.random.default_rng(config.seed)
    trained = model.cfg.context_length
    rows, skipped = [], set()
    for method in methods:
        for length in lengths:
            if length in skipped:
                continue
            factor = ev.scaling_factor(method, length, trained, config.scaling_factor)
            with ev.scaled_rope(model, method, factor):
                for depth in config.passkey_depths:
                    try:
                        prompts = [ev.passkey_prompt(tokenizer, filler, length, depth, rng)
                                   for _ in range(config.passkey_trials)]
                    except ev.PasskeyDoesNotFit as error:
                        log.warning("passkey at length %d skipped for %s: %s", length, meta["run"], error)
                        skipped.add(length)
                        break
                    trials = [ev.passkey_trial(model, prompt) for prompt in prompts]
                    rows.append({**meta, "method": method, "length": length, "depth": depth, "trials": len(trials),
                                 "exact_match": sum(t[0] for t in trials) / len(trials),
                                 "key_logprob": sum(t[1] for t in trials) / len(trials)})
    return rows


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Every (checkpoint × scaling × attention × length) measurement, written as one report in out_dir."""
    import numpy as np
    from tqdm.auto import tqdm

    from minillm import evaluation as ev
    from minillm.checkpoint import find_runs, load_model
    from minillm.config import DataConfig, EvalConfig, TokenizerConfig
    from minillm.data import TextDataModule
    from minillm.report import log_to_wandb, write_report

    config: EvalConfig = to_run_config(cfg)
    device = _device(config.device)
    runs = [run for path in config.checkpoints for run in find_runs(path)]
    records, passkey, theory = [], [], []
    for run in runs:
        model = load_model(run.checkpoint).to(device)
        trained = model.cfg.context_length
        if not run.config.is_file() or not run.tokenizer.is_file():
            raise ConfigError(f"ckpt: {run.folder} lacks config.yaml or tokenizer.json (not a training run folder)")
        run_cfg = OmegaConf.load(run.config)
        data = TextDataModule(DataConfig(**run_cfg.data), TokenizerConfig(path=str(run.tokenizer)),
                              seq_len=trained, seed=int(run_cfg.seed))
        data.setup("validate")
        lengths = sorted(config.lengths or [trained * m for m in (1, 2, 4, 8, 16)])
        documents = data.long_documents(min_tokens=min(lengths) + 1)
        longest = max((len(d) for d in documents), default=0) - 1
        usable = [n for n in lengths if n <= longest]
        for n in sorted(set(lengths) - set(usable)):
            log.warning("length %d skipped for %s: the longest validation document has %d tokens", n, run.name, longest + 1)
        if not usable:
            raise ConfigError(f"lengths: none of {lengths} fits the validation documents of {run.name} "
                              f"(longest: {longest + 1} tokens)")
        tokens = ev.evaluation_tokens(documents, max(usable), config.max_documents)
        label = model_label(model.cfg.rope, model.cfg.rope_scaling)
        meta = {"model": label, "run": run.name, "seed": int(run_cfg.seed), "trained_length": trained,
                "variant": model.cfg.rope.variant, "checkpoint": str(run.checkpoint)}
        rotary = model.cfg.rope.is_rotary
        methods = config.scalings if rotary else ["none"]
        plan = [(m, a, n) for m in methods for a in config.attention for n in usable]
        for method, attention, length in tqdm(plan, desc=f"eval {run.name}", unit="length"):
            row = {**meta, "method": method, "attention": attention, "stride": config.stride}
            if model.cfg.rope.variant == "learned" and length > trained:
                records.append({**row, "length": length, "applicable": False, "ppl": None, "loss": None,
                                "by_position": [], "note": f"learned positions stop at {trained}"})
                continue
            factor = ev.scaling_factor(method, length, trained, config.scaling_factor)
            with ev.scaled_rope(model, method, factor):
                result = ev.perplexity_at_length(model, tokens, length, attention=attention, stride=config.stride,
                                                 batch_size=config.batch_size, buckets=config.buckets)
            records.append({**row, "factor": factor, "applicable": True, **result})
        if config.passkey_trials:
            filler = np.concatenate(documents)
            lengths_for_passkey = [n for n in usable if model.cfg.rope.variant != "learned" or n <= trained]
            passkey += _passkey_rows(model, data.tokenizer, filler, lengths_for_passkey, methods, config,
                                     {k: meta[k] for k in ("model", "run", "seed")})
        if rotary:
            rotary_dim = model.cfg.rope.rotary_dim or model.cfg.head_dim
            critical, bound = ev.critical_dimension(rotary_dim, model.cfg.rope.theta, trained)
            for length in usable:
                theory.append({"model": label, "run": run.name, "rotary_dim": rotary_dim, "theta": model.cfg.rope.theta,
                               "trained_length": trained, "critical_dim": critical, "extrapolation_bound": bound,
                               "length": length, "min_base": ev.minimum_base(rotary_dim, length),
                               "supported_length": ev.supported_length(rotary_dim, model.cfg.rope.theta, length)})
    header = (f"# Length extrapolation\n\nCheckpoints: {', '.join(config.checkpoints)}; device: {device}; "
              f"attention: {', '.join(config.attention)}; stride: {config.stride}.\n")
    files = write_report(records, passkey, theory, out_dir, header)
    if config.logger.kind == "wandb":
        groups = {OmegaConf.load(r.config).logger.get("group") for r in runs}
        log_to_wandb(records, passkey, out_dir, config.logger.project,
                     config.logger.group or (groups.pop() if len(groups) == 1 else None), wandb_mode(config.logger.mode),
                     theory=theory)
    return files
