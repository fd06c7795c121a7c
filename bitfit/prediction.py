"""Predictions from a compiled graph and a task pack, with the runtime alone (no torch)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from bitfit.runtime import Answers, Predictions, TaskSession, TokenPredictions
from bitfit.runtime import args as A
from bitfit.runtime.errors import BitFitError
from bitfit.runtime.fs import read_bounded

MAX_TEXTS_FILE = 1 << 30  # predict reads the whole file: a bigger one is not meant for it


def predict(
    compiled: str | os.PathLike,
    pack: str | os.PathLike,
    texts: Sequence[str] | Sequence[Sequence[str]],
    text_pairs: Sequence[str] | None = None,
    *,
    threads: int | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    backend: str = "onnxruntime",
) -> Predictions | TokenPredictions | Answers:
    """Run the pack's task kind (runtime.kinds): classification / regression -> Predictions; token-classification
    -> TokenPredictions (texts: strings, or lists of words); question-answering -> Answers (texts are the
    questions, text_pairs their contexts)."""
    A.check("pack", pack, A.PACK)
    session = TaskSession(compiled, threads=threads, device=device, backend=backend)
    task = session.register(pack)
    return session.predict(task, texts, text_pairs, batch_size=batch_size)


def read_texts(path: str | os.PathLike) -> tuple[list, list[str] | None]:
    """One text per line, or JSONL objects with `text` (and `text_pair`), with `tokens` (a list of words, for
    token classification), or with `question` and `context` (question answering: questions, contexts)."""
    p = Path(path)
    fix = "give a UTF-8 text file: one text per line, or JSONL"
    raw = read_bounded(p, MAX_TEXTS_FILE, what="file of texts", error=BitFitError, fix=fix)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BitFitError(f"{p} is not UTF-8 ({e.reason} at byte {e.start}): {fix}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if p.suffix.lower() != ".jsonl":
        return lines, None
    try:
        rows = [json.loads(line) for line in lines]
    except (ValueError, RecursionError) as e:  # bad JSON, or a number Python will not convert
        raise BitFitError(f"{p} is not valid JSONL ({e})") from None
    if rows and all(isinstance(r, dict) and "tokens" in r for r in rows):
        return [r["tokens"] for r in rows], None
    if rows and all(isinstance(r, dict) and "question" in r and "context" in r for r in rows):
        return [r["question"] for r in rows], [r["context"] for r in rows]
    if any(not isinstance(r, dict) or "text" not in r for r in rows):
        raise BitFitError(f"{p}: every JSONL row needs a `text` field (or `tokens`, or `question` and `context`)")
    pairs = [r.get("text_pair") for r in rows]
    return [r["text"] for r in rows], (pairs if any(x is not None for x in pairs) else None)
