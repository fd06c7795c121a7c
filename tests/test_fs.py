"""The one writer of output directories and files (runtime/fs.py): atomic replacement, the old copy kept
until the new one is in place, leftovers of killed runs cleaned, the umask honoured, refusals up front."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from bitfit.runtime import fs
from bitfit.runtime.errors import BitFitError, PackError
from conftest import fail_moves_into

MARK = "manifest.json"
KIND = "bitfit-thing"


def mine(text: str) -> str:
    """A marker file of the kind the tests write (its format is what lets --overwrite replace it)."""
    return json.dumps({"format": KIND, "text": text})


def make(target, text: str):
    with fs.output_dir(target, overwrite=True, marker=MARK, format=KIND, what="thing") as tmp:
        (tmp / MARK).write_text(mine(text))
        (tmp / "data.bin").write_bytes(text.encode() * 3)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_writes_and_replaces_leaving_nothing_beside(tmp_path):
    target = tmp_path / "out"
    make(target, "one")
    make(target, "two")
    assert (target / MARK).read_text() == mine("two") and (target / "data.bin").read_bytes() == b"twotwotwo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_while_building_leaves_the_old_version(tmp_path):
    target = tmp_path / "out"
    make(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with fs.output_dir(target, overwrite=True, marker=MARK, format=KIND, what="thing") as tmp:
            (tmp / MARK).write_text("half")
            raise RuntimeError("boom")
    assert (target / MARK).read_text() == mine("old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_move_brings_the_old_version_back(tmp_path, monkeypatch):
    """The rename of the new directory into place fails: the old one, moved aside first, returns."""
    target = tmp_path / "out"
    make(target, "old")
    fail_moves_into(target, monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make(target, "new")
    assert (target / MARK).read_text() == mine("old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_writer_are_cleaned_and_an_orphaned_old_copy_restored(tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    stale = tmp_path / f".out.bitfit-tmp-{pid}-0000"
    stale.mkdir()
    (stale / MARK).write_text("half-written")
    old = tmp_path / f".out.bitfit-old-{pid}-1111"  # killed between its two renames: out is missing
    old.mkdir()
    (old / MARK).write_text(mine("the only complete copy"))
    alive = tmp_path / f".out.bitfit-tmp-{os.getpid()}-2222"  # a live writer's (this process): kept
    alive.mkdir()
    restored = fs.clean_leftovers(target)
    assert sorted(p.name for p in restored) == sorted([stale.name, old.name])
    assert (target / MARK).read_text() == mine("the only complete copy")
    assert not stale.exists() and alive.exists()
    alive.rmdir()
    make(target, "next")  # and the writer itself cleans before it writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "out"
        with fs.output_dir(target, overwrite=False, marker=MARK, format=KIND, what="thing") as tmp:
            (tmp / MARK).write_text("x")
            fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as onnx / tempfile write
            os.close(fd)
            (tmp / "sub").mkdir(mode=0o700)
        fs.write_file(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(target) == mode(target / "sub") == 0o755
    assert mode(target / MARK) == mode(target / "private.bin") == mode(tmp_path / "report.json") == 0o644


def test_refusals_come_before_any_work(tmp_path):
    target = tmp_path / "out"
    make(target, "mine")
    with pytest.raises(PackError, match=r"already exists: choose another output path \(--out\), or pass --overwrite"):
        fs.check_target(target, overwrite=False, marker=MARK, format=KIND, what="thing", error=PackError)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.raises(BitFitError, match="exists and is not a thing: refusing to replace it"):
        make(other, "x")
    assert (other / "keep.txt").read_text() == "keep" and not (other / MARK).exists()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(BitFitError, match="exists and is not a thing"):
        make(link, "x")
    assert (target / MARK).read_text() == mine("mine")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BitFitError, match="is not a writable directory"):
        fs.check_target(a_file / "out", overwrite=False, marker=MARK, format=KIND, what="thing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_place_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(BitFitError, match="is not a writable directory"):
        fs.check_target(locked / "out", overwrite=False, marker=MARK, format=KIND, what="thing")


def test_write_file_is_atomic_and_never_overwrites_silently(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    fs.write_file(path, "one")
    with pytest.raises(BitFitError, match="already exists"):
        fs.write_file(path, "two", overwrite=False)
    with pytest.raises(BitFitError, match="is a directory"):
        fs.write_file(tmp_path, "x")
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(OSError):
        fs.write_file(path, "three")
    assert path.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


# -- issue 23 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("marker_text, holds", [
    (json.dumps({"format": "bitfit-other", "x": 1}), "declares format 'bitfit-other'"),
    (json.dumps({"name": "App", "icons": []}), r"declares no format \(another tool wrote it\)"),
    ("not json {", r"declares no format \(another tool wrote it\)"),
    (json.dumps(["format"]), r"declares no format \(another tool wrote it\)"),
])
def test_overwrite_replaces_only_a_directory_that_declares_the_writers_format(tmp_path, marker_text, holds):
    other = tmp_path / "other"
    other.mkdir()
    (other / MARK).write_text(marker_text)
    (other / "index.html").write_text("<html></html>")
    for overwrite in (True, False):  # without --overwrite too: suggesting it would be wrong
        with pytest.raises(PackError, match=rf"other is not a thing: its manifest\.json {holds} where a thing's "
                                            r"declares 'bitfit-thing'; refusing to replace it, even with --overwrite"):
            fs.check_target(other, overwrite=overwrite, marker=MARK, format=KIND, what="thing", error=PackError)
    with pytest.raises(BitFitError, match="refusing to replace it, even with --overwrite"):
        make(other, "x")
    assert (other / MARK).read_text() == marker_text and (other / "index.html").exists()
    mine_dir = tmp_path / "mine"
    make(mine_dir, "one")
    make(mine_dir, "two")  # the same kind, with overwrite: replaced
    assert (mine_dir / MARK).read_text() == mine("two")


def test_an_output_place_is_tried_not_guessed(tmp_path, monkeypatch):
    """Root passes every os.access check, yet cannot make anything in /proc: the parent is probed by making
    (and removing) a directory in it, before any work."""
    monkeypatch.setattr(fs.os, "access", lambda *a, **k: True)
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777):
        if os.fspath(path).startswith(os.fspath(tmp_path / "ro")):
            raise OSError(30, "Read-only file system")
        return real_mkdir(path, mode)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(fs.os, "mkdir", mkdir)
    with pytest.raises(BitFitError, match=r"cannot write .*ro/out: .*ro is not a writable directory \(Read-only file "
                                          r"system\); choose another output path"):
        fs.check_target(tmp_path / "ro" / "out", overwrite=False, marker=MARK, format=KIND, what="thing")
    fs.check_target(tmp_path / "rw" / "deeper" / "out", overwrite=False, marker=MARK, format=KIND, what="thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]  # the probe left nothing behind


def test_a_file_under_a_file_is_refused_as_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    for call in (lambda p: fs.check_file(p, what="report"), lambda p: fs.write_file(p, "{}", what="report")):
        with pytest.raises(BitFitError, match=r"cannot write .*file/r\.json: .*file is not a writable directory \(it "
                                              r"is not a directory\); choose another path for the report"):
            call(tmp_path / "file" / "r.json")
    assert (tmp_path / "file").read_text() == "x"
