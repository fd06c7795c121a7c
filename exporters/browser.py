"""A headless Chromium held open from Python: the browser tests, benchmarks/web_latency.py and the quickstart open a
site written by `bitfit export-web` in it and read what the page computed.

It runs web/tools/browser.mjs under Node.js, which drives the system's Chromium (Debian's /usr/bin/chromium, or
the binary CHROMIUM names) through playwright-core; nothing downloads a browser. Commands and answers are JSON
lines (the .mjs file lists the commands).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from bitfit.runtime.errors import BitFitError

from .web import web_root


class BrowserError(BitFitError):
    """The browser (or the page) could not do what was asked: the message is the page's or Playwright's."""


def chromium_path() -> str:
    return os.environ.get("CHROMIUM") or "/usr/bin/chromium"


def browser_problem() -> str | None:
    """Why a browser cannot be driven here (None: it can): what is missing and how to get it."""
    if shutil.which("node") is None:
        return "no Node.js (node) on PATH: install nodejs, then run scripts/setup_web.sh"
    if not Path(chromium_path()).is_file():
        return f"no Chromium at {chromium_path()}: run scripts/setup_web.sh as root (apt-get install chromium), or set CHROMIUM"
    try:
        root = web_root()
    except BitFitError as e:
        return str(e)
    if not (root / "node_modules" / "playwright-core" / "package.json").is_file():
        return f"playwright-core is not installed in {root}/node_modules: run scripts/setup_web.sh (npm ci --prefix web)"
    return None


class Browser:
    """`with Browser() as b: b.call("goto", url=...); b.call("eval", js="async () => ...")`."""

    def __init__(self, *, timeout_s: float = 180.0) -> None:
        problem = browser_problem()
        if problem:
            raise BrowserError(problem)
        self.timeout_s = timeout_s
        root = web_root()
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # a pipe nobody reads could fill and stall
        self._proc = subprocess.Popen(
            ["node", str(root / "tools" / "browser.mjs")], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, encoding="utf-8", env={**os.environ, "CHROMIUM": chromium_path()})
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._answer(60.0)
        if ready.get("value") != "ready":
            self.close()
            raise BrowserError(f"Chromium did not start: {ready.get('error', ready)}")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self.close()
            raise BrowserError(f"the browser did not answer within {timeout_s:.0f} s") from None
        if line is None:
            self._proc.wait()
            self._stderr.seek(0)
            err = self._stderr.read()
            raise BrowserError(f"the browser driver exited: {err.strip()[-2000:]}")
        return json.loads(line)

    def call(self, op: str, **args: Any) -> Any:
        """Send one command; its value, or BrowserError with the page's (or Playwright's) message."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self._proc.stdin.flush()
        answer = self._answer(self.timeout_s)
        if not answer.get("ok"):
            raise BrowserError(str(answer.get("error")))
        return answer.get("value")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._stderr.close()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
