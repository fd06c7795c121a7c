"""The one writer of output directories and files (runtime/fs.py): atomic replacement, the old copy kept
until the new one is in place, leftovers of killed runs cleaned, the umask honoured, refusals up front."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from bitfit.runtime import fs
from bitfit.runtime.errors import BitFitError, PackError
from conftest import fail_moves_into

MARK = "manifest.json"


def make(target, text: str):
    with fs.output_dir(target, overwrite=True, marker=MARK, what="thing") as tmp:
        (tmp / MARK).write_text(text)
        (tmp / "data.bin").write_bytes(text.encode() * 3)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_writes_and_replaces_leaving_nothing_beside(tmp_path):
    target = tmp_path / "out"
    make(target, "one")
    make(target, "two")
    assert (target / MARK).read_text() == "two" and (target / "data.bin").read_bytes() == b"twotwotwo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_while_building_leaves_the_old_version(tmp_path):
    target = tmp_path / "out"
    make(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with fs.output_dir(target, overwrite=True, marker=MARK, what="thing") as tmp:
            (tmp / MARK).write_text("half")
            raise RuntimeError("boom")
    assert (target / MARK).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_move_brings_the_old_version_back(tmp_path, monkeypatch):
    """The rename of the new directory into place fails: the old one, moved aside first, returns."""
    target = tmp_path / "out"
    make(target, "old")
    fail_moves_into(target, monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        make(target, "new")
    assert (target / MARK).read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_killed_writer_are_cleaned_and_an_orphaned_old_copy_restored(tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    stale = tmp_path / f".out.bitfit-tmp-{pid}-0000"
    stale.mkdir()
    (stale / MARK).write_text("half-written")
    old = tmp_path / f".out.bitfit-old-{pid}-1111"  # killed between its two renames: out is missing
    old.mkdir()
    (old / MARK).write_text("the only complete copy")
    alive = tmp_path / f".out.bitfit-tmp-{os.getpid()}-2222"  # a live writer's (this process): kept
    alive.mkdir()
    restored = fs.clean_leftovers(target)
    assert sorted(p.name for p in restored) == sorted([stale.name, old.name])
    assert (target / MARK).read_text() == "the only complete copy"
    assert not stale.exists() and alive.exists()
    alive.rmdir()
    make(target, "next")  # and the writer itself cleans before it writes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "out"
        with fs.output_dir(target, overwrite=False, marker=MARK, what="thing") as tmp:
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
        fs.check_target(target, overwrite=False, marker=MARK, what="thing", error=PackError)
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
    assert (target / MARK).read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BitFitError, match="is not a writable directory"):
        fs.check_target(a_file / "out", overwrite=False, marker=MARK, what="thing")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_place_is_refused_up_front(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(BitFitError, match="is not a writable directory"):
        fs.check_target(locked / "out", overwrite=False, marker=MARK, what="thing")


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
