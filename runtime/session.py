"""One onnxruntime session for the frozen encoder, any number of tasks.

A task is its bias arrays and a small head. Switching tasks binds other pre-built OrtValues to the
graph's bias inputs; the graph is never reloaded. Biases a pack does not train are not fed, so the
graph's defaults (the base model's values, stored as overridable initializers) apply.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import compiled as cm
from .errors import BitFitError, CompiledModelError, UnknownTaskError
from .heads import (DEFAULT_MAX_ANSWER_TOKENS, Answers, Head, TokenPredictions, answers_nothing, best_span,
                    null_score, softmax, word_logits)
from .heads import pool  # noqa: F401 - callers import pool from here
from .pack import PackManifest, TaskPack, load_pack, sha256_file
from .tokenize import TextEncoder, check_texts


@dataclass(frozen=True)
class Predictions:
    """Outputs for a batch of texts: logits [n, k], scores (probabilities, or the value for regression)."""

    task: str
    task_kind: str
    label_names: list[str]
    logits: np.ndarray
    scores: np.ndarray
    labels: list[Any]

    @classmethod
    def from_logits(cls, task: str, manifest: PackManifest, logits: np.ndarray) -> Predictions:
        if manifest.task_kind == "classification":
            scores = softmax(logits)
            labels: list[Any] = [manifest.labels[i] for i in scores.argmax(axis=-1)]
        else:
            scores = logits
            labels = [float(v) for v in logits[:, 0]]
        return cls(task, manifest.task_kind, list(manifest.labels), logits, scores, labels)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per text: label, scores by label name, logits."""
        out = []
        for i, label in enumerate(self.labels):
            if self.task_kind == "classification":
                scores = {n: float(s) for n, s in zip(self.label_names, self.scores[i])}
            else:
                scores = {"value": float(self.scores[i, 0])}
            out.append({"label": label, "scores": scores, "logits": [float(x) for x in self.logits[i]]})
        return out


@dataclass
class _Task:
    pack: TaskPack
    values: dict[str, ort.OrtValue]  # bias input name -> OrtValue, built once at registration (plain graphs)
    arrays: dict[str, np.ndarray]  # the memory those OrtValues point at: keep it alive
    head: Head


@dataclass(frozen=True)
class _State:
    """Everything a call reads, replaced as a whole by register/remove: a call that took it sees one
    consistent set of tasks (and, on a mixed graph, the bias tables built from exactly those tasks)."""

    tasks: dict[str, _Task]
    index: dict[str, int]  # mixed graphs: each task's row in the tables
    tables: dict[str, ort.OrtValue]  # mixed graphs: bias name -> [tasks, dim]
    arrays: dict[str, np.ndarray]  # the memory behind the tables


class TaskSession:
    """Serve many task packs from one compiled graph: `register` packs, then `run(task, texts)`."""

    def __init__(
        self,
        compiled_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        device: str = "cpu",
        spinning: bool = True,
        check_integrity: bool = True,
    ) -> None:
        """threads: onnxruntime intra-op threads (default: all cores). device: "cpu", "cuda" (task biases are
        kept on the GPU, so a call copies none), or "auto" (cuda where onnxruntime has it). spinning=False
        stops idle worker threads from busy-waiting after a run: do that when other sessions or processes
        share the cores (measured on 2 cores: a spinning session slowed the next one by up to 40%)."""
        self.directory = Path(compiled_dir)
        self.device, providers = _device(device)
        self.manifest = cm.read_manifest(self.directory)
        model_path = self.directory / cm.MODEL_FILE
        if check_integrity and self.manifest.model_sha256 and sha256_file(model_path) != self.manifest.model_sha256:
            raise CompiledModelError(
                f"{model_path} does not match the checksum in {cm.MANIFEST_FILE}: it is corrupt or was replaced; "
                "compile again"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Bias inputs are initializers on purpose (their default is the base model): skip the warning per bias.
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(model_path), options, providers=providers
            )
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise CompiledModelError(f"onnxruntime cannot load {model_path} ({e}): compile again") from e
        inputs = {i.name for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        # the in-graph head's inputs are optional and never fed here: the numpy head is applied to the hidden state
        declared = set(self.manifest.token_inputs) | set(self.manifest.bias_specs)
        declared |= {h.name for h in self.manifest.head_inputs}
        if self.manifest.mixed:
            declared.add(cm.TASK_IDS)
        if inputs != declared:
            raise CompiledModelError(
                f"{model_path} has inputs that differ from its manifest (only in graph: "
                f"{sorted(inputs - declared)[:4]}, only in manifest: {sorted(declared - inputs)[:4]}): compile again"
            )
        self.encoder = TextEncoder(
            str(self.directory / cm.TOKENIZER_FILE),
            pad_token=self.manifest.pad_token,
            pad_token_id=self.manifest.pad_token_id,
            token_inputs=self.manifest.token_inputs,
        )
        self.base_biases = self._read_base_biases()
        self._state = _State({}, {}, {}, {})
        self._lock = threading.Lock()

    def _read_base_biases(self) -> dict[str, np.ndarray]:
        path = self.directory / cm.BASE_BIASES_FILE
        if not path.is_file():
            if self.manifest.mixed:
                raise CompiledModelError(f"{self.directory} has no {cm.BASE_BIASES_FILE}: compile it again")
            return {}
        try:
            from safetensors.numpy import load_file

            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CompiledModelError(f"{path} is unreadable ({e}): compile again") from e

    # -- tasks ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return sorted(self._state.tasks)

    @property
    def mixed(self) -> bool:
        """Whether one batch may hold rows of different tasks in a single pass."""
        return self.manifest.mixed

    def pack(self, task: str) -> TaskPack:
        return self._get(task).pack

    def register(self, pack: TaskPack | str | os.PathLike, *, name: str | None = None, replace: bool = False) -> str:
        """Validate a pack against the graph's manifest and make it servable under `name`."""
        if not isinstance(pack, TaskPack):
            pack = load_pack(pack)
        pack.validate(f"task pack {pack.name!r}")
        cm.check_pack_fits(self.manifest, pack)
        name = name or pack.name
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in pack.biases.items()}
        values = {} if self.mixed else {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in arrays.items()}
        task = _Task(
            pack=pack,
            values=values,
            arrays=arrays,
            head=Head.from_pack(pack),
        )
        with self._lock:  # build the new state aside, then swap it in with one assignment
            if name in self._state.tasks and not replace:
                raise BitFitError(f"a task named {name!r} is already registered: pass replace=True or another name")
            self._state = self._build_state({**self._state.tasks, name: task})
        return name

    def remove(self, task: str) -> None:
        with self._lock:
            self._get(task)
            self._state = self._build_state({k: v for k, v in self._state.tasks.items() if k != task})

    def _build_state(self, tasks: dict[str, _Task]) -> _State:
        if not self.mixed or not tasks:
            return _State(tasks, {}, {}, {})
        order = sorted(tasks)
        arrays = {}
        for spec in self.manifest.bias_inputs:  # a bias a pack did not train is the base model's
            base = self.base_biases[spec.name]
            arrays[spec.name] = np.ascontiguousarray(np.stack([tasks[t].arrays.get(spec.name, base) for t in order]),
                                                     dtype=np.float32)
        tables = {k: ort.OrtValue.ortvalue_from_numpy(v, self.device, 0) for k, v in arrays.items()}
        return _State(tasks, {t: i for i, t in enumerate(order)}, tables, arrays)

    def _get(self, task: str, state: _State | None = None) -> _Task:
        state = state or self._state
        try:
            return state.tasks[task]
        except (KeyError, TypeError):
            known = ", ".join(sorted(state.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {task!r}: registered tasks are {known}") from None

    # -- inference -----------------------------------------------------------------------------
    def encode(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, max_length: int
    ) -> dict[str, np.ndarray]:
        return self.encoder(texts, text_pairs, max_length=max_length)

    def hidden_states(
        self, inputs: dict[str, np.ndarray], task: str | None = None, *, biases: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """The encoder's last hidden state with a task's biases; task=None runs the graph's defaults (the base
        model). `biases` feeds raw arrays by input name on top (used to check that every bias input is live)."""
        state = self._state
        if task is not None:
            self._get(task, state)
        return self._hidden(self._check_inputs(inputs), task, state, biases)

    def _hidden(
        self, feeds: dict[str, np.ndarray], task: str | None, state: _State, biases: dict[str, np.ndarray] | None = None
    ) -> np.ndarray:
        if self.mixed:
            rows = len(next(iter(feeds.values())))
            if task is None:  # bind no table: the defaults hold one row, the base model's
                return self._forward(feeds, np.zeros(rows, np.int64), {}, biases)
            if biases:
                raise BitFitError("biases= overrides only apply with task=None")
            self._get(task, state)
            return self._forward(feeds, np.full(rows, state.index[task], np.int64), state.tables)
        values = {} if task is None else self._get(task, state).values
        return self._forward(feeds, None, values, biases)

    def _forward(
        self,
        feeds: dict[str, np.ndarray],
        task_ids: np.ndarray | None,
        values: dict[str, ort.OrtValue],
        biases: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """One run: token feeds, task_ids (mixed graphs: row i reads row task_ids[i] of every table), bias
        OrtValues (a task's vectors, or a mixed graph's tables), and raw `biases` arrays on top."""
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        if task_ids is not None:
            binding.bind_cpu_input(cm.TASK_IDS, task_ids)
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        specs = self.manifest.bias_specs
        for name, array in (biases or {}).items():
            if name not in specs or tuple(np.shape(array)) != specs[name].shape:
                raise BitFitError(f"no bias input {name} of shape {np.shape(array)} in the graph")
            array = np.ascontiguousarray(array if task_ids is None else np.asarray(array)[None, :], np.float32)
            # bind_cpu_input only knows required inputs; an OrtValue also binds an overridable initializer
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, self.device, 0))
        binding.bind_output(self.manifest.output)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def logits(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        state = self._state
        self._get(task, state)  # an unknown task is the first thing to report
        return self._logits(task, self._check_inputs(inputs), state)

    def _logits(self, task: str, feeds: dict[str, np.ndarray], state: _State) -> np.ndarray:
        """[B, K] for sequence kinds, [B, T, K] for token kinds."""
        t = self._get(task, state)  # head and biases from the same state: never half of a swapped pack
        hidden = self._hidden(feeds, task, state)
        return _head(t, hidden, feeds["attention_mask"])

    def run(
        self,
        task: str,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
    ) -> Predictions:
        """Tokenize, run in batches of `batch_size`, and apply the task's head."""
        state = self._state
        m = self._get(task, state).pack.manifest
        _check_kind(task, m, "run")
        _check_pairs(task, m, text_pairs is not None)
        chunks = []
        for start in range(0, len(texts), batch_size):
            pairs = None if text_pairs is None else text_pairs[start : start + batch_size]
            inputs = self.encode(texts[start : start + batch_size], pairs, max_length=m.max_length)
            chunks.append(self._logits(task, self._check_inputs(inputs), state))
        if not chunks:
            raise BitFitError("texts is empty: give at least one text")
        return Predictions.from_logits(task, m, np.concatenate(chunks))

    def run_mixed(
        self, rows: Sequence[tuple[str, str] | tuple[str, str, str | None]], *, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Rows of (task, text) or (task, text, text_pair), any tasks mixed: one record per row, in order,
        each with task, label, scores and logits (the numbers `run` gives for that row's task).

        On a graph compiled with mixed=True the rows run together, `batch_size` at a time, each row with
        its own task's biases; on other graphs, one pass per task present.
        """
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise BitFitError("rows must be a non-empty list of (task, text) or (task, text, text_pair)")
        state = self._state
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            if not isinstance(row, (tuple, list)) or len(row) not in (2, 3):
                raise BitFitError(f"rows[{i}] must be (task, text) or (task, text, text_pair), got {row!r}")
            groups.setdefault(row[0], []).append(i)
        for task in groups:
            _check_kind(task, self._get(task, state).pack.manifest, "run_mixed")
        pairs = [row[2] if len(row) == 3 else None for row in rows]
        for task, index in groups.items():
            given = sum(pairs[i] is not None for i in index)
            if given not in (0, len(index)):
                raise BitFitError(f"rows of task {task!r} mix single texts and pairs: give text_pair for all or none")
            _check_pairs(task, self._get(task, state).pack.manifest, given > 0)
        logits: list[np.ndarray | None] = [None] * len(rows)
        if self.mixed:
            for start in range(0, len(rows), batch_size):
                chunk = range(start, min(start + batch_size, len(rows)))
                tasks = [rows[i][0] for i in chunk]
                feeds = self._check_inputs(self.encoder.encode_rows(
                    [rows[i][1] for i in chunk], [pairs[i] for i in chunk],
                    [state.tasks[t].pack.manifest.max_length for t in tasks]))
                ids = np.array([state.index[t] for t in tasks], np.int64)
                hidden = self._forward(feeds, ids, state.tables)
                for task in set(tasks):
                    local = np.array([j for j, t in enumerate(tasks) if t == task])
                    out = _head(state.tasks[task], hidden[local], feeds["attention_mask"][local])
                    for j, row_logits in zip(local, out):
                        logits[start + j] = row_logits
        else:
            for task, index in groups.items():
                m = state.tasks[task].pack.manifest
                texts = [rows[i][1] for i in index]
                task_pairs = [pairs[i] for i in index] if pairs[index[0]] is not None else None
                for start in range(0, len(index), batch_size):
                    sl = slice(start, start + batch_size)
                    inputs = self.encode(texts[sl], None if task_pairs is None else task_pairs[sl], max_length=m.max_length)
                    for i, row_logits in zip(index[sl], self._logits(task, self._check_inputs(inputs), state)):
                        logits[i] = row_logits
        out = []
        for row, row_logits in zip(rows, logits):
            m = state.tasks[row[0]].pack.manifest
            out.append({"task": row[0], **Predictions.from_logits(row[0], m, row_logits[None, :]).records()[0]})
        return out

    def run_tokens(
        self, task: str, texts: Sequence[str] | Sequence[Sequence[str]], *, batch_size: int = 32
    ) -> TokenPredictions:
        """Token classification: a label per word, from the word's first sub-token (as trained). Each item
        of `texts` is a string (words are then the tokenizer's own pre-tokenization, with character
        offsets) or a list of words (as in the training data); all items must be of one form."""
        state = self._state
        m = self._get(task, state).pack.manifest
        _check_kind(task, m, "run_tokens")
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise BitFitError("texts must be a non-empty list of strings, or of lists of words")
        pretokenized = not isinstance(texts[0], str)
        if pretokenized:
            for i, words in enumerate(texts):
                if isinstance(words, str):
                    raise BitFitError(f"texts[{i}] is a string but texts[0] is a list of words: give one form for all")
                check_texts(words, f"texts[{i}]")
        else:
            check_texts(texts, "texts")
        words_out, labels_out, scores_out, logits_out, offsets_out, truncated_out = [], [], [], [], [], []
        for start in range(0, len(texts), batch_size):
            batch = [list(t) if pretokenized else t for t in texts[start : start + batch_size]]
            inputs, encodings = self.encoder.encodings(batch, max_length=m.max_length, pretokenized=pretokenized)
            logits = self._logits(task, self._check_inputs(inputs), state)
            for row, item, enc in zip(logits, batch, encodings):
                if pretokenized:
                    words, offsets = list(item), None
                    n_words = len(words)
                    word_ids = enc.word_ids
                else:
                    offsets, word_ids = _word_spans(enc)
                    words = [item[a:b] for a, b in offsets]
                    n_words = len(offsets)
                wl = word_logits(row, word_ids, n_words)
                probs = softmax(np.nan_to_num(wl, nan=0.0))
                has = ~np.isnan(wl[:, 0]) if n_words else np.zeros(0, bool)
                best = probs.argmax(axis=-1) if n_words else np.zeros(0, np.int64)
                words_out.append(words)
                labels_out.append([m.labels[k] if h else None for k, h in zip(best, has)])
                scores_out.append([float(p[k]) if h else None for p, k, h in zip(probs, best, has)])
                logits_out.append(wl)
                offsets_out.append(offsets)
                truncated_out.append(bool(enc.overflowing) or not bool(has.all()))
        return TokenPredictions(task, list(m.labels), words_out, labels_out, scores_out, logits_out, offsets_out,
                                truncated_out)

    def answer(
        self,
        task: str,
        questions: Sequence[str],
        contexts: Sequence[str],
        *,
        max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
        batch_size: int = 32,
        windows: bool = True,
        stride: int | None = None,
        no_answer: bool | None = None,
        null_threshold: float = 0.0,
    ) -> Answers:
        """Extractive QA: for each (question, context), the best span of the context (start <= end, at most
        `max_answer_tokens` tokens) as text with its character offsets.

        A context longer than the pack's max_length is read in overlapping windows (the question whole in
        each, `stride` context tokens shared by neighbours, default a quarter of max_length) and the span
        with the best score over all windows wins, as in Hugging Face's QA pipeline (`batch_size` bounds
        both the questions tokenized together and the windows per run). windows=False truncates the
        context instead, as training did (`truncated` says so).

        no_answer (default: the pack's own `no_answer`, True when it was trained with unanswerable questions,
        SQuAD 2.0): the answer is "" (start = end = 0) when the "no answer" score, CLS start + end logit
        (the lowest over windows), beats the best span's score by more than `null_threshold`; `score` is
        then that null score."""
        state = self._state
        m = self._get(task, state).pack.manifest
        _check_kind(task, m, "answer")
        check_texts(questions, "questions")
        check_texts(contexts, "contexts")
        if len(questions) != len(contexts):
            raise BitFitError(f"got {len(questions)} questions but {len(contexts)} contexts: give one context each")
        empty = [i for i, c in enumerate(contexts) if not c.strip()]
        if empty:
            raise BitFitError(f"contexts[{empty[0]}] is empty: every question needs a context to answer from")
        if max_answer_tokens < 1:
            raise BitFitError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
        stride = m.max_length // 4 if stride is None else stride
        if not isinstance(stride, int) or stride < 0:
            raise BitFitError(f"stride must be a whole number of tokens >= 0, got {stride!r}")
        pairs = list(zip(questions, contexts))
        best: list[tuple[float, int, int]] = [(float("-inf"), 0, 0)] * len(pairs)
        null = [float("inf")] * len(pairs)
        truncated = [False] * len(pairs)
        # `batch_size` questions at a time (bounded memory, padding to that group's longest), their windows
        # `batch_size` at a time through the graph
        for first in range(0, len(pairs), batch_size):
            group = pairs[first : first + batch_size]
            if windows:
                inputs, encodings, owner = self.encoder.windows(group, max_length=m.max_length, stride=stride)
            else:
                inputs, encodings = self.encoder.encodings(group, max_length=m.max_length, strategy="only_second")
                owner = list(range(len(group)))
                truncated[first : first + len(group)] = [bool(enc.overflowing) for enc in encodings]
            for start in range(0, len(encodings), batch_size):
                rows = slice(start, start + batch_size)
                logits = self._logits(task, self._check_inputs({k: v[rows] for k, v in inputs.items()}), state)
                for row, enc, j in zip(logits, encodings[rows], owner[rows]):
                    i = first + j
                    allowed = np.array([s == 1 for s in enc.sequence_ids]) & (np.asarray(enc.attention_mask) == 1)
                    if not allowed.any():
                        continue
                    s, e, score = best_span(row[:, 0], row[:, 1], allowed, max_answer_tokens)
                    if score > best[i][0]:
                        best[i] = (score, enc.offsets[s][0], enc.offsets[e][1])
                    null[i] = min(null[i], null_score(row[:, 0], row[:, 1]))
        use_null = m.no_answer if no_answer is None else no_answer
        if use_null:
            best = [(n, 0, 0) if answers_nothing(n, b[0], null_threshold) else b for b, n in zip(best, null)]
        return Answers(task, [c[a:b] for c, (_, a, b) in zip(contexts, best)], [int(a) for _, a, _ in best],
                       [int(b) for _, _, b in best], [float(score) for score, _, _ in best], truncated)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = self.manifest.token_inputs
        missing = [k for k in wanted if k not in inputs]
        if missing:
            raise BitFitError(f"missing token inputs {missing}: the graph takes {wanted}")
        feeds = {}
        shape = np.shape(inputs[wanted[0]])
        for k in wanted:
            a = np.asarray(inputs[k])
            if a.ndim != 2 or a.shape != shape:
                raise BitFitError(f"{k} has shape {a.shape}: every token input must be [batch, sequence] like {shape}")
            if not np.issubdtype(a.dtype, np.integer):
                raise BitFitError(f"{k} has dtype {a.dtype}: token inputs must be integers")
            feeds[k] = np.ascontiguousarray(a, dtype=np.int64)
        if shape[1] > self.manifest.max_positions:
            raise BitFitError(f"sequence length {shape[1]} exceeds the model's {self.manifest.max_positions} positions")
        return feeds


def _device(device: str) -> tuple[str, list[str]]:
    available = ort.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BitFitError(
                f"device 'cuda' asked for, but this onnxruntime has only {', '.join(available)}: install "
                "onnxruntime-gpu (instead of onnxruntime), or use device 'cpu' or 'auto'"
            )
        return "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BitFitError(f"unknown device {device!r}: use cpu, cuda or auto")


def _head(task: _Task, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    return task.head(hidden, attention_mask)


_METHODS = {"classification": "run", "regression": "run", "token-classification": "run_tokens",
            "question-answering": "answer"}


def _check_kind(task: str, manifest: PackManifest, method: str) -> None:
    """Each task kind has its own call: say which one when the wrong one is used."""
    right = _METHODS[manifest.task_kind]
    if method == "run_mixed" and manifest.token_level:
        raise BitFitError(f"task {task!r} is a {manifest.task_kind} task: run_mixed serves sequence tasks only; "
                          f"call {right}() for it")
    if method != "run_mixed" and method != right:
        raise BitFitError(f"task {task!r} is a {manifest.task_kind} task: call {right}() for it, not {method}()")


def _word_spans(encoding: Any) -> tuple[list[tuple[int, int]], list[int | None]]:
    """Character span of each word of a raw text that has tokens (first token's start to last token's end),
    and the tokens' word ids renumbered to index those spans (a pre-token that yields no token leaves a gap)."""
    spans: dict[int, list[int]] = {}
    for w, (a, b) in zip(encoding.word_ids, encoding.offsets):
        if w is None:
            continue
        if w in spans:
            spans[w][1] = max(spans[w][1], b)
        else:
            spans[w] = [a, b]
    rank = {w: i for i, w in enumerate(sorted(spans))}
    word_ids = [None if w is None else rank[w] for w in encoding.word_ids]
    return [(spans[w][0], spans[w][1]) for w in sorted(spans)], word_ids


def _check_pairs(task: str, manifest: PackManifest, given: bool) -> None:
    if manifest.text_pair and not given:
        raise BitFitError(f"task {task!r} was trained on sentence pairs: pass text_pairs too")
    if not manifest.text_pair and given:
        raise BitFitError(f"task {task!r} was trained on single sentences: do not pass text_pairs")


def load(compiled_dir: str | os.PathLike, packs: Sequence[str | os.PathLike] = (), **kwargs: Any) -> TaskSession:
    """Open a compiled directory and register `packs` (paths) on it."""
    session = TaskSession(compiled_dir, **kwargs)
    for p in packs:
        session.register(p)
    return session
