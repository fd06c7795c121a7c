"""`bitfit serve`: an HTTP server for every task pack in a directory, on one compiled graph.

Endpoints (JSON in and out; errors are 4xx {"error": message}, never a crash):

    GET  /v1/tasks          {"tasks": [{"name", "task_kind", "labels", "text_pair", "max_length"}, ...]}
    POST /v1/predict        {"task": NAME, "texts": [...], "text_pairs": [...]?}
                            -> {"predictions": [{"label", "scores", "logits"}, ...]}
                               (the numbers `bitfit predict --json` prints for that pack)
    POST /v1/tokens         token classification: {"task": NAME, "texts": [...]}
                            -> {"predictions": [{"tokens", "labels", "scores", "offsets", "truncated"}, ...]}
                               (TaskSession.run_tokens: a label per word, words with character offsets)
    POST /v1/answer         extractive QA: {"task": NAME, "questions": [...], "contexts": [...]}
                            -> {"answers": [{"answer", "start", "end", "score", "truncated"}, ...]}
                               (TaskSession.answer: the best span of each context)
    GET  /healthz           {"status": "ok", "tasks": N}  (503 while no task is registered)
    GET  /metrics           Prometheus text: requests by endpoint and status, request latency, rows per
                            batch, tasks per batch, batch latency, registered tasks
    POST /v1/admin/reload   rescan the packs directory -> {"added", "replaced", "unchanged", "refused", "missing"}

The packs directory: every subdirectory holding manifest.json is a pack (hidden ones, such as the
temporary directories `save_pack` writes, are skipped). A pack is served under the task name in its
manifest, not under its directory's name (as `TaskSession.register` and `bitfit predict` do). On reload
a pack is new (added), changed (its manifest.json or tensors.safetensors bytes differ from the version
served: replaced atomically with `TaskSession.register(..., replace=True)`) or unchanged. A pack that
fails the runtime's strict validation, does not fit the graph, or declares a task name another
directory also declares, is refused with its error (keyed by task name, or by directory name when its
manifest cannot be read) and the version already served keeps serving. Tasks whose pack left the
directory keep serving too (listed as "missing"); restart to drop them. Only safetensors packs load.

The reload endpoint is an admin endpoint on the same port, without authentication: bind to loopback
(the default, 127.0.0.1) or put the server behind a proxy that blocks /v1/admin/.

Sequence requests are batched dynamically across tasks (bitfit/batcher.py): rows of concurrent requests,
of any tasks, go through one `TaskSession.run_mixed` call. Token and QA requests are not batched across
requests (their rows have other shapes and decoders): each runs as one call on the same inference thread,
between batches, so they never race a pack swap. Needs the runtime plus starlette, uvicorn and
prometheus_client (`pip install 'bitfit-deploy[serve]'`); no torch.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.compiled import check_pack_fits
from runtime.errors import BitFitError, UnknownTaskError
from runtime.pack import MANIFEST_FILE, TENSORS_FILE, PackManifest, TaskPack, load_pack, read_manifest, sha256_file
from runtime.session import TaskSession

from .batcher import BatchError, Batcher, BatchRecord

ENDPOINTS = ("/v1/tasks", "/v1/predict", "/v1/tokens", "/v1/answer", "/healthz", "/metrics", "/v1/admin/reload")
PREDICT_KEYS = ("task", "texts", "text_pairs")
TOKENS_KEYS = ("task", "texts")
ANSWER_KEYS = ("task", "questions", "contexts")
# The endpoint that serves each task kind: a request to another one is told where to go.
KIND_ENDPOINTS = {"classification": "/v1/predict", "regression": "/v1/predict", "token-classification": "/v1/tokens",
                  "question-answering": "/v1/answer"}


@dataclass
class ServeConfig:
    """Limits of one server. A request over a limit is refused with 413 (too many texts, a text too long,
    a body too large); batching groups up to max_batch_rows rows, waiting at most max_wait_ms after the
    first queued request."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 10_000  # characters per text (and per text_pair)
    max_batch_rows: int = 32  # rows per session call when batching
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others
    batching: bool = True  # False: every request is its own session call
    max_body_bytes: int | None = None  # default: enough for max_texts texts and pairs of max_text_chars

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_chars", "max_batch_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BitFitError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 10_000:
            raise BitFitError(f"max_wait_ms must be between 0 and 10000, got {self.max_wait_ms!r}")
        if self.max_body_bytes is None:
            # utf-8 takes up to 4 bytes a character, JSON escapes up to 6 ("\\u1234"): be generous
            self.max_body_bytes = 2 * self.max_texts * (6 * self.max_text_chars + 16) + 65_536

    @classmethod
    def from_limits(cls, **limits: Any) -> ServeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(limits) - known)
        if unknown:
            raise BitFitError(f"unknown server limits {unknown}: known are {sorted(known)}")
        return cls(**{k: v for k, v in limits.items() if v is not None})


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the packs directory ------------------------------------------------------------------------------
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
    """What identifies one version of a pack on disk: its manifest's and its tensors' bytes."""
    manifest = hashlib.sha256((directory / MANIFEST_FILE).read_bytes()).hexdigest()
    tensors = directory / TENSORS_FILE
    return f"{manifest}:{sha256_file(tensors) if tensors.is_file() else 'none'}"


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
                check_pack_fits(self.session.manifest, pack, f"task pack {directory.name!r}")
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


# -- metrics ------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app, in their own registry (so many apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("bitfit_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.request_seconds = Histogram("bitfit_request_seconds", "HTTP request latency by endpoint",
                                         ["endpoint"], registry=self.registry,
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_rows = Histogram("bitfit_batch_rows", "rows per session call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_tasks = Histogram("bitfit_batch_tasks", "distinct tasks per session call",
                                     registry=self.registry, buckets=(1, 2, 3, 4, 6, 8, 16, 32))
        self.batch_seconds = Histogram("bitfit_batch_seconds", "latency of one session call",
                                       registry=self.registry,
                                       buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.tasks = Gauge("bitfit_tasks", "registered tasks", registry=self.registry)
        self.reloads = Counter("bitfit_reloads", "pack reloads by outcome (added, replaced, refused)",
                               ["outcome"], registry=self.registry)

    def batch(self, record: BatchRecord) -> None:
        self.batch_rows.observe(record.rows)
        self.batch_tasks.observe(len(record.tasks))
        self.batch_seconds.observe(record.seconds)


class _MetricsMiddleware:
    """Counts every HTTP request by endpoint and status, and times it (pure ASGI)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope.get("path", "") if scope.get("path") in ENDPOINTS else "other"
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


# -- request handling ---------------------------------------------------------------------------------
def _json(content: Any, status: int = 200) -> Response:
    try:
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or inf in an output: the pack is broken, not the request
        return _error(500, "the model produced a non-finite value (NaN or inf): check the task pack")
    return Response(body, status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_large = int(length) > limit
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {length!r}") from None
        if too_large:
            raise RequestError(413, f"request body of {length} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise RequestError(400, "invalid JSON: the request body is empty")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "invalid JSON: nested too deeply") from None


def _strings(body: dict, key: str, config: ServeConfig) -> list[str]:
    value = body[key]
    if not isinstance(value, list):
        raise RequestError(422, f"{key} must be a list of strings, got {type(value).__name__}")
    if not value:
        raise RequestError(422, f"{key} is empty: give at least one text")
    if len(value) > config.max_texts:
        raise RequestError(413, f"{key} has {len(value)} items, over the limit of {config.max_texts} per request")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise RequestError(422, f"{key}[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RequestError(422, f"{key}[{i}] is empty: give some text")
        if len(text) > config.max_text_chars:
            raise RequestError(413, f"{key}[{i}] has {len(text)} characters, over the limit of "
                                    f"{config.max_text_chars}")
    return value


def _fields(body: Any, keys: tuple[str, ...], required: tuple[str, ...]) -> str:
    """Check the body's fields; returns its task name."""
    takes = ", ".join(keys[:-1]) + " and " + keys[-1]
    if not isinstance(body, dict):
        raise RequestError(422, f"the body must be a JSON object with {takes}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(keys))
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}: the body takes {takes}")
    for key in required:
        if key not in body:
            raise RequestError(422, f"missing field {key!r}: the body takes {takes}")
    task = body["task"]
    if not isinstance(task, str) or not task:
        raise RequestError(422, f"task must be a non-empty string, got {task!r}"[:300])
    return task


def _manifest(session: TaskSession, task: str, endpoint: str) -> PackManifest:
    """The task's manifest, or 404 for an unknown task and 422 naming the right endpoint for another kind."""
    try:
        manifest = session.pack(task).manifest
    except UnknownTaskError as e:
        raise RequestError(404, str(e)) from None
    right = KIND_ENDPOINTS[manifest.task_kind]
    if right != endpoint:
        raise RequestError(422, f"task {task!r} is a {manifest.task_kind} task: POST it to {right}, not {endpoint}")
    return manifest


def parse_predict(body: Any, session: TaskSession, config: ServeConfig) -> tuple[str, list[str], list[str] | None]:
    """Check a /v1/predict body against the limits and the task: (task, texts, text_pairs) or RequestError."""
    task = _fields(body, PREDICT_KEYS, ("task", "texts"))
    texts = _strings(body, "texts", config)
    pairs = None if body.get("text_pairs") is None else _strings(body, "text_pairs", config)
    manifest = _manifest(session, task, "/v1/predict")
    if pairs is not None and len(pairs) != len(texts):
        raise RequestError(422, f"text_pairs has {len(pairs)} items but texts has {len(texts)}: give one pair per text")
    if manifest.text_pair and pairs is None:
        raise RequestError(422, f"task {task!r} takes sentence pairs: give text_pairs, one per text")
    if not manifest.text_pair and pairs is not None:
        raise RequestError(422, f"task {task!r} takes single sentences: do not give text_pairs")
    return task, texts, pairs


def parse_tokens(body: Any, session: TaskSession, config: ServeConfig) -> tuple[str, list[str]]:
    """Check a /v1/tokens body: (task, texts) or RequestError."""
    task = _fields(body, TOKENS_KEYS, TOKENS_KEYS)
    texts = _strings(body, "texts", config)
    _manifest(session, task, "/v1/tokens")
    return task, texts


def parse_answer(body: Any, session: TaskSession, config: ServeConfig) -> tuple[str, list[str], list[str]]:
    """Check a /v1/answer body: (task, questions, contexts) or RequestError."""
    task = _fields(body, ANSWER_KEYS, ANSWER_KEYS)
    questions = _strings(body, "questions", config)
    contexts = _strings(body, "contexts", config)
    if len(questions) != len(contexts):
        raise RequestError(422, f"questions has {len(questions)} items but contexts has {len(contexts)}: "
                                "give one context per question")
    _manifest(session, task, "/v1/answer")
    return task, questions, contexts


def create_app(
    session: TaskSession, packs_dir: str | os.PathLike | None, config: ServeConfig | None = None
) -> Starlette:
    """The server app for `session`. With `packs_dir`, every valid pack in it is registered now (the outcome
    is `app.state.initial_load`, a ReloadResult) and POST /v1/admin/reload rescans it. `app.state` also
    holds session, config, batcher (its `stats` count batches, rows and mixed-task batches) and metrics."""
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(session, max_batch_rows=config.max_batch_rows, max_wait_ms=config.max_wait_ms,
                      enabled=config.batching, on_batch=metrics.batch)
    packs = PackDirectory(packs_dir, session) if packs_dir is not None else None
    initial = packs.reload() if packs is not None else ReloadResult(unchanged=list(session.tasks))
    reload_lock = asyncio.Lock()
    metrics.tasks.set_function(lambda: len(session.tasks))

    async def tasks(request: Request) -> Response:
        out = []
        for name in session.tasks:
            try:
                m = session.pack(name).manifest
            except UnknownTaskError:
                continue
            out.append({"name": name, "task_kind": m.task_kind, "labels": list(m.labels),
                        "text_pair": bool(m.text_pair), "max_length": int(m.max_length)})
        return _json({"tasks": out})

    async def predict(request: Request) -> Response:
        try:
            body = await _read_json(request, int(config.max_body_bytes or 0))
            task, texts, pairs = parse_predict(body, session, config)
            records = await batcher.submit(task, texts, pairs)
        except RequestError as e:
            return _error(e.status, e.message)
        except BatchError as e:
            return _error(e.status, str(e))
        except BitFitError as e:
            return _error(404 if isinstance(e, UnknownTaskError) else 422, str(e))
        predictions = [{"label": r["label"], "scores": r["scores"], "logits": r["logits"]} for r in records]
        return _json({"predictions": predictions})

    async def unbatched(request: Request, parse: Callable, run: Callable, key: str) -> Response:
        """A token or QA request: one call on the inference thread, between batches (see the module doc)."""
        try:
            body = await _read_json(request, int(config.max_body_bytes or 0))
            args = parse(body, session, config)
            result = await batcher.call(run, *args)
        except RequestError as e:
            return _error(e.status, e.message)
        except BitFitError as e:  # e.g. the task was swapped for another kind between parse and run
            return _error(404 if isinstance(e, UnknownTaskError) else 422, str(e))
        return _json({key: result.records()})

    async def tokens(request: Request) -> Response:
        return await unbatched(request, parse_tokens, session.run_tokens, "predictions")

    async def answer(request: Request) -> Response:
        return await unbatched(request, parse_answer, session.answer, "answers")

    async def healthz(request: Request) -> Response:
        n = len(session.tasks)
        if n == 0:
            return _json({"status": "no tasks", "tasks": 0}, 503)
        return _json({"status": "ok", "tasks": n})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def reload(request: Request) -> Response:
        if packs is None:
            return _error(409, "this server was started without a packs directory: nothing to reload")
        async with reload_lock:  # one reload at a time
            try:
                loaded, result = await asyncio.to_thread(packs.prepare)
                # all swaps of one reload happen together, between two batches
                result = await batcher.call(packs.commit, loaded, result)
            except BitFitError as e:
                return _error(422, str(e))
            except OSError as e:
                return _error(500, f"cannot read the packs directory: {e}")
        for outcome in ("added", "replaced"):
            metrics.reloads.labels(outcome).inc(len(getattr(result, outcome)))
        metrics.reloads.labels("refused").inc(len(result.refused))
        return _json(result.to_json())

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return _error(exc.status_code, str(exc.detail))
        return _error(500, "internal error")

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}"[:500])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(
        routes=[
            Route("/v1/tasks", tasks, methods=["GET"]),
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/v1/tokens", tokens, methods=["POST"]),
            Route("/v1/answer", answer, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/v1/admin/reload", reload, methods=["POST"]),
        ],
        middleware=[Middleware(_MetricsMiddleware, metrics=metrics)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.session = session
    app.state.config = config
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.packs = packs
    app.state.initial_load = initial
    return app


def serve(
    compiled: str | os.PathLike,
    packs: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    threads: int | None = None,
    device: str = "cpu",
    log_level: str = "warning",
    **limits: Any,
) -> None:
    """Serve every pack in `packs` on the graph in `compiled` until interrupted. `limits` are ServeConfig
    fields (max_texts, max_text_chars, max_batch_rows, max_wait_ms, batching). Raises BitFitError (before
    listening) when the compiled directory is bad or no pack in `packs` is valid."""
    import uvicorn

    config = ServeConfig.from_limits(**limits)
    if not 0 <= int(port) <= 65535:
        raise BitFitError(f"port must be between 0 and 65535, got {port}")
    packs_dir = Path(packs)
    if not packs_dir.is_dir():
        raise BitFitError(f"no packs directory at {packs_dir}: give a directory holding task packs")
    # The event loop (HTTP parsing, JSON) needs a core of its own: onnxruntime on every core starved it on 2
    # cores (measured with benchmarks/load_test.py: client p99 600 ms with 2 threads, 180 ms with 1, at the
    # same throughput). Spinning off for the same reason.
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    session = TaskSession(compiled, threads=threads, device=device, spinning=False)
    app = create_app(session, packs_dir, config)
    initial: ReloadResult = app.state.initial_load
    for name, message in initial.refused.items():
        print(f"bitfit serve: refused {name}: {message}", file=sys.stderr)
    if not session.tasks:
        raise BitFitError(f"no valid task pack in {packs_dir} (each pack is a subdirectory holding {MANIFEST_FILE} "
                          f"and {TENSORS_FILE}): nothing to serve")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bitfit serve: warning: listening on {host}: POST /v1/admin/reload has no authentication",
              file=sys.stderr)
    batching = (f"batching up to {config.max_batch_rows} rows, {config.max_wait_ms:g} ms" if config.batching
                else "batching off")
    print(f"bitfit serve: {len(session.tasks)} tasks ({', '.join(session.tasks)}) on http://{host}:{port} "
          f"({batching}, {threads} onnxruntime threads)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=False)
