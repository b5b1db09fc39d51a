"""Train one model (or, with -m, a sweep of them): python scripts/train.py rope=xpos trainer.max_steps=500."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minillm.cli import register_configs
from minillm.console import run_script


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from minillm.console import OutputFolder, Stopped, fail, rank_zero
    from minillm.runs import RunFolder
    from minillm.train.resume import has_checkpoint

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    output = OutputFolder(run_dir, worth_keeping=lambda: has_checkpoint(RunFolder(run_dir)))
    try:
        with output:  # held for the run's life, taken before anything is written (even a log line)
            from minillm.train.run import train  # here, not above: a refused command line loads no Lightning

            summary = train(cfg, run_dir, hydra_cfg.overrides.task)
    except (ValueError, OSError, Stopped) as error:  # bad config or data, NaN loss, full disk, a signal: named
        fail(error, output)
    if not rank_zero():  # under DDP every rank runs this script; one result line is enough
        return
    if summary.get("finished"):
        print(f"the run in {run_dir} has already trained {summary['steps']} steps (trainer.max_steps="
              f"{summary['max_steps']}); nothing was changed: raise trainer.max_steps to train on", flush=True)
        return
    loss = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    # flushed now: a sweep's joblib worker lives on after the job and may be stopped with its buffer unwritten
    print(f"val/loss {loss} after {summary['tokens']:,} tokens; results in {run_dir}", flush=True)


if __name__ == "__main__":
    from minillm.help import answer_help

    answer_help("train", sys.argv[1:])  # before the schemas, which import torch: help needs none
    register_configs()
    run_script(main)
