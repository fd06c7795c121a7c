"""`bitfit serve`: the HTTP server (`app`: the /v1 handlers and `create_app`; `v2`: the Open Inference
Protocol's codec and routes; `state`: ServeConfig, the one AppState and the route wrapper with the doors;
`web`: the one error type, bodies, limits and doors both protocols share), its pack-directory scanner
(`packdir`, no web imports), its metrics (`metrics`) and its cross-task batcher (`batcher`).

`from bitfit.serve import create_app, serve` loads the web app; importing the package alone, `ServeConfig`
(bitfit.serve.config) or `bitfit.serve.packdir` does not, so the CLI and the scanner work without starlette.
"""
from __future__ import annotations

from typing import Any

_APP = ("ServeConfig", "create_app", "serve")


def __getattr__(name: str) -> Any:
    if name == "ServeConfig":  # no web imports: the CLI builds its flags from it
        from .config import ServeConfig

        return ServeConfig
    if name in _APP:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'bitfit.serve' has no attribute {name!r}")


__all__ = list(_APP)
