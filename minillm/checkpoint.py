"""Checkpoints and run folders: find them, load them safely, rebuild the model they hold."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from minillm.config import ModelConfig
from minillm.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or not one of ours; the message names the file."""


@dataclass
class Run:
    """A trained model on disk: its checkpoint and the folder with its config and tokenizer."""

    checkpoint: Path
    folder: Path

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def tokenizer(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def config(self) -> Path:
        return self.folder / "config.yaml"


def _checkpoint_in(folder: Path) -> Optional[Path]:
    """best.ckpt (lowest validation loss) when there is one, else last.ckpt."""
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / "checkpoints" / name).is_file():
            return folder / "checkpoints" / name
    return None


def find_runs(path: str | Path) -> list[Run]:
    """A .ckpt file, a run folder, or a folder of run folders (a multirun) -> the runs in it."""
    path = Path(path).expanduser()
    if path.is_file():
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return [Run(path, folder)]
    if not path.is_dir():
        raise CheckpointError(f"ckpt: {path} does not exist")
    if (checkpoint := _checkpoint_in(path)) is not None:
        return [Run(checkpoint, path)]
    runs = [Run(c, sub) for sub in sorted(p for p in path.iterdir() if p.is_dir())
            if (c := _checkpoint_in(sub)) is not None]
    if not runs:
        raise CheckpointError(f"ckpt: no checkpoints/best.ckpt or checkpoints/last.ckpt in {path} "
                              f"or in the folders inside it")
    return runs


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a checkpoint someone hands you cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({str(error).splitlines()[0]})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint \
            or "model" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"checkpoint {path} was not written by minillm (no hyper_parameters.model)")
    return checkpoint


def load_model(path: str | Path) -> Transformer:
    """Rebuild the Transformer stored in a training checkpoint, in eval mode, on the CPU."""
    checkpoint = load_checkpoint(path)
    try:
        model = Transformer(ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"]))
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        model.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} does not match its own model config: "
                              f"{str(error).splitlines()[0]}") from error
    return model.eval()
