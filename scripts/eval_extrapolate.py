"""Measure length extrapolation: python scripts/eval_extrapolate.py ckpt=<checkpoint, run or multirun folder>."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minillm.cli import register_configs
from minillm.console import run_script


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from minillm.console import OutputFolder, Stopped, fail

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    output = OutputFolder(out_dir, worth_keeping=lambda: (out_dir / "report.md").is_file())
    try:
        with output:  # held while it runs, taken before anything is written; a failure leaves it as it was
            from minillm.eval.run import evaluate  # here, not above: a refused command line loads no Lightning

            files = evaluate(cfg, out_dir)
    except (ValueError, OSError, Stopped) as error:  # bad checkpoint, config, length, folder, a signal: named
        fail(error, output)
    print(open(files["markdown"]).read())
    print(f"results in {out_dir}", flush=True)  # flushed now: a sweep's worker may be stopped with its buffer unwritten


if __name__ == "__main__":
    from minillm.help import answer_help

    answer_help("eval", sys.argv[1:])  # before the schemas, which import torch: help needs none
    register_configs()
    run_script(main)
