"""What both protocols of `bitfit serve` share: the one HTTP error type and how each protocol renders errors,
JSON answers, reading a bounded body, the list-of-strings and limits checks of a request, and the doors (Host,
Origin, admin token). No routes here: /v1 is app.py's, /v2 is v2.py's.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bitfit.runtime.errors import BitFitError, UnknownTaskError
from bitfit.runtime.kinds import KINDS, WrongCallError

from .batcher import ServiceUnavailable


class HTTPError(Exception):
    """A request this server refuses (bad JSON, wrong shape, over a limit, a closed door). `status` None: an
    invalid request, answered with the protocol's own status for that (Protocol.invalid)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


EXPECTED = (HTTPError, BitFitError, ServiceUnavailable)  # what a route answers itself; anything else is a 500


@dataclass(frozen=True)
class Protocol:
    """How one protocol answers errors: `invalid` is its status for a request it cannot serve as sent (/v1:
    422; the Open Inference Protocol: 400 for every invalid request). Errors are {"error": message} in both."""

    name: str
    invalid: int

    def status(self, exc: BaseException) -> int:
        if isinstance(exc, HTTPError):
            return exc.status or self.invalid
        if isinstance(exc, UnknownTaskError):
            return 404
        if isinstance(exc, BitFitError):  # NonFiniteOutputError too: not a 500 (the server works; the pack does not)
            return self.invalid
        if isinstance(exc, ServiceUnavailable):
            return 503
        if isinstance(exc, HTTPException):
            return exc.status_code
        return 500

    def render(self, request: Request, exc: BaseException) -> Response:
        """The one mapping of errors to HTTP answers (every handler raises; nothing else builds an error)."""
        if isinstance(exc, WrongCallError):  # the session names a call; a client needs the route
            route = KINDS[exc.kind].route
            message = f"task {exc.task!r} is a {exc.kind} task: POST it to {route}, not {request.url.path}"
        elif isinstance(exc, HTTPError):
            message = exc.message
        elif isinstance(exc, HTTPException):
            message = str(exc.detail)
        elif isinstance(exc, (BitFitError, ServiceUnavailable)):
            message = str(exc)
        else:
            message = f"internal error: {type(exc).__name__}: {exc}"[:500]
        return error(self.status(exc), message)


V1 = Protocol("v1", invalid=422)
V2 = Protocol("v2", invalid=400)


# -- answers ------------------------------------------------------------------------------------------
def error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def dumps(obj: Any) -> str:
    """Compact JSON, refusing NaN and inf (ValueError): no client parses them."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


NON_FINITE = "the model produced a non-finite value (NaN or inf): check the task pack"


def json_response(content: Any, status: int = 200) -> Response:
    try:
        body = dumps(content)
    except ValueError:  # NaN or inf in an output: the pack is broken, not the request
        return error(500, NON_FINITE)
    return Response(body, status_code=status, media_type="application/json")


# -- request bodies ---------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int, timeout: float = 30.0) -> Any:
    """The body as JSON: at most `limit` bytes, arriving within `timeout` seconds (a client that trickles its
    body holds a connection and a task; 408 after that)."""
    return parse_json(await read_body(request, limit, timeout), "invalid JSON", status=400)


def parse_json(raw: bytes, what: str, status: int | None = None) -> Any:
    """`raw` as JSON, or an HTTPError starting with `what` (the protocol's invalid status unless `status`)."""
    if not raw.strip():
        raise HTTPError(f"{what}: the request body is empty", status)
    try:
        return json.loads(raw)
    except RecursionError:
        raise HTTPError(f"{what}: nested too deeply", status) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError; an integer of thousands of digits too
        raise HTTPError(f"{what}: {e}"[:300], status) from None


async def read_body(request: Request, limit: int, timeout: float = 30.0) -> bytes:
    """The raw body: at most `limit` bytes, arriving within `timeout` seconds."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(f"the request body did not arrive within {timeout:g} s", 408) from None


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_large = int(length) > limit
        except ValueError:
            raise HTTPError(f"invalid Content-Length header {length!r}", 400) from None
        if too_large:
            raise HTTPError(f"request body of {length} bytes is over the limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(f"request body is over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def kind_of(value: Any) -> str:
    """A JSON value's type for a message (with the value where it is a short scalar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"[:40]
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def strings(value: Any, path: str) -> list[str]:
    """`value` when it is a list of strings (both protocols' texts); an invalid-request error naming the path."""
    if not isinstance(value, list):
        raise HTTPError(f"{path} must be a list of strings, got {kind_of(value)}")
    for i, text in enumerate(value):
        if not isinstance(text, str):
            raise HTTPError(f"{path}[{i}] must be a string, got {kind_of(text)}")
    return value


def check_limits(what: str, texts: list[str], max_texts: int, max_chars: int) -> list[str]:
    """The server's limits on one list of texts, for both protocols: 413 over max_texts or max_chars."""
    if len(texts) > max_texts:
        raise HTTPError(f"{what} has {len(texts)} items, over the limit of {max_texts} per request", 413)
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise HTTPError(f"{what}[{i}] has {len(text)} characters, over the limit of {max_chars}", 413)
    return texts


# -- doors: who may call what ---------------------------------------------------------------------------
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_door(request: Request, allowed_hosts: tuple[str, ...] | None, admin_token: str | None,
               admin: bool) -> None:
    """Refuse what a web page in a browser on this machine could make the server do, and admin calls without
    the token. Host: on a loopback server only loopback names are answered (a DNS-rebinding page names its
    own). Origin: a browser sends one on a cross-site request; it must be the server's own. Admin routes:
    the token when one is set, and a JSON content type, which a page cannot send cross-site unasked."""
    host = _hostname(request.headers.get("host", ""))
    if allowed_hosts is not None and host not in allowed_hosts:
        raise HTTPError(f"requests for host {host!r} are not answered here: address the server by "
                        f"{' or '.join(allowed_hosts)}", 403)
    origin = request.headers.get("origin")
    if origin is not None and request.method == "POST":
        from urllib.parse import urlsplit

        parts = urlsplit(origin)
        if parts.netloc.lower() != request.headers.get("host", "").lower():
            raise HTTPError(f"cross-site request from origin {origin!r} refused: call the API from a server or a "
                            "page of this origin", 403)
    if not admin:
        return
    if admin_token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {admin_token}".encode()):
            raise HTTPError("admin routes need `Authorization: Bearer <token>` with the server's admin token", 401)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPError("admin routes take Content-Type: application/json (send {} as the body)", 415)


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
