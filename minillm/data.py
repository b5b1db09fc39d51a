"""Corpora, tokenizer training/loading, token caches, the LightningDataModules (text, synthetic tasks)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import datasets
import huggingface_hub
import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from minillm import synthetic
from minillm.config import DataConfig, TokenizerConfig
from minillm.files import write_atomic
from minillm.synthetic import TaskConfig

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # separates documents in the packed streams; id 0 in trained tokenizers
CACHE_FORMAT = 1  # bump when the layout of the token caches changes
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PATH_SUFFIXES = frozenset({*FILE_BUILDERS, ".csv", ".tsv", ".arrow"})  # a missing name with these is a local path
# datasets' split keywords (datasets.data_files.SPLIT_KEYWORDS): a file or folder so named holds that split.
SPLIT_KEYWORDS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                  "dev": "validation", "val": "validation", "test": "test", "testing": "test", "eval": "test",
                  "evaluation": "test"}
# Named exactly for the split, or for it and a shard number (train-00000-of-00002): never "unit_test" or "devices".
SPLIT_NAME = re.compile(rf"({'|'.join(SPLIT_KEYWORDS)})(?:[-_.]\d[\w.-]*)?", re.IGNORECASE)
HUB_PROBE_TIMEOUT = 5.0  # seconds the hub gets to answer before a hub name fails, instead of ~30 s of retries
# Folders of the standard library that hold tests, installed packages or build configuration, not library source.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                                  "__phello__"})
ENCODE_BATCH = 512  # documents per encode_batch call: large enough for the Rust threads, small enough for memory


class DataError(ValueError):
    """A data or tokenizer input that cannot be used; the message starts with the setting it names."""


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
    return (Path(name).suffix.lower() in PATH_SUFFIXES or name.startswith((".", "/", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


@dataclass
class Corpus:
    """The training documents and, when the data has a validation split, that split's documents."""

    train: datasets.Dataset
    val: Optional[datasets.Dataset] = None  # None: hold out training documents by hash (data.val_fraction)
    val_split: Optional[str] = None  # the split `val` came from


def load_corpus(cfg: DataConfig) -> Corpus:
    """The splits cfg names, each cut to cfg.max_documents and checked for a text column."""
    hf_cache = str(Path(cfg.cache_dir).expanduser() / "hf_datasets")  # never HF's default under $HOME
    local = Path(cfg.path).expanduser()
    val_split = getattr(cfg, "val_split", None)  # DataConfig.val_split; None: "validation" if the data has it
    if val_split is not None and val_split == cfg.split:
        raise DataError(f"data.val_split={val_split!r}: is also data.split, so validation would be training data; "
                        f"name another split, or leave it unset to hold out documents by hash")
    if cfg.path == "stdlib" or local.exists():
        splits = {"train": _stdlib_dataset()} if cfg.path == "stdlib" else _load_local(local, cfg, hf_cache)
        val_split = _validation_split(cfg, val_split, sorted(splits))
        train, val = splits[cfg.split], None if val_split is None else splits[val_split]
    elif _looks_like_a_path(cfg.path):
        raise DataError(f"data.path={cfg.path!r}: no such file or folder (resolved to {local.resolve()})")
    else:
        _check_hub_reachable(cfg, local)
        train = _load_hub(cfg, cfg.split, hf_cache)
        val = None if val_split is None else _load_hub(cfg, val_split, hf_cache)
    return Corpus(_checked(train, cfg, cfg.split), None if val is None else _checked(val, cfg, val_split), val_split)


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The training documents (data.split), cut to cfg.max_documents and checked for a text column."""
    return load_corpus(cfg).train


def _stdlib_dataset() -> datasets.Dataset:
    """The embedded corpus: one document per standard-library source file, with its path."""
    files = _stdlib_files()
    return datasets.Dataset.from_dict({"text": [data.decode("utf-8", "replace") for _, data in files],
                                       "path": [name for name, _ in files]})


def _validation_split(cfg: DataConfig, val_split: Optional[str], available: list[str]) -> Optional[str]:
    """The split to validate on (None: hash-split the training one), after checking that both named exist."""
    if cfg.split not in available:
        raise DataError(f"data.split={cfg.split!r}: not a split of data.path={cfg.path!r}; its splits: {available}")
    if val_split is not None and val_split not in available:
        raise DataError(f"data.val_split={val_split!r}: not a split of data.path={cfg.path!r}; its splits: "
                        f"{available}")
    if val_split is None and "validation" in available and cfg.split != "validation":
        val_split = "validation"
    unused = [name for name in available if name not in (cfg.split, val_split)]
    if val_split is None and unused:  # a test or eval split is never picked unasked: say that it exists
        log.warning("data.path=%r: validating on documents held out of %r by hash; its splits %s are unused "
                    "(data.val_split=<split> validates on one)", cfg.path, cfg.split, unused)
    return val_split


def _split_of(relative: Path) -> Optional[str]:
    """The split a file's folders or name say it belongs to (datasets' keywords), or None."""
    for part in (*relative.parts[:-1], relative.stem):
        match = SPLIT_NAME.fullmatch(part)
        if match:
            return SPLIT_KEYWORDS[match.group(1).lower()]
    return None


def _file_splits(path: Path, files: list[Path], cfg: DataConfig) -> dict[str, list[Path]]:
    """Files by split: all "train" unless files or folders are named for splits (train, validation, val, test)."""
    named = {p: _split_of(p.relative_to(path)) for p in files} if path.is_dir() else {}
    if not any(named.values()):
        return {"train": files}
    unnamed = [p.relative_to(path).as_posix() for p, split in named.items() if split is None]
    if unnamed:  # neither guess is safe: these could be training or validation documents
        example = next(p.relative_to(path).as_posix() for p, split in named.items() if split is not None)
        raise DataError(f"data.path={cfg.path!r}: some files are named for a split (e.g. {example}) and "
                        f"{len(unnamed)} are not (e.g. {unnamed[0]}); name every file or folder by its split, "
                        f"or none of them")
    splits: dict[str, list[Path]] = {}
    for p, split in named.items():
        splits.setdefault(split, []).append(p)
    return splits


def _load_local(path: Path, cfg: DataConfig, hf_cache: str) -> dict[str, datasets.Dataset]:
    """Every split of a file, a folder of files or a save_to_disk folder; plain data has one split, "train"."""
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():  # written by save_to_disk
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    builders = {FILE_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders:
        raise DataError(f"data.path={cfg.path!r}: expected {sorted(FILE_BUILDERS)} files or a save_to_disk folder")
    if len(builders) > 1:
        raise DataError(f"data.path={cfg.path!r} mixes file kinds {sorted(builders)}; keep one kind per folder")
    splits = _file_splits(path, files, cfg)
    for split, group in splits.items():
        if all(p.stat().st_size == 0 for p in group):  # the json builder fails obscurely on empty files
            where = "" if len(splits) == 1 else f" in its {split!r} split"
            raise DataError(f"data.path={cfg.path!r} holds no documents{where}: its {len(group)} file(s) are empty")
    builder = builders.pop()
    # One .txt file is one document (not one line), and stray non-UTF-8 bytes become U+FFFD.
    options = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files={split: [str(p) for p in group]
                                                            for split, group in splits.items()},
                                       cache_dir=hf_cache, **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, pa.ArrowException) as error:
        raise _read_error(cfg, path, builder, files, error) from error
    return dict(loaded)


def _read_error(cfg: DataConfig, path: Path, builder: str, files: list[Path], error: Exception) -> DataError:
    """What datasets could not read, in one line: the first malformed JSON line, else the innermost cause."""
    if builder == "json":  # datasets names the row only in log lines; find it again, on this failure path only
        for file in files:
            bad = _bad_json_line(file)
            if bad is not None:
                where = "" if file == path else f"{file.relative_to(path).as_posix()} "
                return DataError(f"data.path={cfg.path!r}: {where}{bad}")
    cause = error
    for _ in range(10):  # the chain's end says what went wrong; its head only that generation failed
        if (cause.__cause__ or cause.__context__) is None:
            break
        cause = cause.__cause__ or cause.__context__
    return DataError(f"data.path={cfg.path!r}: could not read the {builder} files: {type(cause).__name__}: {cause}")


def _bad_json_line(path: Path) -> Optional[str]:
    """'line N is not valid JSON (why)' for the first row of a JSON-lines file that does not parse, else None."""
    with path.open("rb") as f:
        rows = ((number, line) for number, line in enumerate(f, 1) if line.strip())
        for index, (number, line) in enumerate(rows):
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if index == 0:  # perhaps one JSON document over many lines, as .json files may be
                    return _bad_json_document(path)
                return f"line {number} is not valid JSON ({_json_problem(error)})"
            if index > 0 and not isinstance(row, dict):  # the first may be a one-line list of rows
                return f"line {number} is JSON but not an object of fields"
    return None


def _bad_json_document(path: Path) -> Optional[str]:
    """'line N is not valid JSON (why)' if path, read as one JSON document, does not parse; else None."""
    try:
        json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        return f"line {getattr(error, 'lineno', 1)} is not valid JSON ({_json_problem(error)})"
    return None


def _json_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8: {error.reason} at byte {error.start}"
    return "nested too deeply"  # RecursionError


def _check_hub_reachable(cfg: DataConfig, local: Path) -> None:
    """Fail at once, not after the hub client's retries (~30 s), when the hub cannot answer."""
    if datasets.config.HF_HUB_OFFLINE:  # datasets then looks in its cache only, which is quick
        return
    try:
        huggingface_hub.get_session().head(datasets.config.HF_ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as error:  # refused, no DNS, timed out, TLS: whatever the client raises, no answer came
        raise DataError(f"data.path={cfg.path!r}: neither a local file or folder (resolved to {local.resolve()}) "
                        f"nor loadable from the hub: {datasets.config.HF_ENDPOINT} cannot be reached "
                        f"({type(error).__name__}: {error}); set HF_HUB_OFFLINE=1 to use a copy cached earlier"
                        ) from error


def _load_hub(cfg: DataConfig, split: str, hf_cache: str) -> datasets.Dataset:
    """One split of the hub dataset cfg names (its first max_documents when streamed)."""
    try:
        docs = datasets.load_dataset(cfg.path, cfg.name, split=split, streaming=cfg.streaming, cache_dir=hf_cache)
    except (OSError, ValueError) as error:  # OSError covers ConnectionError, offline mode and not-found
        offline = " (HF_HUB_OFFLINE is set: only copies cached earlier count)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"data.path={cfg.path!r}: neither a local file or folder nor a dataset the HuggingFace hub "
                        f"could serve{offline} (name={cfg.name!r}, split={split!r}): {error}") from error
    if cfg.streaming:  # a stream has no end: materialise the first max_documents
        docs = datasets.Dataset.from_list(list(docs.take(cfg.max_documents)))
    return docs


def _checked(docs: datasets.Dataset, cfg: DataConfig, split: str) -> datasets.Dataset:
    """docs cut to cfg.max_documents, refused unless some rows hold text in cfg.text_field; warns of the others."""
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        docs = docs.select(range(cfg.max_documents))
    source = f"data.path={cfg.path!r}" + ("" if split == cfg.split else f" (split {split!r})")
    if len(docs) == 0:
        raise DataError(f"{source} holds no documents")
    field, others = cfg.text_field, [c for c in docs.column_names if c != cfg.text_field]
    feature = docs.features.get(field)
    if feature is None:
        raise DataError(f"data.text_field={field!r} is not a column of {source}: none of its {len(docs)} rows has "
                        f"it; the rows have fields {others}")
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        column = docs.with_format("arrow")[field]  # counted in Arrow: no Python strings made yet
        missing, empty = column.null_count, pc.sum(pc.equal(pc.utf8_length(column), 0)).as_py() or 0
    elif dtype == "null":  # the rows that have it all hold null
        missing, empty = len(docs), 0
    else:  # mixed kinds of value (datasets' Json feature) or one that is not text: look at each
        values = docs[field]
        missing, empty = sum(not isinstance(value, str) for value in values), sum(value == "" for value in values)
    if missing == len(docs):
        held = "" if dtype == "null" else f" as text (it holds {feature})"
        raise DataError(f"data.text_field={field!r}: none of the {len(docs)} rows of {source} has it{held}; "
                        f"the rows have fields {others}")
    if missing:
        log.warning("data.text_field=%r: %d of %d rows of %s lack it or are not text; skipped",
                    field, missing, len(docs), source)
    if missing + empty == len(docs):
        raise DataError(f"{source}: all {len(docs)} documents have an empty {field!r}")
    return docs


def document_texts(docs: datasets.Dataset, cfg: DataConfig) -> list[str]:
    """The non-empty texts of docs, in order: rows without text were counted by _checked; empty ones add nothing."""
    try:
        return [text for text in docs[cfg.text_field] if isinstance(text, str) and text]
    except UnicodeDecodeError as error:  # Arrow checks UTF-8 only when a string is read
        raise DataError(f"data.text_field={cfg.text_field!r}: data.path={cfg.path!r} holds bytes that are not "
                        f"UTF-8 text ({error.reason} at byte {error.start})") from error


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
            raise DataError(f"tokenizer.path={cfg.path!r}: no such file (resolved to {path.resolve()})")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception for any parse failure
            raise DataError(f"tokenizer.path={cfg.path!r}: not a valid tokenizer.json ({error})") from error
        if tokenizer.token_to_id(EOS_TOKEN) is None:
            raise DataError(f"tokenizer.path={cfg.path!r}: has no {EOS_TOKEN!r} token to separate documents")
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
    """A synthetic task's examples, one per window: batch b is `synthetic.batch(task, seq_len, batch_size, seed, b)`."""

    def __init__(self, task: TaskConfig, seq_len: int, batch_size: int, seed: int, first_batch: int = 0,
                 stride: int = 1):
        task.check_length(seq_len)
        self.task, self.seq_len, self.batch_size, self.seed = task, seq_len, batch_size, seed
        self.first_batch, self.stride = first_batch, stride

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return synthetic.batch(self.task, self.seq_len, self.batch_size, self.seed, b)


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

    def save_tokenizer(self, folder: str | Path) -> Path:
        """Write folder/tokenizer.json (loadable as tokenizer.path) and return its path."""
        path = Path(folder) / "tokenizer.json"
        write_atomic(path, self.tokenizer.to_str())
        return path


class TextDataModule(ResumableData):
    """Documents -> split -> tokenizer -> cached token streams -> training and validation windows."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0):
        super().__init__()
        if seq_len <= 0:
            raise ValueError(f"seq_len: must be positive, got {seq_len}")
        self.data_config, self.tokenizer_config, self.seq_len, self.seed = data, tokenizer, seq_len, seed
        self.cache_dir = Path(data.cache_dir).expanduser()
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
        corpus = load_corpus(cfg)
        train_texts = document_texts(corpus.train, cfg)
        if corpus.val is None:  # no validation split: hold documents out by a hash of their text
            texts = train_texts
            try:
                train_texts, val_texts = split_documents(texts, cfg.val_fraction)
            except ValueError as error:
                raise DataError(f"data.path={cfg.path!r}: {error}") from error
            held_out, split_key = f"data.val_fraction={cfg.val_fraction}", {"val_fraction": cfg.val_fraction}
        else:
            val_texts = document_texts(corpus.val, cfg)
            texts = train_texts + val_texts
            held_out, split_key = f"data.val_split={corpus.val_split!r}", {"validation": content_hash(val_texts)}
            shared = len(set(val_texts) & set(train_texts))
            if shared:  # the user's split, so kept; but a validation loss on seen text flatters the model
                log.warning("%s: %d of its %d documents are also in the training split %r", held_out, shared,
                            len(val_texts), cfg.split)
        tokenizer = build_tokenizer(self.tokenizer_config, train_texts, self.cache_dir / "tokenizers")
        tokenizer_sha = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
        corpus_sha = content_hash(texts)
        key = _hash_json({"format": CACHE_FORMAT, "documents": corpus_sha, **split_key, "tokenizer": tokenizer_sha})
        folder = self.cache_dir / "tokens" / key[:20]
        encode_val = functools.cache(lambda: encode_documents(tokenizer, val_texts))
        train = cached_array(folder / "train.npy", lambda: encode_documents(tokenizer, train_texts)[0])
        val = cached_array(folder / "val.npy", lambda: encode_val()[0])
        val_starts = cached_array(folder / "val_starts.npy", lambda: encode_val()[1])

        window = self.seq_len + 1
        if len(val) < window:
            more = "raise data.val_fraction" if corpus.val is None else "add documents to that split"
            raise DataError(f"{held_out}: the validation split has {len(val)} tokens, fewer than "
                            f"model.context_length + 1 = {window} (data.path={cfg.path!r}): lower "
                            f"model.context_length or {more}")
        if len(train) <= window:
            raise DataError(f"data.path={cfg.path!r}: the training split has {len(train)} tokens, too few for "
                            f"windows of model.context_length + 1 = {window}: lower model.context_length or use "
                            f"more documents")
        self.tokenizer, self.train_tokens, self.val_tokens, self.val_starts = tokenizer, train, val, val_starts
        self._train_path = folder / "train.npy"
        dataset = {"path": cfg.path, "name": cfg.name, "split": cfg.split, "text_field": cfg.text_field,
                   "documents": len(texts), "sha256": corpus_sha}
        if cfg.path == "stdlib":
            dataset["stdlib"] = stdlib_fingerprint()
        self.fingerprint = {
            "dataset": dataset,
            "split": {"val_split": corpus.val_split, "val_fraction": cfg.val_fraction if corpus.val is None else None,
                      "train_documents": len(train_texts), "val_documents": len(val_texts)},
            "tokenizer": {"path": self.tokenizer_config.path, "vocab_size": self.vocab_size, "sha256": tokenizer_sha},
            "tokens": {"train": len(self.train_tokens), "val": len(self.val_tokens),
                       "unigram_entropy_nats": unigram_entropy(self.train_tokens, self.vocab_size)},
        }

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


    def long_documents(self, min_tokens: int) -> list[np.ndarray]:
        """Validation documents of at least min_tokens tokens (EOS excluded), longest first, at most
        data.long_documents of them: the texts the extrapolation evaluation reads."""
        lengths = np.diff(self.val_starts) - 1
        chosen = sorted((i for i in range(len(lengths)) if lengths[i] >= min_tokens), key=lambda i: (-lengths[i], i))
        return [np.asarray(self.val_tokens[self.val_starts[i]:self.val_starts[i] + lengths[i]], dtype=np.int64)
                for i in chosen[:self.data_config.long_documents]]



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
        examples = synthetic.validation_set(self.task, self.seq_len, self.data_config.val_windows, self.seed)
        return DataLoader(examples, batch_size=self.data_config.batch_size, shuffle=False,
                          pin_memory=torch.cuda.is_available())


def task_tokenizer(task: TaskConfig) -> Tokenizer:
    """The task's vocabulary as a word-level tokenizer (id i is the task's token i, named as its layout says), so
    that a run folder holds a tokenizer.json as text runs do and examples decode to readable text."""
    vocab = {name: i for i, name in enumerate(task.token_names())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def data_module(data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0) -> ResumableData:
    """The data module `data` asks for: a synthetic task or text."""
    cls = SyntheticDataModule if data.synthetic else TextDataModule
    return cls(data, tokenizer, seq_len=seq_len, seed=seed)
