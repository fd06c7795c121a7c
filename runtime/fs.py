"""Files on disk: one writer for output directories and files, and checksums.

Every command that writes a directory (train, compile, extract, import-peft, export-bank, export-triton)
goes through `output_dir`: it builds the new directory beside the target, fsyncs it, and swaps it in by
renames. The old copy is moved aside, never deleted, until the new one is in place, so a crash or a failed
rename leaves one complete version, never a mix and never nothing. Temporary names carry the writer's pid:
leftovers of a killed run are recognised by that pid being gone, and cleaned (an orphaned old copy whose
target is missing is moved back first). New files and directories get the permissions the umask gives,
as any other program's output would (tempfile's 0700 / 0600 would hide packs from a service account).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BitFitError

_TMP, _OLD = "bitfit-tmp", "bitfit-old"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


MAX_JSON_BYTES = 16 << 20  # a manifest or map: kilobytes; more is not one of ours
# a tokenizer.json: multilingual ones are tens of MB (xlm-roberta's: 17 MB); more is not a tokenizer
MAX_TOKENIZER_BYTES = 256 << 20


def open_regular(path: str | os.PathLike, *, error: type[BitFitError], fix: str) -> tuple[int, int]:
    """An open descriptor of `path` and its size, only if it is a regular file (a directory, FIFO, socket
    or device is refused; a FIFO never blocks the open). The caller closes the descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path} is missing: {fix}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory, not a file: {fix}") from None
    except OSError as e:
        raise error(f"cannot open {path} ({e.strerror}): {fix}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        what = "directory" if stat.S_ISDIR(info.st_mode) else "FIFO" if stat.S_ISFIFO(info.st_mode) else "special file"
        raise error(f"{path} is a {what}, not a regular file: {fix}")
    return fd, info.st_size


def regular_size(path: str | os.PathLike, *, error: type[BitFitError], fix: str) -> int:
    """The size of `path` if it is a regular file; `error` otherwise (missing, a directory, a FIFO, ...)."""
    fd, size = open_regular(path, error=error, fix=fix)
    os.close(fd)
    return size


def read_bounded(path: str | os.PathLike, limit: int, *, what: str, error: type[BitFitError], fix: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    fd, size = open_regular(path, error=error, fix=fix)
    try:
        if size > limit:
            raise error(f"{path} is {size:,} bytes, more than a {what} can be ({limit:,}): {fix}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while it was read
        raise error(f"{path} is more than a {what} can be ({limit:,} bytes): {fix}")
    return data


def read_json(path: str | os.PathLike, *, what: str, error: type[BitFitError], fix: str,
              limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file that a person may have edited, truncated, replaced or inflated: refused with `error`
    naming the problem and `fix` unless it is a regular UTF-8 file of at most `limit` bytes holding JSON
    without NaN or Infinity, nested at most a few hundred levels, with numbers Python can hold."""
    data = read_bounded(path, limit, what=what, error=error, fix=fix)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): {fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): {fix}") from None
    except RecursionError:
        raise error(f"{path} is nested too deeply to be a {what}: {fix}") from None
    except ValueError as e:  # a NaN / Infinity literal, or an integer of thousands of digits
        raise error(f"{path} holds a value JSON manifests may not hold ({e}): {fix}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(target: Path, parent: Path) -> str:
    # staged elsewhere (beside a watched repository), the name also says which directory the target is in
    return f".{target.name}." if parent == target.parent else f".{target.parent.name}-{target.name}."


def _sibling(target: Path, tag: str, parent: Path | None = None) -> Path:
    parent = parent or target.parent
    return parent / f"{_prefix(target, parent)}{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _leftovers(target: Path, parent: Path) -> list[tuple[str, Path]]:
    """(tag, path) of temporary siblings of `target` whose writer process is gone."""
    out = []
    prefix = _prefix(target, parent)
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for p in entries:
        for tag in (_TMP, _OLD):
            head = f"{prefix}{tag}-"
            pid = p.name[len(head):].split("-")[0] if p.name.startswith(head) else ""
            if pid.isdigit() and not _alive(int(pid)):
                out.append((tag, p))
    return out


def clean_leftovers(target: str | os.PathLike, parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove what a killed writer left beside `target` (its temporary and old copies). An old copy whose
    target is missing is the only complete version: it is moved back to `target` instead. Returns the paths
    removed or restored."""
    target = Path(target)
    done = []
    for tag, path in sorted(_leftovers(target, Path(parent) if parent else target.parent)):
        if tag == _OLD and not target.exists():
            os.replace(path, target)
        else:
            _remove(path)
        done.append(path)
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk before it is renamed into place."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _declared_format(marker: Path) -> str | None:
    """The `format` a marker file declares; None where it is no JSON object naming one (a web app's
    manifest.json, a damaged file, anything another tool wrote)."""
    try:
        data = read_json(marker, what="manifest", error=BitFitError, fix="")
    except BitFitError:
        return None
    found = data.get("format") if isinstance(data, dict) else None
    return found if isinstance(found, str) else None


def check_target(
    target: str | os.PathLike, *, overwrite: bool, marker: str, format: str, what: str,
    error: type[BitFitError] = BitFitError,
) -> Path:
    """Refuse, before any work, a target that exists without overwrite; one that is not a `what` this tool
    wrote (its `marker` file must declare `format`: a pack is never replaced by a compiled directory, nor a
    web app's folder holding a manifest.json by either), even with overwrite; and an output directory that
    cannot be written (tried, not guessed: root passes every permission check, yet cannot write /proc)."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if target.is_symlink() or not target.is_dir() or not (target / marker).is_file():
            raise error(f"{target} exists and is not a {what}: refusing to replace it; choose another path")
        found = _declared_format(target / marker)
        if found != format:
            holds = f"declares format {found!r}" if found else "declares no format (another tool wrote it)"
            raise error(f"{target} is not a {what}: its {marker} {holds} where a {what}'s declares {format!r}; "
                        "refusing to replace it, even with --overwrite: choose another output path")
        if not overwrite:
            raise error(f"{target} already exists: choose another output path (--out), or pass --overwrite to "
                        "replace it")
    _check_parent(target, error, "choose another output path")
    return target


def _check_parent(target: Path, error: type[BitFitError], fix: str) -> None:
    """Refuse a target whose nearest existing ancestor is not a directory this process can write in."""
    parent = target.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None:
        problem = "it is not a directory" if not existing.is_dir() else _unwritable(existing, target)
        if problem:
            raise error(f"cannot write {target}: {existing} is not a writable directory ({problem}); {fix}")


def _unwritable(directory: Path, target: Path) -> str | None:
    """Why nothing can be made in `directory` (None when a probe directory could be made and removed)."""
    probe = _sibling(target, _TMP, directory)
    try:
        os.mkdir(probe, 0o700)
    except OSError as e:
        return e.strerror or str(e)
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return None


@contextlib.contextmanager
def output_dir(
    target: str | os.PathLike,
    *,
    overwrite: bool,
    marker: str,
    format: str,
    what: str,
    staging: str | os.PathLike | None = None,
    error: type[BitFitError] = BitFitError,
) -> Iterator[Path]:
    """Write a directory atomically: `with output_dir(out, overwrite=..., marker="manifest.json",
    format="bitfit-task-pack", what="task pack") as tmp:` fill `tmp`; on leaving the block it replaces `out`.
    `marker` is a JSON file every directory of this kind holds, declaring `format`: an existing target whose
    marker is missing or declares another format is refused, never replaced (check_target). `staging` is where the
    temporary directory is made (default: beside the target; it must be on the same filesystem), for targets
    inside a directory that another program watches (a Triton model repository)."""
    target = check_target(target, overwrite=overwrite, marker=marker, format=format, what=what, error=error)
    parent = Path(staging) if staging is not None else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target, parent)
    tmp = _sibling(target, _TMP, parent)
    os.mkdir(tmp, 0o777)  # mode & ~umask: what the user's umask allows, like any other output
    try:
        yield tmp
        _chmod_tree(tmp)
        _fsync_tree(tmp)
        # checked again: the target may have appeared (or changed) while the new version was being built
        check_target(target, overwrite=overwrite, marker=marker, format=format, what=what, error=error)
        _swap(tmp, target, parent)
    finally:
        if tmp.exists():
            _remove(tmp)


def _chmod_tree(root: Path) -> None:
    """Files some writers make with 0600 (onnx, tempfile) get what the umask gives, as the rest."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)


def _swap(tmp: Path, target: Path, parent: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return
    old = _sibling(target, _OLD, parent)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)  # the new one could not go in: the old one comes back
        raise
    _fsync_dir(target.parent)
    _remove(old)


def check_file(path: str | os.PathLike, *, overwrite: bool = True, what: str = "file") -> Path:
    """Refuse, before any work, a file path write_file could not write: a directory, an existing file without
    overwrite, or a place that is not a writable directory (under a file, in /proc)."""
    path = Path(path)
    if path.is_dir():
        raise BitFitError(f"{path} is a directory: give a file name for the {what}")
    if path.exists() and not overwrite:
        raise BitFitError(f"{path} already exists: choose another path, or pass --overwrite to replace it")
    _check_parent(path, BitFitError, f"choose another path for the {what}")
    return path


def write_file(
    path: str | os.PathLike, data: bytes | str, *, overwrite: bool = True, what: str = "file"
) -> Path:
    """Write one file atomically (a temporary sibling, fsync, rename). overwrite=False refuses an existing
    file; a directory at `path` is always refused."""
    path = check_file(path, overwrite=overwrite, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = _sibling(path, _TMP)
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise BitFitError(f"cannot write {path} ({e.strerror}): choose another path") from e
        raise
    _fsync_dir(path.parent)
    return path
