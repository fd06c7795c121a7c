"""Dynamic batching for the server: requests for any tasks are merged into one `TaskSession.run_mixed` call.

Requests (task, texts, text_pairs) wait in a queue. One worker takes the oldest request, then keeps
collecting until the batch holds `max_batch_rows` rows or `max_wait_ms` have passed since that request
was queued, and runs the whole batch with ONE `run_mixed(rows)` call on a single inference thread (a
1-worker executor: session calls never overlap, and pack registrations made through `call` are
serialised with them, so a request never sees half of a task swap). Each request gets its own slice of
the results back.

- A request with more rows than `max_batch_rows` is run alone, never split, never refused here.
- Each request is checked by the session's own validator (`TaskSession.check_call`) on the inference
  thread just before the call, so it is checked against the packs the call will use; a request that does
  not fit fails alone, with the session's error, unchanged (the server maps error types to statuses).
- If `run_mixed` fails for a whole batch anyway, each request of that batch is run on its own, so only
  the requests that really fail get the error.
- With batching off, every request is its own `run_mixed` call on the same thread.

Needs asyncio and the runtime only.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bitfit.runtime.errors import BitFitError
from bitfit.runtime.session import TaskSession


class ServiceUnavailable(Exception):
    """The batcher is stopping or stopped: the request was not run (a server answers 503)."""


@dataclass
class BatchRecord:
    """One session call: its rows, requests, the tasks it held and how long it took."""

    rows: int
    requests: int
    tasks: tuple[str, ...]
    seconds: float


@dataclass
class BatchStats:
    """Counters over all session calls, plus the last `keep` batches."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    mixed_batches: int = 0  # batches holding rows of more than one task
    max_rows: int = 0
    max_tasks: int = 0
    failed_batches: int = 0  # run_mixed raised for a whole batch (requests were then retried one by one)
    keep: int = 1000
    recent: collections.deque = field(default_factory=collections.deque)

    def add(self, record: BatchRecord) -> None:
        self.batches += 1
        self.rows += record.rows
        self.requests += record.requests
        self.mixed_batches += len(record.tasks) > 1
        self.max_rows = max(self.max_rows, record.rows)
        self.max_tasks = max(self.max_tasks, len(record.tasks))
        self.recent.append(record)
        while len(self.recent) > self.keep:
            self.recent.popleft()

    def to_json(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "rows": self.rows, "requests": self.requests,
            "mixed_batches": self.mixed_batches, "max_rows": self.max_rows, "max_tasks": self.max_tasks,
            "failed_batches": self.failed_batches,
            "mean_rows": self.rows / self.batches if self.batches else 0.0,
        }


@dataclass
class _Request:
    task: str
    texts: list[str]
    pairs: list[str] | None
    future: asyncio.Future
    queued: float  # loop.time()

    @property
    def rows(self) -> int:
        return len(self.texts)


class Batcher:
    """Queue requests and serve them in dynamic batches (see the module docstring).

    `on_batch(record)` is called on the event loop after every session call (for metrics)."""

    def __init__(
        self,
        session: TaskSession,
        *,
        max_batch_rows: int = 32,
        max_wait_ms: float = 5.0,
        enabled: bool = True,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise BitFitError(f"max_batch_rows must be at least 1, got {max_batch_rows}")
        if max_wait_ms < 0:
            raise BitFitError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.session = session
        self.max_batch_rows = int(max_batch_rows)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.enabled = bool(enabled)
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._executor = _executor()
        self._stats_lock = threading.Lock()
        self._records: list[BatchRecord] = []
        # event-loop state, (re)made by _ensure_started on the loop that uses the batcher
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[_Request] = collections.deque()
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    # -- public -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._closed:  # started again after close() (an app served a second time)
            self._executor, self._closed = _executor(), False
        self._ensure_started()

    async def stop(self) -> None:
        """Stop the worker; requests still queued fail with ServiceUnavailable."""
        worker, self._worker = self._worker, None
        if worker is not None and not worker.done():
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(ServiceUnavailable("the server is shutting down"))
        self._pending_rows = 0

    def close(self) -> None:
        """Release the inference thread (after `stop`); `start` makes a new one."""
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the inference thread, between batches (pack registrations, token and QA calls)."""
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, task: str, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> list[dict]:
        """Predict `texts` (and `text_pairs`) with `task`: one record per text, as `run_mixed` gives them
        (task, label, scores, logits), plus the digest of the pack that answered it. Raises what the session
        raised for this request (UnknownTaskError, WrongCallError, BitFitError, ...), or ServiceUnavailable
        when stopping."""
        if self._closed:
            raise ServiceUnavailable("the server is shutting down")
        texts = list(texts)
        pairs = None if text_pairs is None else list(text_pairs)
        loop = asyncio.get_running_loop()
        request = _Request(task, texts, pairs, loop.create_future(), loop.time())
        if not self.enabled:
            results = await loop.run_in_executor(self._executor, self._run_batch, [request])
            self._finish([request], results)
            return await request.future
        self._ensure_started()
        self._pending.append(request)
        self._pending_rows += request.rows
        assert self._wakeup is not None
        self._wakeup.set()
        return await request.future

    # -- worker -------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._worker is not None and not self._worker.done():
            return
        if self._loop is not loop:  # a new event loop (e.g. another test client): start afresh
            self._pending = collections.deque()
            self._pending_rows = 0
            self._wakeup = asyncio.Event()
            self._loop = loop
        self._worker = loop.create_task(self._work(), name="bitfit-batcher")

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].queued + self.max_wait
            while self._pending_rows < self.max_batch_rows:
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            batch = self._take()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except asyncio.CancelledError:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(ServiceUnavailable("the server is shutting down"))
                raise
            except Exception as e:  # the executor itself failed: fail this batch, keep serving
                results = [e] * len(batch)
            self._finish(batch, results)

    def _take(self) -> list[_Request]:
        """Oldest requests first, up to max_batch_rows rows (the first one always, however large)."""
        batch: list[_Request] = []
        rows = 0
        while self._pending:
            request = self._pending[0]
            if request.future.done():  # the client went away
                self._pending.popleft()
                self._pending_rows -= request.rows
                continue
            if batch and rows + request.rows > self.max_batch_rows:
                break
            self._pending.popleft()
            self._pending_rows -= request.rows
            batch.append(request)
            rows += request.rows
        return batch

    def _finish(self, batch: list[_Request], results: list[Any]) -> None:
        for request, result in zip(batch, results):
            if request.future.done():
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
        with self._stats_lock:
            records = list(self._records)
            self._records.clear()
        for record in records:
            if self.on_batch is not None:
                try:
                    self.on_batch(record)
                except Exception:  # noqa: BLE001 - metrics must never stop the worker
                    pass

    # -- inference thread ---------------------------------------------------------------------
    def _call(self, batch: list[_Request]) -> list[list[dict]]:
        rows: list[tuple] = []
        for request in batch:
            if request.pairs is None:
                rows.extend((request.task, t) for t in request.texts)
            else:
                rows.extend((request.task, t, p) for t, p in zip(request.texts, request.pairs))
        # which pack answers each row, read here on the inference thread where swaps are serialised with the
        # call: read later on the event loop, a reload landing in between would label old logits as new
        digests = {r.task: self.session.digest(r.task) for r in batch}
        start = time.perf_counter()
        out = self.session.run_mixed(rows)
        seconds = time.perf_counter() - start
        if len(out) != len(rows):
            raise BitFitError(f"run_mixed returned {len(out)} records for {len(rows)} rows")
        for r in out:
            r["digest"] = digests[r["task"]]
        record = BatchRecord(len(rows), len(batch), tuple(sorted({r.task for r in batch})), seconds)
        with self._stats_lock:
            self.stats.add(record)
            self._records.append(record)  # handed to on_batch on the event loop by _finish
        results, at = [], 0
        for request in batch:
            results.append(out[at : at + request.rows])
            at += request.rows
        return results

    def _run_batch(self, batch: list[_Request]) -> list[Any]:
        """One run_mixed call for the requests that fit; per request a result list or the exception it raised.
        Runs on the inference thread, so no pack swap happens between the checks and the call."""
        results: list[Any] = [None] * len(batch)
        ok: list[int] = []
        for i, request in enumerate(batch):
            try:
                self.session.check_call("run_mixed", request.task, request.texts, request.pairs)
                ok.append(i)
            except Exception as e:  # noqa: BLE001 - handed to the request, whatever it is
                results[i] = e
        if not ok:
            return results
        try:
            for i, r in zip(ok, self._call([batch[i] for i in ok])):
                results[i] = r
        except Exception as e:  # noqa: BLE001
            if len(ok) == 1:
                results[ok[0]] = e
                return results
            with self._stats_lock:
                self.stats.failed_batches += 1
            for i in ok:  # isolate the culprit: each request alone
                try:
                    results[i] = self._call([batch[i]])[0]
                except Exception as e1:  # noqa: BLE001
                    results[i] = e1
        return results


def _executor() -> ThreadPoolExecutor:
    # one thread: session calls never overlap, and registrations through `call` fall between batches
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitfit-infer")
