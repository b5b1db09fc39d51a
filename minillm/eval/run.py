"""Config -> evaluation -> report: what scripts/eval_extrapolate.py runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from minillm.console import Stopped, held_signals, quiet_libraries
from minillm.files import check_writable, replace_contents
from minillm.registry import ConfigError, to_run_config
from minillm.tracking import wandb_mode


def _device(requested: str):
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(requested, True)
    if not available:
        raise ConfigError(f"device={requested!r}: torch {torch.__version__} sees no {requested} device here; "
                          f"use device=cpu (or device=auto)")
    return torch.device(requested)


def _not_results(name: str) -> bool:
    """Entries of a results folder that are no results: its logs and hidden files (the lock, a staging folder)."""
    return name.startswith(".") or name.endswith(".log")


def check_results_folder(out_dir: Path, overwrite: bool) -> None:
    """Raise, naming the folder, where it holds results already and overwrite=true does not say to replace them
    (or where what it holds is not an evaluation's: overwrite replaces only those)."""
    present = sorted(p.name for p in out_dir.iterdir() if not _not_results(p.name)) if out_dir.is_dir() else []
    if not present:
        return
    shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
    if not overwrite:
        raise ConfigError(f"hydra.run.dir={str(out_dir)!r}: already holds results ({shown}); evaluate into another "
                          f"folder, or pass overwrite=true to replace them")
    foreign = [name for name in present if not _written_by_evaluations(out_dir / name)]
    if not {"report.md", "results.json"} & set(present) or foreign:
        raise ConfigError(f"hydra.run.dir={str(out_dir)!r}: holds files that are not an evaluation's results "
                          f"({', '.join(foreign[:4]) or shown}); overwrite=true replaces only an evaluation's")


def _written_by_evaluations(path: Path) -> bool:
    """Whether an evaluation writes entries like this one: report files (.md, .csv, .json, .png, not a run's own
    tokenizer.json, summary.json or init_from.json) and W&B's folder; a run's config.yaml, checkpoints/ or a
    user's other files are never replaced."""
    if path.is_dir() and not path.is_symlink():
        return path.name == "wandb"
    return path.suffix in (".md", ".csv", ".json", ".png") and path.name not in (
        "tokenizer.json", "summary.json", "init_from.json")


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Every (checkpoint × scaling × attention × length) measurement, written as one report in out_dir.

    The report is written into a staging folder inside out_dir and swapped in whole at the end, so that out_dir
    holds the old results or the new ones, never a mix, whatever stops the evaluation."""
    from minillm.eval import loop
    from minillm.eval.config import EvalConfig
    from minillm.eval.perplexity import PerplexityRecord
    from minillm.eval.report import write_report
    from minillm.eval.sources import model_sources

    if not cfg.get("verbose", False):
        quiet_libraries()
    check_writable(out_dir)
    config: EvalConfig = to_run_config(cfg)
    check_results_folder(out_dir, config.overwrite)
    staging = out_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # one a killed process of the same pid left
    staging.mkdir()
    try:
        device = _device(config.device)
        sources = model_sources(config)
        results = loop.evaluate(config, device, sources)
        windows = f"stride: {config.stride}" if config.stride is not None else "non-overlapping windows"
        windows = f"; {windows}" if results.of(PerplexityRecord) else ""  # windows of text only
        header = (f"# Length extrapolation\n\nModels: {', '.join(config.checkpoints)}; device: {device}; "
                  f"precision: {results.precision} ({results.precision_reason}); "
                  f"attention: {', '.join(config.attention)}{windows}.\n")
        staged = write_report(results, staging, header)
        with held_signals():
            replace_contents(out_dir, staging, spare=_not_results)
    except Stopped as stop:  # the staging folder is gone once swapped in: a signal held back until then
        written = "the results were written before it" if not staging.exists() else "no results were written"
        raise Stopped(stop.signum, f"{stop}; {written}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {key: out_dir / path.relative_to(staging) for key, path in staged.items()}
    if config.logger.kind == "wandb":
        from minillm.eval.wandb import log_to_wandb

        log_to_wandb(results, out_dir, config.logger.project, _wandb_group(config, sources),
                     wandb_mode(config.logger.mode))
    return files


def _wandb_group(config, sources: list) -> Optional[str]:
    """logger.group, else the one W&B group every training run evaluated logged to (imported models have none)."""
    from minillm.interop.pretrained import PretrainedSource

    if config.logger.group:
        return config.logger.group
    groups = {run.wandb_group for run in sources if not isinstance(run, PretrainedSource)}
    return groups.pop() if len(groups) == 1 else None
