"""`ServeConfig`: the limits and doors of one server, as a dataclass whose every field has a default, help text
(`metadata["help"]`) and a range check in __post_init__, so the CLI's serve flags can be generated from it.
No web imports: the CLI reads it without the server's extra installed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from bitfit.runtime.errors import BitFitError


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class ServeConfig:
    """Limits and doors of one server. A request over a limit is refused with 413 (too many texts, a text too
    long, a body too large); batching groups up to max_batch_rows rows, waiting at most max_wait_ms after the
    first queued request. The security model: docs/serving.md. Every field has a default and help text
    (`metadata["help"]`), and is range-checked in __post_init__."""

    max_texts: int = field(default=64, metadata=_help("texts per request; more are answered 413"))
    max_text_chars: int = field(default=10_000, metadata=_help("characters per text (and per text pair)"))
    max_batch_rows: int = field(default=32, metadata=_help("rows per session call when batching"))
    max_wait_ms: float = field(default=5.0, metadata=_help("how long the oldest queued request waits for others "
                                                             "(0 to 10000 ms)"))
    batching: bool = field(default=True, metadata=_help("False: every request is its own session call"))
    max_body_bytes: int | None = field(default=None, metadata=_help(
        "request body limit in bytes (default: enough for max_texts texts and pairs of max_text_chars)"))
    body_timeout_s: float = field(default=30.0, metadata=_help(
        "a request whose body takes longer to arrive is answered 408 (seconds, up to 3600)"))
    header_timeout_s: float = field(default=10.0, metadata=_help(
        "a connection that has not sent a whole request head by then is closed (seconds, up to 3600)"))
    max_connections: int = field(default=256, metadata=_help("open connections served at once; more are answered 503"))
    admin_token: str | None = field(default=None, metadata=_help(
        "POST /v1/admin/* needs `Authorization: Bearer <token>` when set (at least 16 printable characters)"))
    allowed_hosts: tuple[str, ...] | None = field(default=None, metadata=_help(
        "Host headers answered (None: any); loopback servers set it"))
    reload_every_s: float = field(default=0.0, metadata=_help(
        "rescan the packs directory this often (0: only on POST /v1/admin/reload; up to 86400)"))

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
