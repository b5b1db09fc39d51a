"""Train one model (or, with -m, a sweep of them): python scripts/train.py rope=xpos trainer.max_steps=500."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minillm.cli import register_configs
from minillm.console import check_overrides

register_configs(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from minillm.console import fail, rank_zero
    from minillm.train.run import train  # here, not above: --help needs no Lightning

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        summary = train(cfg, run_dir, hydra_cfg.overrides.task)
    except (ValueError, OSError) as error:  # bad config or data, NaN loss, corrupt checkpoint, full disk: named
        fail(error, run_dir)
    if not rank_zero():  # under DDP every rank runs this script; one result line is enough
        return
    if summary.get("finished"):
        print(f"the run in {run_dir} has already trained {summary['steps']} steps (trainer.max_steps="
              f"{summary['max_steps']}); nothing was changed: raise trainer.max_steps to train on")
        return
    loss = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    print(f"val/loss {loss} after {summary['tokens']:,} tokens; results in {run_dir}")


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
