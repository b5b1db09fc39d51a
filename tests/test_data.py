"""Tests for minillm.data: corpora, split, tokenizer, token caches, windows, resumption."""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import sysconfig
import time
from pathlib import Path

import datasets
import huggingface_hub
import huggingface_hub.constants
import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from minillm.data.corpus import HUB_PROBE_TIMEOUT, content_hash
from minillm.data.modules import data_module
import minillm.data.corpus as corpus_module
import minillm.data.text as text_module
import minillm.data.tokens as tokens_module
from minillm.data.config import DataConfig, TokenizerConfig
from minillm.data.synthetic import SYNTHETIC_TASKS, task_config
from minillm.data.answers import batch, examples, validation_set
from minillm.data.tokens import EOS_TOKEN, build_tokenizer, task_tokenizer, unigram_entropy
from minillm.data.corpus import (DataError, document_texts, load_corpus, load_documents, split_documents, stdlib_fingerprint)
from minillm.data.modules import SyntheticDataModule, SyntheticWindows, TextDataModule, TrainWindows

SEQ_LEN = 32
SMALL_VOCAB = TokenizerConfig(vocab_size=400)


def small_stdlib(cache_dir: Path, **overrides) -> DataConfig:
    """The first 40 standard-library modules: about a megabyte, enough for a 400-token BPE in well under a second."""
    options = {"path": "stdlib", "max_documents": 40, "val_fraction": 0.2, "val_windows": 8, "batch_size": 4,
               "long_documents": 3, "cache_dir": str(cache_dir)}
    return DataConfig(**{**options, **overrides})


def ready(cache_dir: Path, seed: int = 0, **overrides) -> TextDataModule:
    dm = TextDataModule(small_stdlib(cache_dir, **overrides), SMALL_VOCAB, seq_len=SEQ_LEN, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def warm_copy(dm: TextDataModule, cache_dir: Path, seed: int = 0, **overrides) -> TextDataModule:
    """Like ready(), on a copy of dm's cache: for tests about what happens after the first build."""
    shutil.copytree(dm.cache_dir, cache_dir, dirs_exist_ok=True)
    return ready(cache_dir, seed=seed, **overrides)


def batches(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def stdlib_docs(tmp_path_factory) -> datasets.Dataset:
    return load_documents(DataConfig(path="stdlib", cache_dir=str(tmp_path_factory.mktemp("cache"))))


@pytest.fixture(scope="module")
def dm(tmp_path_factory) -> TextDataModule:
    """A prepared module the read-only tests share; tests that change the cache work on a copy of it."""
    return ready(tmp_path_factory.mktemp("cache"))


# ----------------------------------------------------------------------------------------------
# Corpora


def test_stdlib_corpus_is_library_source_without_tests(stdlib_docs):
    paths = stdlib_docs["path"]
    assert list(paths) == sorted(paths)
    assert 500 < len(paths) < 2000
    for path in paths:
        folders = path.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__phello__"} & set(folders), path
        assert not path.startswith("_sysconfigdata"), path
    assert {"os.py", "json/decoder.py", "asyncio/tasks.py"} <= set(paths)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib_docs["text"][list(paths).index("os.py")] == (root / "os.py").read_text(encoding="utf-8")


def test_stdlib_fingerprint_is_stable_and_describes_the_corpus(stdlib_docs):
    first, second = stdlib_fingerprint(), stdlib_fingerprint()
    assert first == second
    assert first["files"] == len(stdlib_docs)
    assert first["bytes"] > 5_000_000
    assert len(first["sha256"]) == 64
    assert first["sha256"] == content_hash(list(stdlib_docs["text"]))


def test_txt_folder_gives_one_document_per_file_in_path_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    contents = {"b.txt": "second\n\nwith a blank line\n", "a.txt": "first document\nline two\n",
                "sub/c.txt": "third é ü 你好\n"}
    for name, text in contents.items():
        (folder / name).write_text(text, encoding="utf-8")
    docs = load_documents(DataConfig(path=str(folder), cache_dir=str(tmp_path / "cache")))
    assert list(docs["text"]) == [contents["a.txt"], contents["b.txt"], contents["sub/c.txt"]]


def test_non_utf8_bytes_in_a_txt_file_are_replaced(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 ol\xe9\n")
    docs = load_documents(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    assert list(docs["text"]) == ["caf\ufffd ol\ufffd\n"]


def test_jsonl_with_another_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"id": i, "content": f"document number {i}\n"} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    docs = load_documents(DataConfig(path=str(path), text_field="content", cache_dir=str(tmp_path / "cache")))
    assert list(docs["content"]) == [row["content"] for row in rows]


def test_parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "gamma"], "n": [1, 2]}), path)
    docs = load_documents(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")))
    assert list(docs["text"]) == ["alpha beta", "gamma"]


def test_save_to_disk_folders_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "single"))
    splits = {"train": ["t1", "t2"], "validation": ["v1"]}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}
                         ).save_to_disk(str(tmp_path / "dict"))
    cache = str(tmp_path / "cache")
    assert list(load_documents(DataConfig(path=str(tmp_path / "single"), cache_dir=cache))["text"]) == ["one", "two"]
    validation = load_documents(DataConfig(path=str(tmp_path / "dict"), split="validation", cache_dir=cache))
    assert list(validation["text"]) == ["v1"]
    with pytest.raises(ValueError, match=r"data.split='test'.*\['train', 'validation'\]"):
        load_documents(DataConfig(path=str(tmp_path / "dict"), split="test", cache_dir=cache))


def test_max_documents_truncates(stdlib_docs, tmp_path):
    docs = load_documents(DataConfig(path="stdlib", max_documents=7, cache_dir=str(tmp_path)))
    assert list(docs["path"]) == list(stdlib_docs["path"][:7])


def test_missing_local_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        load_documents(DataConfig(path=str(missing), cache_dir=str(tmp_path)))


def test_missing_text_field_lists_the_columns(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello", "title": "t"}) + "\n")
    with pytest.raises(DataError, match=r"^data.text_field='text' is not a column of data.path=.*: none of its 1 "
                                        r"rows has it; the rows have fields \['body', 'title'\]$"):
        load_documents(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")))


def test_empty_datasets_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").touch()
    # One shard of zero rows (save_to_disk writes no shard at all by default, which load_from_disk cannot read).
    datasets.Dataset.from_dict({"text": ["x"]}).select([]).save_to_disk(str(tmp_path / "none"), num_shards=1)
    datasets.Dataset.from_dict({"text": ["", ""]}).save_to_disk(str(tmp_path / "blank"))
    for name in ("empty.jsonl", "none"):
        with pytest.raises(ValueError, match=f"{name}' holds no documents"):
            load_documents(DataConfig(path=str(tmp_path / name), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(ValueError, match="all 2 documents have an empty 'text'"):
        load_documents(DataConfig(path=str(tmp_path / "blank"), cache_dir=str(tmp_path / "cache")))


def test_unknown_hub_dataset_offline_names_the_dataset(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    # Both libraries read the variables at import time; patch what they read.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="data.path='minillm-tests/no-such-corpus'") as caught:
        load_documents(DataConfig(path="minillm-tests/no-such-corpus", cache_dir=str(tmp_path)))
    assert caught.value.__cause__ is not None


def test_streamed_hub_dataset_is_cut_at_max_documents(tmp_path, monkeypatch):
    stream = datasets.Dataset.from_dict({"text": [f"streamed document {i}" for i in range(100)]}).to_iterable_dataset()
    calls = []

    def fake_load_dataset(path, name=None, *, split, streaming, cache_dir):
        calls.append((path, name, split, streaming))
        return stream

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(corpus_module, "_check_hub_reachable", lambda cfg, local: None)  # no network in tests
    docs = load_documents(DataConfig(path="someone/corpus", name="en", streaming=True, max_documents=3,
                                     cache_dir=str(tmp_path)))
    assert calls == [("someone/corpus", "en", "train", True)]
    assert list(docs["text"]) == [f"streamed document {i}" for i in range(3)]


# ----------------------------------------------------------------------------------------------
# Errors that name their setting, and the splits local data brings


def write_jsonl(path: Path, rows: list) -> list:
    """rows as JSON lines (a str is the row {"text": str}); returns rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r} if isinstance(r, str) else r) + "\n" for r in rows))
    return rows


def stories(kind: str, count: int) -> list[str]:
    return [f"{kind} story {i}: the {kind} fox jumps over the lazy dog {i} times.\n" for i in range(count)]


def local(path: Path, tmp_path: Path, **overrides) -> DataConfig:
    """A DataConfig for path; val_split is set as an attribute until DataConfig declares the field."""
    val_split = overrides.pop("val_split", None)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), val_windows=2, batch_size=2, **overrides)
    if val_split is not None:
        cfg.val_split = val_split
    return cfg


def refuse_hub(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked although the name is a local path")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(huggingface_hub, "get_session", refuse)


def test_corrupt_tokenizer_path_names_tokenizer_path_not_data_path(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", stories("plain", 6))
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    tokenizer = TokenizerConfig(path=str(tmp_path / "tokenizer.json"))
    dm = TextDataModule(local(tmp_path / "docs.jsonl", tmp_path), tokenizer, seq_len=8)
    with pytest.raises(DataError) as caught:
        dm.setup()
    assert str(caught.value).startswith(f"tokenizer.path={str(tmp_path / 'tokenizer.json')!r}: not a valid "
                                        f"tokenizer.json (")
    assert "data.path" not in str(caught.value)


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, stories("plain", 6))
    with path.open("a") as f:
        f.write('{"text": "seventh, cut short\n{"text": "eighth"}\n')
    with pytest.raises(DataError) as caught:
        load_documents(local(path, tmp_path))
    message = str(caught.value)
    assert message.startswith(f"data.path={str(path)!r}: line 7 is not valid JSON (") and "\n" not in message
    # In a folder the file is named too; the first row of a file and a pretty-printed .json are located as well.
    folder = tmp_path / "corpus"
    write_jsonl(folder / "a.jsonl", stories("a", 3))
    (folder / "b.jsonl").write_text('not json\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=rf"^data.path={str(folder)!r}: b.jsonl line 1 is not valid JSON \("):
        load_documents(local(folder, tmp_path))
    (folder / "b.jsonl").write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(DataError, match=rf"^data.path={str(folder)!r}: b.jsonl line 2 is JSON but not an object"):
        load_documents(local(folder, tmp_path))
    pretty = tmp_path / "docs.json"
    pretty.write_text('[\n  {"text": "one"},\n  {"text" "two"}\n]\n')
    with pytest.raises(DataError, match=rf"^data.path={str(pretty)!r}: line 3 is not valid JSON \("):
        load_documents(local(pretty, tmp_path))
    pretty.write_text('[\n  {"text": "one"},\n  {"text": "two"}\n]\n')
    assert list(load_documents(local(pretty, tmp_path))["text"]) == ["one", "two"]


@pytest.mark.parametrize("name", ["mydata.jsonl", "mydata.csv", "./mydata", "../elsewhere/mydata", "a/b/mydata",
                                  "~/no-such-minillm-folder"])
def test_missing_local_path_fails_at_once_naming_where_it_looked(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    refuse_hub(monkeypatch)
    with pytest.raises(DataError) as caught:
        load_documents(DataConfig(path=name, cache_dir=str(tmp_path / "cache")))
    resolved = Path(name).expanduser().resolve()
    assert str(caught.value) == f"data.path={name!r}: no such file or folder (resolved to {resolved})"


def test_bare_name_fails_fast_when_offline_or_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as probe:  # a port nobody listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset after a failed probe"))
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        load_documents(DataConfig(path="mydata", cache_dir=str(tmp_path / "cache")))
    assert time.monotonic() - started < HUB_PROBE_TIMEOUT
    assert str(caught.value).startswith(f"data.path='mydata': neither a local file or folder (resolved to "
                                        f"{(tmp_path / 'mydata').resolve()}) nor loadable from the hub: "
                                        f"http://127.0.0.1:{port} cannot be reached (")
    assert str(caught.value).endswith("set HF_HUB_OFFLINE=1 to use a copy cached earlier")
    monkeypatch.undo()
    # Offline, datasets looks in its cache only: no probe, no retries.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: pytest.fail("probed the hub while offline"))
    started = time.monotonic()
    with pytest.raises(DataError, match=r"^data.path='mydata': neither a local file or folder nor a dataset the "
                                        r"HuggingFace hub could serve \(HF_HUB_OFFLINE is set"):
        load_documents(DataConfig(path="mydata", cache_dir=str(tmp_path / "cache")))
    assert time.monotonic() - started < 5


def decoded_documents(dm: TextDataModule, tokens: np.ndarray) -> list[str]:
    """The documents of a packed stream, decoded: EOS ends each."""
    ends = np.flatnonzero(np.asarray(tokens) == dm.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [dm.tokenizer.decode(np.asarray(tokens[s:e], dtype=np.int64).tolist()) for s, e in zip(starts, ends)]


def test_validation_file_beside_train_file_is_the_validation_split(tmp_path):
    folder = tmp_path / "corpus"
    train = write_jsonl(folder / "train.jsonl", stories("training", 12))
    val = write_jsonl(folder / "validation.jsonl", stories("held-out", 4))
    write_jsonl(folder / "test.jsonl", stories("test", 3))
    dm = TextDataModule(local(folder, tmp_path), TokenizerConfig(vocab_size=300, min_frequency=1), seq_len=8)
    dm.setup()
    assert decoded_documents(dm, dm.train_tokens) == train  # every training row, and no other
    assert decoded_documents(dm, dm.val_tokens) == val
    assert dm.fingerprint["split"] == {"val_split": "validation", "val_fraction": None, "train_documents": 12,
                                       "val_documents": 4}
    # The same documents hash-split are another cache entry, never the one above.
    mixed = tmp_path / "mixed.jsonl"
    write_jsonl(mixed, train + val)
    other = TextDataModule(local(mixed, tmp_path), TokenizerConfig(vocab_size=300, min_frequency=1), seq_len=8)
    other.setup()
    assert other.fingerprint["split"]["val_split"] is None and other._train_path != dm._train_path


@pytest.mark.parametrize("layout", ["valid.jsonl", "val.jsonl", "dev.jsonl", "validation/part-a.jsonl",
                                    "data/validation-00000-of-00001.jsonl"])
def test_datasets_names_for_the_validation_split_are_recognised(tmp_path, layout):
    folder = tmp_path / "corpus"
    train_name = "data/train-00000-of-00001.jsonl" if layout.startswith("data/") else \
        "train/part-a.jsonl" if "/" in layout else "train.jsonl"
    train = write_jsonl(folder / train_name, stories("training", 5))
    val = write_jsonl(folder / layout, stories("held-out", 2))
    corpus = load_corpus(local(folder, tmp_path))
    assert corpus.val_split == "validation"
    assert list(corpus.train["text"]) == train and list(corpus.val["text"]) == val


def test_saved_dataset_dict_validation_split_and_data_split_are_honoured(tmp_path):
    splits = {"train": stories("training", 4), "validation": stories("held-out", 2), "extra": stories("extra", 3)}
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"text": texts}) for name, texts in splits.items()}
                         ).save_to_disk(str(tmp_path / "dict"))
    corpus = load_corpus(local(tmp_path / "dict", tmp_path))
    assert (list(corpus.train["text"]), list(corpus.val["text"])) == (splits["train"], splits["validation"])
    corpus = load_corpus(local(tmp_path / "dict", tmp_path, split="extra"))
    assert (list(corpus.train["text"]), list(corpus.val["text"])) == (splits["extra"], splits["validation"])
    corpus = load_corpus(local(tmp_path / "dict", tmp_path, val_split="extra"))
    assert corpus.val_split == "extra" and list(corpus.val["text"]) == splits["extra"]
    with pytest.raises(DataError, match=r"^data.val_split='nope': not a split of data.path=.*; its splits: "
                                        r"\['extra', 'train', 'validation'\]$"):
        load_corpus(local(tmp_path / "dict", tmp_path, val_split="nope"))
    with pytest.raises(DataError, match=r"^data.val_split='train': is also data.split"):
        load_corpus(local(tmp_path / "dict", tmp_path, val_split="train"))


def test_a_split_the_local_data_lacks_is_refused_naming_data_split(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, stories("plain", 3))
    with pytest.raises(DataError, match=rf"^data.split='bogus': not a split of data.path={str(path)!r}; its splits: "
                                        r"\['train'\]$"):
        load_documents(local(path, tmp_path, split="bogus"))
    with pytest.raises(DataError, match=r"^data.split='validation': .*its splits: \['train'\]$"):
        load_documents(local("stdlib", tmp_path, split="validation"))
    folder = tmp_path / "corpus"
    write_jsonl(folder / "train.jsonl", stories("training", 3))
    write_jsonl(folder / "test.jsonl", stories("test", 2))
    with pytest.raises(DataError, match=r"^data.split='bogus': .*its splits: \['test', 'train'\]$"):
        load_documents(local(folder, tmp_path, split="bogus"))


def test_without_a_validation_split_documents_are_hash_split_and_unused_splits_named(tmp_path, caplog):
    folder = tmp_path / "corpus"
    write_jsonl(folder / "train.jsonl", stories("training", 6))
    test = write_jsonl(folder / "test.jsonl", stories("test", 2))
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        corpus = load_corpus(local(folder, tmp_path))
    assert corpus.val is None and corpus.val_split is None and len(corpus.train) == 6
    assert "its splits ['test'] are unused (data.val_split=<split> validates on one)" in caplog.text
    assert list(load_corpus(local(folder, tmp_path, val_split="test")).val["text"]) == test


def test_files_named_for_a_split_beside_unnamed_ones_are_refused(tmp_path):
    folder = tmp_path / "corpus"
    write_jsonl(folder / "train.jsonl", stories("training", 3))
    write_jsonl(folder / "notes.jsonl", stories("notes", 2))
    with pytest.raises(DataError, match=r"some files are named for a split \(e.g. train.jsonl\) and 1 are not "
                                        r"\(e.g. notes.jsonl\)"):
        load_documents(local(folder, tmp_path))
    # Names that merely contain a keyword are documents like any other.
    other = tmp_path / "documents"
    other.mkdir()
    for name in ("unit_test.txt", "devices.txt", "a.txt"):
        (other / name).write_text(f"the text of {name}\n")
    corpus = load_corpus(local(other, tmp_path))
    assert corpus.val is None and len(corpus.train) == 3


def test_hub_validation_split_is_loaded_only_when_named(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *, split, streaming, cache_dir):
        calls.append(split)
        return datasets.Dataset.from_dict({"text": [f"{split} document {i}" for i in range(3)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(corpus_module, "_check_hub_reachable", lambda cfg, local: None)
    corpus = load_corpus(local("someone/corpus", tmp_path))
    assert calls == ["train"] and corpus.val is None
    corpus = load_corpus(local("someone/corpus", tmp_path, val_split="validation"))
    assert calls == ["train", "train", "validation"] and corpus.val["text"][0] == "validation document 0"


def test_rows_without_the_text_field_are_counted_and_skipped(tmp_path, caplog):
    path = tmp_path / "docs.jsonl"
    rows = write_jsonl(path, [{"text": t} if i % 40 else {"title": "no text here"}
                              for i, t in enumerate(stories("plain", 120))])
    cfg = local(path, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        docs = load_documents(cfg)
    assert f"data.text_field='text': 3 of 120 rows of data.path={str(path)!r} lack it or are not text; skipped" \
        in caplog.text
    assert document_texts(docs, cfg) == [row["text"] for row in rows if "text" in row]
    # Values of another kind are skipped the same way (datasets reads such a column as JSON values).
    write_jsonl(path, ["first", {"text": 5}, {"text": {"nested": "no"}}, "last"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        assert document_texts(load_documents(cfg), cfg) == ["first", "last"]
    assert "2 of 4 rows" in caplog.text
    # No row has it: the error lists the fields the rows do have.
    write_jsonl(path, [{"text": None, "body": "b", "title": "t"}] * 3)
    with pytest.raises(DataError, match=r"^data.text_field='text': none of the 3 rows of data.path=.* has it; "
                                        r"the rows' other fields: \['body', 'title'\]$"):
        load_documents(cfg)
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string()), "n": [1, 2]}), tmp_path / "docs.parquet")
    with pytest.raises(DataError, match=r"^data.text_field='text': none of the 2 rows .* fields: \['n'\]$"):
        load_documents(local(tmp_path / "docs.parquet", tmp_path))
    # Values that are not text: the error names the field and what it holds (no other field to list here).
    write_jsonl(path, [{"text": 5}, {"text": 7}])
    with pytest.raises(DataError, match=r"^data.text_field='text': none of the 2 rows of data.path=.* holds text in "
                                        r"it, only int64 values$"):
        load_documents(cfg)


def test_text_that_is_not_utf8_names_data_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "\xc1 not utf-8"}\n{"text": "fine"}\n')
    cfg = local(path, tmp_path)
    with pytest.raises(DataError, match=rf"^data.text_field='text': data.path={str(path)!r} holds bytes that are "
                                        r"not UTF-8 text"):
        document_texts(load_documents(cfg), cfg)


# ----------------------------------------------------------------------------------------------
# Split


def test_split_is_deterministic_disjoint_and_complete():
    texts = [f"document {i}\n" * (i % 7 + 1) for i in range(200)]
    train, val = split_documents(texts, 0.1)
    assert (train, val) == split_documents(texts, 0.1)
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val)
    assert 5 < len(val) < 40  # about 10% of 200
    # Decided by content, not position: reversing the corpus keeps every document on its side.
    assert set(split_documents(texts[::-1], 0.1)[1]) == set(val)


def test_split_keeps_both_sides_non_empty():
    texts = [f"doc {i}" for i in range(10)]
    train, val = split_documents(texts, 1e-9)
    assert len(val) == 1 and len(train) == 9
    train, val = split_documents(texts, 1 - 1e-9)
    assert len(train) == 1 and len(val) == 9
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only one"], 0.5)


# ----------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def train_texts(stdlib_docs) -> list[str]:
    return [t for t in stdlib_docs["text"][:40] if t]


@pytest.mark.parametrize("text", ["def f(x):\n    return x + 1  # ascii\n\n\tpass",
                                  "naïve café — 你好, мир 🙂\r\n \u00a0end"])
def test_tokenizer_round_trips_text(tmp_path, train_texts, text):
    tokenizer = build_tokenizer(SMALL_VOCAB, train_texts, tmp_path)
    assert tokenizer.get_vocab_size() == SMALL_VOCAB.vocab_size
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned


def test_tokenizer_is_cached_by_its_inputs(tmp_path, train_texts, monkeypatch):
    first = build_tokenizer(SMALL_VOCAB, train_texts, tmp_path)
    (cached,) = (p for p in tmp_path.glob("*.json") if not p.name.endswith(".record.json"))
    mtime = cached.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("trained again although the tokenizer was cached")

    monkeypatch.setattr(tokens_module, "train_tokenizer", refuse)
    second = build_tokenizer(SMALL_VOCAB, train_texts, tmp_path)
    assert second.to_str() == first.to_str() and cached.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="trained again"):  # another vocabulary size is another tokenizer
        build_tokenizer(TokenizerConfig(vocab_size=300), train_texts, tmp_path)
    monkeypatch.undo()
    cached.write_text('{"truncated": ')
    assert build_tokenizer(SMALL_VOCAB, train_texts, tmp_path).to_str() == first.to_str()  # retrained, same result


@pytest.mark.parametrize("with_record", [False, True])
def test_a_cached_tokenizer_swapped_for_another_is_trained_again(tmp_path, train_texts, caplog, with_record):
    """The cache file's record (its inputs and sha256) must vouch for it: another valid tokenizer put in its place,
    alone or with its own record, is not used (it would train a model of another vocabulary than asked)."""
    build_tokenizer(SMALL_VOCAB, train_texts, tmp_path / "asked")
    build_tokenizer(TokenizerConfig(vocab_size=300), train_texts, tmp_path / "other")
    (cached,) = (p for p in (tmp_path / "asked").glob("bpe-*.json") if not p.name.endswith(".record.json"))
    (other,) = (p for p in (tmp_path / "other").glob("bpe-*.json") if not p.name.endswith(".record.json"))
    shutil.copy(other, cached)
    if with_record:
        shutil.copy(other.with_name(f"{other.stem}.record.json"), cached.with_name(f"{cached.stem}.record.json"))
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        tokenizer = build_tokenizer(SMALL_VOCAB, train_texts, tmp_path / "asked")
    assert tokenizer.get_vocab_size() == SMALL_VOCAB.vocab_size == 400
    assert f"cached tokenizer {cached} is not what it claims" in caplog.text
    assert build_tokenizer(SMALL_VOCAB, train_texts, tmp_path / "asked").get_vocab_size() == 400  # rebuilt whole


def test_tokenizer_from_a_path(tmp_path, dm):
    saved = dm.save_tokenizer(tmp_path / "run" / "tokenizer.json")
    loaded = build_tokenizer(TokenizerConfig(path=str(saved)), [], tmp_path / "unused")
    assert loaded.to_str() == dm.tokenizer.to_str()
    with pytest.raises(DataError, match="^tokenizer.path='.*missing.json': no such file"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "missing.json")), [], tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="^tokenizer.path='.*bad.json': not a valid tokenizer"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path / "bad.json")), [], tmp_path)


# ----------------------------------------------------------------------------------------------
# Token caches


def cache_files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (cache_dir / "tokens").rglob("*") if p.is_file()}


def test_streams_pack_documents_with_eos(dm):
    assert dm.train_tokens.dtype == np.uint16 and dm.val_tokens.dtype == np.uint16
    assert dm.eos_id == 0 and dm.vocab_size == SMALL_VOCAB.vocab_size
    starts = np.asarray(dm.val_starts)
    assert starts[0] == 0 and starts[-1] == len(dm.val_tokens)
    assert np.all(dm.val_tokens[starts[1:] - 1] == dm.eos_id)  # every document ends with EOS
    assert int((np.asarray(dm.val_tokens) == dm.eos_id).sum()) == len(starts) - 1
    fingerprint = dm.fingerprint
    assert fingerprint["tokens"] == {"train": len(dm.train_tokens), "val": len(dm.val_tokens),
                                     "unigram_entropy_nats": unigram_entropy(dm.train_tokens, dm.vocab_size)}
    assert 0 < fingerprint["tokens"]["unigram_entropy_nats"] < math.log(dm.vocab_size)
    assert fingerprint["split"]["val_documents"] == len(starts) - 1
    assert fingerprint["dataset"]["stdlib"] == stdlib_fingerprint()
    assert fingerprint["dataset"]["documents"] == 40 - sum(1 for t in load_documents(dm.data_config)["text"] if not t)


def test_token_cache_is_reused(tmp_path, monkeypatch):
    first = ready(tmp_path)
    before = cache_files(tmp_path)
    assert {"train.npy", "train.json", "val.npy", "val.json", "val_starts.npy", "val_starts.json"} <= set(before)

    def refuse(*args, **kwargs):
        raise AssertionError("encoded again although the tokens were cached")

    monkeypatch.setattr(text_module, "encode_documents", refuse)
    second = ready(tmp_path)
    assert cache_files(tmp_path) == before
    assert np.array_equal(second.train_tokens, first.train_tokens)
    assert second.fingerprint == first.fingerprint


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage_header", "drop_sidecar"])
def test_corrupt_cache_is_rebuilt_identically(tmp_path, caplog, dm, damage):
    expected = np.array(warm_copy(dm, tmp_path).train_tokens)
    (path,) = (tmp_path / "tokens").rglob("train.npy")
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_a_byte":  # same length, so only the checksum can tell
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    elif damage == "garbage_header":
        path.write_bytes(b"not an npy file" + raw[15:])
    else:
        path.with_suffix(".json").unlink()
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        rebuilt = ready(tmp_path)
    assert "corrupt" in caplog.text and "train.npy" in caplog.text
    assert np.array_equal(rebuilt.train_tokens, expected)
    assert path.read_bytes() == raw


def test_a_token_cache_swapped_in_from_another_folder_is_rebuilt(tmp_path, caplog, dm):
    """A stream and its record copied from another cache folder (another split of the documents) are valid files
    that vouch for themselves; the record also says what they were built from, so they are rebuilt."""
    expected = np.array(warm_copy(dm, tmp_path).train_tokens)
    ready(tmp_path, val_fraction=0.5)
    folders = {p.parent for p in (tmp_path / "tokens").rglob("train.npy")}
    (ours,) = {p.parent for p in (tmp_path / "tokens").rglob("train.npy")
               if np.array_equal(np.load(p), expected)}
    (theirs,) = folders - {ours}
    for name in ("train.npy", "train.json"):
        shutil.copy(theirs / name, ours / name)
    with caplog.at_level(logging.WARNING, logger="minillm.data"):
        rebuilt = ready(tmp_path)
    assert f"token cache {ours / 'train.npy'} is corrupt (its record does not vouch for it)" in caplog.text
    assert np.array_equal(rebuilt.train_tokens, expected)


@pytest.mark.parametrize("below", [False, True])
def test_a_cache_dir_that_is_a_file_names_data_cache_dir(tmp_path, below):
    (tmp_path / "file").write_text("x")
    cache_dir = tmp_path / "file" / "sub" if below else tmp_path / "file"
    with pytest.raises(DataError, match=rf"^data.cache_dir='{cache_dir}': cannot hold the caches "
                                        rf"\({tmp_path / 'file'} is a file, not a folder\)$"):
        load_documents(DataConfig(path="stdlib", cache_dir=str(cache_dir)))


def test_cache_writes_leave_no_temporary_files(tmp_path):
    ready(tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]
    assert leftovers == [] and any(tmp_path.rglob("*.npy"))


def test_validation_stream_shorter_than_a_window_is_refused(tmp_path, dm):
    shutil.copytree(dm.cache_dir, tmp_path, dirs_exist_ok=True)
    too_long = TextDataModule(small_stdlib(tmp_path), SMALL_VOCAB, seq_len=10_000_000)
    with pytest.raises(ValueError, match=r"validation split has \d+ tokens, fewer than model\.context_length \+ 1 = 10000001"):
        too_long.setup()


# ----------------------------------------------------------------------------------------------
# Windows and resumption


def test_training_windows_are_shifted_slices_of_the_stream(dm):
    stream = np.asarray(dm.train_tokens, dtype=np.int64)
    slices = np.lib.stride_tricks.sliding_window_view(stream, SEQ_LEN + 1)
    for x, y in batches(dm.train_dataloader(), 3):
        assert x.shape == y.shape == (dm.data_config.batch_size, SEQ_LEN) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            window = np.concatenate([row_x, row_y[-1:]])
            assert (slices == window).all(axis=1).any()


def test_batches_depend_on_the_seed_only(tmp_path, dm):
    same_seed = warm_copy(dm, tmp_path, seed=0)
    other_seed = ready(tmp_path, seed=1)
    reference = batches(dm.train_dataloader(), 4)
    for (x, _), (x_again, _), (x_other, _) in zip(reference, batches(same_seed.train_dataloader(), 4),
                                                  batches(other_seed.train_dataloader(), 4)):
        assert torch.equal(x, x_again)
        assert not torch.equal(x, x_other)


def test_batches_do_not_depend_on_workers_or_ranks(tmp_path, dm):
    reference = [x for x, _ in batches(dm.train_dataloader(), 6)]
    with_workers = warm_copy(dm, tmp_path, num_workers=2)
    assert all(torch.equal(a, b) for a, (b, _) in zip(reference, batches(with_workers.train_dataloader(), 6)))
    # Two ranks interleave: rank 0 sees batches 0, 2, 4 and rank 1 sees 1, 3, 5.
    ranks = [iter(TrainWindows(dm._train_path, SEQ_LEN, dm.data_config.batch_size, dm.seed, first_batch=r, stride=2))
             for r in (0, 1)]
    interleaved = [next(ranks[b % 2])[0] for b in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(reference, interleaved))


def test_load_state_dict_resumes_the_batch_sequence(tmp_path, dm):
    uninterrupted = batches(dm.train_dataloader(), 7)
    resumed = warm_copy(dm, tmp_path)
    resumed.load_state_dict({"batches_consumed": 4})
    assert resumed.state_dict() == {"batches_consumed": 4}
    for (x, y), (x_resumed, y_resumed) in zip(uninterrupted[4:], batches(resumed.train_dataloader(), 3)):
        assert torch.equal(x, x_resumed) and torch.equal(y, y_resumed)


class RecordingModule(L.LightningModule):
    """A one-parameter model that remembers the inputs of every training step."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return (self.weight * batch[0].float().mean()).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.weight * batch[0].float().mean()).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(dm: TextDataModule, root: Path, saved_on: str, ckpt_path=None) -> RecordingModule:
    """Seven steps with a checkpoint every three, saved on train batch end or on validation end."""
    if saved_on == "train_batch_end":
        checkpoints = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    else:
        checkpoints = ModelCheckpoint(dirpath=root, filename="{step}", monitor="val/loss", save_top_k=-1)
    model = RecordingModule()
    trainer = L.Trainer(max_steps=7, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), callbacks=[checkpoints])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("saved_on", ["train_batch_end", "validation_end"])
def test_trainer_resumed_mid_run_sees_the_same_batches(tmp_path, dm, saved_on):
    uninterrupted = fit(warm_copy(dm, tmp_path), tmp_path / "full", saved_on).seen
    checkpoint = tmp_path / "full" / "step=3.ckpt"
    assert torch.load(checkpoint, weights_only=True)["TextDataModule"] == {"batches_consumed": 3}
    resumed = fit(ready(tmp_path), tmp_path / "resumed", saved_on, ckpt_path=checkpoint).seen
    assert len(uninterrupted) == 7 and len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted[3:], resumed))


def test_validation_windows_are_fixed_and_spread_over_the_stream(dm):
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    x = torch.cat([x for x, _ in first])
    assert x.shape == (dm.data_config.val_windows, SEQ_LEN)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    val = torch.from_numpy(np.asarray(dm.val_tokens, dtype=np.int64))
    assert torch.equal(x[0], val[:SEQ_LEN])  # the first window starts the stream, the last ends it
    assert torch.equal(torch.cat([y for _, y in first])[-1], val[-SEQ_LEN:])


def test_long_documents_are_the_longest_validation_documents(dm):
    lengths = sorted(np.diff(np.asarray(dm.val_starts)) - 1, reverse=True)
    min_tokens = int(lengths[1])  # at least two documents qualify
    long = dm.long_documents(min_tokens)
    assert [len(d) for d in long] == [int(n) for n in lengths if n >= min_tokens][: dm.data_config.long_documents]
    assert all(d.dtype == np.int64 and dm.eos_id not in d for d in long)
    assert len(dm.long_documents(0)) == dm.data_config.long_documents
    assert dm.long_documents(int(lengths[0]) + 1) == []
    text = dm.tokenizer.decode(long[0].tolist())
    assert any(t == text for t in load_documents(dm.data_config)["text"])


def test_unigram_entropy_by_hand():
    from minillm.data.tokens import unigram_entropy

    assert unigram_entropy(np.array([0, 1, 2, 3], dtype=np.uint16), 8) == pytest.approx(math.log(4))
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    assert unigram_entropy(np.array([5, 5, 5, 2]), 8) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


# ----------------------------------------------------------------------------------------------
# Synthetic tasks (data=synthetic)


def synthetic_data(task: str = "flipflop", seq_len: int = 32, **knobs) -> DataConfig:
    data = DataConfig(path="synthetic", task=task, batch_size=4, val_windows=6)
    setattr(data.tasks, task, task_config(task, knobs))
    return data


def test_synthetic_windows_yield_batches_from_first_batch_by_stride():
    task = task_config("flipflop")
    windows = iter(SyntheticWindows(task, 32, 4, seed=7, first_batch=5, stride=2))
    for b in (5, 7, 9):
        x, y = next(windows)
        assert x.shape == y.shape == (4, 32)
        expected = batch(task, 32, 4, seed=7, index=b)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    with pytest.raises(ValueError, match="model.context_length"):
        SyntheticWindows(task, 2, 4, seed=7)


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_synthetic_module_serves_the_tasks_batches_and_a_fixed_validation_set(task):
    data = synthetic_data(task)
    dm = data_module(data, TokenizerConfig(), seq_len=64, seed=3)
    assert isinstance(dm, SyntheticDataModule) and dm.vocab_size == data.synthetic_task.vocab_size
    for b, (x, y) in enumerate(batches(dm.train_dataloader(), 2)):
        expected = batch(data.synthetic_task, 64, 4, seed=3, index=b)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    ((x, y, answers),) = batches(dm.val_dataloader(), 1)
    reference = validation_set(data.synthetic_task, 64, 6, seed=3).tensors
    assert torch.equal(x, reference[0][:4]) and torch.equal(answers, reference[2][:4])
    assert dm.fingerprint["dataset"]["task"] == task and dm.fingerprint["tokenizer"]["vocab_size"] == dm.vocab_size


def test_synthetic_module_resumes_the_batch_sequence():
    dm = data_module(synthetic_data(), TokenizerConfig(), seq_len=32)
    uninterrupted = batches(dm.train_dataloader(), 5)
    resumed = data_module(synthetic_data(), TokenizerConfig(), seq_len=32)
    resumed.load_state_dict({"batches_consumed": 3})
    for (x, y), (x_again, y_again) in zip(uninterrupted[3:], batches(resumed.train_dataloader(), 2)):
        assert torch.equal(x, x_again) and torch.equal(y, y_again)


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_task_tokenizer_names_every_id_and_round_trips(task):
    config = task_config(task)
    tokenizer = task_tokenizer(config)
    assert tokenizer.get_vocab_size() == config.vocab_size == len(set(config.token_names()))
    x = examples(config, 64, 1, seed=0, index=0).inputs[0].tolist()
    text = tokenizer.decode(x)
    assert tokenizer.encode(text).ids == x


def test_synthetic_module_takes_a_tokenizer_of_its_vocabulary_only(tmp_path):
    data = synthetic_data("copy")
    path = tmp_path / "tokenizer.json"
    path.write_text(task_tokenizer(data.synthetic_task).to_str())
    data_module(data, TokenizerConfig(path=str(path)), seq_len=32)  # a fine-tuning's source tokenizer: the same
    other = synthetic_data("copy", num_symbols=5)
    with pytest.raises(DataError, match=r"^tokenizer.path=.*not the vocabulary of the copy task"):
        data_module(other, TokenizerConfig(path=str(path)), seq_len=32)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"^tokenizer.path=.*not a readable tokenizer.json"):
        data_module(data, TokenizerConfig(path=str(path)), seq_len=32)


@pytest.mark.parametrize("settings, name", [
    ({"path": "synthetic"}, "data.task"),
    ({"path": "synthetic", "task": "sorting"}, "data.task"),
    ({"path": "stdlib", "task": "mqar"}, "data.task"),
])
def test_synthetic_data_settings_are_checked_naming_them(settings, name):
    with pytest.raises(ValueError, match=rf"^{name}: "):
        DataConfig(**settings)
