"""Arguments of the public Python API, checked at the door: every public function passes what it was given
through `check` (with the schema's Field types, runtime.schema, plus the few below that only arguments
take), so a wrong type or range is a BitFitError naming the argument and what it accepts, never a raw
TypeError or ValueError from deep inside (range() with step 0, a list used as a dict key, a str iterated
as a list of paths).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from . import schema as S
from .errors import BitFitError


def _path(v: Any) -> bool:
    if not isinstance(v, (str, os.PathLike)):
        return False
    text = os.fspath(v)
    return isinstance(text, str) and 0 < len(text) and "\0" not in text  # a NUL makes os calls raise ValueError


PATH = S.Field(_path, "a path (a non-empty str or os.PathLike)")
CALLABLE = S.Field(callable, "a function")
ANY = S.Field(lambda v: True, "anything")
# a batch size, a number of rows or instances: a bool is refused (True is an int to Python, not a size to us)
COUNT = S.Field(lambda v: S.integer(1).check(v), "a whole number >= 1")


def number(lo: float = -math.inf, hi: float = math.inf) -> S.Field:
    """A finite int or float in [lo, hi] (not a bool, not a str holding a number)."""
    def check(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi

    bounds = "" if (lo, hi) == (-math.inf, math.inf) else f" from {lo:g} to {hi:g}" if hi < math.inf else f" >= {lo:g}"
    return S.Field(check, f"a finite number{bounds}")


def optional(field: S.Field) -> S.Field:
    return S.Field(lambda v: v is None or field.check(v), f"None or {field.expect}")


def sequence_of(item: S.Field, min_len: int = 0) -> S.Field:
    """A list or tuple (not a str, which would be iterated character by character) of `item`s."""
    def check(v: Any) -> bool:
        return (isinstance(v, Sequence) and not isinstance(v, (str, bytes)) and len(v) >= min_len
                and all(item.check(x) for x in v))

    least = f" (at least {min_len})" if min_len else ""
    return S.Field(check, f"a list{least} of {item.expect}")


def _pack_or_path(v: Any) -> bool:
    # a TaskPack by what it has (the pack module imports this one: importing it back, even late, is a circle)
    return all(hasattr(v, a) for a in ("manifest", "tensors", "validate", "digest")) or PATH.check(v)


PACK = S.Field(_pack_or_path, "a TaskPack or the path of a pack directory")
PACKS = sequence_of(S.Field(_pack_or_path, "TaskPacks or paths of pack directories"))


def check(name: str, value: Any, field: S.Field, error: type[BitFitError] = BitFitError) -> Any:
    """`value` if `field` accepts it; otherwise `error` naming the argument, what it accepts and what it got."""
    if not field.check(value):
        raise error(f"{name} must be {field.expect}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    shown = repr(value)  # not JSON: an argument may be any object (a tuple-keyed dict, a module)
    return shown if len(shown) <= 80 else shown[:77] + "..."
