"""Session-wide fixtures: tiny random models, synthetic data files, trained packs and compiled graphs.

Everything expensive is built once per session and cached by its arguments. Fixtures hand out paths;
a test that changes files on disk copies them first (see `copy_dir`).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import WORDS, make_tiny

REPO = Path(__file__).resolve().parents[1]
# Installed, the only import name is `bitfit`; `python -m pytest` from the repository would also make its
# top-level folders importable as `runtime`, `compiler`, ... and a stray `import runtime` would load a second
# copy of a module. Take the repository off the path, as it is off the path of an installed package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
# Committed results hold real runs only: no test may write there (checked at the end of the session).
RESULTS = (REPO / "experiments" / "results", REPO / "benchmarks" / "results")

KINDS = ("bert", "roberta", "distilbert", "mpnet", "electra")
POSITIVE = ("good", "great", "fun", "love")
NEGATIVE = ("bad", "awful", "boring", "hate")
NEUTRAL = [w for w in WORDS if w not in POSITIVE + NEGATIVE]
QUIET = {"progress": False, "log": lambda s: None}
# Parity tolerance on fp32 logits and hidden states (typical differences are ~1e-6).
ATOL = 1e-4


def pytest_configure(config):
    # The models are tiny: one torch thread is fastest, and far faster when another process loads the CPU
    # (two spinning intra-op threads then fight it for both cores).
    import torch

    torch.set_num_threads(1)
    config._bitfit_results = _results_digest()


def _results_digest() -> dict[str, str]:
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in RESULTS if d.is_dir() for p in sorted(d.rglob("*")) if p.is_file()}


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_bitfit_results", None)
    if before is not None and _results_digest() != before:
        session.exitstatus = 1
        changed = sorted(set(before.items()) ^ set(_results_digest().items()))
        print(f"\nFAILED: tests changed committed results (write to tmp_path instead): {changed[:4]}",
              file=sys.stderr)


def _phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(NEUTRAL) for _ in range(n))


def write_sentiment(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Two labels, told apart by one sentiment word in otherwise random text (JSONL)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            positive = i % 2 == 0
            word = rng.choice(POSITIVE if positive else NEGATIVE)
            text = f"{_phrase(rng, rng.randint(2, 8))} {word} {_phrase(rng, rng.randint(0, 6))}"
            fh.write(json.dumps({"text": text.strip(), "label": "positive" if positive else "negative"}) + "\n")
    return path


def write_pairs(path: Path, n: int = 90, seed: int = 1) -> Path:
    """Sentence pairs with three labels (JSONL with a text_pair column)."""
    rng = random.Random(seed)
    names = ("entail", "neutral", "contradict")
    with open(path, "w") as fh:
        for i in range(n):
            label = names[i % 3]
            first = _phrase(rng, rng.randint(3, 9))
            second = first if label == "entail" else _phrase(rng, rng.randint(2, 7))
            if label == "contradict":
                second = "not " + second
            fh.write(json.dumps({"text": first, "text_pair": second, "label": label}) + "\n")
    return path


def write_scores(path: Path, n: int = 80, seed: int = 2) -> Path:
    """Regression: a float score per text (CSV)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write("text,label\n")
        for _ in range(n):
            pos, neg = rng.randint(0, 3), rng.randint(0, 3)
            words = [rng.choice(POSITIVE) for _ in range(pos)] + [rng.choice(NEGATIVE) for _ in range(neg)]
            words += [rng.choice(NEUTRAL) for _ in range(rng.randint(1, 6))]
            rng.shuffle(words)
            fh.write(f"{' '.join(words)},{pos - neg + rng.uniform(-0.5, 0.5):.3f}\n")
    return path


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "sentiment": write_sentiment(root / "sentiment.jsonl"),
        "pairs": write_pairs(root / "pairs.jsonl"),
        "scores": write_scores(root / "scores.csv"),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(kind="bert", seed=0) -> directory of a saved tiny random encoder + tokenizer (cached)."""
    cache: dict[tuple[str, int], Path] = {}

    def get(kind: str = "bert", seed: int = 0) -> Path:
        if (kind, seed) not in cache:
            cache[kind, seed] = make_tiny(kind, tmp_path_factory.mktemp(f"model-{kind}-seed{seed}"), seed=seed)
        return cache[kind, seed]

    return get


@pytest.fixture(scope="session")
def trained_pack(tiny_model, data_files, tmp_path_factory):
    """trained_pack(kind, biases, data, seed, base_seed, epochs) -> path of a trained task pack (cached)."""
    from bitfit.training.train import train

    cache: dict[tuple, Path] = {}

    def get(kind="bert", biases="all", data="sentiment", seed=0, base_seed=0, epochs=2, pooling="mean") -> Path:
        key = (kind, biases, data, seed, base_seed, epochs, pooling)
        if key not in cache:
            slug = "-".join(str(k).replace(",", "_").replace("+", "_") for k in key)
            out = tmp_path_factory.mktemp("packs") / slug
            name = f"{data}-{kind}-{biases.replace(',', '_')}-s{seed}-b{base_seed}-{pooling}"
            train(tiny_model(kind, base_seed), data_files[data], out, biases=biases, epochs=epochs, seed=seed,
                  pooling=pooling, task_name=name, **QUIET)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def compiled_dir(tiny_model, tmp_path_factory):
    """compiled_dir(kind="bert", biases="all", seed=0) -> a compiled directory (cached)."""
    from bitfit.compiler.compile import compile as compile_model

    cache: dict[tuple, Path] = {}

    def get(kind: str = "bert", biases: str = "all", seed: int = 0) -> Path:
        key = (kind, biases, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("compiled") / f"{kind}-{biases.replace(',', '_')}-seed{seed}"
            compile_model(tiny_model(kind, seed), out, biases=biases, log=lambda s: None)
            cache[key] = out
        return cache[key]

    return get


# -- the common cast, on tiny BERT -------------------------------------------------------------------
@pytest.fixture(scope="session")
def bert_model(tiny_model) -> Path:
    return tiny_model("bert", 0)


@pytest.fixture(scope="session")
def bert_compiled(compiled_dir) -> Path:
    return compiled_dir("bert", "all")


@pytest.fixture(scope="session")
def bert_compiled_min(compiled_dir) -> Path:
    """A graph with only bq and bm2 as bias inputs."""
    return compiled_dir("bert", "bq,bm2")


@pytest.fixture(scope="session")
def pack_all(trained_pack) -> Path:
    return trained_pack("bert", "all")


@pytest.fixture(scope="session")
def pack_min(trained_pack) -> Path:
    return trained_pack("bert", "bq,bm2")


@pytest.fixture(scope="session")
def pack_other_base(trained_pack) -> Path:
    """Trained on a tiny BERT with other random weights (seed 1): it fits no graph of seed 0."""
    return trained_pack("bert", "all", base_seed=1)


@pytest.fixture(scope="session")
def pack_pairs(trained_pack) -> Path:
    return trained_pack("bert", "all", data="pairs")


@pytest.fixture(scope="session")
def pack_scores(trained_pack) -> Path:
    return trained_pack("bert", "all", data="scores")


# -- helpers as fixtures -----------------------------------------------------------------------------
@pytest.fixture
def copy_dir(tmp_path):
    """copy_dir(src) -> a private copy of a pack or compiled directory under this test's tmp_path."""

    def copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or Path(src).name)
        shutil.copytree(src, dst)
        return dst

    return copy


def make_inputs(batch: int, length: int, token_inputs, vocab: int, pad_id: int, seed: int = 0) -> dict:
    """Random int64 token inputs [batch, length]: row 0 full, the last row (when batch > 1) padded to a third,
    other rows padded to random lengths >= 1."""
    rng = np.random.default_rng(seed + 1000 * batch + length)
    lengths = np.concatenate([[length], rng.integers(1, length + 1, size=batch - 1)]).astype(np.int64)
    if batch > 1:
        lengths[-1] = max(1, length // 3)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(5, vocab, size=(batch, length)), pad_id).astype(np.int64)
    types = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        types[i, n // 2 : n] = 1  # a second segment, as for sentence pairs
    full = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: full[k] for k in token_inputs}


@pytest.fixture(scope="session")
def token_inputs():
    """token_inputs(session, batch, length, seed=0) -> random padded inputs that fit `session`'s graph."""
    from bitfit.runtime.compiled import TOKENIZER_FILE
    from tokenizers import Tokenizer

    def get(session, batch: int, length: int, seed: int = 0) -> dict:
        vocab = Tokenizer.from_file(str(session.directory / TOKENIZER_FILE)).get_vocab_size()
        m = session.manifest
        return make_inputs(batch, length, m.token_inputs, vocab, m.pad_token_id, seed)

    return get


@pytest.fixture(scope="session")
def torch_logits():
    """torch_logits(pack, model_dir, inputs) -> the PyTorch BitFitModel's logits for numpy token inputs."""
    import torch
    from bitfit.encoder.model import model_from_pack

    def run(pack, model_dir: Path, inputs: dict) -> np.ndarray:
        model = model_from_pack(pack, base=model_dir).eval()
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    return run


@pytest.fixture(scope="session")
def torch_hidden():
    """torch_hidden(model_dir, inputs, biases=None) -> the base encoder's last hidden state, optionally with
    some biases (by canonical name) replaced."""
    import torch
    from bitfit.encoder.biases import find_biases
    from bitfit.encoder.model import load_encoder

    def run(model_dir: Path, inputs: dict, biases: dict | None = None) -> np.ndarray:
        encoder = load_encoder(model_dir)
        slots = {s.name: s for s in find_biases(encoder, "all")}
        with torch.no_grad():
            for name, value in (biases or {}).items():
                slots[name].parameter.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
            return encoder(**{k: torch.from_numpy(v) for k, v in inputs.items()}).last_hidden_state.numpy()

    return run


def perturbed(pack, scale: float, seed: int = 0):
    """The pack with noise on every tensor: a short training run leaves biases close to the base, so noise
    makes a parity check sensitive to biases that are not actually applied."""
    from bitfit.runtime import TaskPack

    rng = np.random.default_rng(seed)
    return TaskPack(pack.manifest, {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32)
                                    for k, v in pack.tensors.items()})


def write_sealed(path: Path, data: dict) -> None:
    """Write a manifest the way a hand edit that also recomputes the manifest's own checksum would: the
    checks behind the seal (schema, rules, tensors) are then what must catch the edit."""
    from bitfit.runtime.schema import seal

    path.write_text(json.dumps(seal(data)))


def reseal_compiled(directory: Path, **changes) -> None:
    """A compiled directory whose files were changed on purpose, made to load again: every file's checksum
    and the manifest's seal recomputed (what a deliberate forger would do)."""
    from bitfit.runtime.compiled import FILES, MANIFEST_FILE
    from bitfit.runtime.fs import sha256_file

    data = json.loads((directory / MANIFEST_FILE).read_text())
    data.update(changes)
    data["files"] = {name: sha256_file(directory / name) for name in FILES}
    write_sealed(directory / MANIFEST_FILE, data)


def fail_moves_into(target: Path, monkeypatch) -> None:
    """Make the writer's final rename of a new directory onto `target` fail, as a full disk would."""
    import os

    from bitfit.runtime import fs

    real = os.replace

    def replace(src, dst):
        if ".bitfit-tmp-" in os.fspath(src) and os.fspath(dst) == os.fspath(target):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fs.os, "replace", replace)
