"""write_atomic: whole files or none, one temporary name per process, nothing left behind a failure; a folder's
contents replaced whole; the run log never written through a link."""

from __future__ import annotations

import os

import numpy as np
import pytest

from minillm.files import replace_contents, write_atomic


def test_text_bytes_and_writer_functions_all_land_whole(tmp_path):
    target = tmp_path / "summary.json"
    write_atomic(target, "pi ≈ 3.14")
    assert target.read_bytes() == "pi ≈ 3.14".encode("utf-8")  # UTF-8 whatever the locale
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    array = np.arange(5)
    write_atomic(tmp_path / "a.npy", lambda f: np.save(f, array))
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "summary.json"]
    write_atomic(tmp_path / "new" / "folder" / "config.yaml", "x: 1\n")  # missing folders are created
    assert (tmp_path / "new" / "folder" / "config.yaml").read_text() == "x: 1\n"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_atomic(target, "old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_each_process_writes_through_its_own_temporary_name(tmp_path, monkeypatch):
    """Two ranks writing one file at once must not share a temporary file (one would rename the other's
    half-written bytes into place); a single writer uses one fixed name, so a killed write is replaced."""
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: seen.append(os.path.basename(src)) or real_replace(src, dst))
    write_atomic(tmp_path / "config.yaml", "a")
    monkeypatch.setattr(os, "getpid", lambda: 999999)
    write_atomic(tmp_path / "config.yaml", "b")
    write_atomic(tmp_path / "last.ckpt", b"c", per_process=False)
    assert seen[0] != seen[1] and seen[0].startswith(".config.yaml.") and seen[0].endswith(".partial")
    assert "999999" in seen[1] and seen[2] == ".last.ckpt.partial"


def test_run_log_opens_at_its_first_line_and_drops_lines_it_cannot_write(tmp_path):
    import logging

    from minillm.files import RunLog

    log = RunLog(str(tmp_path / "train.log"))
    assert not (tmp_path / "train.log").exists()  # nothing logged yet: no file
    log.emit(logging.makeLogRecord({"msg": "first line", "levelname": "INFO"}))
    log.flush()
    assert (tmp_path / "train.log").read_text().strip() == "first line"
    log.close()
    missing = RunLog(str(tmp_path / "no_such_folder" / "train.log"))
    missing.emit(logging.makeLogRecord({"msg": "dropped", "levelname": "INFO"}))  # no exception
    assert not (tmp_path / "no_such_folder").exists()


def test_a_link_named_like_the_log_is_not_written_through(tmp_path):
    import logging

    from minillm.files import RunLog

    outside = tmp_path / "outside.txt"
    outside.write_text("not the run's\n")
    (tmp_path / "train.log").symlink_to(outside)
    log = RunLog(str(tmp_path / "train.log"))
    log.emit(logging.makeLogRecord({"msg": "a line", "levelname": "INFO"}))  # dropped, no exception
    log.close()
    assert outside.read_text() == "not the run's\n"


def test_replace_contents_swaps_every_entry_but_the_spared_and_leaves_no_mix(tmp_path):
    folder = tmp_path / "eval"
    (folder / "old_plots").mkdir(parents=True)
    for name, text in (("report.md", "old"), ("tail_loss.png", "old"), ("eval.log", "log"), (".lock", "")):
        (folder / name).write_text(text)
    staging = folder / ".staging"
    staging.mkdir()
    (staging / "report.md").write_text("new")
    (staging / "results.json").write_text("{}")
    replace_contents(folder, staging, spare=lambda name: name.startswith(".") or name.endswith(".log"))
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "eval.log", "report.md", "results.json"]
    assert (folder / "report.md").read_text() == "new" and (folder / "eval.log").read_text() == "log"


@pytest.mark.parametrize("failing_call", [1, 3, 4])
def test_replace_contents_that_fails_midway_puts_the_old_entries_back(tmp_path, monkeypatch, failing_call):
    """A failure while moving (the 1st rename: old aside; 3rd and 4th: new in) leaves the old set, whole."""
    folder = tmp_path / "eval"
    folder.mkdir()
    for name in ("report.md", "tail_loss.png"):
        (folder / name).write_text("old")
    staging = folder / ".staging"
    staging.mkdir()
    for name in ("report.md", "results.json"):
        (staging / name).write_text("new")
    real, calls = os.replace, []

    def replace(source, target):
        calls.append(1)
        if len(calls) == failing_call:
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        replace_contents(folder, staging, spare=lambda name: name.startswith("."))
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in folder.iterdir()) == [".staging", "report.md", "tail_loss.png"]
    assert all((folder / name).read_text() == "old" for name in ("report.md", "tail_loss.png"))
    assert sorted(p.name for p in staging.iterdir()) == ["report.md", "results.json"]
