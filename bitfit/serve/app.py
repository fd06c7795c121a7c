"""`bitfit serve`: an HTTP server for every task pack in a directory, on one compiled graph.

Endpoints (JSON in and out; errors are 4xx {"error": message}, never a crash):

    GET  /v1/tasks          {"tasks": [{"name", "task_kind", "labels", "text_pair", "max_length", "digest"}, ...]}
    POST /v1/predict        {"task": NAME, "texts": [...], "text_pairs": [...]?}
                            -> {"predictions": [{"label", "scores", "logits"}, ...]}
                               (the numbers `bitfit predict --json` prints for that pack)
    POST /v1/tokens         token classification: {"task": NAME, "texts": [...]}
                            -> {"predictions": [{"tokens", "labels", "scores", "offsets", "truncated"}, ...]}
                               (TaskSession.run_tokens: a label per word, words with character offsets)
    POST /v1/answer         extractive QA: {"task": NAME, "questions": [...], "contexts": [...]}
                            -> {"answers": [{"answer", "start", "end", "score", "truncated"}, ...]}
                               (TaskSession.answer: the best span of each context)
    GET  /healthz           {"status": "ok", "tasks": N}  (503 while no task is registered; "clashes" where
                            several pack directories declare one task: which one is served)
    GET  /metrics           Prometheus text (bitfit.serve.metrics)
    POST /v1/admin/reload   rescan the packs directory -> {"added", "replaced", "unchanged", "refused", "missing",
                            "clashes"}
                            (the rules: bitfit.serve.packdir)
    /v2/...                 the Open Inference Protocol (KServe v2 / Triton HTTP), one model per task:
                            health, metadata, ready and infer (bitfit.serve.v2)

Which endpoint serves a task is its kind's `route` (runtime.kinds). This layer checks only the JSON shape
of a body and the server's limits; everything about the task (registered? this endpoint's kind? pairs?
empty texts?) is the session's one validator (`TaskSession.check_call`), whose errors reach `error_response`,
the one place that maps error types to statuses: unknown task 404, other bad input 422 (a task whose output
is NaN or inf too: runtime.errors.NonFiniteOutputError), over a limit 413, shutting down 503, anything else 500.

The reload endpoint is an admin endpoint on the same port, without authentication: bind to loopback
(the default, 127.0.0.1) or put the server behind a proxy that blocks /v1/admin/.

Sequence requests are batched dynamically across tasks (bitfit.serve.batcher): rows of concurrent requests,
of any tasks, go through one `TaskSession.run_mixed` call. Token and QA requests are not batched across
requests (their rows have other shapes and decoders): each runs as one call on the same inference thread,
between batches, so they never race a pack swap. Needs the runtime plus starlette, uvicorn and
prometheus_client (`pip install 'bitfit-deploy[serve]'`); no torch.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bitfit.runtime.errors import BitFitError, UnknownTaskError
from bitfit.runtime.kinds import KINDS, WrongCallError
from bitfit.runtime.pack import MANIFEST_FILE, TENSORS_FILE
from bitfit.runtime.session import TaskSession
from bitfit.runtime.version import __version__

from . import v2
from .batcher import Batcher, ServiceUnavailable
from .metrics import Metrics, MetricsMiddleware
from .packdir import PackDirectory, ReloadResult
from .v2 import ProtocolError


@dataclass
class ServeConfig:
    """Limits and doors of one server. A request over a limit is refused with 413 (too many texts, a text too
    long, a body too large); batching groups up to max_batch_rows rows, waiting at most max_wait_ms after the
    first queued request. The security model: docs/serving.md."""

    max_texts: int = 64  # texts per request
    max_text_chars: int = 10_000  # characters per text (and per text_pair)
    max_batch_rows: int = 32  # rows per session call when batching
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others
    batching: bool = True  # False: every request is its own session call
    max_body_bytes: int | None = None  # default: enough for max_texts texts and pairs of max_text_chars
    body_timeout_s: float = 30.0  # a request whose body takes longer to arrive is answered 408
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    max_connections: int = 256  # open connections (and requests in flight); more are answered 503
    admin_token: str | None = None  # POST /v1/admin/* needs `Authorization: Bearer <token>` when set
    allowed_hosts: tuple[str, ...] | None = None  # Host headers answered (None: any); loopback servers set it
    reload_every_s: float = 0.0  # rescan the packs directory this often (0: only on POST /v1/admin/reload)

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_text_chars", "max_batch_rows", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BitFitError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_wait_ms, (int, float)) or not 0 <= self.max_wait_ms <= 10_000:
            raise BitFitError(f"max_wait_ms must be between 0 and 10000, got {self.max_wait_ms!r}")
        if not isinstance(self.reload_every_s, (int, float)) or not 0 <= self.reload_every_s <= 86_400:
            raise BitFitError(f"reload_every_s must be 0 (off) or a number of seconds up to 86400, got "
                              f"{self.reload_every_s!r}")
        for name in ("body_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise BitFitError(f"{name} must be a number of seconds in (0, 3600], got {value!r}")
        if self.admin_token is not None and (not isinstance(self.admin_token, str) or len(self.admin_token) < 16
                                             or not self.admin_token.isprintable() or " " in self.admin_token):
            raise BitFitError("the admin token must be at least 16 printable characters without spaces (e.g. "
                              "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
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
    """A request this layer refuses (bad JSON, wrong shape, over a limit): answered with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Body:
    """The JSON shape of one POST endpoint: its fields (lists of strings but `task`), which are required,
    the session call that serves it, and the key of the answer's list."""

    fields: tuple[str, ...]
    required: tuple[str, ...]
    answer: str  # key of the list in the response


BODIES = {
    "/v1/predict": Body(("task", "texts", "text_pairs"), ("task", "texts"), "predictions"),
    "/v1/tokens": Body(("task", "texts"), ("task", "texts"), "predictions"),
    "/v1/answer": Body(("task", "questions", "contexts"), ("task", "questions", "contexts"), "answers"),
}
assert {k.route for k in KINDS.values()} <= set(BODIES), "every kind's route needs a body shape here"


# -- errors -------------------------------------------------------------------------------------------
def error_response(request: Request, exc: BaseException) -> Response:
    """The one mapping of errors to HTTP answers (every handler raises; nothing else builds an error)."""
    response = _map_error(request, exc)
    if request.url.path.startswith("/v2/") and response.status_code == 422:
        response.status_code = 400  # the Open Inference Protocol answers every invalid request 400
    return response


def _map_error(request: Request, exc: BaseException) -> Response:
    if isinstance(exc, (RequestError, ProtocolError)):
        return _error(exc.status, exc.message)
    if isinstance(exc, WrongCallError):  # the session names a call; a client needs the route
        route = KINDS[exc.kind].route
        return _error(422, f"task {exc.task!r} is a {exc.kind} task: POST it to {route}, not {request.url.path}")
    if isinstance(exc, UnknownTaskError):
        return _error(404, str(exc))
    if isinstance(exc, BitFitError):  # NonFiniteOutputError too: 422, not a 500 (the server works; the pack does not)
        return _error(422, str(exc))
    if isinstance(exc, ServiceUnavailable):
        return _error(503, str(exc))
    if isinstance(exc, HTTPException):
        return _error(exc.status_code, str(exc.detail))
    return _error(500, f"internal error: {type(exc).__name__}: {exc}"[:500])


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _json(content: Any, status: int = 200) -> Response:
    try:
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or inf in an output: the pack is broken, not the request
        return _error(500, "the model produced a non-finite value (NaN or inf): check the task pack")
    return Response(body, status_code=status, media_type="application/json")


# -- request bodies: JSON shape and limits only ---------------------------------------------------------
async def read_json(request: Request, limit: int, timeout: float = 30.0) -> Any:
    """The body as JSON: at most `limit` bytes, arriving within `timeout` seconds (a client that trickles its
    body holds a connection and a task; 408 after that)."""
    body = await read_body(request, limit, timeout)
    if not body.strip():
        raise RequestError(400, "invalid JSON: the request body is empty")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"invalid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of thousands of digits: Python refuses to convert it
        raise RequestError(400, f"invalid JSON: {e}"[:300]) from None


async def read_body(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The raw body: at most `limit` bytes, arriving within `timeout` seconds."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g} s") from None


async def _read_body(request: Request, limit: int) -> bytes:
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
    return b"".join(chunks)


# -- doors: who may call what ---------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_door(request: Request, config: ServeConfig, admin: bool) -> None:
    """Refuse what a web page in a browser on this machine could make the server do, and admin calls without
    the token. Host: on a loopback server only loopback names are answered (a DNS-rebinding page names its
    own). Origin: a browser sends one on a cross-site request; it must be the server's own. Admin routes:
    the token when one is set, and a JSON content type, which a page cannot send cross-site unasked."""
    host = _hostname(request.headers.get("host", ""))
    if config.allowed_hosts is not None and host not in config.allowed_hosts:
        raise RequestError(403, f"requests for host {host!r} are not answered here: address the server by "
                                f"{' or '.join(config.allowed_hosts)}")
    origin = request.headers.get("origin")
    if origin is not None and request.method == "POST":
        from urllib.parse import urlsplit

        parts = urlsplit(origin)
        if parts.netloc.lower() != request.headers.get("host", "").lower():
            raise RequestError(403, f"cross-site request from origin {origin!r} refused: call the API from a "
                                    "server or a page of this origin")
    if not admin:
        return
    if config.admin_token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.admin_token}".encode()):
            raise RequestError(401, "admin routes need `Authorization: Bearer <token>` with the server's admin token")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise RequestError(415, "admin routes take Content-Type: application/json (send {} as the body)")


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def parse_body(data: Any, shape: Body, config: ServeConfig) -> dict[str, Any]:
    """The body's fields, checked for shape and limits: a JSON object with known fields, `task` a non-empty
    string, every other field a list of strings within the limits. RequestError otherwise."""
    takes = ", ".join(shape.fields[:-1]) + " and " + shape.fields[-1]
    if not isinstance(data, dict):
        raise RequestError(422, f"the body must be a JSON object with {takes}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(shape.fields))
    if unknown:
        raise RequestError(422, f"unknown fields {unknown}: the body takes {takes}"[:500])
    for key in shape.required:
        if key not in data:
            raise RequestError(422, f"missing field {key!r}: the body takes {takes}")
    task = data["task"]
    if not isinstance(task, str) or not task:
        raise RequestError(422, f"task must be a non-empty string, got {task!r}"[:300])
    out: dict[str, Any] = {"task": task}
    for key in shape.fields[1:]:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise RequestError(422, f"{key} must be a list of strings, got {type(value).__name__}")
        if len(value) > config.max_texts:
            raise RequestError(413, f"{key} has {len(value)} items, over the limit of {config.max_texts} per request")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise RequestError(422, f"{key}[{i}] must be a string, got {type(text).__name__}")
            if len(text) > config.max_text_chars:
                raise RequestError(413, f"{key}[{i}] has {len(text)} characters, over the limit of "
                                        f"{config.max_text_chars}")
        out[key] = value
    return out


# -- the app ------------------------------------------------------------------------------------------
def create_app(
    session: TaskSession,
    packs_dir: str | os.PathLike | None,
    config: ServeConfig | None = None,
    *,
    replica: str | None = None,
    reload_all: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> Starlette:
    """The server app for `session`. With `packs_dir`, every valid pack in it is registered now (the outcome
    is `app.state.initial_load`, a ReloadResult) and POST /v1/admin/reload rescans it. `app.state` also
    holds session, config, batcher (its `stats` count batches, rows and mixed-task batches), metrics and
    `reload` (rescan now, in this process: the ReloadResult). Where the app is one of several replicas
    (bitfit.serve.ray_app), `replica` names it in /v1/tasks and /healthz, and `reload_all` is what the
    admin route runs instead: the rescan on every replica, its answer the route's."""
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(session, max_batch_rows=config.max_batch_rows, max_wait_ms=config.max_wait_ms,
                      enabled=config.batching, on_batch=metrics.batch)
    packs = PackDirectory(packs_dir, session) if packs_dir is not None else None
    initial = packs.reload() if packs is not None else ReloadResult(unchanged=list(session.tasks))
    reload_lock = asyncio.Lock()
    metrics.tasks.set_function(lambda: len(session.tasks))

    async def tasks(request: Request) -> Response:
        check_door(request, config, admin=False)
        out = []
        for name in session.tasks:
            try:
                m = session.pack(name).manifest
            except UnknownTaskError:  # removed since the listing
                continue
            out.append({"name": name, "task_kind": m.task_kind, "labels": list(m.labels),
                        "text_pair": bool(m.text_pair), "max_length": int(m.max_length),
                        "digest": session.digest(name)})
        return _json({"tasks": out, **({"replica": replica} if replica else {})})

    async def post(request: Request) -> Response:
        """Every POST endpoint of a kind: the body's shape here, the rest is the session's."""
        check_door(request, config, admin=False)
        shape = BODIES[request.url.path]
        body = parse_body(await read_json(request, int(config.max_body_bytes or 0), config.body_timeout_s), shape,
                          config)
        task = body["task"]
        if shape.answer == "answers":
            result = await batcher.call(session.answer, task, body["questions"], body["contexts"])
        elif "text_pairs" in shape.fields:  # sequence kinds: batched with every other such request
            records = await batcher.submit(task, body["texts"], body.get("text_pairs"))
            return _json({"predictions": [{k: r[k] for k in ("label", "scores", "logits")} for r in records]})
        else:
            result = await batcher.call(session.run_tokens, task, body["texts"])
        return _json({shape.answer: result.records()})

    async def healthz(request: Request) -> Response:
        check_door(request, config, admin=False)
        n = len(session.tasks)
        named = {"replica": replica} if replica else {}
        if packs is not None and packs.clashes:  # directories declaring one task: which is served (packdir)
            named["clashes"] = dict(sorted(packs.clashes.items()))
        if n == 0:
            return _json({"status": "no tasks", "tasks": 0, **named}, 503)
        return _json({"status": "ok", "tasks": n, **named})

    async def metrics_endpoint(request: Request) -> Response:
        check_door(request, config, admin=False)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def reload_here() -> ReloadResult:
        if packs is None:
            raise RequestError(409, "this server was started without a packs directory: nothing to reload")
        async with reload_lock:  # one reload at a time
            try:
                loaded, result = await asyncio.to_thread(packs.prepare)
            except OSError as e:
                raise RequestError(500, f"cannot read the packs directory: {e}") from e
            # all swaps of one reload happen together, between two batches
            result = await batcher.call(packs.commit, loaded, result)
        for outcome in ("added", "replaced"):
            metrics.reloads.labels(outcome).inc(len(getattr(result, outcome)))
        metrics.reloads.labels("refused").inc(len(result.refused))
        return result

    async def reload(request: Request) -> Response:
        check_door(request, config, admin=True)
        if reload_all is not None:
            return _json(await reload_all())
        return _json((await reload_here()).to_json())

    async def rescan_periodically() -> None:
        while True:
            await asyncio.sleep(config.reload_every_s)
            try:
                result = await reload_here()
            except Exception as e:  # noqa: BLE001 - a failed rescan is reported and retried, never fatal
                print(f"bitfit serve: rescanning {packs_dir} failed: {e}", file=sys.stderr, flush=True)
                continue
            if result.added or result.replaced or result.refused:
                print(f"bitfit serve: rescan: {json.dumps(result.to_json())}", file=sys.stderr, flush=True)

    # -- the Open Inference Protocol (KServe v2 / Triton HTTP): one model per task ----------------------
    async def v2_server(request: Request) -> Response:
        check_door(request, config, admin=False)
        return _json({"name": "bitfit", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def v2_live(request: Request) -> Response:
        check_door(request, config, admin=False)
        return _json({"live": True})

    async def v2_ready(request: Request) -> Response:
        check_door(request, config, admin=False)
        ready = bool(session.tasks)
        return _json({"ready": ready}, 200 if ready else 503)

    def v2_task(request: Request) -> tuple[str, str, Any]:
        """The task a /v2/models/{model}[/versions/{version}] path names, its digest and pack (404 otherwise)."""
        task = request.path_params["model"]
        pack = session.pack(task)  # UnknownTaskError: 404
        digest = session.digest(task)
        version = request.path_params.get("version")
        if version is not None and version != v2.version_of(digest):
            raise RequestError(404, f"task {task!r} is served at version {v2.version_of(digest)}, not {version!r} "
                                    f"(a version is the start of the pack's digest; GET /v2/models/{task})")
        return task, digest, pack

    async def v2_model(request: Request) -> Response:
        check_door(request, config, admin=False)
        task, digest, pack = v2_task(request)
        m = pack.manifest
        return _json(v2.model_metadata(task, digest, KINDS[m.task_kind], m, f"bitfit-{session.backend}"))

    async def v2_model_ready(request: Request) -> Response:
        check_door(request, config, admin=False)
        task, _, _ = v2_task(request)
        return _json({"name": task, "ready": True})

    def versioned(fn: Callable[..., Any]) -> Callable[..., tuple[Any, str]]:
        def call(task: str, *args: Any) -> tuple[Any, str]:
            digest = session.digest(task)
            return fn(task, *args), digest
        return call

    def reloaded_under(task: str, parsed: Any, ran: str | None) -> ServiceUnavailable | None:
        """A reload that changed the task's signature (its kind, or pairs) between parsing a request against one
        pack and running it on another: the request was read for a model that no longer exists, so the honest
        answer is a retry (the client re-reads the metadata), not the other kind's refusal or its outputs."""
        pack, digest = session.pack(task), session.digest(task)  # UnknownTaskError (removed): 404 as ever
        if ran is not None and digest != ran:  # reloaded again since: which pack ran is no longer known
            same = False
        else:
            was, now = KINDS[parsed.manifest.task_kind], KINDS[pack.manifest.task_kind]
            same = (v2.inputs_of(was, parsed.manifest), v2.outputs_of(was, parsed.manifest)) == \
                (v2.inputs_of(now, pack.manifest), v2.outputs_of(now, pack.manifest))
        return None if same else ServiceUnavailable(
            f"task {task!r} was reloaded as a {pack.manifest.task_kind} task with another signature while this "
            f"request ran: retry it (GET /v2/models/{task} for the new inputs and outputs)")

    async def v2_infer(request: Request) -> Response:
        check_door(request, config, admin=False)
        task, parsed_digest, pack = v2_task(request)
        kind = KINDS[pack.manifest.task_kind]
        raw = await read_body(request, int(config.max_body_bytes or 0), config.body_timeout_s)
        req = v2.parse_infer(raw, request.headers.get(v2.HEADER_LENGTH), v2.inputs_of(kind, pack.manifest),
                             config.max_texts, config.max_text_chars)
        v2.check_outputs(req, v2.outputs_of(kind, pack.manifest))
        # the version reported is the digest of the pack that ran, read on the inference thread with the run
        # (a reload between the run and the response must not label old outputs with the new version)
        try:
            if kind.call == "answer":
                result, digest = await batcher.call(versioned(session.answer), task, req.inputs["question"],
                                                    req.inputs["context"])
                records = result.records()
            elif kind.call == "run_tokens":
                result, digest = await batcher.call(versioned(session.run_tokens), task, req.inputs["text"])
                records = result.records()
            else:  # batched with every other sequence request, /v1 and /v2 alike
                records = await batcher.submit(task, req.inputs["text"], req.inputs.get("text_pair"))
                digest = records[0]["digest"]
        except UnknownTaskError:
            raise
        except BitFitError as exc:  # the pack's own refusal, unless a reload changed the task under the request
            if session.digest(task) != parsed_digest and (busy := reloaded_under(task, pack, None)):
                raise busy from exc
            raise
        if digest != parsed_digest and (busy := reloaded_under(task, pack, digest)):
            raise busy
        try:
            body, headers = v2.encode_response(task, digest, req, v2.output_tensors(kind, records))
        except ValueError:  # NaN or inf in an output: the pack is broken, not the request
            return _error(500, "the model produced a non-finite value (NaN or inf): check the task pack")
        return Response(body, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        rescans = asyncio.create_task(rescan_periodically()) if config.reload_every_s and packs else None
        try:
            yield
        finally:
            if rescans is not None:
                rescans.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rescans
            await batcher.stop()
            batcher.close()  # the inference thread goes with the app

    routes = [
        Route("/v1/tasks", tasks, methods=["GET"]),
        *(Route(path, post, methods=["POST"]) for path in BODIES),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/admin/reload", reload, methods=["POST"]),
        Route("/v2", v2_server, methods=["GET"]),
        Route("/v2/health/live", v2_live, methods=["GET"]),
        Route("/v2/health/ready", v2_ready, methods=["GET"]),
        *(r for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}") for r in (
            Route(base, v2_model, methods=["GET"]),
            Route(f"{base}/ready", v2_model_ready, methods=["GET"]),
            Route(f"{base}/infer", v2_infer, methods=["POST"]),
        )),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics, routes=routes)],  # labelled by route template
        # one handler for all: the expected errors by type, and Exception (answered 500, and logged by uvicorn)
        exception_handlers={t: error_response for t in (RequestError, ProtocolError, BitFitError, ServiceUnavailable,
                                                         HTTPException, Exception)},
        lifespan=lifespan,
    )
    app.state.session = session
    app.state.config = config
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.packs = packs
    app.state.initial_load = initial
    app.state.reload = reload_here
    return app


def _check_listen(host: str, port: int) -> None:
    """Refuse a host or port that cannot be bound, before any model is loaded (as uvicorn binds it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BitFitError(f"cannot listen on {host!r}: {e.strerror}; give an address of this machine with --host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise BitFitError(f"cannot listen on {host}:{port} ({e.strerror}): another server holds the port, or the "
                              "address is not this machine's; choose another --port or --host") from None


ADMIN_TOKEN_ENV = "BITFIT_ADMIN_TOKEN"


def door_limits(host: str, limits: dict[str, Any]) -> dict[str, Any]:
    """`limits` with the doors a server listening on `host` needs: the admin token (from BITFIT_ADMIN_TOKEN when
    not given), loopback Host names only on a loopback address; BitFitError for a non-loopback address
    without a token. Every way of starting a server (here, bitfit.serve.ray_app) goes through it."""
    limits = dict(limits)
    if limits.get("admin_token") is None:
        limits["admin_token"] = os.environ.get(ADMIN_TOKEN_ENV) or None
    loopback = host in LOOPBACK
    if loopback:  # a page that rebinds its own domain to 127.0.0.1 sends its own name as Host
        limits.setdefault("allowed_hosts", LOOPBACK)
    elif limits["admin_token"] is None:
        raise BitFitError(f"listening on {host} would open POST /v1/admin/reload to the network: set an admin token "
                          f"({ADMIN_TOKEN_ENV}, or --admin-token), or listen on 127.0.0.1")
    return limits


def serve(
    compiled: str | os.PathLike,
    packs: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    threads: int | None = None,
    device: str = "cpu",
    backend: str = "onnxruntime",
    log_level: str = "warning",
    **limits: Any,
) -> None:
    """Serve every pack in `packs` on the graph in `compiled` until interrupted. `limits` are ServeConfig
    fields (max_texts, max_text_chars, max_batch_rows, max_wait_ms, batching, timeouts, max_connections,
    admin_token; the token defaults to the BITFIT_ADMIN_TOKEN environment variable). Raises BitFitError
    (before listening) when the compiled directory is bad, no pack in `packs` is valid, the port cannot be
    bound, or a non-loopback host is asked for without an admin token."""
    import uvicorn

    config = ServeConfig.from_limits(**door_limits(host, limits))
    if not 0 <= int(port) <= 65535:
        raise BitFitError(f"port must be between 0 and 65535, got {port}")
    _check_listen(host, int(port))
    packs_dir = Path(packs)
    if not packs_dir.is_dir():
        raise BitFitError(f"no packs directory at {packs_dir}: give a directory holding task packs")
    # The event loop (HTTP parsing, JSON) needs a core of its own: onnxruntime on every core starved it on 2
    # cores (measured with benchmarks/load_test.py: client p99 600 ms with 2 threads, 180 ms with 1, at the
    # same throughput). Spinning off for the same reason.
    threads = threads or max(1, (os.cpu_count() or 2) - 1)
    session = TaskSession(compiled, threads=threads, device=device, spinning=False, backend=backend)
    app = create_app(session, packs_dir, config)
    initial: ReloadResult = app.state.initial_load
    for name, message in initial.refused.items():
        print(f"bitfit serve: refused {name}: {message}", file=sys.stderr)
    if not session.tasks:
        raise BitFitError(f"no valid task pack in {packs_dir} (each pack is a subdirectory holding {MANIFEST_FILE} "
                          f"and {TENSORS_FILE}): nothing to serve")
    batching = (f"batching up to {config.max_batch_rows} rows, {config.max_wait_ms:g} ms" if config.batching
                else "batching off")
    print(f"bitfit serve: {len(session.tasks)} tasks ({', '.join(session.tasks)}) on http://{host}:{port} "
          f"({batching}, {threads} {session.backend} threads)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, access_log=False,
                http=_with_header_timeout(config.header_timeout_s), limit_concurrency=config.max_connections,
                timeout_keep_alive=5)


def _with_header_timeout(seconds: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for the request head: uvicorn times out idle keep-alive
    connections but waits forever for a head that arrives a byte at a time (slowloris). A connection with no
    request in flight that has not completed a head `seconds` after it opened (or after its last response)
    is closed; a request being served is never cut."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._head_too_slow)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._head_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _head_too_slow(self) -> None:
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline
