"""Parity of a compiled graph and its task packs against PyTorch, with the figures shown.

For the graph: the runtime's tokenization equals transformers'; with no bias fed, the graph is the
base model; each bias input, perturbed alone, changes the output (no input is dead or baked in).
For each pack: logits and probabilities on real sentences and on a grid of batch sizes and sequence
lengths with padding, against the base model with the pack loaded in PyTorch; label agreement; and a
perturbed copy of the pack must both change the output and still match PyTorch. Each check is a function
returning its rows (GRAPH_CHECKS, PACK_CHECKS), run in that order. Token-level packs
(token classification, QA) are compared per token on the real (unpadded) tokens; the reference head
is training.model's BitFitModel in PyTorch (pooler packs: its tanh pooler), the runtime's is numpy.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime import args as A
from bitfit.runtime import schema as S
from bitfit.runtime.backends import BACKENDS
from bitfit.runtime.compiled import CompiledManifest, changed_files, read_compiled_manifest
from bitfit.runtime.errors import (
    BitFitError,
    CompiledModelError,
    IncompatibleError,
    ParityError,
)
from bitfit.runtime.fs import write_file
from bitfit.runtime.heads import softmax
from bitfit.runtime.pack import TaskPack

SENTENCES = [
    "A gripping, beautifully acted film that stays with you long after the credits.",
    "What a waste of two hours.",
    "How far is it from Denver to Aspen?",
    "WINNER!! You have been selected to receive a £900 prize reward. Call 09061701461 now.",
    "I'll call you later, I'm still at work.",
    "The plot meanders, but the performances are worth it.",
    "Who invented the telephone?",
    "ok",
]
GRID = ((1, 8), (3, 17), (8, 64), (2, 128))
# Default logit tolerance per precision mode. int8: per-channel int8 vs fp32 logits on all-MiniLM-L6-v2's
# test sets were at most 0.4-1.2; fp16 weights: about 5e-3 on hidden states.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1.5}
MIN_MOVE = 1e-3  # a pack with other biases must move some logit by more than this


@dataclass
class Check:
    subject: str  # pack name, or "graph"
    case: str
    max_abs: float
    max_rel: float = float("nan")
    prob_abs: float = float("nan")
    agreement: float = float("nan")  # % of rows whose label matches PyTorch
    tolerance: float = float("nan")
    passed: bool = True
    note: str = ""


@dataclass
class VerifyReport:
    compiled: str
    atol: float
    mode: str = "fp32"
    min_agreement: float = float("nan")
    precision: str = "fp32"
    checks: list[Check] = field(default_factory=list)
    backend: str = "onnxruntime"

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def table(self) -> str:
        head = ["task", "case", "max |dlogit|", "max rel", "max |dprob|", "labels agree", "tol", "result"]
        rows = [head]
        for c in self.checks:
            rows.append([
                c.subject, c.case, _fmt(c.max_abs), _fmt(c.max_rel), _fmt(c.prob_abs),
                "" if np.isnan(c.agreement) else f"{c.agreement:.1f}%",
                _fmt(c.tolerance), ("ok" if c.passed else "FAIL") + (f" ({c.note})" if c.note else ""),
            ])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "PASS" if self.ok else f"FAIL: {len(self.failures)} of {len(self.checks)} checks"
        if self.mode == "fp32":
            rule = f"fp32 mode: max |dlogit| <= {self.atol:g}"
        else:
            rule = (f"{self.mode} mode ({self.precision} graph vs fp32 PyTorch): max |dlogit| <= {self.atol:g} per "
                    f"case and labels agree on >= {self.min_agreement:g}% of all rows per pack")
        on = "" if self.backend == "onnxruntime" else f" on {self.backend}"
        return "\n".join(lines) + f"\n\n{verdict}{on}. {rule}; rel diff where |ref| >= 1e-2"

    def failure_summary(self) -> str:
        """One line naming every failed check with its figure and tolerance."""
        def one(c: Check) -> str:
            figure = "" if np.isnan(c.max_abs) else f": max |dlogit| {c.max_abs:.2e} (tolerance {c.tolerance:.2e})"
            return f"{c.subject} / {c.case}{figure}{f' [{c.note}]' if c.note else ''}"

        return (f"parity failed on {self.compiled}: {len(self.failures)} of {len(self.checks)} checks ("
                + "; ".join(one(c) for c in self.failures) + "): the compiled graph or a pack does not compute what "
                "PyTorch does; compile again, or call verify(..., strict=False) for the report")

    def to_json(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "backend": self.backend, "atol": self.atol, "mode": self.mode,
                "precision": self.precision,
                "min_agreement": None if np.isnan(self.min_agreement) else self.min_agreement, "ok": self.ok,
                "checks": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in asdict(c).items()}
                           for c in self.checks]}


def _fmt(x: float) -> str:
    return "" if x is None or np.isnan(x) else f"{x:.2e}"


def diff(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Max abs diff, and max relative diff over entries where |ref| >= 1e-2 (near zero it means nothing)."""
    d = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    big = np.abs(ref) >= 1e-2
    return float(d.max()), float((d[big] / np.abs(ref[big])).max()) if big.any() else float("nan")


def grid_inputs(b: int, s: int, vocab: int, token_inputs: Sequence[str], rng: np.random.Generator,
                pad_id: int) -> dict[str, np.ndarray]:
    """Random ids with per-row lengths in [1, s] (row 0 full), padded like the tokenizer pads."""
    lengths = np.concatenate([[s], rng.integers(1, s + 1, size=b - 1)])
    ids = rng.integers(min(5, vocab - 1), vocab, size=(b, s))
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, pad_id)
    types = np.zeros_like(ids)
    for i, n in enumerate(lengths):  # a second segment in the back half, as for sentence pairs
        types[i, n // 2 : n] = 1
    full = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": types}
    return {k: full[k] for k in token_inputs}


class _Reference:
    """The base encoder in PyTorch; packs are written into its bias parameters one at a time."""

    def __init__(self, model: str | os.PathLike, fingerprint: str):
        from bitfit.encoder.biases import find_biases
        from bitfit.encoder.model import base_fingerprint, load_encoder

        self.encoder = load_encoder(model)
        fp = base_fingerprint(self.encoder)
        if fp != fingerprint:
            raise IncompatibleError(
                f"{model!r} (fingerprint {fp[:12]}) is not the model the graph was compiled from "
                f"(fingerprint {fingerprint[:12]}): pass --model with the compiled base model"
            )
        self.slots = {s.name: s for s in find_biases(self.encoder, "all")}
        self.base = {k: s.parameter.detach().clone() for k, s in self.slots.items()}

    def set_biases(self, values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, slot in self.slots.items():
                v = values.get(name)
                slot.parameter.copy_(self.base[name] if v is None else torch.from_numpy(np.asarray(v)))

    @torch.no_grad()
    def hidden(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.encoder(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()

    @torch.no_grad()
    def logits(self, pack: TaskPack, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """The pack's head in PyTorch (training.model's BitFitModel) on the encoder with the pack's biases."""
        from bitfit.encoder.model import attach_head

        self.set_biases(pack.biases)
        return attach_head(self.encoder, pack)(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


@dataclass
class _Run:
    """What every check of one verify run reads: the graph's manifest, the session on the graph, the PyTorch
    reference, the texts, and the tolerances. The checks draw from one random generator in a fixed order."""

    manifest: CompiledManifest
    session: TaskSession
    ref: _Reference
    rng: np.random.Generator
    sentences: list[str]
    encoded: dict[str, np.ndarray]  # the sentences, tokenized by the runtime at max_len
    max_len: int
    base: str | os.PathLike  # the base model: the caller's, else the one the graph records
    atol: float
    mode: str
    min_agreement: float
    grid: Sequence[tuple[int, int]]


@dataclass
class _PackUnderTest:
    pack: TaskPack
    name: str  # its task name in the run's session
    label: str  # its own name, for the report


def check_tokenizer(run: _Run) -> list[Check]:
    """The runtime's `tokenizers` path gives transformers' ids."""
    from bitfit.encoder.model import load_tokenizer

    hf = load_tokenizer(run.base)(run.sentences, padding=True, truncation=True, max_length=run.max_len,
                                  return_tensors="np", return_token_type_ids=True)
    same = all(np.array_equal(run.encoded[k], hf[k]) for k in run.manifest.token_inputs)
    return [Check("graph", "tokenizer ids vs transformers", 0.0 if same else float("inf"), passed=same,
                  note="" if same else "token ids differ")]


def check_base_model(run: _Run) -> list[Check]:
    """With nothing fed, the graph is the base model. Compared on real tokens: hidden states at padded
    positions are never read by a head and differ more between attention kernels (seen: 6e-5 vs 2.5e-6)."""
    run.ref.set_biases({})
    valid = run.encoded["attention_mask"].astype(bool)
    a, r = diff(run.session.hidden_states(run.encoded)[valid], run.ref.hidden(run.encoded)[valid])
    return [Check("graph", "base model, no bias fed (hidden, real tokens)", a, r, tolerance=run.atol,
                  passed=a <= run.atol)]


def check_live_biases(run: _Run) -> list[Check]:
    """Each bias input is live: perturbing it alone moves the output. Not bk: a key bias adds q.bk to every
    score of a query's row, which softmax cancels exactly, so it cannot move any output (the compiler's
    CheckBiasInputsPass checks structurally that bk inputs are consumed)."""
    probe = {k: v[:1, :8] for k, v in run.encoded.items()}
    reference = run.session.hidden_states(probe)
    dead = []
    probed = [spec for spec in run.manifest.bias_inputs if spec.kind != "bk"]
    for spec in probed:
        delta = run.rng.normal(0, 1.0, spec.shape).astype(np.float32)
        fed = {spec.name: run.ref.base[spec.name].numpy() + delta}
        if np.abs(run.session.hidden_states(probe, biases=fed) - reference).max() <= 1e-4:
            dead.append(spec.name)
    return [Check("graph", f"each of {len(probed)} non-bk bias inputs is live", float("nan"), passed=not dead,
                  note=f"dead: {', '.join(dead[:4])}" if dead else "")]


def check_pack_parity(run: _Run, item: _PackUnderTest) -> list[Check]:
    """The pack's logits against PyTorch on real sentences and on the shape grid with padding; in fp16 / int8
    modes, label agreement over all rows too. Token kinds compare per real (unpadded) token."""
    pack, m = item.pack, item.pack.manifest
    cases = [("real sentences", run.session.encode(run.sentences, max_length=m.max_length))]
    cases += [(f"grid b={b} s={s}", grid_inputs(b, s, int(run.ref.encoder.config.vocab_size),
                                                run.manifest.token_inputs, run.rng, run.manifest.pad_token_id))
              for b, s in run.grid if s <= run.manifest.max_positions]
    out, pooled = [], []
    for case, inputs in cases:
        ours, ref = run.session.logits(item.name, inputs), run.ref.logits(pack, inputs)
        if m.token_level:  # padded positions are never read (see check_base_model)
            real = inputs["attention_mask"].astype(bool)
            ours, ref = ours[real], ref[real]
        pooled.append((ours, ref))
        out.append(_compare(item.label, case, ours, ref, pack, run.atol))
    if run.mode != "fp32" and m.kind.argmax:
        ours_all, ref_all = np.concatenate([o for o, _ in pooled]), np.concatenate([r for _, r in pooled])
        agree = float((ours_all.argmax(-1) == ref_all.argmax(-1)).mean() * 100)
        a, r = diff(ours_all, ref_all)
        out.append(Check(item.label, f"labels over all {len(ours_all)} rows", a, r, agreement=agree,
                         tolerance=run.atol, passed=agree >= run.min_agreement,
                         note=f"needs >= {run.min_agreement:g}%"))
    return out


def check_perturbed_pack(run: _Run, item: _PackUnderTest) -> list[Check]:
    """A pack with other biases changes the output, and still matches PyTorch. Only the biases get noise: with
    the head perturbed too, the output moved whether or not the task's biases reached the graph."""
    pack, session = item.pack, run.session
    noisy = {k: (v + run.rng.normal(0, 0.1, v.shape)).astype(np.float32) if k in pack.biases else v
             for k, v in pack.tensors.items()}
    other = TaskPack(pack.manifest, noisy)
    other_name = session.register(other, name=f"{item.name}-perturbed")
    try:
        inputs = session.encode(run.sentences, max_length=pack.manifest.max_length)
        ours_pack, ours_other = session.logits(item.name, inputs), session.logits(other_name, inputs)
        ref_other = run.ref.logits(other, inputs)
    finally:
        session.remove(other_name)
    if pack.manifest.token_level:
        real = inputs["attention_mask"].astype(bool)
        ours_pack, ours_other, ref_other = ours_pack[real], ours_other[real], ref_other[real]
    moved = float(np.abs(ours_other - ours_pack).max())
    check = _compare(item.label, "perturbed biases vs PyTorch", ours_other, ref_other, other, run.atol)
    check.note = f"output moved {moved:.2e}"
    check.passed = check.passed and moved > MIN_MOVE
    return [check]


# The checks, in the order they run (and draw from the run's random generator): each returns its report rows.
GRAPH_CHECKS: tuple[Callable[[_Run], list[Check]], ...] = (check_tokenizer, check_base_model, check_live_biases)
PACK_CHECKS: tuple[Callable[[_Run, _PackUnderTest], list[Check]], ...] = (check_pack_parity, check_perturbed_pack)


def verify(
    compiled: str | os.PathLike,
    packs: Sequence[str | os.PathLike | TaskPack] = (),
    *,
    model: str | os.PathLike | None = None,
    atol: float | None = None,
    mode: str = "auto",
    min_agreement: float = 90.0,
    texts: Sequence[str] | None = None,
    grid: Sequence[tuple[int, int]] = GRID,
    seed: int = 0,
    log: Callable[[str], None] = print,
    strict: bool = True,
    backend: str = "onnxruntime",
) -> VerifyReport:
    """Check the compiled graph and every pack against PyTorch. Every check runs; then, if any failed, a
    ParityError lists them all (its `report` has the figures), unless strict=False, which returns the
    report as it is (`report.ok` False) for the caller to look at.

    mode: "fp32" (every logit within atol, default 1e-4); "fp16" or "int8" (logits within atol, default
    2e-2 / 1.5, and labels agreeing with fp32 PyTorch on >= min_agreement % of all rows per pack); or
    "auto", the mode of the graph's precision (int8 for backend "openvino-int8", which compresses weights).
    backend: the engine the graph runs on (runtime.backends): every check, the liveness of each bias input
    included, runs on it, so a backend that ignored a fed bias fails here.
    """
    A.check("packs", packs, A.PACKS)
    A.check("model", model, A.optional(A.PATH))
    A.check("atol", atol, A.optional(A.number(0)))
    A.check("min_agreement", min_agreement, A.number(0, 100))
    A.check("texts", texts, A.optional(A.sequence_of(S.Field(lambda t: isinstance(t, str) and t.strip() != "",
                                                              "non-blank strings"), 1)))
    A.check("grid", grid, A.sequence_of(S.Field(lambda c: isinstance(c, (tuple, list)) and len(c) == 2
                                                  and all(A.COUNT.check(x) for x in c),
                                                  "(batch, sequence length) pairs of whole numbers >= 1")))
    A.check("seed", seed, S.integer(0, 2**63 - 1))
    A.check("log", log, A.CALLABLE)
    A.check("strict", strict, S.boolean())
    A.check("backend", backend, S.one_of(BACKENDS))
    cm = read_compiled_manifest(compiled)  # not a compiled directory at all: bad input (exit 2)
    if mode == "auto":
        mode = "int8" if cm.precision.startswith("int8") or backend.endswith("int8") else cm.precision
    if mode not in TOLERANCES:
        raise BitFitError(f"verify mode must be auto, {', '.join(TOLERANCES)}; got {mode!r}")
    if atol is None:
        atol = TOLERANCES[mode]
    report = VerifyReport(str(compiled), atol, mode, min_agreement if mode != "fp32" else float("nan"), cm.precision,
                          backend=backend)

    # every file is the one that was compiled: a mismatch is a failed check (exit 1), not bad input
    changed = changed_files(Path(compiled), cm)
    report.checks.append(Check("graph", "files match their checksums", float("nan"), passed=not changed,
                               note=f"changed: {', '.join(changed)}" if changed else ""))
    try:
        session = TaskSession(compiled, check_integrity=False, backend=backend)
    except CompiledModelError:
        if not changed:
            raise
        return _finish(report, strict)  # a changed file that no longer loads: that row says it all

    base = model or cm.base_model_source()  # the recorded directory, if here; else the HF id
    sentences = list(texts or SENTENCES)
    max_len = min(128, cm.max_positions)
    run = _Run(cm, session, _Reference(base, cm.base_fingerprint), np.random.default_rng(seed), sentences,
               session.encode(sentences, max_length=max_len), max_len, base, atol, mode, min_agreement, grid)
    for graph_check in GRAPH_CHECKS:
        report.checks += graph_check(run)
    for item in packs:
        pack = item if isinstance(item, TaskPack) else load_pack(item)
        name = session.register(pack, name=f"pack-{len(session.tasks)}")  # a task name, unique here
        log(f"verifying {pack.name} ...")
        for pack_check in PACK_CHECKS:
            report.checks += pack_check(run, _PackUnderTest(pack, name, pack.name))
        session.remove(name)
    run.ref.set_biases({})
    return _finish(report, strict)


def _finish(report: VerifyReport, strict: bool) -> VerifyReport:
    if strict and not report.ok:
        raise ParityError(report.failure_summary(), report)
    return report


def _compare(subject: str, case: str, ours: np.ndarray, ref: np.ndarray, pack: TaskPack, atol: float) -> Check:
    """Token kinds come here as [real tokens, K]: agreement is then per token."""
    a, r = diff(ours, ref)
    if pack.manifest.kind.argmax:
        p = float(np.abs(softmax(ours) - softmax(ref)).max())
        agree = float((ours.argmax(-1) == ref.argmax(-1)).mean() * 100)
    else:
        p, agree = float("nan"), float("nan")
    return Check(subject, case, a, r, p, agree, atol, passed=a <= atol)


def write_report(report: VerifyReport, path: str | os.PathLike) -> Path:
    import json

    return write_file(path, json.dumps(report.to_json(), indent=2) + "\n", what="report")
