"""Measure length extrapolation: python scripts/eval_extrapolate.py ckpt=<checkpoint, run or multirun folder>."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minillm.cli import register_configs
from minillm.console import check_overrides

register_configs(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from minillm.console import fail
    from minillm.eval.run import evaluate  # here, not above: --help needs no Lightning

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        files = evaluate(cfg, out_dir)
    except (ValueError, OSError) as error:  # bad checkpoint, config, length or folder: the message names it
        fail(error, out_dir)
    print(open(files["markdown"]).read())
    print(f"results in {out_dir}")


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
