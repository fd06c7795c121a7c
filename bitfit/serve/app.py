"""`bitfit serve`: an HTTP server for every task pack in a directory, on one compiled graph.

Endpoints (JSON in and out; errors are 4xx {"error": message}, never a crash):

    GET  /v1/tasks          {"tasks": [{"name", "task_kind", "labels", "text_pair", "max_length", "digest"}, ...],
                             "next": NAME or null}: one page by task name, `?limit=N` (default 100, at most
                            1000) `&after=NAME` (the previous page's "next")
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
of a body and the server's limits (web.strings, web.check_limits: the same checks as /v2's); everything
about the task (registered? this endpoint's kind? pairs? empty texts?) is the session's one validator
(`TaskSession.check_call`), whose errors reach `web.Protocol.render`, the one place that maps error types to
statuses: unknown task 404, other bad input 422 (/v1; /v2 answers 400; a task whose output is NaN or inf
too: runtime.errors.NonFiniteOutputError), over a limit 413, shutting down 503, anything else 500.

The handlers are module-level functions over one `AppState` (bitfit.serve.state, in `app.state.bitfit`),
each mounted through `state.route`, which runs the doors (Host, Origin, the admin token) before it; the /v2
routes are v2.py's, beside the protocol's codec.

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
import bisect
import contextlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from bitfit.runtime.calls import SEQUENCE, Body, by_route
from bitfit.runtime.errors import BitFitError, UnknownTaskError
from bitfit.runtime.kinds import KINDS
from bitfit.runtime.pack import MANIFEST_FILE, TENSORS_FILE
from bitfit.runtime.session import TaskSession

from . import v2
from .metrics import MetricsMiddleware
from .packdir import PackDirectory, ReloadResult
from .config import ServeConfig
from .state import AppState, route
from .web import LOOPBACK, V1, HTTPError, check_limits, json_response, parse_json, strings

__all__ = ["BODIES", "AppState", "ServeConfig", "create_app", "door_limits", "parse_body", "serve"]


# the /v1 POST endpoints, one per call shape (runtime.calls): its body's fields and the key of its answer
BODIES = {route: shape.body for route, shape in by_route().items()}
assert {k.route for k in KINDS.values()} <= set(BODIES), "every kind's route is a call shape's"


def parse_body(data: Any, shape: Body, config: ServeConfig) -> dict[str, Any]:
    """The body's fields, checked for shape and limits: a JSON object with known fields, `task` a non-empty
    string, every other field a list of strings within the limits. HTTPError otherwise."""
    takes = ", ".join(shape.fields[:-1]) + " and " + shape.fields[-1]
    if not isinstance(data, dict):
        raise HTTPError(f"the body must be a JSON object with {takes}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(shape.fields))
    if unknown:
        raise HTTPError(f"unknown fields {unknown}: the body takes {takes}"[:500])
    for key in shape.required:
        if key not in data:
            raise HTTPError(f"missing field {key!r}: the body takes {takes}")
    task = data["task"]
    if not isinstance(task, str) or not task:
        raise HTTPError(f"task must be a non-empty string, got {task!r}"[:300])
    out: dict[str, Any] = {"task": task}
    for key in shape.fields[1:]:
        if data.get(key) is not None:
            out[key] = check_limits(key, strings(data[key], key), config.max_texts, config.max_text_chars)
    return out


# -- /v1 handlers ---------------------------------------------------------------------------------------
PAGE = 100  # tasks per /v1/tasks page unless ?limit= says otherwise
MAX_PAGE = 1000


def _page_limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return PAGE
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise HTTPError(f"limit must be a whole number from 1 to {MAX_PAGE}, got {raw!r}"[:300])
    return limit


async def tasks(request: Request, state: AppState) -> Response:
    """One page of the registered tasks, by name: those after `after`, at most `limit`; "next" is the `after`
    of the next page (null on the last)."""
    session, limit = state.session, _page_limit(request)
    names = session.tasks  # sorted
    after = request.query_params.get("after")
    start = bisect.bisect_right(names, after) if after is not None else 0
    out = []
    for name in names[start:]:
        if len(out) == limit:
            break
        try:
            m, digest = session.pack(name).manifest, session.digest(name)
        except UnknownTaskError:  # removed since the listing
            continue
        out.append({"name": name, "task_kind": m.task_kind, "labels": list(m.labels), "text_pair": bool(m.text_pair),
                    "max_length": int(m.max_length), "digest": digest})
    more = bool(out) and names[-1] > out[-1]["name"]
    return json_response({"tasks": out, "next": out[-1]["name"] if more else None,
                          **({"replica": state.replica} if state.replica else {})})


async def post(request: Request, state: AppState) -> Response:
    """Every POST endpoint of a kind: the body's shape here, the rest is the session's."""
    shape = by_route()[request.url.path]
    body = parse_body(parse_json(await state.body(request), "invalid JSON", status=400), shape.body, state.config)
    task, session, batcher = body["task"], state.session, state.batcher
    if shape is SEQUENCE:  # batched with every other sequence request
        records = await batcher.submit(task, body["texts"], body.get("text_pairs"))
        return json_response({"predictions": [{k: r[k] for k in ("label", "scores", "logits")} for r in records]})
    # the other shapes take their body's fields, in order, as the session call's arguments
    result = await batcher.call(getattr(session, shape.method), task, *(body[f] for f in shape.body.fields[1:]))
    return json_response({shape.body.answer: result.records()})


async def healthz(request: Request, state: AppState) -> Response:
    n = len(state.session)
    named: dict[str, Any] = {"replica": state.replica} if state.replica else {}
    if state.packs is not None and state.packs.clashes:  # directories declaring one task: which is served
        named["clashes"] = dict(sorted(state.packs.clashes.items()))
    if n == 0:
        return json_response({"status": "no tasks", "tasks": 0, **named}, 503)
    return json_response({"status": "ok", "tasks": n, **named})


async def metrics(request: Request, state: AppState) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def reload(request: Request, state: AppState) -> Response:
    if state.reload_all is not None:
        return json_response(await state.reload_all())
    return json_response((await state.reload()).to_json())


ROUTES = [
    route("/v1/tasks", tasks),
    *(route(path, post, "POST") for path in BODIES),
    route("/healthz", healthz),
    route("/metrics", metrics),
    route("/v1/admin/reload", reload, "POST", admin=True),
    *v2.ROUTES,
]


# -- the app ------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    state: AppState = app.state.bitfit
    await state.batcher.start()
    rescans = asyncio.create_task(state.rescan_periodically()) \
        if state.config.reload_every_s and state.packs is not None else None
    try:
        yield
    finally:
        if rescans is not None:
            rescans.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rescans
        await state.batcher.stop()
        state.batcher.close()  # the inference thread goes with the app


def _unexpected(request: Request, exc: Exception) -> Response:
    """Errors outside every route's own handling: starlette's 404 and 405, and a 500 (logged by uvicorn)."""
    return V1.render(request, exc)


def create_app(
    session: TaskSession,
    packs_dir: str | os.PathLike | None,
    config: ServeConfig | None = None,
    *,
    replica: str | None = None,
    reload_all: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> Starlette:
    """The server app for `session`. With `packs_dir`, every valid pack in it is registered now (the outcome
    is `app.state.initial_load`, a ReloadResult) and POST /v1/admin/reload rescans it. `app.state.bitfit` is
    the AppState; `app.state` also holds its session, config, batcher (its `stats` count batches, rows and
    mixed-task batches), metrics, packs and `reload` (rescan now, in this process: the ReloadResult). Where
    the app is one of several replicas (bitfit.serve.ray_app), `replica` names it in /v1/tasks and /healthz,
    and `reload_all` is what the admin route runs instead: the rescan on every replica, its answer the route's."""
    packs = PackDirectory(packs_dir, session) if packs_dir is not None else None
    state = AppState.start(session, packs, config or ServeConfig(), replica=replica, reload_all=reload_all)
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(MetricsMiddleware, metrics=state.metrics, routes=ROUTES)],  # by route template
        exception_handlers={HTTPException: _unexpected, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.bitfit = state
    for name in ("session", "config", "batcher", "metrics", "packs", "initial_load"):
        setattr(app.state, name, getattr(state, name))
    app.state.reload = state.reload
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
    if not len(session):
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
