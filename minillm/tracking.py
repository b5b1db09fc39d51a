"""Where metrics go: the logger settings and W&B's mode, shared by training and evaluation."""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from typing import Optional

from minillm.registry import choice


@dataclass
class LoggerConfig:
    """Where metrics go: W&B (offline without an API key), a CSV file, or nowhere but the run folder."""

    kind: str = "wandb"  # wandb | csv | none
    project: str = "minillm"  # the W&B project
    group: Optional[str] = None  # the W&B group; None: none (a fine-tuning: its source run's)
    tags: list[str] = field(default_factory=list)  # W&B tags beside those naming the encoding and its settings
    mode: str = "auto"  # auto: online with an API key, offline otherwise | online | offline | disabled

    def __post_init__(self) -> None:
        choice(self.kind, "logger.kind", ("wandb", "csv", "none"))
        choice(self.mode, "logger.mode", ("auto", "online", "offline", "disabled"))


def wandb_mode(requested: str) -> str:
    """auto: online only with credentials (an API key or a netrc entry), so a laptop never waits on a login."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"
