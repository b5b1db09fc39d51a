"""Run folders and checkpoints: find them, load them safely, rebuild the model they hold."""

from __future__ import annotations

import glob
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from minillm.model.config import ModelConfig
from minillm.model.transformer import Transformer
from minillm.registry import ConfigError


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


def _natural_key(path: Path) -> list:
    """'2_rope=alibi' before '10_rope=xpos': Hydra numbers multirun jobs without padding."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def find_runs(path: str | Path) -> list[Run]:
    """A .ckpt file, a run folder, or a folder of run folders (a multirun, one level deep) -> the runs in it;
    a glob pattern (`sweep/*rope-alibi__*`) -> the runs of every path it matches, in natural order.
    A run folder's checkpoint is checkpoints/best.ckpt, else checkpoints/last.ckpt."""
    if any(char in str(path) for char in "*?[") and not Path(path).expanduser().exists():
        matches = sorted(glob.glob(str(Path(path).expanduser())), key=lambda p: _natural_key(Path(p)))
        if not matches:
            raise CheckpointError(f"ckpt: nothing matches {path}")
        return [run for match in matches for run in find_runs(match)]
    path = Path(path).expanduser()
    if path.is_file():
        folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return [Run(path, folder)]
    if not path.is_dir():
        raise CheckpointError(f"ckpt: {path} does not exist")
    if (checkpoint := _checkpoint_in(path)) is not None:
        return [Run(checkpoint, path)]
    runs = [Run(c, sub) for sub in sorted((p for p in path.iterdir() if p.is_dir()), key=_natural_key)
            if (c := _checkpoint_in(sub)) is not None]
    if not runs:
        raise CheckpointError(f"ckpt: no checkpoints/best.ckpt or checkpoints/last.ckpt in {path} "
                              f"or in the folders inside it")
    return runs


def load_failure(error: Exception) -> str:
    """One line on why loading failed (torch.load's own messages run to a page)."""
    text = str(error)
    if (refused := re.search(r"Unsupported global: GLOBAL (\S+)", text)) is not None:
        return f"it holds a Python object that weights_only loading will not build: {refused.group(1)}"
    if "Weights only load failed" in text:
        operand = re.search(r"Unsupported operand \d+", text)
        return "not a pickle the safe unpickler can read" + (f": {operand.group(0)}" if operand else "")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = first.split(". ")[0]  # miniz and friends add paragraphs of advice after the first sentence
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a checkpoint someone hands you cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling foreign bytes can raise nearly anything (KeyError, EOFError, ...)
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a PyTorch checkpoint "
                              f"({load_failure(error)})") from error
    hyper_parameters = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hyper_parameters, dict) or "model" not in hyper_parameters \
            or not isinstance(checkpoint.get("state_dict"), dict):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} was not written by minillm's training (expected state_dict and "
                              f"hyper_parameters.model; found {found})")
    return checkpoint


def checkpoint_model_config(checkpoint: dict, path: str | Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(checkpoint["hyper_parameters"]["model"])
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid model config: {load_failure(error)}") from error


def run_model_config(run: Run) -> ModelConfig:
    """The model config a run's checkpoint was trained with (the checks an evaluation makes before measuring)."""
    return checkpoint_model_config(load_checkpoint(run.checkpoint), run.checkpoint)


def load_model(path: str | Path) -> Transformer:
    """Rebuild the Transformer stored in a training checkpoint, in eval mode, on the CPU."""
    checkpoint = load_checkpoint(path)
    cfg = checkpoint_model_config(checkpoint, path)
    try:
        model = Transformer(cfg)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid model config: {load_failure(error)}") from error
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # "Error(s) in loading state_dict ...", then one line per problem
        problems = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise CheckpointError(f"checkpoint {path}: the weights do not fit the model its config describes "
                              f"({problems[:400] or load_failure(error)})") from error
    return model.eval()


def check_writable(folder: Path) -> None:
    """Raise, naming the folder, unless files can be written in it (before any work is done)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"hydra.run.dir={str(folder)!r}: the output folder cannot be written "
                          f"({error.strerror or error})") from error
