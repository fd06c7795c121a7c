"""Bias tables of a mixed graph: one [capacity, dim] array per bias input, a row per registered task.

Registering a task writes its row in place into free capacity; the tables double when they are full, so
loading N tasks costs O(N) in all (rebuilding every table from all tasks on each registration cost O(N^2):
about two hours for 10,000 packs). A row is freed for reuse only once nothing can still read it: the row is
tied to the session's own copy of the task's pack, and returns to the free list when that copy is garbage,
that is when no state (and so no request in flight) and no caller holding the pack can reach it. A request
therefore never sees a row half-written or re-used under it: writes go only to rows no live state indexes.

A task's bias arrays are read-only views of its row, so its biases are held once (the table), not twice.
"""
from __future__ import annotations

import mmap
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

MIN_CAPACITY = 8


class BiasTables:
    """The mixed graph's bias tables with spare capacity. `value` makes the engine's tensor over an array;
    `shared` says whether that tensor reads the array's memory (onnxruntime and OpenVINO on the CPU) or holds
    a copy (a GPU), in which case every change re-makes the tensors of the tables it touched."""

    def __init__(self, base: Mapping[str, np.ndarray], value: Callable[[np.ndarray], Any], *, shared: bool,
                 capacity: int = MIN_CAPACITY) -> None:
        self._base = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in base.items()}
        self._value = value
        self._shared = shared
        self._free: list[int] = []  # rows whose task nothing can reach any more (filled by finalizers)
        self._free_lock = threading.Lock()  # finalizers run on whichever thread drops the last reference
        self.used = 0  # rows ever handed out: [0, used) hold tasks or are free
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, Any] = {}
        self._allocate(max(int(capacity), MIN_CAPACITY))

    @property
    def capacity(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    @property
    def free_rows(self) -> int:
        return self.capacity - self.used + len(self._free)

    def _allocate(self, capacity: int) -> None:
        arrays = {}
        for name, base in self._base.items():
            table = _anonymous((capacity, base.shape[-1]))
            if name in self.arrays:
                table[: self.used] = self.arrays[name][: self.used]
            arrays[name] = table
        self.arrays = arrays  # states made before keep the old arrays (and tensors) they were given
        self.values = {k: self._value(v) for k, v in arrays.items()}

    def reserve(self, count: int) -> bool:
        """Make room for `count` more rows (doubling); True if the tables moved to new memory."""
        if count <= len(self._free) + self.capacity - self.used:
            return False
        needed = self.used + count - len(self._free)
        self._allocate(max(2 * self.capacity, needed))
        return True

    def write(self, biases: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        """Write one task's row (its biases, the base model's where it has none) into a free row. Returns the
        row and read-only views of it for the biases given. Call `reserve` first."""
        with self._free_lock:
            row = self._free.pop() if self._free else None
        if row is None:
            row, self.used = self.used, self.used + 1
        views = {}
        for name, table in self.arrays.items():
            given = biases.get(name)
            table[row] = self._base[name] if given is None else given
            if given is not None:
                views[name] = _readonly(table[row])
        return row, views

    def views(self, row: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Read-only views of `row` in the current tables (after the tables moved)."""
        return {name: _readonly(self.arrays[name][row]) for name in names}

    def release_when_gone(self, owner: object, row: int) -> None:
        """Return `row` to the free list once `owner` (the session's copy of the task's pack) is garbage."""
        weakref.finalize(owner, _release, self._free, self._free_lock, row)

    def refresh(self) -> None:
        """Tensors over the arrays again, after in-place writes, where the engine keeps a copy (a GPU)."""
        if not self._shared:
            self.values = {k: self._value(v) for k, v in self.arrays.items()}


def _anonymous(shape: tuple[int, int]) -> np.ndarray:
    """A zeroed float32 array in its own anonymous mapping. Its pages become resident only when a row is
    written, so spare capacity costs address space, not memory; and freeing it (the tables moved) unmaps it.
    From malloc instead, a freed table raises glibc's mmap threshold, later tables come from the heap, and the
    old ones stayed resident after they were freed: 1.32x the packs' bytes per task at 2,000 tasks, 1.00x here."""
    buffer = mmap.mmap(-1, max(4, shape[0] * shape[1] * 4))
    return np.frombuffer(buffer, np.float32, count=shape[0] * shape[1]).reshape(shape)


def _release(free: list[int], lock: threading.Lock, row: int) -> None:
    with lock:
        free.append(row)


def _readonly(view: np.ndarray) -> np.ndarray:
    view.flags.writeable = False
    return view
