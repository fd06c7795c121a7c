"""Synthetic data for the token-classification and QA heads: a word's tag is a function of the word
(made-up words split into several sub-tokens, so the first-sub-token rule matters), and a QA answer is
the word after the marker "answer"."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tiny import WORDS

ENTITY_X = ("movie", "film", "plot", "actor")
ENTITY_Y = ("city", "name", "year", "day", "night")
MADE_UP = ("zorbex", "quaffle", "blimpton", "skrull")  # not in the tiny vocabulary: several sub-tokens each
FILLER = [w for w in WORDS if w not in ENTITY_X + ENTITY_Y + ("answer",)]


def tag_of(word: str) -> str:
    if word in ENTITY_X:
        return "B-X"
    if word in ENTITY_Y:
        return "B-Y"
    return "B-Z" if word in MADE_UP else "O"


def write_token_data(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = FILLER + list(ENTITY_X + ENTITY_Y + MADE_UP)
    with open(path, "w") as fh:
        for _ in range(n):
            words = [rng.choice(vocab) for _ in range(rng.randint(3, 10))]
            fh.write(json.dumps({"tokens": words, "tags": [tag_of(w) for w in words]}) + "\n")
    return path


def write_qa_data(path: Path, n: int = 80, seed: int = 0, unanswerable: float = 0.0) -> Path:
    """The answer is the word after the marker word "answer" in a context of random words. A share
    `unanswerable` of the rows have no marker and no answer (SQuAD 2.0)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 8)))
            target = rng.choice(ENTITY_X + ENTITY_Y)
            after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 6)))
            question = f"what is the answer {rng.choice(FILLER)} ?"
            if unanswerable and rng.random() < unanswerable:
                fh.write(json.dumps({"question": question, "context": f"{before} {target} {after}",
                                     "answers": {"text": [], "answer_start": []}}) + "\n")
                continue
            context = f"{before} answer {target} {after}"
            start = len(before) + len(" answer ")
            assert context[start : start + len(target)] == target
            fh.write(json.dumps({"question": question, "context": context,
                                 "answers": {"text": [target], "answer_start": [start]}}) + "\n")
    return path
