"""What a command shows and leaves behind: minillm's own lines, one line per failure or signal, an output folder
held by one process, and a failed command's own files removed (never anything it found there)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Optional

from hydra.experimental.callback import Callback


def quiet_libraries() -> None:
    """Only minillm's own lines on the console: the libraries' notices (devices, tips, deprecations, W&B's
    login advice) and progress bars go unshown unless verbose=true. Their errors still surface, as exceptions."""
    from functools import partialmethod

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module="minillm")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch", "wandb", "datasets", "hydra",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # "Generating train split" for local files
    try:  # the hub's progress bars, and with them transformers' (weight loading)
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    if "datasets" in sys.modules:  # imported already: the variable above came too late
        from datasets.utils import disable_progress_bars as disable_datasets_bars
        disable_datasets_bars()
    import tqdm

    # A bar that does not say whether to show (transformers' GGUF de-quantizing bar) stays hidden; minillm's
    # and Lightning's bars pass `disable` themselves and are unaffected.
    if not isinstance(tqdm.std.tqdm.__init__, partialmethod):
        tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=True)


# ----------------------------------------------------------------------------------------------
# Signals

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # not SIGUSR1: Lightning's SLURM requeue keeps it
_received: list[int] = []  # the stop signals this process received, in order
_holding: list[bool] = [False]  # within held_signals(): a stop signal is recorded, raised at its end
_main_pid: list[int] = [os.getpid()]  # the command's process (forked DataLoader workers inherit the handler)


class Stopped(BaseException):
    """The command was ended by a signal; the message says what was kept. Exit status 128 + the signal's number,
    as a shell reports a process killed by it. A BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


def _on_stop_signal(signum: int, _frame) -> None:
    if os.getpid() != _main_pid[0]:  # a forked worker: torch's worker loop ends quietly on KeyboardInterrupt
        raise KeyboardInterrupt
    _received.append(signum)
    if _holding[0]:
        return
    # Lightning's handler (during trainer.fit) calls this one after flagging the trainer, which then stops at its
    # next step boundary and raises there (train() turns that into Stopped); otherwise stop here.
    if signal.getsignal(signum) is _on_stop_signal:
        raise Stopped(signum)


def catch_stop_signals() -> None:
    """SIGTERM and SIGINT end the command with Stopped (a line and status 128 + signum) instead of a traceback
    or a silent exit 0."""
    _main_pid[0] = os.getpid()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


@contextmanager
def held_signals() -> Iterator[None]:
    """A stretch no stop signal interrupts (files being swapped): one received meanwhile raises Stopped at its
    end. A flag, not a signal mask: the kernel may hand the signal to any thread, and Python runs the handler
    in the main thread whichever received it."""
    before = len(_received)
    _holding[0] = True
    try:
        yield
    finally:
        _holding[0] = False
    if len(_received) > before:
        raise Stopped(_received[before])


@contextmanager
def interrupt_at_step_end(request_stop: Callable[[], None]) -> Iterator[None]:
    """Within (a training loop): Ctrl-C (SIGINT) is recorded and calls request_stop(), so that training stops at
    its next step boundary with its files whole, as Lightning stops on SIGTERM; a second Ctrl-C stops at once."""
    start = len(_received)

    def on_interrupt(signum: int, _frame) -> None:
        if os.getpid() != _main_pid[0]:
            raise KeyboardInterrupt
        again = signum in _received[start:]
        _received.append(signum)
        if again:
            raise Stopped(signum)
        request_stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def received_signal(since: int = 0) -> Optional[int]:
    """The first stop signal this process received after its first `since` ones (None: none)."""
    return _received[since] if len(_received) > since else None


def signals_received() -> int:
    """How many stop signals this process has received: a `since` for received_signal."""
    return len(_received)


# ----------------------------------------------------------------------------------------------
# The output folder

_new_folders: set[Path] = set()  # output folders Hydra made for this command (noted by NewOutputFolders)


class NewOutputFolders(Callback):
    """Hydra callback (hydra.callbacks in conf/): notes whether the output folder exists before Hydra makes it,
    so that a failed command removes a folder only when the command made it."""

    def __init__(self) -> None:  # Callback's other hooks (on_job_end, on_run_end, ...) do nothing
        self.new_sweep = False  # pickled to a parallel launcher's workers with the callback

    def on_run_start(self, config, **_) -> None:
        try:
            folder = Path(str(config.hydra.run.dir)).absolute()
        except Exception:  # an unresolvable folder fails in Hydra next, named there
            return
        if not folder.exists():
            _new_folders.add(folder)

    def on_multirun_start(self, config, **_) -> None:
        try:
            self.new_sweep = not Path(str(config.hydra.sweep.dir)).exists()
        except Exception:
            pass

    def on_job_start(self, config, **_) -> None:
        if self.new_sweep and str(config.hydra.mode) == "RunMode.MULTIRUN":  # every job folder in it is new too
            _new_folders.add(Path(config.hydra.runtime.output_dir).absolute())


def _rank_zero_by_environment() -> bool:
    """Whether this process is the first of a run (DDP's other ranks, started with a rank in their environment,
    run in rank 0's folder and leave its ownership to it). Read as Lightning does, without importing it."""
    return all(os.environ.get(key, "0") in ("", "0")
               for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"))


class FolderInUse(ValueError):
    """Another live process holds the output folder."""


class OutputFolder:
    """The command's output folder, held by this process alone for its life: an exclusive lock (fcntl.flock,
    released by the OS however the process ends) on a file in it naming the holder. It remembers what the folder
    held before, so that a failed command removes what it made (unless `worth_keeping()` says otherwise, e.g. a
    checkpoint was written) and nothing else. DDP's other ranks share rank 0's folder without holding it."""

    LOCK = ".minillm.lock"

    def __init__(self, path: Path, setting: str = "hydra.run.dir", worth_keeping: Callable[[], bool] = lambda: False):
        self.path = Path(path).absolute()
        self.setting = setting
        self.worth_keeping = worth_keeping
        self.made = self.path in _new_folders  # made by Hydra for this command
        self.before: Optional[set[str]] = None  # the names the folder held when this process took it
        self._lock: Optional[int] = None  # the lock file's descriptor while held

    def __enter__(self) -> "OutputFolder":
        if _rank_zero_by_environment():
            self._acquire()
        return self

    def __exit__(self, kind, _error, _traceback) -> None:
        if kind is None:  # a failure keeps the folder held until fail() has removed what this process made
            self.release()

    @property
    def held(self) -> bool:
        return self._lock is not None

    def _acquire(self) -> None:
        lock = self.path / self.LOCK
        while True:
            try:
                descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise ValueError(f"{self.setting}={str(self.path)!r}: the output folder cannot be written "
                                 f"({error.strerror or error})") from error
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 200).decode(errors="replace").strip() or "another process"
                os.close(descriptor)
                raise FolderInUse(f"{self.setting}={str(self.path)!r}: in use by {holder}; one folder holds one "
                                  f"run at a time: wait for it to end, or choose another folder") from None
            try:  # the file a previous holder removed while this one waited is no lock: take the new one
                same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(descriptor)
        self._lock = descriptor
        self.before = set(os.listdir(self.path)) - {self.LOCK}
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode())

    def release(self) -> None:
        """Give the folder up (its lock file removed while still held, so no waiter takes a stale one)."""
        if self._lock is None:
            return
        try:
            (self.path / self.LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._lock)
        self._lock = None

    def new_entries(self) -> list[Path]:
        """What this process added to the folder since it took it (the lock file aside)."""
        if self.before is None or not self.path.is_dir():
            return []
        return sorted(self.path / name for name in set(os.listdir(self.path)) - self.before - {self.LOCK})

    def discard(self) -> None:
        """After a failure: remove what this process added, and the folder if Hydra made it for this command,
        unless worth_keeping(). Only a holder removes anything: a refused process touches nothing."""
        if not self.held or self.worth_keeping():
            return
        _close_logs_in(self.path)
        for entry in self.new_entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        if self.made and not self.new_entries() and not self.before:
            self.release()
            try:
                self.path.rmdir()
            except OSError:  # a folder that cannot be written cannot be removed either: stderr has the line
                pass


def _close_logs_in(folder: Path) -> None:
    """Close and detach the log files in `folder` (Hydra's job log), so that nothing writes them again."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.close()
            root.removeHandler(handler)


def report(message: str, logged: bool = True) -> None:
    """One line on stderr, and (logged=True) in the run folder's log (Hydra's file handler)."""
    print(message, file=sys.stderr)
    if not logged:
        return
    record = logging.makeLogRecord({"name": "minillm", "levelname": "ERROR", "levelno": logging.ERROR, "msg": message})
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.emit(record)
            except OSError:  # a folder that cannot be written: stderr has it
                pass


def fail(error: BaseException, output: Optional[OutputFolder] = None) -> NoReturn:
    """A failed or stopped command: one line (`error: ...`) on stderr and in the run's log; exit 2, or 128 + the
    signal's number when a signal stopped it. What the command made in `output` is removed unless worth keeping."""
    if isinstance(error, Stopped) and not _rank_zero_by_environment():
        # DDP's other ranks stop with rank 0, which says where and exits 128 + signum: a non-zero status here
        # would make Lightning's process observer SIGKILL rank 0 before its line.
        sys.exit(0)
    report(f"error: {error}", logged=output is None or output.held)  # a refused command writes no folder's log
    if output is not None:
        output.discard()
        output.release()
    sys.exit(128 + error.signum if isinstance(error, Stopped) else 2)


# ----------------------------------------------------------------------------------------------
# The command line


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


def hydra_error_line(error: Exception) -> str:
    """Hydra's or OmegaConf's error as one line naming the override or setting: 'optim.lr=fast: Value 'fast'
    could not be converted to Float'."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__
    reason = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    merging = "Error merging override "
    if first.startswith(merging) and reason:
        return f"{first.removeprefix(merging)}: {reason}"
    key = getattr(error, "full_key", None) or getattr(cause, "full_key", None)
    line = f"{first.rstrip('.')}: {reason}" if reason and reason not in first else first
    return f"{key}: {line}" if key and str(key) not in line else line


def unique_suffix() -> str:
    """A short name part (the `unique` resolver of hydra.run.dir), random: two runs started in the same second
    get two folders. The ranks of one job started by a launcher (srun's tasks, torchrun's workers) each compose
    their own config: they take the job's ids, hashed, so that all of them agree on one folder."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        shared = ("SLURM_JOB_ID", "SLURM_STEP_ID")
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        shared = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
    else:
        return os.urandom(3).hex()
    return hashlib.sha1("/".join(os.environ.get(key, "") for key in shared).encode()).hexdigest()[:6]


def run_script(main: Callable[[], object]) -> None:
    """Run a Hydra script's main(): a stop signal, Hydra's own errors (types, missing options) and a folder Hydra
    cannot make each end in one `error:` line, exit 128 + signum or 2, instead of a traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing a trimmed traceback
    check_overrides(sys.argv[1:])
    catch_stop_signals()
    try:
        main()
    except Stopped as stop:  # before the output folder was taken: nothing was written
        print(f"error: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {hydra_error_line(error)}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # Hydra making the output folder (a file in the way, no permission)
        if error.filename is None:  # not a path (a closed pipe, say): not the folder's fault
            raise
        setting = "hydra.sweep.dir" if {"-m", "--multirun"} & set(sys.argv) else "hydra.run.dir"
        where = f"={str(error.filename)!r}" if error.filename else ""
        print(f"error: {setting}{where}: the output folder cannot be made ({error.strerror or error})",
              file=sys.stderr)
        sys.exit(2)


def shares_console() -> bool:
    """Whether progress bars would garble the console: stdout is no terminal (a file, a pipe, a scheduler's log),
    or this is one of several jobs a parallel launcher (Hydra's joblib) runs at once on one terminal."""
    if not sys.stdout.isatty():
        return True
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra = HydraConfig.get()
            return str(hydra.mode) == "RunMode.MULTIRUN" and "joblib" in str(hydra.launcher.get("_target_", ""))
    except ImportError:
        pass
    return False


def rank_zero() -> bool:
    """Whether this process is rank 0 (the only one under DDP that reports)."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0
