"""The packs directory of `bitfit serve`: which subdirectories are packs, what changed since the last scan,
and registering it on the session (no web imports: the server's app calls this).

Every subdirectory holding manifest.json is a pack (hidden ones, such as the temporary directories the
toolkit's writer makes, are skipped). A pack is served under the task name in its manifest, not under its
directory's name (as `TaskSession.register` and `bitfit predict` do). On reload a pack is new (added),
changed (its manifest.json or tensors.safetensors bytes differ from the version served: replaced atomically
with `TaskSession.register(..., replace=True)`) or unchanged. A pack that fails the runtime's strict
validation, does not fit the graph, or declares a task name another directory also declares, is refused
with its error (keyed by task name, or by directory name when its manifest cannot be read) and the version
already served keeps serving. Tasks whose pack left the directory keep serving too (listed as "missing");
restart to drop them. Only safetensors packs load.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitfit.runtime.errors import BitFitError
from bitfit.runtime.fs import MAX_JSON_BYTES, read_bounded, regular_size, sha256_file
from bitfit.runtime.pack import (
    MANIFEST_FILE,
    TENSORS_FILE,
    TaskPack,
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

    def to_json(self) -> dict[str, Any]:
        return {"added": sorted(self.added), "replaced": sorted(self.replaced), "unchanged": sorted(self.unchanged),
                "refused": dict(sorted(self.refused.items())), "missing": sorted(self.missing)}


@dataclass
class _Loaded:
    name: str
    directory: Path
    fingerprint: str
    pack: TaskPack


def _fingerprint(directory: Path) -> str:
    """What identifies one version of a pack on disk: its manifest's and its tensors' bytes (regular files
    only, the manifest bounded: a FIFO or a huge file put there is refused, not waited on)."""
    fix = "replace it with a task pack"
    manifest = read_bounded(directory / MANIFEST_FILE, MAX_JSON_BYTES, what="pack manifest", error=BitFitError, fix=fix)
    tensors = directory / TENSORS_FILE
    regular_size(tensors, error=BitFitError, fix=fix)
    return f"{hashlib.sha256(manifest).hexdigest()}:{sha256_file(tensors)}"


class PackDirectory:
    """Scans a packs directory and registers what changed (see the module docstring for the rules)."""

    def __init__(self, root: str | os.PathLike, session: TaskSession) -> None:
        self.root = Path(root)
        self.session = session
        self.served: dict[str, str] = {}  # task -> fingerprint of the version registered from this directory

    def prepare(self) -> tuple[list[_Loaded], ReloadResult]:
        """Read, check and load everything new or changed (no registration): safe to run in a thread."""
        result = ReloadResult()
        if not self.root.is_dir():
            raise BitFitError(f"no packs directory at {self.root}: give a directory of task packs")
        claims: dict[str, list[Path]] = {}
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (directory / MANIFEST_FILE).is_file():
                continue
            try:
                name = read_manifest(directory).task
            except Exception as e:  # noqa: BLE001 - a bad pack is reported, never fatal
                result.refused[directory.name] = str(e)
                continue
            claims.setdefault(name, []).append(directory)
        loaded: list[_Loaded] = []
        for name, directories in claims.items():
            if len(directories) > 1:
                where = ", ".join(d.name for d in directories)
                result.refused[name] = f"task {name!r} is declared by several packs ({where}): keep one"
                continue
            directory = directories[0]
            try:
                fingerprint = _fingerprint(directory)
                if self.served.get(name) == fingerprint and name in self.session.tasks:
                    result.unchanged.append(name)
                    continue
                pack = load_pack(directory)  # strict: checksum, provenance, names, shapes, dtypes, finite
                self.session.compiled.check_pack(pack, f"task pack {directory.name!r}")
                if pack.name != name:
                    raise BitFitError(f"{directory} changed while it was read: reload again")
            except Exception as e:  # noqa: BLE001
                result.refused[name] = str(e)
                continue
            loaded.append(_Loaded(name, directory, fingerprint, pack))
        present = set(claims)
        result.missing = [t for t in self.session.tasks if t not in present]
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
            (result.replaced if existed else result.added).append(item.name)
        return result

    def reload(self) -> ReloadResult:
        """prepare + commit in the calling thread (startup, or no server running)."""
        return self.commit(*self.prepare())
