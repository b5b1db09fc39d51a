"""Config -> evaluation -> report: what scripts/eval_extrapolate.py runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from minillm.console import quiet_libraries
from minillm.registry import ConfigError, to_run_config
from minillm.runs import check_writable
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


def evaluate(cfg: DictConfig, out_dir: Path) -> dict[str, Path]:
    """Every (checkpoint × scaling × attention × length) measurement, written as one report in out_dir."""
    from minillm.eval import loop
    from minillm.eval.config import EvalConfig
    from minillm.eval.perplexity import PerplexityRecord
    from minillm.eval.report import write_report
    from minillm.eval.sources import model_sources

    if not cfg.get("verbose", False):
        quiet_libraries()
    check_writable(out_dir)
    config: EvalConfig = to_run_config(cfg)
    device = _device(config.device)
    sources = model_sources(config)
    results = loop.evaluate(config, device, sources)
    stride = f"; stride: {config.stride}" if results.of(PerplexityRecord) else ""  # windows of text only
    header = (f"# Length extrapolation\n\nModels: {', '.join(config.checkpoints)}; device: {device}; "
              f"precision: {results.precision} ({results.precision_reason}); "
              f"attention: {', '.join(config.attention)}{stride}.\n")
    files = write_report(results, out_dir, header)
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
