"""`bitfit serve-web`: a static server for a site written by `bitfit export-web`, for a person's preview, the
browser tests and benchmarks/web_latency.py (any static web server does as well: docs/web.md says what it needs).

What it adds to Python's http.server: the MIME types a module page needs (.mjs and .wasm; Chromium refuses a
module script served as anything but JavaScript), the cross-origin isolation headers under which onnxruntime-web
may use several wasm threads (isolated=True), caching that fits the site (site.json always revalidated; every
other file is named by its digest, so it never changes under its name), and no request log on stderr.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bitfit.runtime import args as A
from bitfit.runtime import schema as S
from bitfit.runtime.errors import BitFitError

from .web import SITE_FILE

TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
         ".onnx": "application/octet-stream", ".bin": "application/octet-stream", ".html": "text/html; charset=utf-8",
         ".css": "text/css"}


class _Handler(SimpleHTTPRequestHandler):
    isolated = True
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def end_headers(self) -> None:
        if self.isolated:  # crossOriginIsolated: SharedArrayBuffer, so wasm threads
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        fixed = any(part in self.path for part in ("/model/", "/tasks/"))
        self.send_header("Cache-Control", "public, max-age=31536000, immutable" if fixed else "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def serve_site(site: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 0,
               isolated: bool = True) -> Iterator[str]:
    """Serve `site` on a background thread for the block's duration; yields its URL (port 0: any free port)."""
    A.check("site", site, A.PATH)
    A.check("host", host, S.string(256))
    A.check("port", port, S.integer(0, 65535))
    A.check("isolated", isolated, S.boolean())
    root = Path(site)
    if not (root / SITE_FILE).is_file():
        raise BitFitError(f"{root} holds no {SITE_FILE}: it is not a site bitfit export-web wrote; export one first")
    handler = type("Handler", (_Handler,), {"isolated": isolated})
    try:
        server = ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(root)))
    except OSError as e:
        raise BitFitError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bitfit-serve-web", daemon=True)
    thread.start()
    try:
        name = f"[{host}]" if ":" in host else host
        yield f"http://{name}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve_web(site: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, isolated: bool = True,
              log=print) -> None:
    """`bitfit serve-web`: serve `site` until interrupted (Ctrl-C)."""
    A.check("log", log, A.CALLABLE)
    with serve_site(site, host=host, port=port, isolated=isolated) as url:
        log(f"serving {site} at {url} ({'cross-origin isolated: wasm threads' if isolated else 'one wasm thread'}); "
            "Ctrl-C stops")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
