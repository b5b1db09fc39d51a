"""What a command shows and leaves behind: minillm's own lines, one line per failure, no empty run folders."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn


def quiet_libraries() -> None:
    """Only minillm's own lines on the console: the libraries' notices (devices, tips, deprecations, W&B's
    login advice) go unshown unless verbose=true. Their errors still surface, as exceptions."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="minillm")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch", "wandb", "datasets", "hydra",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:  # the hub's progress bars, and with them transformers' (GGUF dequantization, weight loading)
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


def fail(error: Exception, run_dir: Path) -> NoReturn:
    """A failed command: one line on stderr (and in the run folder's log), exit 2. A run folder the command
    made and left holding nothing but its log is removed instead, so failures leave no empty folders."""
    message = f"error: {error}"
    print(message, file=sys.stderr)
    logs = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    leftovers = [p for p in run_dir.iterdir() if p.suffix != ".log"] if run_dir.is_dir() else []
    if run_dir.is_dir() and not leftovers:
        for handler in logs:
            handler.close()
        try:
            for path in run_dir.glob("*.log"):
                path.unlink()
            run_dir.rmdir()
        except OSError:  # a folder that cannot be written cannot be removed either: stderr has the line
            pass
    else:
        record = logging.makeLogRecord({"name": "minillm", "levelname": "ERROR", "levelno": logging.ERROR,
                                        "msg": message})
        for handler in logs:
            try:
                handler.emit(record)
            except OSError:  # a folder that cannot be written: stderr has it
                pass
    sys.exit(2)


def check_overrides(argv: list[str]) -> None:
    """Refuse a malformed command-line override in one line that quotes it (exit 2), before Hydra composes:
    Hydra's own grammar error names the text it stopped at, not the override it sits in."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")]
    try:
        OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        message = str(error).removeprefix(f"LexerNoViableAltException: {error.override}")
        reason = message.strip().splitlines()[0] if message.strip() else ""
        if reason.startswith("^") or reason.startswith("See https"):  # the lexer's caret line: nothing to add
            reason = ""
        shown = error.override.encode("unicode_escape").decode("ascii")  # one line, whatever the value holds
        print(f"error: override '{shown}' does not parse" + (f": {reason}" if reason else ""), file=sys.stderr)
        sys.exit(2)
    for override in overrides:  # the encoding has one slot, the top-level groups; the model's copy is derived
        key = override.split("=", 1)[0].lstrip("+~")
        for group in ("rope", "rope_scaling"):
            if key == f"model.{group}" or key.startswith(f"model.{group}."):
                print(f"error: model.{group}: set the top-level {group} group instead (e.g. {group}.<field>=...)",
                      file=sys.stderr)
                sys.exit(2)


def rank_zero() -> bool:
    """Whether this process is rank 0 (the only one under DDP that reports)."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0
