"""The packs directory of `bitfit serve`: which subdirectories are packs, what changed since the last scan,
and registering it on the session (no web imports: the server's app calls this).

Every subdirectory holding manifest.json is a pack (hidden ones, such as the temporary directories the
toolkit's writer makes, are skipped). A pack is served under the task name in its manifest, not under its
directory's name (as `TaskSession.register` and `bitfit predict` do). On reload a pack is new (added),
changed (its manifest.json or tensors.safetensors bytes differ from the version served: replaced atomically
with `TaskSession.register(..., replace=True)`) or unchanged. A pack that fails the runtime's strict
validation or does not fit the graph is refused with its error (keyed by task name, or by directory name
when its manifest cannot be read) and the version already served keeps serving. A refused directory is
remembered by its files' (inode, size, mtime, ctime): a rescan re-reports it without reading it again
(a huge file is not hashed on every --reload-every), until one of its files changes.

Several directories declaring one task name clash: one of them is served and the others are refused (keyed
by directory name, saying which one is served), and `clashes` (in the reload's answer and /healthz) names
them all. The one served is the directory already serving the task, so a reload never takes it offline or
swaps it for another; with none (at startup), the first by directory name. Tasks whose pack left the
directory keep serving too (listed as "missing"); restart to drop them. Only safetensors packs load.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfit.runtime.errors import BitFitError
from bitfit.runtime.fs import MAX_JSON_BYTES, read_bounded, sha256_file
from bitfit.runtime.pack import (
    MANIFEST_FILE,
    TENSORS_FILE,
    PackManifest,
    TaskPack,
    check_tensors_size,
    load_pack,
    read_manifest,
)
from bitfit.runtime.session import TaskSession


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # still served, but no longer in the directory
    # task -> {"serving": the directory chosen, "ignored": the others declaring the same task}
    clashes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"added": sorted(self.added), "replaced": sorted(self.replaced), "unchanged": sorted(self.unchanged),
                "refused": dict(sorted(self.refused.items())), "missing": sorted(self.missing),
                "clashes": dict(sorted(self.clashes.items()))}


@dataclass
class _Loaded:
    name: str
    directory: Path
    fingerprint: str
    pack: TaskPack


def _fingerprint(directory: Path, manifest: PackManifest) -> str:
    """What identifies one version of a pack on disk: its manifest's and its tensors' bytes (regular files
    only, the manifest bounded, the tensors of the size the manifest implies before they are hashed: a FIFO
    or a huge file put there is refused, not waited on)."""
    raw = read_bounded(directory / MANIFEST_FILE, MAX_JSON_BYTES, what="pack manifest", error=BitFitError,
                       fix="replace it with a task pack")
    check_tensors_size(directory, manifest)
    return f"{hashlib.sha256(raw).hexdigest()}:{sha256_file(directory / TENSORS_FILE)}"


def _stat_key(directory: Path) -> tuple:
    """What changes when a pack's files do, for the cost of two stats (taken before they are read, so a
    change while they are read shows at the next scan)."""
    out = []
    for name in (MANIFEST_FILE, TENSORS_FILE):
        try:
            st = os.stat(directory / name)
        except OSError as e:
            out.append(e.errno)
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


@dataclass
class _Refusal:
    key: tuple  # _stat_key when refused
    task: str | None  # the task its manifest declares (None: the manifest was refused)
    message: str


class PackDirectory:
    """Scans a packs directory and registers what changed (see the module docstring for the rules)."""

    def __init__(self, root: str | os.PathLike, session: TaskSession) -> None:
        self.root = Path(root)
        self.session = session
        self.served: dict[str, str] = {}  # task -> fingerprint of the version registered from this directory
        self.sources: dict[str, Path] = {}  # task -> the directory that version came from
        self.clashes: dict[str, dict[str, Any]] = {}  # as of the last scan (ReloadResult.clashes)
        self._refused: dict[Path, _Refusal] = {}

    def _refuse(self, directory: Path, key: tuple, task: str | None, error: Exception) -> str:
        self._refused[directory] = _Refusal(key, task, str(error))
        return str(error)

    def prepare(self) -> tuple[list[_Loaded], ReloadResult]:
        """Read, check and load everything new or changed (no registration): safe to run in a thread."""
        result = ReloadResult()
        if not self.root.is_dir():
            raise BitFitError(f"no packs directory at {self.root}: give a directory of task packs")
        claims: dict[str, list[tuple[Path, tuple, PackManifest | None]]] = {}
        directories = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._refused = {d: r for d, r in self._refused.items() if d in directories}  # gone: forgotten
        for directory in directories:
            if not (directory / MANIFEST_FILE).is_file():
                continue
            key = _stat_key(directory)
            known = self._refused.get(directory)
            if known is not None and known.key == key:  # refused before and unchanged since: not read again
                if known.task is None:
                    result.refused[directory.name] = known.message
                else:
                    claims.setdefault(known.task, []).append((directory, key, None))
                continue
            self._refused.pop(directory, None)
            try:
                manifest = read_manifest(directory)
            except Exception as e:  # noqa: BLE001 - a bad pack is reported, never fatal
                result.refused[directory.name] = self._refuse(directory, key, None, e)
                continue
            claims.setdefault(manifest.task, []).append((directory, key, manifest))
        loaded: list[_Loaded] = []
        for name, candidates in claims.items():
            directory, key, manifest = candidates[0]
            if len(candidates) > 1:
                source = self.sources.get(name) if name in self.session.tasks else None
                chosen = next((c for c in candidates if c[0] == source), None)
                why = "the directory already serving it" if chosen else "the first by directory name"
                directory, key, manifest = chosen or candidates[0]
                ignored = [c[0].name for c in candidates if c[0] != directory]
                result.clashes[name] = {"serving": directory.name, "ignored": ignored}
                every = ", ".join(sorted(c[0].name for c in candidates))
                for other in ignored:
                    result.refused[other] = (f"task {name!r} is declared by several packs ({every}): "
                                             f"{directory.name!r} is served ({why}), {other!r} is not loaded; keep "
                                             "one of them (move the others out, or give them another task name)")
            if manifest is None:  # refused before, unchanged since
                result.refused[name] = self._refused[directory].message
                continue
            try:
                fingerprint = _fingerprint(directory, manifest)
                if self.served.get(name) == fingerprint and name in self.session.tasks:
                    self.sources[name] = directory  # the same bytes, maybe a copy in another directory now
                    result.unchanged.append(name)
                    continue
                pack = load_pack(directory)  # strict: checksum, provenance, names, shapes, dtypes, finite
                self.session.compiled.check_pack(pack, f"task pack {directory.name!r}")
                if pack.name != name:
                    raise BitFitError(f"{directory} changed while it was read: reload again")
            except Exception as e:  # noqa: BLE001
                result.refused[name] = self._refuse(directory, key, name, e)
                continue
            loaded.append(_Loaded(name, directory, fingerprint, pack))
        present = set(claims)
        result.missing = [t for t in self.session.tasks if t not in present]
        self.clashes = result.clashes
        return loaded, result

    def commit(self, loaded: list[_Loaded], result: ReloadResult) -> ReloadResult:
        """Register every loaded pack (each swap is atomic in the session). Call it where no inference runs
        at the same time: the server runs it on the batcher's inference thread."""
        for item in loaded:
            existed = item.name in self.session.tasks
            try:
                self.session.register(item.pack, name=item.name, replace=True)
            except Exception as e:  # noqa: BLE001
                result.refused[item.name] = str(e)
                continue
            self.served[item.name] = item.fingerprint
            self.sources[item.name] = item.directory
            (result.replaced if existed else result.added).append(item.name)
        return result

    def reload(self) -> ReloadResult:
        """prepare + commit in the calling thread (startup, or no server running)."""
        return self.commit(*self.prepare())
