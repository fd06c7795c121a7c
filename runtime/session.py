"""One onnxruntime session for the frozen encoder, any number of tasks.

A task is its bias arrays and a small head. Switching tasks binds other pre-built OrtValues to the
graph's bias inputs; the graph is never reloaded. Biases a pack does not train are not fed, so the
graph's defaults (the base model's values, stored as overridable initializers) apply.

The session holds registration, the state swap, binding and the forward pass; turning logits into
results is each call shape's decoder (runtime.decode, named by runtime.calls), which receives a bound handle
made by `check_call`, never the session.
"""
from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from . import args as A
from . import decode
from . import schema as S
from .backends import open_engine
from .calls import ANSWER, SEQUENCE, TOKENS, CallShape
from .compiled import TASK_IDS, CompiledModel
from .errors import BitFitError, NonFiniteOutputError, PackError, UnknownTaskError
from .heads import DEFAULT_MAX_ANSWER_TOKENS, Head
from .kinds import TaskKind, WrongCallError, kind
from .pack import TaskPack, load_pack, min_max_length
from .results import Answers, Predictions, TokenPredictions
from .schema import check_task_name
from .tables import BiasTables
from .tokenize import TextEncoder


@dataclass(eq=False)  # identity: a task is a key of the session's cache of bound tensors
class _Task:
    pack: TaskPack  # the session's own copy: float32 arrays; on a mixed graph its biases are views of its row
    kind: TaskKind
    head: Head
    digest: str  # TaskPack.digest: which version of the task this is
    row: int = -1  # mixed graphs: the task's row in every bias table


@dataclass(frozen=True)
class _State:
    """Everything a call reads, replaced as a whole by register/remove: a call that took it sees one
    consistent set of tasks (and, on a mixed graph, tables whose rows for exactly those tasks stay as they
    were: later registrations write only rows no live state indexes)."""

    tasks: dict[str, _Task]
    tables: dict[str, Any]  # mixed graphs: bias name -> [capacity, dim], as the engine's tensors
    arrays: dict[str, np.ndarray]  # the memory behind the tables


VALUE_CACHE = 256  # plain graphs: tasks whose biases stay bound as the engine's tensors
MAX_THREADS = 1024  # more intra-op threads than this is a typo (onnxruntime would try to start them all)


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
        backend: str = "onnxruntime",
    ) -> None:
        """threads: intra-op threads (default: all cores). device: "cpu", "cuda" (task biases are kept on the
        GPU, so a call copies none), or "auto" (cuda where onnxruntime has it); OpenVINO: cpu, gpu, npu or
        auto. spinning=False stops idle worker threads from busy-waiting after a run: do that when other
        sessions or processes share the cores (measured on 2 cores: a spinning session slowed the next one by
        up to 40%). backend: "onnxruntime", "openvino", or "openvino-int8" (OpenVINO's own int8 weight
        compression), runtime.backends; OpenVINO needs a graph compiled with --no-defaults."""
        A.check("compiled_dir", compiled_dir, A.PATH)
        if threads is not None and not S.integer(1, MAX_THREADS).check(threads):
            raise BitFitError(f"threads must be a whole number from 1 to {MAX_THREADS} (or None: all cores), "
                              f"got {threads!r}")
        A.check("device", device, S.string(64))
        A.check("backend", backend, S.string(64))
        A.check("spinning", spinning, S.boolean())
        A.check("check_integrity", check_integrity, S.boolean())
        self.compiled = CompiledModel.open(compiled_dir, check_integrity=check_integrity)
        self.directory = self.compiled.directory
        self.manifest = self.compiled.manifest
        self.base_biases = self.compiled.base_biases
        self.engine = open_engine(backend, self.compiled.model_path, self.manifest, threads=threads, device=device,
                                  spinning=spinning)
        self.backend = self.engine.name
        self.device = getattr(self.engine, "device", device)  # what the engine resolved it to (auto -> cpu)
        self.session = self.engine.session  # onnxruntime's InferenceSession (OpenVINO: its compiled model)
        self.encoder = TextEncoder(
            str(self.compiled.tokenizer_path),
            pad_token=self.manifest.pad_token,
            pad_token_id=self.manifest.pad_token_id,
            token_inputs=self.manifest.token_inputs,
        )
        # A graph without defaults (compiled with bias_defaults=False) is fed every bias on every run: the base
        # values stand in for a task's untrained biases, and for all of them on a run without a task.
        self._base_arrays = {} if self.manifest.bias_defaults else {
            k: np.ascontiguousarray(v[None, :] if self.mixed else v, dtype=np.float32) for k, v in self.base_biases.items()}
        self._base_values = {k: self.engine.value(v) for k, v in self._base_arrays.items()}
        self._tables = BiasTables(self.base_biases, self.engine.value, shared=self.engine.shares_memory) \
            if self.mixed else None
        self._state = _State({}, {}, {})
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Task, dict[str, Any]] = OrderedDict()  # plain graphs: see _values
        self._cache_lock = threading.Lock()

    # -- tasks ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return sorted(self._state.tasks)

    def __len__(self) -> int:
        """How many tasks are registered: O(1) (len(session.tasks) sorts every name, per health probe and scrape)."""
        return len(self._state.tasks)

    def __contains__(self, task: object) -> bool:
        """Whether `task` is registered: O(1), where `task in session.tasks` sorts every name (a rescan asked it
        per pack: 6-7 s of a 10,000-pack rescan)."""
        return task in self._state.tasks

    @property
    def mixed(self) -> bool:
        """Whether one batch may hold rows of different tasks in a single pass."""
        return self.manifest.mixed

    def pack(self, task: str) -> TaskPack:
        return self._get(task).pack

    def digest(self, task: str) -> str:
        """The registered pack's TaskPack.digest: servers report it, so a caller can tell which version of a
        task answered (and replicas can be checked to serve the same)."""
        return self._get(task).digest

    @property
    def capacity(self) -> int:
        """Rows the mixed graph's bias tables hold before they next grow (0 on other graphs)."""
        return self._tables.capacity if self._tables else 0

    def register(self, pack: TaskPack | str | os.PathLike, *, name: str | None = None, replace: bool = False) -> str:
        """Validate a pack against the graph's manifest and make it servable under `name` (a task name:
        runtime.schema.TASK_NAME, as /v1 and /v2 address it)."""
        A.check("pack", pack, A.PACK)
        return self.register_many([pack], names=[name], replace=replace)[0]

    def register_many(
        self,
        packs: Sequence[TaskPack | str | os.PathLike],
        *,
        names: Sequence[str | None] | None = None,
        replace: bool = False,
    ) -> list[str]:
        """Register several packs at once: every pack is loaded and checked first (one bad pack registers
        none), then all go in under one state change. Each costs O(1) amortised however many tasks are
        registered: a mixed graph's tables grow by doubling and a task's row is written in place."""
        A.check("packs", packs, A.PACKS)
        A.check("replace", replace, S.boolean())
        names = [None] * len(packs) if names is None else list(A.check("names", names, A.sequence_of(A.ANY)))
        if len(names) != len(packs):
            raise BitFitError(f"names has {len(names)} items but packs has {len(packs)}: give one name per pack")
        for name in names:
            if name is not None:
                check_task_name(name, fix="give register() a name the server can route to")
        tasks = [self._prepare(p) for p in packs]
        named = [n or t.pack.name for n, t in zip(names, tasks)]
        if len(set(named)) != len(named):
            raise BitFitError(f"the task names {sorted({n for n in named if named.count(n) > 1})} appear more than "
                              "once: give each pack its own name")
        with self._lock:  # write rows no state indexes, then swap the new state in with one assignment
            current = self._state.tasks
            taken = [n for n in named if n in current]
            if taken and not replace:
                raise BitFitError(f"a task named {taken[0]!r} is already registered: pass replace=True or another name")
            tables = self._tables
            if tables is not None:
                if tables.reserve(len(tasks)):
                    self._repoint(current)
                for t in tasks:
                    t.row, views = tables.write(t.pack.biases)
                    t.pack.tensors.update(views)  # the row is the one copy of the task's biases
                    tables.release_when_gone(t.pack, t.row)
                tables.refresh()
            new = dict(current)
            new.update(zip(named, tasks))
            self._state = self._new_state(new)
        return named

    def _prepare(self, pack: TaskPack | str | os.PathLike) -> _Task:
        """Load and check a pack; the task holds its own copy of the pack's arrays (float32, contiguous)."""
        if not isinstance(pack, TaskPack):
            pack = load_pack(A.check("pack", pack, A.PACK))  # validated as it loads
        else:
            pack.validate(f"task pack {pack.name!r}")
        self.compiled.check_pack(pack)
        m = pack.manifest
        pair = kind(m.task_kind).two_texts(m.text_pair)
        least = min_max_length(pair, self.encoder.special_tokens(pair))
        if m.max_length < least:  # the manifest's floor is BERT's; this graph's tokenizer may add more
            raise PackError(f"task pack {pack.name!r} has max_length {m.max_length}, less than this graph's tokenizer "
                            f"needs for its special tokens and one token of each text ({least}): train it again with "
                            "a larger --max-length")
        m = copy.copy(m)  # the session's own manifest: its bias specs are the graph's (equal ones, shared), not
        graph = self.manifest.bias_specs  # ~50 objects per task: 20 KB at 10,000 tasks would be 200 MB
        m.biases = [graph[b.name] if graph.get(b.name) == b else b for b in m.biases]
        own = TaskPack(m, _packed(pack.tensors, skip={b.name for b in m.biases} if self.mixed else set()))
        return _Task(own, kind(m.task_kind), Head.from_tensors(m.pooling, own.tensors), pack.digest())

    def _values(self, t: _Task) -> dict[str, Any]:
        """Plain graphs: the task's biases as the engine's tensors, kept for the VALUE_CACHE tasks used last.
        Made for every task at registration they cost ~30 KB each (an OrtValue is ~600 bytes, a task ~50 of
        them: 1.27x the pack's own bytes); made on a miss they cost ~110 us, 1-2% of a MiniLM call."""
        with self._cache_lock:
            values = self._cache.get(t)
            if values is not None:
                self._cache.move_to_end(t)
                return values
        arrays = t.pack.biases
        if not self.manifest.bias_defaults:  # the graph has no default to fall back on
            arrays = {**self._base_arrays, **arrays}
        values = {k: self.engine.value(v) for k, v in arrays.items()}
        with self._cache_lock:
            self._cache[t] = values
            while len(self._cache) > VALUE_CACHE:
                self._cache.popitem(last=False)
        return values

    def _repoint(self, tasks: dict[str, _Task]) -> None:
        """After the tables grew into new memory, the registered packs' views read it, so the old tables are
        freed once no request in flight holds them (amortised O(1): the tables double)."""
        for t in tasks.values():
            t.pack.tensors.update(self._tables.views(t.row, [s.name for s in t.pack.manifest.biases]))

    def _new_state(self, tasks: dict[str, _Task]) -> _State:
        if self._tables is None:
            return _State(tasks, {}, {})
        return _State(tasks, dict(self._tables.values), dict(self._tables.arrays))

    def remove(self, task: str) -> None:
        with self._lock:
            self._get(task)
            self._state = self._new_state({k: v for k, v in self._state.tasks.items() if k != task})

    def _get(self, task: str, state: _State | None = None) -> _Task:
        state = state or self._state
        try:
            return state.tasks[task]
        except (KeyError, TypeError):
            known = ", ".join(sorted(state.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {task!r}: registered tasks are {known}") from None

    def check_call(
        self, call: str, task: str, texts: Any, pairs: Any = None, state: _State | None = None
    ) -> decode.Bound:
        """The one check of a call, made before any work: the task is registered (UnknownTaskError), `call`
        is how its kind is served (WrongCallError, naming the right call), and the inputs fit the task (its
        call shape's check: BitFitError). call: run, run_mixed, run_tokens or answer. Returns the task bound
        to one state (its pack's fields and digest, the encoder, its forward pass), which the decoder uses
        throughout, so a concurrent swap never gives half of two packs."""
        state = state or self._state
        t = self._get(task, state)
        if call not in t.kind.shape.calls:
            raise WrongCallError(task, t.kind.name, call)
        m = t.pack.manifest
        bound = decode.Bound(task, t.kind.name, tuple(m.labels), bool(m.text_pair), m.max_length, bool(m.no_answer),
                             t.digest, t.kind.decode, self.encoder, partial(self.forward, task, state=state))
        t.kind.shape.check(bound, texts, pairs)
        return bound

    def _serve(self, shape: CallShape, task: str, texts: Any, pairs: Any, options: dict[str, Any]) -> Any:
        """A call through `shape`: its options, then the one check, then its decoder on the bound task."""
        options = decode.check_options(shape.options, options)
        return shape.run(self.check_call(shape.method, task, texts, pairs), texts, pairs, **options)

    # -- inference -----------------------------------------------------------------------------
    def encode(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, *, max_length: int
    ) -> dict[str, np.ndarray]:
        A.check("max_length", max_length, A.COUNT)
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
            if task is None:  # the defaults (or, without them, the base tables) hold one row: the base model's
                return self._forward(feeds, np.zeros(rows, np.int64), self._base_values, biases)
            if biases:
                raise BitFitError("biases= overrides only apply with task=None")
            return self._forward(feeds, np.full(rows, self._get(task, state).row, np.int64), state.tables)
        values = self._base_values if task is None else self._values(self._get(task, state))
        return self._forward(feeds, None, values, biases)

    def _forward(
        self,
        feeds: dict[str, np.ndarray],
        task_ids: np.ndarray | None,
        values: dict[str, Any],
        biases: dict[str, np.ndarray] | None = None,
    ) -> np.ndarray:
        """One run: token feeds, task_ids (mixed graphs: row i reads row task_ids[i] of every table), prepared
        bias values (a task's vectors, or a mixed graph's tables), and raw `biases` arrays on top."""
        specs = self.manifest.bias_specs
        extra, keep = {}, []  # raw arrays: prepared for this call only, and kept alive until it is done
        for name, array in (biases or {}).items():
            if name not in specs or tuple(np.shape(array)) != specs[name].shape:
                raise BitFitError(f"no bias input {name} of shape {np.shape(array)} in the graph")
            keep.append(np.ascontiguousarray(array if task_ids is None else np.asarray(array)[None, :], np.float32))
            extra[name] = self.engine.value(keep[-1])
        if task_ids is not None:
            feeds = {**feeds, TASK_IDS: task_ids}
        return self.engine.run(feeds, {**values, **extra})  # an explicit array wins over the task's value

    def logits(self, task: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The task's head on token inputs: [B, K] for sequence kinds, [B, T, K] for token kinds."""
        state = self._state
        self._get(task, state)  # an unknown task is the first thing to report
        return self.forward(task, inputs, state)

    def forward(self, task: str, inputs: dict[str, np.ndarray], state: _State) -> np.ndarray:
        """Logits of `task` as it is in `state` (from check_call): head and biases of the same version."""
        feeds = self._check_inputs(inputs)
        t = self._get(task, state)
        return _head(task, t, self._hidden(feeds, task, state), feeds["attention_mask"])

    def predict(self, task: str, texts: Sequence[Any], text_pairs: Sequence[str] | None = None, **options: Any) -> Any:
        """Whatever the task's kind gives: Predictions (run), TokenPredictions (run_tokens) or Answers (answer,
        with `text_pairs` as the contexts). `options` go to that call (batch_size, ...)."""
        k = self._get(task).kind
        taken = k.shape.option_names()
        unknown = sorted(set(options) - set(taken))
        if unknown:
            raise BitFitError(f"{k.call}() takes no option {', '.join(unknown)}: a {k.name} task takes "
                              f"{', '.join(taken) or 'none'}")
        return self._serve(k.shape, task, texts, text_pairs, options)

    def run(
        self,
        task: str,
        texts: Sequence[str],
        text_pairs: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
    ) -> Predictions:
        """Classification / regression: tokenize, run in batches of `batch_size`, apply the task's head."""
        return self._serve(SEQUENCE, task, texts, text_pairs, {"batch_size": batch_size})

    def run_mixed(
        self, rows: Sequence[tuple[str, str] | tuple[str, str, str | None]], *, batch_size: int = 64
    ) -> list[dict[str, Any]]:
        """Rows of (task, text) or (task, text, text_pair), any tasks mixed: one record per row, in order,
        each with task, label, scores and logits (the numbers `run` gives for that row's task).

        On a graph compiled with mixed=True the rows run together, `batch_size` at a time, each row with
        its own task's biases; on other graphs, one pass per task present.
        """
        state = self._state
        return decode.run_mixed(rows, partial(self.check_call, "run_mixed", state=state),
                                partial(self._forward_rows, state) if self.mixed else None, batch_size=batch_size)

    def _forward_rows(
        self, state: _State, tasks: list[str], texts: list[str], pairs: list[str | None]
    ) -> list[np.ndarray]:
        """A mixed graph's one pass over rows of different tasks, each row with its own task's biases and head."""
        feeds = self._check_inputs(self.encoder.encode_rows(
            texts, pairs, [state.tasks[t].pack.manifest.max_length for t in tasks]))
        ids = np.array([state.tasks[t].row for t in tasks], np.int64)
        hidden = self._forward(feeds, ids, state.tables)
        logits: list[np.ndarray] = [np.empty(0)] * len(tasks)
        for task in set(tasks):
            local = np.array([j for j, t in enumerate(tasks) if t == task])
            out = _head(task, state.tasks[task], hidden[local], feeds["attention_mask"][local])
            for j, row_logits in zip(local, out):
                logits[j] = row_logits
        return logits

    def run_tokens(
        self, task: str, texts: Sequence[str] | Sequence[Sequence[str]], *, batch_size: int = 32
    ) -> TokenPredictions:
        """Token classification: a label per word, from the word's first sub-token (as trained). Each item
        of `texts` is a string (words are then the tokenizer's own pre-tokenization, with character
        offsets) or a list of words (as in the training data); all items must be of one form."""
        return self._serve(TOKENS, task, texts, None, {"batch_size": batch_size})

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
        return self._serve(ANSWER, task, questions, contexts, {
            "max_answer_tokens": max_answer_tokens, "batch_size": batch_size, "windows": windows, "stride": stride,
            "no_answer": no_answer, "null_threshold": null_threshold})

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = self.manifest.token_inputs
        A.check("inputs", inputs, S.Field(lambda v: isinstance(v, Mapping),
                                          f"a dict of token arrays ({', '.join(wanted)})"))
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
        m = self.manifest
        if shape[1] > m.max_positions:
            raise BitFitError(f"sequence length {shape[1]} exceeds the model's {m.max_positions} positions")
        if 0 in shape:
            raise BitFitError(f"token inputs of shape {shape}: give at least one row of at least one token")
        # out-of-range ids would index outside an embedding (onnxruntime wraps negative ones around)
        for name, top in (("input_ids", m.vocab_size), ("token_type_ids", m.type_vocab_size), ("attention_mask", 2)):
            if name in feeds and not (feeds[name].min() >= 0 and feeds[name].max() < top):
                raise BitFitError(f"{name} must lie in [0, {top}), got values from {feeds[name].min()} to "
                                  f"{feeds[name].max()}: tokenize with the compiled directory's tokenizer.json")
        empty = np.flatnonzero(feeds["attention_mask"].sum(axis=1) == 0)
        if empty.size:
            raise BitFitError(f"row {int(empty[0])} has no attended token (attention_mask all 0): every row needs one")
        return feeds


def _head(name: str, task: _Task, hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """The task's logits, refused when any is NaN or inf: every call's results (run, run_mixed, run_tokens,
    answer, logits) come from here, so no caller (predict, the server, Ray) ever answers with such a number."""
    with np.errstate(all="ignore"):  # an overflow is reported below, as an error; numpy's warning is only noise
        logits = task.head(hidden, attention_mask)
    # token kinds: only attended tokens become answers (padding is never decoded)
    looked_at = logits[attention_mask.astype(bool)] if logits.ndim == 3 else logits
    if not np.isfinite(looked_at).all():
        raise NonFiniteOutputError(name)
    return logits


def _packed(tensors: Mapping[str, np.ndarray], skip: set[str]) -> dict[str, np.ndarray]:
    """The tensors as views of one float32 buffer (those in `skip` as given: a mixed graph's biases go into its
    tables). A loaded pack's arrays cost ~1.3x their bytes (safetensors allocates each with its own
    overhead); one buffer costs their bytes."""
    kept = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items() if k not in skip}
    buffer = np.empty(sum(v.size for v in kept.values()), np.float32)
    out, at = {}, 0
    for k, v in kept.items():
        out[k] = buffer[at:at + v.size].reshape(v.shape)
        out[k][...] = v
        at += v.size
    out.update({k: tensors[k] for k in skip if k in tensors})
    return out


def load(compiled_dir: str | os.PathLike, packs: Sequence[str | os.PathLike] = (), **kwargs: Any) -> TaskSession:
    """Open a compiled directory and register `packs` (paths) on it."""
    A.check("packs", packs, A.PACKS)
    session = TaskSession(compiled_dir, **kwargs)
    for p in packs:
        session.register(p)
    return session
