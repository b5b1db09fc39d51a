"""Train one model (or, with -m, a sweep of them): python scripts/train.py rope=xpos trainer.max_steps=500."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from minillm.config import register_configs
from minillm.run import train

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except (ValueError, OSError) as error:  # bad config or data, NaN loss, corrupt checkpoint, full disk: named
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if rank_zero_only.rank != 0:  # under DDP every rank runs this script; one result line is enough
        return
    loss = "n/a" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    print(f"val/loss {loss} after {summary['tokens']:,} tokens; results in {run_dir}")


if __name__ == "__main__":
    main()
