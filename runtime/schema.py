"""Manifests as schemas: every key's type and range, required keys, no unknown keys, checked in one place
before a manifest becomes an object. A hand-edited, truncated or hostile manifest is refused with the key,
what it must be and what it holds, never turned into a traceback deeper down or a plausible wrong answer.

Each format (task pack, compiled directory, bias bank) declares its fields here with the checks below;
its reader calls `validate` on the parsed JSON and then `seal`'s counterpart `check_seal`, which compares
the manifest with the sha256 it carries of itself, so an edit by hand is caught even where the values are
well-formed (labels swapped, pooling changed, max_length raised).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BitFitError

SEAL = "manifest_sha256"
MAX_SIZE = 1 << 31  # any dimension, count or length a manifest may state


@dataclass(frozen=True)
class Field:
    check: Callable[[Any], bool]
    expect: str  # what the value must be, for the message
    required: bool = True


def text(max_len: int = 4096) -> Field:
    return Field(lambda v: isinstance(v, str) and 0 < len(v) <= max_len and v.strip() == v and v.isprintable(),
                 f"a non-empty string of printable characters (at most {max_len}, no surrounding spaces)")


# A task's name is a URL path segment (/v2/models/NAME), a directory name and the v2 model name at once: what all
# three take unescaped, starting with a letter or digit (so never "." or ".." or a hidden name).
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TASK_NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def task_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a task name (None when it can)."""
    if isinstance(name, str) and TASK_NAME.fullmatch(name):
        return None
    return f"task name {_show(name)} is not {TASK_NAME_RULE} (it names a URL path, a directory and a v2 model)"


def check_task_name(name: Any, error: type[BitFitError] = BitFitError, fix: str = "choose another name") -> str:
    """`name` if it is a task name; `error` saying why not and `fix` otherwise."""
    problem = task_name_problem(name)
    if problem:
        raise error(f"{problem}: {fix}")
    return name


def task_name(required: bool = True) -> Field:
    return Field(lambda v: task_name_problem(v) is None, TASK_NAME_RULE, required)


def string(max_len: int = 4096, required: bool = True) -> Field:
    return Field(lambda v: isinstance(v, str) and len(v) <= max_len, f"a string (at most {max_len} characters)",
                 required)


def integer(lo: int, hi: int = MAX_SIZE, required: bool = True) -> Field:
    return Field(lambda v: _int(v) and lo <= v <= hi, f"a whole number from {lo} to {hi}", required)


def boolean(required: bool = True) -> Field:
    return Field(lambda v: isinstance(v, bool), "true or false", required)


def one_of(values: Any, required: bool = True) -> Field:
    options = tuple(values)
    return Field(lambda v: isinstance(v, str) and v in options, f"one of {', '.join(map(str, options))}", required)


def equal(value: Any) -> Field:
    return Field(lambda v: v == value and type(v) is type(value), f"{value!r}")


def hexdigest(required: bool = True) -> Field:
    return Field(lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
                 "a sha256 hex digest (64 characters 0-9a-f)", required)


def list_of(item: Field, max_len: int = 1 << 20, required: bool = True, unique: bool = False) -> Field:
    def check(v: Any) -> bool:
        if not isinstance(v, list) or len(v) > max_len or not all(item.check(x) for x in v):
            return False
        return not unique or len({json.dumps(x, sort_keys=True) for x in v}) == len(v)

    return Field(check, f"a list{' of distinct' if unique else ' of'} {item.expect} (at most {max_len})", required)


def mapping(value: Field, required: bool = True) -> Field:
    return Field(lambda v: isinstance(v, dict) and all(isinstance(k, str) and value.check(x) for k, x in v.items()),
                 f"an object whose values are {value.expect}", required)


def record(fields: Mapping[str, Field], required: bool = True) -> Field:
    """A JSON object with these fields (the same rules as a whole manifest)."""
    def check(v: Any) -> bool:
        return isinstance(v, dict) and not problems(v, fields)

    names = ", ".join(f"{k}{'' if f.required else '?'}" for k, f in fields.items())
    return Field(check, f"an object with {names}", required)


def json_value(required: bool = True) -> Field:
    """Free-form JSON whose numbers are finite (metrics, notes): it informs, it never decides an output."""
    return Field(_finite_json, "JSON with finite numbers", required)


SHAPE = Field(lambda v: isinstance(v, list) and 0 < len(v) <= 4 and all(_int(d) and 1 <= d <= MAX_SIZE for d in v),
              "a shape: a list of 1 to 4 whole numbers >= 1")


def problems(data: Mapping[str, Any], fields: Mapping[str, Field]) -> list[str]:
    out = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        out.append(f"unknown keys {_short(unknown)} (written by another tool, or edited by hand)")
    missing = sorted(k for k, f in fields.items() if f.required and k not in data)
    if missing:
        out.append(f"missing keys {_short(missing)}")
    for key, f in fields.items():
        if key in data and not f.check(data[key]):
            out.append(f"{key} must be {f.expect}, got {_show(data[key])}")
    return out


def validate(data: Any, fields: Mapping[str, Field], where: str, error: type[BitFitError], fix: str) -> dict:
    """`data` as a dict that passed every field check; `error` naming every problem and the fix otherwise."""
    if not isinstance(data, dict):
        raise error(f"{where} must hold a JSON object, not {type(data).__name__}: {fix}")
    found = problems(data, fields)
    if found:
        raise error(f"{where} is invalid: {'; '.join(found)}: {fix}")
    return data


def digest(data: Mapping[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own seal."""
    body = {k: v for k, v in data.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                     allow_nan=False).encode()).hexdigest()


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its seal: the sha256 of everything else in it."""
    return {**{k: v for k, v in data.items() if k != SEAL}, SEAL: digest(data)}


def check_seal(data: Mapping[str, Any], where: str, error: type[BitFitError], fix: str) -> None:
    if data.get(SEAL) != digest(data):
        raise error(f"{where} does not match its own checksum ({SEAL}): it was edited or damaged after it was "
                    f"written, and its values cannot be trusted; {fix}")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite_json(v: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (str, bool, int)) or v is None:
        return True
    if isinstance(v, list):
        return all(_finite_json(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _finite_json(x, depth + 1) for k, x in v.items())
    return False


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _show(value: Any) -> str:
    shown = json.dumps(value, ensure_ascii=True, default=str) if not isinstance(value, str) else repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
