"""The one reader of a versioned, sealed manifest: the task pack's manifest.json, the compiled directory's
manifest.json and the bias bank's bank.json all go through `read_versioned`, in the same order of checks:
a bounded JSON read, the format's name, its version (a whole number, neither newer nor older than this
bitfit reads), checksums that must be present, the schema (runtime.schema), then the seal.

Each format states its own words once, in a `Format`: what a refusal says to do depends on who wrote the
file (compile it again, re-save the pack, export the bank again).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schema as S
from .errors import BitFitError
from .fs import read_json


@dataclass(frozen=True)
class Format:
    """A manifest format: its name and version, its schema, and its messages. The messages are templates
    over {where} (the manifest file), {root} (its directory), {version} (the file's) and {current} (ours)."""

    name: str  # the manifest's "format" value, e.g. "bitfit-task-pack"
    version: int  # the version this bitfit writes and reads
    fields: Mapping[str, S.Field]
    noun: str  # what the file is, for messages: "task-pack manifest"
    error: type[BitFitError]
    fix: str  # what to do about a damaged or edited file
    newer: str  # the file's version is newer than ours
    older: str  # the file's version is older
    checksums: tuple[str, ...] = ()  # keys that must hold a sha256 before the schema is even looked at
    seal: S.Field = S.hexdigest()  # the manifest's own checksum (a pack made in memory may not have one yet)

    @property
    def schema(self) -> dict[str, S.Field]:
        """The fields, and what every format states the same way: its name, its version and its seal."""
        return {**self.fields, S.SEAL: self.seal, "format": S.equal(self.name), "format_version": S.equal(self.version)}


def read_versioned(path: str | os.PathLike, fmt: Format) -> dict[str, Any]:
    """The manifest at `path` as a dict that passed every check of `fmt`; `fmt.error` naming the first
    problem and the fix otherwise."""
    where = Path(path)
    words = {"where": where, "root": where.parent, "current": fmt.version}
    data = read_json(where, what=fmt.noun, error=fmt.error, fix=fmt.fix)
    if not isinstance(data, dict) or data.get("format") != fmt.name:
        raise fmt.error(f"{where} is not a bitfit {fmt.noun} (format is not {fmt.name!r})")
    version = data.get("format_version")
    if not S.integer(0).check(version):
        raise fmt.error(f"{where} has format_version {version!r}, not a whole number: {fmt.fix}")
    if version != fmt.version:
        raise fmt.error((fmt.newer if version > fmt.version else fmt.older).format(**words, version=version))
    for key in fmt.checksums:
        if not S.hexdigest().check(data.get(key)):
            raise fmt.error(f"{where} lacks the required checksum {key}: {fmt.fix}")
    S.validate(data, fmt.schema, str(where), fmt.error, fmt.fix)
    S.check_seal(data, str(where), fmt.error, fmt.fix)
    return data
