"""Files written whole (a temporary file beside the target, fsynced, renamed over it, the folder fsynced), a
folder's contents replaced whole, the run folder's log file (never written through a symbolic link), and whether
a folder can be written at all."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

Payload = Union[str, bytes, memoryview, Callable[[BinaryIO], object]]


def write_atomic(path: Path, data: Payload, *, per_process: bool = True) -> None:
    """Write `data` (str as UTF-8, bytes, or a function that writes to the open binary file) to `path`,
    creating its folder if needed.

    Readers, kills and full disks see the old file or the new one, never part of either; on failure the
    temporary file is removed and the error raised. The temporary name has no suffix a reader would take
    for the real file. per_process=True (the default) gives each process its own temporary name, so that
    ranks writing one file at once never share one; a file with a single writer (checkpoints, written by
    rank 0) passes False, and its next write then replaces whatever a killed write left behind.
    """
    path = Path(path)
    owner = f".{socket.gethostname()}-{os.getpid()}" if per_process else ""
    tmp = path.with_name(f".{path.name}{owner}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)  # make the rename itself durable


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def replace_contents(folder: Path, staging: Path, spare: Callable[[str], bool]) -> None:
    """Make `folder` hold what `staging` (a folder inside it) holds, in place of its own entries; the entries
    whose name `spare` accepts (its log, its lock) stay. Old entries are moved aside, the new ones moved in, then
    the old removed (renames within one file system, no copies). Any failure on the way moves everything back:
    the folder holds the old set or the new, never a mix. Callers hold stop signals off meanwhile
    (minillm.console.held_signals)."""
    aside = folder / f".replaced-{os.getpid()}"
    moved_aside: list[str] = []
    moved_in: list[str] = []
    aside.mkdir()
    try:
        for entry in list(folder.iterdir()):
            if entry not in (staging, aside) and not spare(entry.name):
                os.replace(entry, aside / entry.name)
                moved_aside.append(entry.name)
        for entry in list(staging.iterdir()):
            os.replace(entry, folder / entry.name)
            moved_in.append(entry.name)
    except BaseException:
        for name in moved_in:
            os.replace(folder / name, staging / name)
        for name in moved_aside:
            os.replace(aside / name, folder / name)
        aside.rmdir()
        raise
    staging.rmdir()
    _fsync_folder(folder)
    shutil.rmtree(aside, ignore_errors=True)


class RunLog(logging.FileHandler):
    """The run folder's log file (Hydra's job log), opened at its first line. Where the folder cannot be
    written the lines are dropped instead of every logging call raising; minillm then stops, naming it. A log
    that is a symbolic link is not opened (its lines are dropped): a run writes its folder, not where a link
    in it points."""

    def __init__(self, filename: str, mode: str = "a", encoding: Optional[str] = None):
        super().__init__(filename, mode, encoding, delay=True)

    def _open(self):
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if "a" in self.mode else os.O_TRUNC)
        return open(os.open(self.baseFilename, flags, 0o644), self.mode, encoding=self.encoding,
                    errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:
            pass


def check_writable(folder: Path, setting: str = "hydra.run.dir") -> None:
    """Raise ValueError, naming the setting and folder, unless files can be written in it (before any work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{setting}={str(folder)!r}: the output folder cannot be written "
                         f"({error.strerror or error})") from error
