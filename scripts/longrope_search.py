"""Search LongRoPE's rescale factors for one model: python scripts/longrope_search.py ckpt=<run folder, hf:, .gguf>."""

import shutil
import sys

import hydra
from omegaconf import DictConfig

from minillm.cli import register_configs
from minillm.console import run_script


@hydra.main(version_base="1.3", config_path="../conf", config_name="longrope_search")
def main(cfg: DictConfig) -> None:
    from minillm.console import Stopped, fail, quiet_libraries

    try:
        from minillm.eval.longrope_search import run_search
        from minillm.registry import to_run_config

        if not cfg.get("verbose", False):
            quiet_libraries()
        settings = to_run_config(cfg)
        out, result = run_search(settings)
    except (ValueError, OSError, Stopped) as error:  # bad model, setting, length, log: named in one line
        fail(error)
    seeds = ", ".join(f"{name} {value['ppl']:.4f}" for name, value in result["seeds"].items())
    print(f"best ppl {result['best']['ppl']:.4f} ({result['best']['origin']}, candidate {result['best']['index']}) "
          f"at {result['fitness_length']} tokens; seeds: {seeds}")
    print(f"factors in {out}", flush=True)


def answer_help(argv: list[str]) -> None:
    """-h / --help: the settings read from LongRopeSearchConfig's source (minillm.help: instant, no torch)."""
    if "-h" not in argv and "--help" not in argv:
        return
    from minillm.help import Page, config_class

    page = Page(min(max(shutil.get_terminal_size((100, 24)).columns, 80), 120), {"data": None})
    page.text(f"scripts/longrope_search.py: {__doc__.splitlines()[0]}")
    page.text()
    page.text("usage: python scripts/longrope_search.py ckpt=<model> [data=<option>] [key=value ...]")
    page.text()
    page.text("Settings (key=default [type] description):")
    page.fields(config_class("minillm.eval.longrope_search", "LongRopeSearchConfig"), "", 2)
    print("\n".join(page.lines))
    sys.exit(0)


if __name__ == "__main__":
    answer_help(sys.argv[1:])  # before the schemas, which import torch
    from hydra.core.config_store import ConfigStore

    from minillm.eval.longrope_search import LongRopeSearchConfig

    register_configs()
    ConfigStore.instance().store(name="longrope_search_schema", node=LongRopeSearchConfig)
    run_script(main)
