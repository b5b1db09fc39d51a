"""Measure length extrapolation: python scripts/eval_extrapolate.py ckpt=<checkpoint, run or multirun folder>."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minillm.config import register_configs
from minillm.run import evaluate

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        files = evaluate(cfg, out_dir)
    except (ValueError, FileNotFoundError) as error:  # bad checkpoint, config or length: the message names it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(open(files["markdown"]).read())
    print(f"results in {out_dir}")


if __name__ == "__main__":
    main()
