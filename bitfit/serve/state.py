"""The server's one state (`AppState`, held in `app.state.bitfit`), and `route`: the wrapper every route goes
through (its doors, then its handler over the state, then its protocol's rendering of any refusal). Handlers
are module-level functions `(request, state) -> Response`. The limits are `ServeConfig` (bitfit.serve.config).
"""
from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bitfit.runtime.session import TaskSession

from .batcher import Batcher
from .config import ServeConfig
from .metrics import Metrics
from .packdir import PackDirectory, ReloadResult
from .web import EXPECTED, V1, HTTPError, Protocol, check_door, read_body


@dataclass
class AppState:
    """Everything the handlers share: the session, limits, batcher, metrics, the packs directory (None: a
    server without one), the first scan's outcome, and, where the app is one of several replicas
    (bitfit.serve.ray_app), its name and what the admin reload runs instead of a local rescan."""

    session: TaskSession
    config: ServeConfig
    batcher: Batcher
    metrics: Metrics
    packs: PackDirectory | None
    initial_load: ReloadResult
    replica: str | None = None
    reload_all: Callable[[], Awaitable[dict[str, Any]]] | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def start(cls, session: TaskSession, packs: PackDirectory | None, config: ServeConfig, **more: Any) -> AppState:
        """The state of a new app: metrics and batcher made, every valid pack of `packs` registered now."""
        metrics = Metrics(tasks=lambda: len(session), capacity=lambda: session.capacity)
        batcher = Batcher(session, max_batch_rows=config.max_batch_rows, max_wait_ms=config.max_wait_ms,
                          enabled=config.batching, on_batch=metrics.batch)
        initial = packs.reload() if packs is not None else ReloadResult(unchanged=list(session.tasks))
        return cls(session, config, batcher, metrics, packs, initial, **more)

    async def body(self, request: Request) -> bytes:
        """The request's body within the server's size and time limits."""
        return await read_body(request, int(self.config.max_body_bytes or 0), self.config.body_timeout_s)

    async def reload(self) -> ReloadResult:
        """Rescan the packs directory in this process: read in a thread, then every swap of one reload together,
        on the inference thread between two batches."""
        if self.packs is None:
            raise HTTPError("this server was started without a packs directory: nothing to reload", 409)
        async with self.reload_lock:  # one reload at a time
            try:
                loaded, result = await asyncio.to_thread(self.packs.prepare)
            except OSError as e:
                raise HTTPError(f"cannot read the packs directory: {e}", 500) from e
            result = await self.batcher.call(self.packs.commit, loaded, result)
        for outcome in ("added", "replaced"):
            self.metrics.reloads.labels(outcome).inc(len(getattr(result, outcome)))
        self.metrics.reloads.labels("refused").inc(len(result.refused))
        return result

    async def rescan_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_every_s)
            try:
                result = await self.reload()
            except Exception as e:  # noqa: BLE001 - a failed rescan is reported and retried, never fatal
                root = self.packs.root if self.packs is not None else None
                print(f"bitfit serve: rescanning {root} failed: {e}", file=sys.stderr, flush=True)
                continue
            if result.added or result.replaced or result.refused:
                print(f"bitfit serve: rescan: {json.dumps(result.to_json())}", file=sys.stderr, flush=True)


Handler = Callable[[Request, AppState], Awaitable[Response]]


def route(path: str, handler: Handler, method: str = "GET", *, protocol: Protocol = V1, admin: bool = False) -> Route:
    """A route whose handler runs behind the doors (check_door: Host, Origin; the admin token where `admin`)
    with the app's state, and whose refusals are answered in `protocol`'s way. Errors no route expects reach
    the app's handler (500)."""

    async def endpoint(request: Request) -> Response:
        state: AppState = request.app.state.bitfit
        try:
            check_door(request, state.config.allowed_hosts, state.config.admin_token, admin)
            return await handler(request, state)
        except EXPECTED as exc:
            return protocol.render(request, exc)

    endpoint.__name__ = handler.__name__
    return Route(path, endpoint, methods=[method])
