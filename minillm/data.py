"""Corpora, tokenizer training/loading, token caches, the LightningDataModule."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sysconfig
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import datasets
import lightning as L
import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from minillm.config import DataConfig, TokenizerConfig
from minillm.files import write_atomic

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # separates documents in the packed streams; id 0 in trained tokenizers
CACHE_FORMAT = 1  # bump when the layout of the token caches changes
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Folders of the standard library that hold tests, installed packages or build configuration, not library source.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                  "__phello__"})
ENCODE_BATCH = 512  # documents per encode_batch call: large enough for the Rust threads, small enough for memory


# ----------------------------------------------------------------------------------------------
# Corpora


def content_hash(texts: Sequence[str]) -> str:
    """sha256 of the texts in order; each is length-prefixed so that ["ab", "c"] != ["a", "bc"]."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _stdlib_files() -> list[tuple[str, bytes]]:
    """(relative path, raw bytes) of every standard-library source file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Prune while walking: site-packages alone can hold ten times the library.
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS and not
                         (Path(folder) == root and d.startswith("config-"))]
        for name in names:
            path = Path(folder, name)
            # _sysconfigdata_*.py is generated at build time: this machine's build flags, not library code.
            if name.endswith(".py") and not name.startswith("_sysconfigdata") and path.is_file() \
                    and not path.is_symlink():
                files.append((path.relative_to(root).as_posix(), path.read_bytes()))
    return sorted(files)


def stdlib_fingerprint() -> dict:
    """What the embedded corpus is on this interpreter, for run logs: version, size, content hash."""
    files = _stdlib_files()
    return {
        "python": platform.python_version(),
        "files": len(files),
        "bytes": sum(len(data) for _, data in files),
        "sha256": content_hash([data.decode("utf-8", "replace") for _, data in files]),
    }


def _looks_like_a_path(name: str) -> bool:
    """Hub names are "name" or "owner/name"; anything else that does not exist is a missing local path."""
    return Path(name).suffix in FILE_BUILDERS or name.startswith((".", "/", "~")) or name.count("/") > 1


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The documents cfg names, truncated to cfg.max_documents and checked for a non-empty text column."""
    hf_cache = str(Path(cfg.cache_dir).expanduser() / "hf_datasets")  # never HF's default under $HOME
    if cfg.path == "stdlib":
        files = _stdlib_files()
        docs = datasets.Dataset.from_dict({"text": [data.decode("utf-8", "replace") for _, data in files],
                                           "path": [name for name, _ in files]})
    elif Path(cfg.path).expanduser().exists():
        docs = _load_local(Path(cfg.path).expanduser(), cfg, hf_cache)
    elif _looks_like_a_path(cfg.path):
        raise FileNotFoundError(f"data.path={cfg.path!r}: no such file or folder "
                                f"({Path(cfg.path).expanduser().resolve()})")
    else:
        docs = _load_hub(cfg, hf_cache)
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        docs = docs.select(range(cfg.max_documents))

    if len(docs) == 0:
        raise ValueError(f"data.path={cfg.path!r} holds no documents")
    if cfg.text_field not in docs.column_names:
        raise ValueError(f"data.text_field={cfg.text_field!r} is not a column of {cfg.path!r}; "
                         f"available columns: {docs.column_names}")
    if getattr(docs.features[cfg.text_field], "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"data.text_field={cfg.text_field!r} of {cfg.path!r} holds "
                         f"{docs.features[cfg.text_field]}, not text")
    if not any(docs[cfg.text_field]):
        raise ValueError(f"data.path={cfg.path!r}: all {len(docs)} documents have an empty {cfg.text_field!r}")
    return docs


def _load_local(path: Path, cfg: DataConfig, hf_cache: str) -> datasets.Dataset:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():  # written by save_to_disk
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ValueError(f"data.split={cfg.split!r} is not a split of {path}; available splits: "
                                 f"{sorted(loaded)}")
            loaded = loaded[cfg.split]
        return loaded
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    builders = {FILE_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise ValueError(f"data.path={cfg.path!r}: expected {sorted(FILE_BUILDERS)} files or a save_to_disk folder")
    if len(builders) > 1:
        raise ValueError(f"data.path={cfg.path!r} mixes file kinds {sorted(builders)}; keep one kind per folder")
    if all(p.stat().st_size == 0 for p in files):  # the json builder fails obscurely on empty files
        raise ValueError(f"data.path={cfg.path!r} holds no documents: its {len(files)} file(s) are empty")
    builder = builders.pop()
    # One .txt file is one document (not one line), and stray non-UTF-8 bytes become U+FFFD.
    options = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                                     cache_dir=hf_cache, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        raise ValueError(f"data.path={cfg.path!r}: could not read the {builder} files: {error}") from error


def _load_hub(cfg: DataConfig, hf_cache: str) -> datasets.Dataset:
    try:
        docs = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming, cache_dir=hf_cache)
    except (OSError, ValueError) as error:  # OSError covers ConnectionError, offline mode and not-found
        raise ValueError(f"data.path={cfg.path!r} is neither a local file or folder nor a dataset the HuggingFace "
                         f"hub could serve (name={cfg.name!r}, split={cfg.split!r}): {error}") from error
    if cfg.streaming:  # a stream has no end: materialise the first max_documents
        docs = datasets.Dataset.from_list(list(docs.take(cfg.max_documents)))
    return docs


def split_documents(texts: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation) by document: a document is held out when a hash of its text falls below val_fraction.

    The hash is of the content, not the position, so the split survives reordering and adding documents,
    and duplicates land on the same side. If a side would be empty, the document nearest the threshold moves.
    """
    if len(texts) < 2:
        raise ValueError(f"need at least 2 non-empty documents to split into train and validation, got "
                         f"{len(texts)} (a .txt file is one document: give a folder of .txt files, or .jsonl)")
    positions = [int.from_bytes(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
                 / 2**64 for t in texts]
    held_out = [p < val_fraction for p in positions]
    if not any(held_out):
        held_out[int(np.argmin(positions))] = True
    elif all(held_out):
        held_out[int(np.argmax(positions))] = False
    return ([t for t, v in zip(texts, held_out) if not v], [t for t, v in zip(texts, held_out) if v])


# ----------------------------------------------------------------------------------------------
# Tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN!r} token to separate documents")
    return token_id


def train_tokenizer(texts: Sequence[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme): every byte is in the alphabet, so any text round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    batches = (texts[i:i + ENCODE_BATCH] for i in range(0, len(texts), ENCODE_BATCH))
    tokenizer.train_from_iterator(batches, trainer, length=len(texts))
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, train_texts: Sequence[str], cache_dir: str | Path) -> Tokenizer:
    """cfg.path's tokenizer.json, or a BPE trained on train_texts and cached under cache_dir by its inputs."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.path={cfg.path!r}: no such file ({path.resolve()})")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception for any parse failure
            raise ValueError(f"tokenizer.path={cfg.path!r} is not a valid tokenizer.json: {error}") from error
        if tokenizer.token_to_id(EOS_TOKEN) is None:
            raise ValueError(f"tokenizer.path={cfg.path!r} has no {EOS_TOKEN!r} token to separate documents")
        return tokenizer

    key = _hash_json({"texts": content_hash(train_texts), "vocab_size": cfg.vocab_size,
                      "min_frequency": cfg.min_frequency, "tokenizers": tokenizers.__version__})
    path = Path(cache_dir) / f"bpe-{key[:20]}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:
            log.warning("cached tokenizer %s is unreadable (%s); training it again", path, error)
    log.info("training a %d-token byte-level BPE on %d documents", cfg.vocab_size, len(train_texts))
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size, cfg.min_frequency)
    write_atomic(path, tokenizer.to_str())
    return tokenizer


# ----------------------------------------------------------------------------------------------
# Token caches: one packed stream per split, each document followed by EOS, as a memory-mapped .npy
# with a JSON sidecar (dtype, length, sha256) written after it; a file the sidecar does not vouch for
# (torn write, truncation, bit rot) is rebuilt.


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """−Σ p·ln p of the token frequencies: the loss of a model that ignores context, the bar to beat."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(stream, starts): the packed tokens, and where document i starts (starts[-1] = len(stream))."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    eos = eos_id(tokenizer)
    pieces = []
    for i in range(0, len(texts), ENCODE_BATCH):
        for encoding in tokenizer.encode_batch(list(texts[i:i + ENCODE_BATCH]), add_special_tokens=False):
            pieces.append(np.array([*encoding.ids, eos], dtype=dtype))
    starts = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=starts[1:])
    return np.concatenate(pieces), starts


def _hash_json(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _describe(array: np.ndarray) -> dict:
    return {"dtype": str(array.dtype), "length": int(array.shape[0]), "sha256": hashlib.sha256(array).hexdigest()}


def _load_verified(path: Path) -> Optional[np.ndarray]:
    sidecar = path.with_suffix(".json")
    if not path.exists() and not sidecar.exists():
        return None
    try:
        array = np.load(path, mmap_mode="r")
        if array.ndim == 1 and _describe(array) == json.loads(sidecar.read_text()):
            return array
        problem = "contents differ from its sidecar"
    except (OSError, ValueError, EOFError) as error:  # missing or truncated file, bad header, bad JSON
        problem = str(error)
    log.warning("token cache %s is corrupt (%s); rebuilding it", path, problem)
    return None


def cached_array(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Memory-map path if its sidecar vouches for it; otherwise build it, write it atomically and map that."""
    array = _load_verified(path)
    if array is None:
        built = build()
        write_atomic(path, lambda f: np.save(f, built))
        write_atomic(path.with_suffix(".json"), json.dumps(_describe(built)))
        array = np.load(path, mmap_mode="r")
    return array


# ----------------------------------------------------------------------------------------------
# Windows


class TrainWindows(IterableDataset):
    """Endless batches of random windows; batch b is a pure function of (seed, b), so a run resumes exactly.

    This loader yields batches first_batch, first_batch + stride, ... (stride = world size, so ranks
    interleave); worker w of n takes every n-th of those, which the DataLoader yields back in order.
    """

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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        b = self.first_batch + self.stride * worker_id
        while True:
            yield self.batch(b)
            b += self.stride * workers


def val_windows(tokens: np.ndarray, seq_len: int, count: int) -> TensorDataset:
    """`count` (x, y) windows of seq_len + 1 tokens spread evenly from the start to the end of the stream."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, num=count).round().astype(np.int64)
    windows = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return TensorDataset(windows[:, :-1], windows[:, 1:])


# ----------------------------------------------------------------------------------------------
# The LightningDataModule


class TextDataModule(L.LightningDataModule):
    """Documents -> split -> tokenizer -> cached token streams -> training and validation windows."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0):
        super().__init__()
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        self.data_config, self.tokenizer_config, self.seq_len, self.seed = data, tokenizer, seq_len, seed
        self.cache_dir = Path(data.cache_dir).expanduser()
        self.start_batch = 0  # global index of the next training batch; set when resuming
        self.tokenizer: Optional[Tokenizer] = None
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        self.val_starts: Optional[np.ndarray] = None  # document i of val_tokens is [val_starts[i], val_starts[i+1] - 1)
        self.fingerprint: dict = {}
        self._train_path: Optional[Path] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return eos_id(self.tokenizer)

    def prepare_data(self) -> None:
        # Lightning calls this once per node, before setup() on every rank: the caches are built here.
        if self.train_tokens is None:
            self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_tokens is None:
            self._load()

    def _load(self) -> None:
        cfg = self.data_config
        docs = load_documents(cfg)
        texts = [text for text in docs[cfg.text_field] if text]  # an empty document adds nothing but an EOS
        train_texts, val_texts = split_documents(texts, cfg.val_fraction)
        tokenizer = build_tokenizer(self.tokenizer_config, train_texts, self.cache_dir / "tokenizers")
        tokenizer_sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        corpus_sha = content_hash(texts)
        key = _hash_json({"format": CACHE_FORMAT, "documents": corpus_sha, "val_fraction": cfg.val_fraction,
                          "tokenizer": tokenizer_sha})
        folder = self.cache_dir / "tokens" / key[:20]
        encode_val = functools.cache(lambda: encode_documents(tokenizer, val_texts))
        train = cached_array(folder / "train.npy", lambda: encode_documents(tokenizer, train_texts)[0])
        val = cached_array(folder / "val.npy", lambda: encode_val()[0])
        val_starts = cached_array(folder / "val_starts.npy", lambda: encode_val()[1])

        window = self.seq_len + 1
        if len(val) < window:
            raise ValueError(f"the validation split has {len(val)} tokens, fewer than seq_len + 1 = {window}: "
                             f"lower seq_len or raise data.val_fraction (now {cfg.val_fraction})")
        if len(train) <= window:
            raise ValueError(f"the training split has {len(train)} tokens, too few for windows of "
                             f"seq_len + 1 = {window}: lower seq_len or use more documents")
        self.tokenizer, self.train_tokens, self.val_tokens, self.val_starts = tokenizer, train, val, val_starts
        self._train_path = folder / "train.npy"
        dataset = {"path": cfg.path, "name": cfg.name, "split": cfg.split, "text_field": cfg.text_field,
                   "documents": len(texts), "sha256": corpus_sha}
        if cfg.path == "stdlib":
            dataset["stdlib"] = stdlib_fingerprint()
        self.fingerprint = {
            "dataset": dataset,
            "split": {"val_fraction": cfg.val_fraction, "train_documents": len(train_texts),
                      "val_documents": len(val_texts)},
            "tokenizer": {"path": self.tokenizer_config.path, "vocab_size": self.vocab_size, "sha256": tokenizer_sha},
            "tokens": {"train": len(self.train_tokens), "val": len(self.val_tokens),
                       "unigram_entropy_nats": unigram_entropy(self.train_tokens, self.vocab_size)},
        }

    def train_dataloader(self) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        windows = TrainWindows(self._train_path, self.seq_len, self.data_config.batch_size, self.seed,
                               first_batch=self.start_batch + rank, stride=world)
        return DataLoader(windows, batch_size=None, num_workers=self.data_config.num_workers,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        # The windows are precomputed and tiny: worker processes would cost more than they save.
        return DataLoader(val_windows(self.val_tokens, self.seq_len, self.data_config.val_windows),
                          batch_size=self.data_config.batch_size, shuffle=False, pin_memory=torch.cuda.is_available())

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

    def long_documents(self, min_tokens: int) -> list[np.ndarray]:
        """Validation documents of at least min_tokens tokens (EOS excluded), longest first, at most
        data.long_documents of them: the texts the extrapolation evaluation reads."""
        lengths = np.diff(self.val_starts) - 1
        chosen = sorted((i for i in range(len(lengths)) if lengths[i] >= min_tokens), key=lambda i: (-lengths[i], i))
        return [np.asarray(self.val_tokens[self.val_starts[i]:self.val_starts[i] + lengths[i]], dtype=np.int64)
                for i in chosen[:self.data_config.long_documents]]

    def save_tokenizer(self, folder: str | Path) -> Path:
        """Write folder/tokenizer.json (loadable as tokenizer.path) and return its path."""
        path = Path(folder) / "tokenizer.json"
        write_atomic(path, self.tokenizer.to_str())
        return path
