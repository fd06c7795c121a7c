"""The runtime's tokenization (tokenizers only) gives transformers' ids, padding and truncation."""
from __future__ import annotations

import numpy as np
import pytest
from bitfit.encoder.model import load_tokenizer
from bitfit.runtime import BitFitError, TaskSession

TEXTS = ["Good movie!", "the " * 100, "Ünïcödé café, naïve résumé", "WIN £900 now!!! call 0906", "ok"]
PAIRS = ["bad plot " * 40, "x", "who?", "the " * 100, "fine"]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("max_length", [8, 16, 64])
def test_runtime_tokenization_equals_transformers(kind, max_length, compiled_dir, tiny_model):
    session = TaskSession(compiled_dir(kind))
    hf = load_tokenizer(tiny_model(kind))
    for pairs in (None, PAIRS):
        ours = session.encode(TEXTS, pairs, max_length=max_length)
        ref = hf(TEXTS, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="np",
                 return_token_type_ids=True)
        assert list(ours) == session.manifest.token_inputs
        for k, v in ours.items():
            assert v.dtype == np.int64
            assert np.array_equal(v, ref[k]), (k, pairs is not None)
        assert ours["input_ids"].shape[1] <= max_length


def test_tokenizer_per_max_length_does_not_leak(bert_compiled):
    """Truncation is tokenizer state: a short max_length must not affect a later long one."""
    session = TaskSession(bert_compiled)
    long_text = ["the " * 30]
    before = session.encode(long_text, max_length=64)["input_ids"]
    session.encode(long_text, max_length=8)
    after = session.encode(long_text, max_length=64)["input_ids"]
    assert np.array_equal(before, after) and before.shape[1] == 32


def test_encode_checks_pairs(bert_compiled):
    session = TaskSession(bert_compiled)
    with pytest.raises(BitFitError, match=r"text_pairs\[0\] is NoneType, not a string"):
        session.encode(["a"], [None], max_length=8)
    with pytest.raises(BitFitError, match=r"text_pairs has 2 items but texts has 1"):
        session.encode(["a"], ["b", "c"], max_length=8)
