"""Tokenizers (trained or loaded) and token caches verified by their content hash."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.data.config import TokenizerConfig
from minillm.data.corpus import DataError, content_hash
from minillm.data.synthetic import TaskConfig
from minillm.files import write_atomic

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"  # separates documents in the packed streams; id 0 in trained tokenizers
CACHE_FORMAT = 2  # bump when the layout of the caches (tokenizers, token streams, their records) changes
ENCODE_BATCH = 512  # documents per encode_batch call: large enough for the Rust threads, small enough for memory


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


def read_tokenizer(path: str | Path, setting: str = "tokenizer.path") -> Tokenizer:
    """A tokenizer.json with the EOS token; DataError naming `setting` and the file otherwise."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataError(f"{setting}={str(path)!r}: no such file (resolved to {resolved.resolve()})")
    try:
        tokenizer = Tokenizer.from_file(str(resolved))
    except Exception as error:  # the Rust side raises a bare Exception for any parse failure
        raise DataError(f"{setting}={str(path)!r}: not a valid tokenizer.json ({error})") from error
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"{setting}={str(path)!r}: has no {EOS_TOKEN!r} token to separate documents")
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, train_texts: Sequence[str], cache_dir: str | Path) -> Tokenizer:
    """cfg.path's tokenizer.json, or a BPE trained on train_texts and cached under cache_dir by its inputs. The
    cached file's record (its inputs and sha256, beside it) must vouch for it, else it is trained again: a cache
    swapped for another valid tokenizer would train a model of another vocabulary than asked."""
    if cfg.path is not None:
        return read_tokenizer(cfg.path)
    inputs = {"format": CACHE_FORMAT, "texts": content_hash(train_texts), "vocab_size": cfg.vocab_size,
              "min_frequency": cfg.min_frequency, "tokenizers": tokenizers.__version__}
    path = Path(cache_dir) / f"bpe-{_hash_json(inputs)[:20]}.json"
    tokenizer = _cached_tokenizer(path, inputs)
    if tokenizer is None:
        log.info("training a %d-token byte-level BPE on %d documents", cfg.vocab_size, len(train_texts))
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size, cfg.min_frequency)
        text = tokenizer.to_str()
        write_atomic(path, text)
        write_atomic(_record(path), json.dumps({"inputs": inputs, "sha256": _sha256(text)}))  # after: it vouches
    return tokenizer


def _record(path: Path) -> Path:
    """Where a cached file's record (what it was built from, its sha256) lies: x.npy -> x.json, x.json ->
    x.record.json."""
    return path.with_name(f"{path.stem}.record.json") if path.suffix == ".json" else path.with_suffix(".json")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _cached_tokenizer(path: Path, inputs: dict) -> Optional[Tokenizer]:
    """The tokenizer cached at path if its record says it was built from `inputs` and has its bytes; else None
    (a warning names the file when there was one)."""
    if not path.exists() and not _record(path).exists():
        return None
    try:
        text = path.read_text()
        if json.loads(_record(path).read_text()) == {"inputs": inputs, "sha256": _sha256(text)}:
            return Tokenizer.from_str(text)
        problem = "its record does not vouch for it: another file, or one built from other settings"
    except Exception as error:  # missing or unreadable file or record; the Rust parser raises a bare Exception
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    log.warning("cached tokenizer %s is not what it claims (%s); training it again", path, problem)
    return None


# ----------------------------------------------------------------------------------------------
# Token caches: one packed stream per split, each document followed by EOS, as a memory-mapped .npy
# with a JSON record (what it was built from, its name, dtype, length, sha256) written after it; a file the record
# does not vouch for (torn write, truncation, bit rot, a file swapped in from elsewhere) is rebuilt.


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


def _describe(array: np.ndarray, inputs: dict, name: str) -> dict:
    return {"inputs": inputs, "file": name, "dtype": str(array.dtype), "length": int(array.shape[0]),
            "sha256": hashlib.sha256(array).hexdigest()}


def _load_verified(path: Path, inputs: dict) -> Optional[np.ndarray]:
    record = _record(path)
    if not path.exists() and not record.exists():
        return None
    try:
        array = np.load(path, mmap_mode="r")
        if array.ndim == 1 and _describe(array, inputs, path.name) == json.loads(record.read_text()):
            return array
        problem = "its record does not vouch for it"
    except (OSError, ValueError, EOFError) as error:  # missing or truncated file, bad header, bad JSON
        problem = str(error)
    log.warning("token cache %s is corrupt (%s); rebuilding it", path, problem)
    return None


def cached_array(path: Path, build: Callable[[], np.ndarray], inputs: dict) -> np.ndarray:
    """Memory-map path if its record vouches for it (built from `inputs`, these bytes); otherwise build it, write
    it atomically, then its record, and map that."""
    array = _load_verified(path, inputs)
    if array is None:
        built = build()
        write_atomic(path, lambda f: np.save(f, built))
        write_atomic(_record(path), json.dumps(_describe(built, inputs, path.name)))
        array = np.load(path, mmap_mode="r")
    return array


def task_tokenizer(task: TaskConfig) -> Tokenizer:
    """The task's vocabulary as a word-level tokenizer (id i is the task's token i, named as its layout says), so
    that a run folder holds a tokenizer.json as text runs do and examples decode to readable text."""
    vocab = {name: i for i, name in enumerate(task.token_names())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer
