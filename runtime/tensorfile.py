"""Reading safetensors files whose header a person may have edited: the header is parsed and checked against
what the manifest declares (names, dtypes, shapes, byte ranges, the file's size) before any tensor is read,
so a header that declares a 2 GB tensor is refused in microseconds instead of allocating it."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .errors import BitFitError
from .fs import open_regular

MAX_HEADER_BYTES = 16 << 20
HEADER_SLACK = 1 << 20  # the most a header of ours takes beyond the tensors: names and offsets, kilobytes
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
           "U8": np.uint8, "I8": np.int8, "BF16": None, "BOOL": np.bool_}


def size_problem(size: int, shapes: Iterable[tuple[int, ...]], itemsize: int = 4) -> str:
    """Why a safetensors file of `size` bytes cannot hold exactly float32 tensors of `shapes` ("" if it can):
    their bytes plus a header. Checked before a file is hashed or read, so a huge file (a sparse one, a tensor
    grown by hand) costs a stat, not minutes of hashing."""
    payload = sum(math.prod(s) for s in shapes) * itemsize
    if payload < size <= payload + HEADER_SLACK:
        return ""
    return f"it is {size:,} bytes where the declared tensors take {payload:,}"


def read_header(path: str | os.PathLike, *, error: type[BitFitError], fix: str) -> tuple[dict, dict[str, str], int]:
    """(tensors' header entries, metadata, file size) of a safetensors file, checked for form: every entry a
    dtype, a shape and byte offsets that lie inside the file, back to back, covering it whole."""
    fd, size = open_regular(path, error=error, fix=fix)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise error(f"{path} is {size} bytes, too short for a safetensors file: {fix}")
            length = int.from_bytes(head, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise error(f"{path} declares a header of {length:,} bytes in a file of {size:,}: {fix}")
            raw = fh.read(length)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path} has no readable safetensors header ({type(e).__name__}): {fix}") from None
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is not a JSON object: {fix}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error(f"{path}: the safetensors metadata must map strings to strings: {fix}")
    data_bytes, spans = size - 8 - length, []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
              and entry["dtype"] in _DTYPES and isinstance(entry["shape"], list) and len(entry["shape"]) <= 8
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in entry["shape"])
              and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"]))
        if not ok:
            raise error(f"{path}: the header entry of {name!r} is malformed: {fix}")
        start, end = entry["data_offsets"]
        item = np.dtype(_DTYPES[entry["dtype"]] or np.uint16).itemsize
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(entry["shape"]) * item:
            raise error(f"{path}: {name!r} declares {entry['dtype']}{entry['shape']} at bytes {start}..{end}, which "
                        f"the file's {data_bytes:,} data bytes do not hold: {fix}")
        spans.append((start, end))
    at = 0
    for start, end in sorted(spans):
        if start != at:
            raise error(f"{path}: its tensors overlap or leave gaps: {fix}")
        at = end
    if at != data_bytes:
        raise error(f"{path} holds {data_bytes - at:,} bytes beyond its tensors: {fix}")
    return header, metadata, size


def load_tensors(
    path: str | os.PathLike,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    error: type[BitFitError],
    fix: str,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file that must hold exactly `expected` (name -> (shape, numpy dtype
    name)); the header is checked against it before anything is read."""
    header, metadata, _ = read_header(path, error=error, fix=fix)
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {', '.join(missing[:6])}")
    if extra:
        problems.append(f"unexpected tensors {', '.join(extra[:6])}")
    for name in sorted(set(expected) & set(header)):
        shape, dtype = expected[name]
        entry = header[name]
        got = _DTYPES[entry["dtype"]]
        if tuple(entry["shape"]) != tuple(shape) or got is None or np.dtype(got).name != dtype:
            problems.append(f"{name} is {entry['dtype']}{entry['shape']} in the file but {dtype}{list(shape)} is "
                            "declared")
    if problems:
        raise error(f"{path} does not hold what its manifest declares: {'; '.join(problems)}: {fix}")
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:  # changed between the check and the read
        raise error(f"{path} is not a readable safetensors file ({e}): {fix}") from e
