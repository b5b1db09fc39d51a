"""Training and validation windows, and the LightningDataModules that serve them (text, synthetic tasks)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from minillm.data.answers import batch, validation_set
from minillm.data.config import DataConfig, TokenizerConfig
from minillm.data.corpus import (
    DataError,
)
from minillm.data.synthetic import TaskConfig
from minillm.data.text import TextTokens
from minillm.data.tokens import (
    task_tokenizer,
)
from minillm.files import write_atomic

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Windows


class BatchStream(IterableDataset):
    """Endless training batches, batch b a pure function of (seed, b) given by `batch`, so a run resumes exactly.

    This loader yields batches first_batch, first_batch + stride, ... (stride = world size, so ranks
    interleave); worker w of n takes every n-th of those, which the DataLoader yields back in order.
    """

    first_batch: int
    stride: int

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        b = self.first_batch + self.stride * worker_id
        while True:
            yield self.batch(b)
            b += self.stride * workers


class TrainWindows(BatchStream):
    """Random windows of a token stream: sample i starts where a generator seeded by (seed, i) says."""

    def __init__(self, tokens_path: Path, seq_len: int, batch_size: int, seed: int,
                 first_batch: int = 0, stride: int = 1):
        self.tokens_path, self.seq_len, self.batch_size, self.seed = Path(tokens_path), seq_len, batch_size, seed
        self.first_batch, self.stride = first_batch, stride
        self._tokens: Optional[np.ndarray] = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:  # opened lazily, in each worker: a pickled memmap would be a full copy
            self._tokens = np.load(self.tokens_path, mmap_mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def window(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `index`: inputs x and next-token targets y, each (seq_len,) int64."""
        start = int(np.random.default_rng([self.seed, index]).integers(0, len(self.tokens) - self.seq_len))
        chunk = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch b: samples b*batch_size .. (b+1)*batch_size - 1, stacked to (batch_size, seq_len)."""
        xs, ys = zip(*(self.window(i) for i in range(b * self.batch_size, (b + 1) * self.batch_size)))
        return torch.stack(xs), torch.stack(ys)


class SyntheticWindows(BatchStream):
    """A synthetic task's examples, one per window: batch b is `batch(task, seq_len, batch_size, seed, b)`."""

    def __init__(self, task: TaskConfig, seq_len: int, batch_size: int, seed: int, first_batch: int = 0,
                 stride: int = 1):
        task.check_length(seq_len)
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed
        self.first_batch, self.stride = first_batch, stride

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(self.task, self.seq_len, self.batch_size, self.seed, b)


def val_windows(tokens: np.ndarray, seq_len: int, count: int) -> TensorDataset:
    """`count` (x, y) windows of seq_len + 1 tokens spread evenly from the start to the end of the stream."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, num=count).round().astype(np.int64)
    windows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return TensorDataset(windows[:, :-1], windows[:, 1:])


# ----------------------------------------------------------------------------------------------
# The LightningDataModule


class ResumableData(L.LightningDataModule):
    """A data module whose training batches are numbered: its state is how many were consumed."""

    start_batch = 0  # global index of the next training batch; set when resuming

    def state_dict(self) -> dict:
        """How many training batches (over all ranks) were consumed, so a resumed run continues after them."""
        if self.trainer is None:
            return {"batches_consumed": self.start_batch}
        # Lightning restores this counter on resume, so it counts the batches of every run so far; `processed`
        # (not `completed`) because checkpoints saved in on_train_batch_end count the batch that just ran.
        processed = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed
        return {"batches_consumed": processed * self.trainer.world_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self.start_batch = int(state_dict["batches_consumed"])

    def rank_stride(self) -> tuple[int, int]:
        """This rank's first batch and the stride between its batches."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return self.start_batch + rank, world

    def save_tokenizer(self, path: str | Path) -> Path:
        """Write the tokenizer to `path` (a run folder's tokenizer.json, loadable as tokenizer.path); return it."""
        path = Path(path)
        write_atomic(path, self.tokenizer.to_str())
        return path


class TextDataModule(TextTokens, ResumableData):
    """Text (data.path) as training and validation windows: TextTokens served to Lightning."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0):
        ResumableData.__init__(self)
        TextTokens.__init__(self, data, tokenizer, seq_len, seed)

    def prepare_data(self) -> None:
        # Lightning calls this once per node, before setup() on every rank: the caches are built here.
        if self.train_tokens is None:
            self.load()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tokens is None:
            self.load()

    def train_dataloader(self) -> DataLoader:
        first, stride = self.rank_stride()
        windows = TrainWindows(self._train_path, self.seq_len, self.data_config.batch_size, self.seed,
                               first_batch=first, stride=stride)
        return DataLoader(windows, batch_size=None, num_workers=self.data_config.num_workers,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        # The windows are precomputed and tiny: worker processes would cost more than they save.
        return DataLoader(val_windows(self.val_tokens, self.seq_len, self.data_config.val_windows),
                          batch_size=self.data_config.batch_size, shuffle=False, pin_memory=torch.cuda.is_available())


class SyntheticDataModule(ResumableData):
    """A synthetic task (data=synthetic): training batches generated from (seed, batch), fixed validation examples
    from a stream training never draws, and the task's own vocabulary as a word-level tokenizer."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0):
        super().__init__()
        self.data_config, self.seq_len, self.seed = data, seq_len, seed
        self.task = data.synthetic_task
        self.task.check_length(seq_len)
        self.tokenizer = task_tokenizer(self.task)
        if tokenizer.path is not None:  # a fine-tuning's source tokenizer, say: it must be this task's vocabulary
            given = Path(tokenizer.path).expanduser()
            try:
                same = Tokenizer.from_file(str(given)).get_vocab() == self.tokenizer.get_vocab()
            except Exception as error:  # tokenizers raises its own Exception type for unreadable files
                raise DataError(f"tokenizer.path={tokenizer.path!r}: not a readable tokenizer.json ({error})") from error
            if not same:
                raise DataError(f"tokenizer.path={tokenizer.path!r}: not the vocabulary of the {self.task.name} task "
                                f"with these data.tasks.{self.task.name} knobs (data=synthetic brings its own)")
        sha = hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()
        self.fingerprint = {
            "dataset": {"path": data.path, "task": self.task.name, "knobs": dataclasses.asdict(self.task),
                        "sizes": self.task.sizes(seq_len), "seed": seed},
            "tokenizer": {"path": tokenizer.path, "vocab_size": self.vocab_size, "sha256": sha},
            "tokens": {"val_examples": data.val_windows, "unigram_entropy_nats": None},
        }

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def train_dataloader(self) -> DataLoader:
        first, stride = self.rank_stride()
        windows = SyntheticWindows(self.task, self.seq_len, self.data_config.batch_size, self.seed, first, stride)
        return DataLoader(windows, batch_size=None, num_workers=self.data_config.num_workers,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        examples = validation_set(self.task, self.seq_len, self.data_config.val_windows, self.seed)
        return DataLoader(examples, batch_size=self.data_config.batch_size, shuffle=False,
                          pin_memory=torch.cuda.is_available())


def data_module(data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0) -> ResumableData:
    """The data module `data` asks for: a synthetic task or text."""
    cls = SyntheticDataModule if data.synthetic else TextDataModule
    return cls(data, tokenizer, seq_len=seq_len, seed=seed)
