"""Checkpoints during training: written atomically, the last good one found after a blow-up."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from minillm.files import write_atomic
from minillm.runs import CheckpointError, RunFolder, load_checkpoint


def last_good_checkpoint(folder: Path, skip: Optional[Path] = None) -> Optional[tuple[Path, int]]:
    """The newest checkpoint in folder that loads and whose weights are all finite, with its step; None if none.
    Newest by modification time, so only the checkpoints from the newest to the good one are read."""
    good = _good_checkpoints(folder, skip)
    newest = next(good, None)
    if newest is not None and newest[0].stem == RunFolder.LAST:
        # last.ckpt repeats another save under a name the next save overwrites: name that stable copy instead.
        twin = next(good, None)
        if twin is not None and twin[1] == newest[1]:
            return twin
    return newest


def _good_checkpoints(folder: Path, skip: Optional[Path]):
    if not folder.is_dir():
        return
    for path in sorted((p for p in folder.glob("*.ckpt") if p != skip), key=lambda p: p.stat().st_mtime_ns,
                       reverse=True):
        try:
            checkpoint = load_checkpoint(path)  # refuses a checkpoint whose weights are not all finite
        except CheckpointError:
            continue
        yield path, int(checkpoint.get("global_step", -1))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder); the message names the file."""


def atomic_checkpoint_io():
    """Lightning's checkpoint writer, made atomic: the bytes go to a temporary file beside the target, are fsynced,
    then renamed over it. A kill or a full disk mid-write leaves the previous file whole, never a truncated one."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__} takes no storage_options")
            path = Path(path)
            # Serialised in memory first, as Lightning's own writer does: torch.save straight to a file turns a
            # full disk into "[enforce fail at inline_container.cc] unexpected pos"; f.write raises ENOSPC itself.
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            try:
                write_atomic(path, buffer.getbuffer(), per_process=False)  # rank 0 alone writes checkpoints
            except OSError as error:
                kept = f"; the previous {path.name} is unchanged" if path.is_file() else ""
                raise CheckpointWriteError(f"checkpoint {path} could not be written "
                                           f"({error.strerror or error}){kept}") from error

    return AtomicCheckpointIO()
