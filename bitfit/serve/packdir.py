"""The packs directory of `bitfit serve`: which subdirectories are packs, what changed since the last scan,
and registering it on the session (no web imports: the server's app calls this).

Every subdirectory holding manifest.json is a pack (hidden ones, such as the temporary directories the
toolkit's writer makes, are skipped). A pack is served under the task name in its manifest, not under its
directory's name (as `TaskSession.register` and `bitfit predict` do). On reload a pack is new (added),
changed (its manifest.json or tensors.safetensors bytes differ from the version served: replaced atomically
with `TaskSession.register(..., replace=True)`) or unchanged. A pack that fails the runtime's strict
validation or does not fit the graph is refused with its error (keyed by task name, or by directory name
when its manifest cannot be read) and the version already served keeps serving. Every directory read is
remembered by its files' (inode, size, mtime, ctime): a rescan neither reads nor hashes a directory whose
files have not changed since (it re-reports a refused one, and counts a served one unchanged), so a rescan
of 10,000 packs costs 20,000 stats, and a huge file is not hashed on every --reload-every.

What a scan loads is registered in one `TaskSession.register_many` call (one state change, the mixed
graph's tables grown once), so a server starting over N packs builds its tables once; a pack that the
session refuses then is retried alone, so it fails alone.

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
    key: tuple  # the directory's _stat_key before it was read


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
class _Seen:
    """A directory as last read: its files' _stat_key then, the task its manifest declares (None: the
    manifest was refused), and either the refusal's message or the fingerprint of the version served."""

    key: tuple
    task: str | None
    message: str | None = None  # refused
    fingerprint: str | None = None  # served


class PackDirectory:
    """Scans a packs directory and registers what changed (see the module docstring for the rules)."""

    def __init__(self, root: str | os.PathLike, session: TaskSession) -> None:
        self.root = Path(root)
        self.session = session
        self.served: dict[str, str] = {}  # task -> fingerprint of the version registered from this directory
        self.sources: dict[str, Path] = {}  # task -> the directory that version came from
        self.clashes: dict[str, dict[str, Any]] = {}  # as of the last scan (ReloadResult.clashes)
        self._seen: dict[Path, _Seen] = {}

    def _refuse(self, directory: Path, key: tuple, task: str | None, error: Exception) -> str:
        self._seen[directory] = _Seen(key, task, message=str(error))
        return str(error)

    def _still_served(self, directory: Path, seen: _Seen) -> bool:
        """Whether `seen` is the version this directory serves now (then an unchanged key means unchanged)."""
        return (seen.fingerprint is not None and self.served.get(seen.task) == seen.fingerprint
                and self.sources.get(seen.task) == directory and seen.task in self.session)

    def prepare(self) -> tuple[list[_Loaded], ReloadResult]:
        """Read, check and load everything new or changed (no registration): safe to run in a thread."""
        result = ReloadResult()
        claims = self._scan(result)
        loaded: list[_Loaded] = []
        for name, candidates in claims.items():
            directory, key, manifest = self._choose(name, candidates, result)
            seen = self._seen.get(directory)
            if manifest is None and seen is not None and seen.message is None:  # served, unchanged: not read
                result.unchanged.append(name)
                continue
            if manifest is None:  # refused before, unchanged since
                result.refused[name] = seen.message if seen is not None else "refused"
                continue
            try:
                fingerprint = _fingerprint(directory, manifest)
                if self.served.get(name) == fingerprint and name in self.session:
                    self.sources[name] = directory  # the same bytes, maybe a copy in another directory now
                    self._seen[directory] = _Seen(key, name, fingerprint=fingerprint)
                    result.unchanged.append(name)
                    continue
                pack = load_pack(directory)  # strict: checksum, provenance, names, shapes, dtypes, finite
                self.session.compiled.check_pack(pack, f"task pack {directory.name!r}")
                if pack.name != name:
                    raise BitFitError(f"{directory} changed while it was read: reload again")
            except Exception as e:  # noqa: BLE001
                result.refused[name] = self._refuse(directory, key, name, e)
                continue
            loaded.append(_Loaded(name, directory, fingerprint, pack, key))
        present = set(claims)
        result.missing = [t for t in self.session.tasks if t not in present]
        self.clashes = result.clashes
        return loaded, result

    def _scan(self, result: ReloadResult) -> dict[str, list[tuple[Path, tuple, PackManifest | None]]]:
        """Every pack directory by the task it declares, with its _stat_key and its manifest (None where the
        directory is unchanged since it was last read: a refusal then, or the version served)."""
        if not self.root.is_dir():
            raise BitFitError(f"no packs directory at {self.root}: give a directory of task packs")
        claims: dict[str, list[tuple[Path, tuple, PackManifest | None]]] = {}
        directories = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        present = set(directories)
        self._seen = {d: r for d, r in self._seen.items() if d in present}  # gone: forgotten
        for directory in directories:
            if not (directory / MANIFEST_FILE).is_file():
                continue
            key = _stat_key(directory)
            seen = self._seen.get(directory)
            unchanged = seen is not None and seen.key == key
            if unchanged and (seen.message is not None or self._still_served(directory, seen)):
                if seen.task is None:
                    result.refused[directory.name] = seen.message or ""
                else:
                    claims.setdefault(seen.task, []).append((directory, key, None))
                continue
            self._seen.pop(directory, None)
            try:
                manifest = read_manifest(directory)
            except Exception as e:  # noqa: BLE001 - a bad pack is reported, never fatal
                result.refused[directory.name] = self._refuse(directory, key, None, e)
                continue
            claims.setdefault(manifest.task, []).append((directory, key, manifest))
        return claims

    def _choose(self, name: str, candidates: list[tuple[Path, tuple, PackManifest | None]],
                result: ReloadResult) -> tuple[Path, tuple, PackManifest | None]:
        """The directory that serves `name`: the only one, or of several (a clash, reported in `result`) the
        one already serving it, else the first by directory name."""
        if len(candidates) == 1:
            return candidates[0]
        source = self.sources.get(name) if name in self.session else None
        chosen = next((c for c in candidates if c[0] == source), None)
        why = "the directory already serving it" if chosen else "the first by directory name"
        directory = (chosen or candidates[0])[0]
        ignored = [c[0].name for c in candidates if c[0] != directory]
        result.clashes[name] = {"serving": directory.name, "ignored": ignored}
        every = ", ".join(sorted(c[0].name for c in candidates))
        for other in ignored:
            result.refused[other] = (f"task {name!r} is declared by several packs ({every}): {directory.name!r} "
                                     f"is served ({why}), {other!r} is not loaded; keep one of them (move the "
                                     "others out, or give them another task name)")
        return chosen or candidates[0]

    def commit(self, loaded: list[_Loaded], result: ReloadResult) -> ReloadResult:
        """Register every loaded pack, all in one state change (`TaskSession.register_many`; each swap is
        atomic in the session); should the session refuse one, each is registered alone so only it fails.
        Call it where no inference runs at the same time: the server runs it on the batcher's inference
        thread."""
        if not loaded:
            return result
        existed = {item.name: item.name in self.session for item in loaded}
        try:
            self.session.register_many([i.pack for i in loaded], names=[i.name for i in loaded], replace=True)
            done = loaded
        except Exception:  # noqa: BLE001 - one bad pack must not keep the others out
            done = []
            for item in loaded:
                try:
                    self.session.register(item.pack, name=item.name, replace=True)
                except Exception as e:  # noqa: BLE001
                    result.refused[item.name] = str(e)
                    continue
                done.append(item)
        for item in done:
            self.served[item.name] = item.fingerprint
            self.sources[item.name] = item.directory
            self._seen[item.directory] = _Seen(item.key, item.name, fingerprint=item.fingerprint)
            (result.replaced if existed[item.name] else result.added).append(item.name)
        return result

    def reload(self) -> ReloadResult:
        """prepare + commit in the calling thread (startup, or no server running)."""
        return self.commit(*self.prepare())
