"""Text as token streams: documents split, tokenized and cached, with the fingerprint of each (no Lightning)."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from minillm.data.config import DataConfig, TokenizerConfig
from minillm.data.corpus import (
    DataError,
    content_hash,
    document_texts,
    load_corpus,
    split_documents,
    stdlib_fingerprint,
)
from minillm.data.tokens import (
    CACHE_FORMAT,
    _hash_json,
    build_tokenizer,
    cached_array,
    encode_documents,
    eos_id,
    unigram_entropy,
)

log = logging.getLogger(__name__)


class TextTokens:
    """Documents -> split -> tokenizer -> cached token streams (train, validation), and the fingerprint of each;
    what training windows and an evaluation's long documents are read from. No Lightning here: an evaluation
    reads a run's validation documents through this class alone."""

    def __init__(self, data: DataConfig, tokenizer: TokenizerConfig, seq_len: int, seed: int = 0):
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

    def load(self) -> None:
        """Read the corpus, build or load the tokenizer, build or load the cached token streams."""
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
        inputs = {"format": CACHE_FORMAT, "documents": corpus_sha, **split_key, "tokenizer": tokenizer_sha}
        folder = self.cache_dir / "tokens" / _hash_json(inputs)[:20]
        encode_val = functools.cache(lambda: encode_documents(tokenizer, val_texts))
        train = cached_array(folder / "train.npy", lambda: encode_documents(tokenizer, train_texts)[0], inputs)
        val = cached_array(folder / "val.npy", lambda: encode_val()[0], inputs)
        val_starts = cached_array(folder / "val_starts.npy", lambda: encode_val()[1], inputs)

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

    def long_documents(self, min_tokens: int) -> list[np.ndarray]:
        """Validation documents of at least min_tokens tokens (EOS excluded), longest first, at most
        data.long_documents of them: the texts the extrapolation evaluation reads."""
        lengths = np.diff(self.val_starts) - 1
        chosen = sorted((i for i in range(len(lengths)) if lengths[i] >= min_tokens), key=lambda i: (-lengths[i], i))
        return [np.asarray(self.val_tokens[self.val_starts[i]:self.val_starts[i] + lengths[i]], dtype=np.int64)
                for i in chosen[:self.data_config.long_documents]]
