"""Token classification, extractive QA and the BERT pooler: train -> pack -> compile -> runtime -> verify.

The data is synthetic (tests/head_data.py).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import Answers, TaskPack, TaskSession, TokenPredictions, load_pack
from bitfit.runtime.errors import BitFitError, PackError
from bitfit.runtime.heads import (
    HEAD_POOLER_BIAS,
    HEAD_POOLER_WEIGHT,
    best_span,
    first_subtokens,
)
from bitfit.runtime.pack import PackManifest
from conftest import ATOL, QUIET, write_sealed
from head_data import write_qa_data, write_token_data


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def head_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head-data")
    return {"tokens": write_token_data(root / "tags.jsonl"), "qa": write_qa_data(root / "qa.jsonl")}


@pytest.fixture(scope="module")
def token_pack(bert_model, head_data, tmp_path_factory) -> Path:
    from bitfit.training.train import train

    out = tmp_path_factory.mktemp("packs") / "tags"
    train(bert_model, head_data["tokens"], out, epochs=3, lr=5e-3, batch_size=8, task_name="tags", **QUIET)
    return out


@pytest.fixture(scope="module")
def qa_pack(bert_model, head_data, tmp_path_factory) -> Path:
    from bitfit.training.train import train

    out = tmp_path_factory.mktemp("packs") / "qa"
    train(bert_model, head_data["qa"], out, epochs=3, lr=5e-3, batch_size=8, task_kind="question-answering",
          task_name="qa", **QUIET)
    return out


# -- data and manifest errors ------------------------------------------------------------------------
def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_token_rows_need_one_tag_per_token(tmp_path):
    from bitfit.training.data import load_task_data, read_token_examples

    path = write_rows(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]},
                                              {"tokens": ["a", "b", "c"], "tags": ["O", "B-X"]}])
    with pytest.raises(BitFitError, match=r"row 2 has 3 tokens but 2 tags: give one tag per token"):
        read_token_examples(path)
    with pytest.raises(BitFitError, match=r"row 2 has 3 tokens but 2 tags"):
        load_task_data(path)  # recognised as token data by its keys
    csv = tmp_path / "t.csv"
    csv.write_text("tokens,tags\na,O\n")
    with pytest.raises(BitFitError, match=r"token-classification data must be JSONL"):
        load_task_data(csv, task_kind="token-classification")


def test_qa_answer_must_be_in_the_context_at_its_offset(tmp_path):
    from bitfit.training.data import read_qa_examples

    row = {"question": "who?", "context": "the actor is here", "answers": {"text": ["actor"], "answer_start": [4]}}
    assert read_qa_examples(write_rows(tmp_path / "ok.jsonl", [row]))[0].answers == ("actor",)
    shifted = {**row, "answers": {"text": ["actor"], "answer_start": [3]}}
    with pytest.raises(BitFitError, match=r"row 1: the answer 'actor' is not in the context at answer_start 3 "
                                          r"\(it occurs at 4\)"):
        read_qa_examples(write_rows(tmp_path / "shifted.jsonl", [shifted]))
    absent = {**row, "answers": {"text": ["city"], "answer_start": [4]}}
    with pytest.raises(BitFitError, match=r"the answer 'city' is not in the context .*does not occur in the context"):
        read_qa_examples(write_rows(tmp_path / "absent.jsonl", [absent]))
    with pytest.raises(BitFitError, match=r"row 1 lacks \['answers'\]"):
        read_qa_examples(write_rows(tmp_path / "lacks.jsonl", [{"question": "q", "context": "c"}]))
    none = {**row, "answers": {"text": [], "answer_start": []}}  # SQuAD 2.0: the context does not answer
    assert read_qa_examples(write_rows(tmp_path / "none.jsonl", [none]))[0].answers == ()
    half = {**row, "answers": {"text": ["actor"], "answer_start": []}}
    with pytest.raises(BitFitError, match=r"1 answer texts and 0 answer_start offsets: give each answer its start"):
        read_qa_examples(write_rows(tmp_path / "half.jsonl", [half]))


def manifest_json(pack_dir: Path) -> dict:
    return json.loads((pack_dir / "manifest.json").read_text())


def test_manifest_enforces_the_head_contract(pack_all):
    base = manifest_json(pack_all)
    with pytest.raises(PackError, match=r"pooling 'none' is only for .*token-classification"):
        PackManifest.from_json({**base, "pooling": "none"})
    with pytest.raises(PackError, match=r"token-classification task has logits per token, so its pooling must be "
                                        r"'none', got 'mean'"):
        PackManifest.from_json({**base, "task_kind": "token-classification"})
    with pytest.raises(PackError, match=r"question-answering task has the labels \['start', 'end'\]"):
        PackManifest.from_json({**base, "task_kind": "question-answering", "pooling": "none"})
    with pytest.raises(PackError, match=r"task_kind must be one of"):
        PackManifest.from_json({**base, "task_kind": "ner"})


# -- training ----------------------------------------------------------------------------------------
def test_token_pack_holds_a_per_token_head(token_pack, qa_pack):
    tags, qa = load_pack(token_pack).manifest, load_pack(qa_pack).manifest
    assert (tags.task_kind, tags.pooling, tags.labels) == ("token-classification", "none", ["B-X", "B-Y", "B-Z", "O"])
    assert tags.metrics["metric"] == "entity_f1" and {"accuracy", "entity_f1"} <= set(tags.metrics["dev"])
    assert (qa.task_kind, qa.pooling, qa.labels, qa.text_pair) == ("question-answering", "none", ["start", "end"], True)
    assert {"exact_match", "f1"} <= set(qa.metrics["dev"])
    for m, k in ((tags, 4), (qa, 2)):
        assert {h.name: h.shape for h in m.head} == {"head.weight": (k, 32), "head.bias": (k,)}
        losses = [h["train_loss"] for h in m.metrics["history"]]
        assert losses[-1] < losses[0]  # it trains


def test_token_targets_sit_on_first_subtokens(bert_model):
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import TokenExample
    from bitfit.training.tokens import IGNORE, encode_tokens

    tok = load_tokenizer(bert_model)
    example = TokenExample(("the", "zorbex", "movie"), ("O", "B-Z", "B-X"))
    inputs, targets, enc = encode_tokens(tok, [example], ["B-X", "B-Z", "O"], 64)
    pieces = tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert pieces[:3] == ["[CLS]", "the", "z"] and pieces[3].startswith("##")  # zorbex is several sub-tokens
    labelled = {pieces[i]: int(t) for i, t in enumerate(targets[0].tolist()) if t != IGNORE}
    assert labelled == {"the": 2, "z": 1, "movie": 0}


def test_qa_targets_cover_the_answer_and_truncated_answers_point_at_cls(bert_model):
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import QAExample
    from bitfit.training.tokens import encode_qa

    tok = load_tokenizer(bert_model)
    near = QAExample("what?", "ok the answer film now", ("film",), (14,))
    far_context = " ".join(["ok"] * 80) + " answer film"
    far = QAExample("what?", far_context, ("film",), (far_context.index("film"),))
    inputs, targets, enc = encode_qa(tok, [near, far], 32)
    pieces = tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    start, end = targets[0].tolist()
    assert pieces[start : end + 1] == ["film"]
    assert targets[1].tolist() == [0, 0]


def test_metrics_follow_squad_and_conlleval():
    from bitfit.training.tokens import entities, entity_f1, squad_metrics

    assert entities(["B-X", "I-X", "O", "I-Y", "B-Y", "B-Y"]) == {("X", 0, 1), ("Y", 3, 3), ("Y", 4, 4), ("Y", 5, 5)}
    assert entity_f1([["B-X", "I-X", "O"]], [["B-X", "O", "O"]]) == 0.0  # boundaries must match exactly
    assert entity_f1([["B-X", "O", None]], [["B-X", "O", "B-Y"]]) == pytest.approx(100 * 2 / 3)
    got = squad_metrics(["The Film!", "a movie plot"], [["film"], ["plot", "the movie"]])
    assert got["exact_match"] == 50.0
    # "a movie plot" -> "movie plot": vs "plot" precision 1/2, recall 1, F1 2/3 ("the movie" -> "movie": the same)
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # SQuAD 2.0: a question without gold answers is right only for an empty prediction, in EM and F1 alike
    v2 = squad_metrics(["", "film", "", "film"], [[], [], ["film"], ["film"]])
    assert v2 == {"exact_match": 50.0, "f1": 50.0}


def test_best_span_is_the_brute_force_best():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 20))
        s, e = rng.normal(size=n), rng.normal(size=n)
        allowed = rng.random(n) < 0.7
        limit = int(rng.integers(1, 6))
        got = best_span(s, e, allowed, limit)
        pairs = [(i, j) for i in range(n) for j in range(i, min(n, i + limit)) if allowed[i] and allowed[j]]
        if not pairs:
            assert got[:2] == (0, 0) and got[2] == float("-inf")
            continue
        i, j = max(pairs, key=lambda p: s[p[0]] + e[p[1]])
        assert got[:2] == (i, j) and got[2] == pytest.approx(s[i] + e[j])
    assert first_subtokens([None, 0, 0, 1, None, 3], 4).tolist() == [1, 3, -1, 5]


# -- runtime vs PyTorch ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def session(bert_compiled, token_pack, qa_pack) -> TaskSession:
    s = TaskSession(bert_compiled)
    s.register(token_pack)
    s.register(qa_pack)
    return s


@pytest.mark.parametrize("task", ["tags", "qa"])
@pytest.mark.parametrize("batch,length", [(1, 7), (4, 23), (3, 64)])
def test_token_logits_match_pytorch_on_padded_batches(session, token_pack, qa_pack, bert_model, token_inputs,
                                                      torch_logits, task, batch, length):
    pack = load_pack(token_pack if task == "tags" else qa_pack)
    inputs = token_inputs(session, batch, length, seed=3)
    ours, ref = session.logits(task, inputs), torch_logits(pack, bert_model, inputs)
    assert ours.shape == ref.shape == (batch, length, len(pack.manifest.labels))
    real = inputs["attention_mask"].astype(bool)
    assert not real.all() or batch == 1  # padded rows are in the batch
    assert np.abs(ours[real] - ref[real]).max() <= ATOL


def test_run_tokens_labels_each_word_by_its_first_subtoken(session, token_pack, bert_model, head_data, torch_logits):
    from bitfit.encoder.model import load_tokenizer

    rows = read_jsonl(head_data["tokens"])[:6]
    words = [r["tokens"] for r in rows]
    out = session.run_tokens("tags", words, batch_size=4)
    assert isinstance(out, TokenPredictions) and out.words == words
    pack = load_pack(token_pack)
    enc = load_tokenizer(bert_model)(words, is_split_into_words=True, padding=True, return_tensors="np",
                                     return_token_type_ids=True)
    ref = torch_logits(pack, bert_model, {k: enc[k].astype(np.int64) for k in session.manifest.token_inputs})
    for i, row in enumerate(words):
        first = [enc.word_ids(i).index(w) for w in range(len(row))]
        assert np.abs(out.logits[i] - ref[i, first]).max() <= ATOL
        assert out.labels[i] == [pack.manifest.labels[k] for k in ref[i, first].argmax(-1)]
    record = out.records()[0]
    assert record["tokens"] == words[0] and len(record["labels"]) == len(words[0]) and not record["truncated"]
    assert all(0 < s <= 1 for s in record["scores"])


def test_run_tokens_on_raw_text_gives_word_offsets(session):
    text = "The zorbex movie, in the city!"
    out = session.run_tokens("tags", [text, "ok"])
    assert out.words[0] == ["The", "zorbex", "movie", ",", "in", "the", "city", "!"]
    assert [text[a:b] for a, b in out.offsets[0]] == out.words[0]
    assert out.records()[1]["offsets"] == [[0, 2]]
    # the same words given pre-split get the same labels
    assert session.run_tokens("tags", [out.words[0]]).labels[0] == out.labels[0]


def test_words_cut_off_by_max_length_get_no_label(session):
    words = ["movie"] * 100  # max_length is 64: [CLS] + 62 words + [SEP]
    out = session.run_tokens("tags", [words])
    assert out.labels[0][:62] == out.labels[0][:1] * 62 and out.labels[0][62:] == [None] * 38
    assert out.scores[0][62] is None and out.truncated == [True]


def test_answers_are_the_best_spans_of_their_contexts(session, qa_pack, bert_model, head_data, torch_logits):
    from bitfit.encoder.model import load_tokenizer

    rows = read_jsonl(head_data["qa"])[:8]
    questions, contexts = [r["question"] for r in rows], [r["context"] for r in rows]
    out = session.answer("qa", questions, contexts, max_answer_tokens=3, batch_size=5)
    assert isinstance(out, Answers) and len(out.answers) == len(rows)
    # the reference: PyTorch logits, decoded by brute force over the context's tokens
    enc = load_tokenizer(bert_model)(questions, contexts, truncation="only_second", max_length=64, padding=True,
                                     return_offsets_mapping=True, return_tensors="np", return_token_type_ids=True)
    feeds = {k: enc[k].astype(np.int64) for k in session.manifest.token_inputs}
    ref = torch_logits(load_pack(qa_pack), bert_model, feeds)
    for i, context in enumerate(contexts):
        a, b = out.starts[i], out.ends[i]
        assert 0 <= a < b <= len(context) and context[a:b] == out.answers[i]
        ctx = [t for t, s in enumerate(enc.sequence_ids(i)) if s == 1]
        s, e = max(((s, e) for s in ctx for e in ctx if 0 <= e - s < 3),
                   key=lambda p: ref[i, p[0], 0] + ref[i, p[1], 1])
        offsets = enc["offset_mapping"][i]
        assert (a, b) == (offsets[s][0], offsets[e][1])
        assert out.scores[i] == pytest.approx(ref[i, s, 0] + ref[i, e, 1], abs=2 * ATOL)
    assert set(out.records()[0]) == {"answer", "start", "end", "score", "truncated"}


def test_long_contexts_are_read_in_overlapping_windows(session, qa_pack, bert_model, torch_logits):
    """The best span over all windows equals a brute-force search over PyTorch logits of the windows that
    transformers' tokenizer makes with the same stride (its QA pipeline's chunking)."""
    from bitfit.encoder.model import load_tokenizer

    rng = random.Random(3)
    filler = "good bad great awful movie plot hate fun boring who the".split()  # the tiny model likes "love"
    contexts = [" ".join(rng.choice(filler) for _ in range(n)) + f" answer {w} love " +
                " ".join(rng.choice(filler) for _ in range(9)) for n, w in ((90, "city"), (150, "year"), (3, "film"))]
    questions = ["what is the answer ?"] * 3
    stride = 64 // 4  # the default: a quarter of the pack's max_length
    out = session.answer("qa", questions, contexts, max_answer_tokens=3, batch_size=3)
    enc = load_tokenizer(bert_model)(questions, contexts, truncation="only_second", max_length=64, stride=stride,
                                     return_overflowing_tokens=True, return_offsets_mapping=True, padding=True,
                                     return_tensors="np", return_token_type_ids=True)
    assert np.bincount(enc["overflow_to_sample_mapping"]).tolist()[:2] >= [2, 3]  # long ones need windows
    ref = torch_logits(load_pack(qa_pack), bert_model, {k: enc[k].astype(np.int64) for k in session.manifest.token_inputs})
    for i, context in enumerate(contexts):
        candidates = []
        for w in np.flatnonzero(enc["overflow_to_sample_mapping"] == i):
            ctx = [t for t, sid in enumerate(enc.sequence_ids(int(w))) if sid == 1]
            for a in ctx:
                for b in ctx:
                    if 0 <= b - a < 3:
                        offsets = enc["offset_mapping"][w]
                        candidates.append((ref[w, a, 0] + ref[w, b, 1], int(offsets[a][0]), int(offsets[b][1])))
        score, a, b = max(candidates)
        assert (out.starts[i], out.ends[i]) == (a, b) and out.answers[i] == context[a:b]
        assert out.scores[i] == pytest.approx(score, abs=2 * ATOL)
    assert out.truncated == [False] * 3
    cut = session.answer("qa", questions, contexts, max_answer_tokens=3, windows=False)
    assert cut.truncated == [True, True, False] and cut.answers[2] == out.answers[2]
    # some best span lies beyond the first window, where the truncating read cannot reach
    first_end = [max(b for (_, b), sid in zip(e.offsets, e.sequence_ids) if sid == 1)
                 for e in session.encoder.encodings(list(zip(questions, contexts)), max_length=64,
                                                    strategy="only_second")[1]]
    assert any(out.starts[i] >= first_end[i] for i in (0, 1))
    # neighbouring windows share `stride` context tokens
    _, windows, owner = session.encoder.windows(list(zip(questions, contexts))[:1], max_length=64, stride=stride)
    spans = [[o for o, sid in zip(w.offsets, w.sequence_ids) if sid == 1] for w in windows]
    assert owner == [0] * len(windows) and all(x[-stride:] == y[:stride] for x, y in zip(spans, spans[1:]))
    # a long question leaves less room: the stride shrinks instead of tokenizers panicking
    long_q = " ".join(["what"] * 50)
    assert session.answer("qa", [long_q], [contexts[0]], stride=40).answers[0] in contexts[0]
    with pytest.raises(BitFitError, match="stride must be"):
        session.answer("qa", questions, contexts, stride=-1)


def test_unanswerable_questions_squad2(bert_model, bert_compiled, torch_logits, tmp_path):
    """Rows with empty answers train CLS; the pack says so, and the runtime then answers "" exactly where
    CLS start + end beats every span in PyTorch's logits."""
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import read_qa_examples
    from bitfit.training.train import train

    data = write_qa_data(tmp_path / "qa2.jsonl", n=120, seed=5, unanswerable=0.4)
    rows = read_jsonl(data)
    assert sum(not r["answers"]["text"] for r in rows) > 20 and not read_qa_examples(data)[
        next(i for i, r in enumerate(rows) if not r["answers"]["text"])].answers
    result = train(bert_model, data, tmp_path / "qa2", epochs=4, lr=5e-3, batch_size=8,
                   task_kind="question-answering", task_name="qa2", **QUIET)
    pack = load_pack(result.pack_path)
    assert pack.manifest.no_answer and {"exact_match", "f1"} <= set(pack.manifest.metrics["dev"])
    session = TaskSession(bert_compiled)
    session.register(pack)
    questions, contexts = [r["question"] for r in rows[:24]], [r["context"] for r in rows[:24]]
    out = session.answer("qa2", questions, contexts, max_answer_tokens=3)
    enc = load_tokenizer(bert_model)(questions, contexts, truncation="only_second", max_length=64, padding=True,
                                     return_offsets_mapping=True, return_tensors="np", return_token_type_ids=True)
    ref = torch_logits(pack, bert_model, {k: enc[k].astype(np.int64) for k in session.manifest.token_inputs})
    for i in range(len(rows[:24])):
        ctx = [t for t, sid in enumerate(enc.sequence_ids(i)) if sid == 1]
        best = max(ref[i, a, 0] + ref[i, b, 1] for a in ctx for b in ctx if 0 <= b - a < 3)
        null = ref[i, 0, 0] + ref[i, 0, 1]
        assert (out.answers[i] == "") == bool(null > best), i
        assert out.scores[i] == pytest.approx(max(null, best), abs=2 * ATOL)
    assert 0 < sum(a == "" for a in out.answers) < len(out.answers)  # both outcomes occur
    spans = session.answer("qa2", questions, contexts, max_answer_tokens=3, no_answer=False)
    assert all(a for a in spans.answers)  # the override gives a span for every question
    strict = session.answer("qa2", questions, contexts, max_answer_tokens=3, null_threshold=1e9)
    assert strict.answers == spans.answers
    with pytest.raises(PackError, match="no_answer is for question-answering"):
        PackManifest.from_json({**pack.manifest.to_json(), "task_kind": "classification", "pooling": "mean",
                                "labels": ["a", "b"]})


def test_token_and_qa_results_carry_the_pack_digest(session):
    assert session.run_tokens("tags", ["a good film"]).digest == session.digest("tags")
    assert session.answer("qa", ["who?"], ["the actor"]).digest == session.digest("qa")
    assert session.predict("qa", ["who?"], ["the actor"]).digest == session.digest("qa")
    assert session.digest("tags") != session.digest("qa")


def test_token_tasks_have_their_own_calls(session, bert_compiled, pack_all):
    with pytest.raises(BitFitError, match=r"'tags' is a token-classification task: call run_tokens\(\) for it, not "):
        session.run("tags", ["a text"])
    with pytest.raises(BitFitError, match=r"'qa' is a question-answering task: call answer\(\)"):
        session.run_tokens("qa", ["a text"])
    with pytest.raises(BitFitError, match=r"run_mixed serves sequence tasks only; call run_tokens\(\)"):
        session.run_mixed([("tags", "a text")])
    with pytest.raises(BitFitError, match=r"got 2 questions but 1 contexts"):
        session.answer("qa", ["q", "q"], ["c"])
    with pytest.raises(BitFitError, match=r"shorten the question"):
        session.answer("qa", [" ".join(["what"] * 80)], ["the film"])
    with pytest.raises(BitFitError, match=r"texts\[1\] is a string but texts\[0\] is a list of words"):
        session.run_tokens("tags", [["a"], "b"])
    other = TaskSession(bert_compiled)
    other.register(pack_all, name="sentiment")
    with pytest.raises(BitFitError, match=r"classification task: call run\(\) for it, not answer\(\)"):
        other.answer("sentiment", ["q"], ["c"])


def test_long_questions_are_refused_in_training_too(bert_model):
    from bitfit.encoder.model import load_tokenizer
    from bitfit.training.data import QAExample
    from bitfit.training.tokens import encode_qa

    long = QAExample(" ".join(["what"] * 80), "the film", ("film",), (4,))
    with pytest.raises(BitFitError, match=r"a question leaves no room for its context"):
        encode_qa(load_tokenizer(bert_model), [long], 64)


# -- the BERT pooler ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_classifier(bert_model, tmp_path_factory) -> Path:
    """A tiny BertForSequenceClassification on the tiny BERT base, as if BitFit-trained: its biases, pooler
    and classifier differ from the base (the frozen weights, and so the fingerprint, do not)."""
    import torch
    import transformers as T

    model = T.BertForSequenceClassification.from_pretrained(bert_model, num_labels=3)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.startswith(("bert.pooler", "classifier")):
                p.add_(torch.randn_like(p) * 0.2)
    out = tmp_path_factory.mktemp("hf-classifier")
    model.save_pretrained(out)
    T.AutoTokenizer.from_pretrained(bert_model).save_pretrained(out)
    return out


def pooler_pack(checkpoint: Path) -> TaskPack:
    """A pack of an HF *ForSequenceClassification checkpoint, made by hand: its biases, pooler and classifier."""
    import transformers as T
    from bitfit.encoder.biases import find_biases
    from bitfit.encoder.model import base_fingerprint, count_parameters, load_encoder
    from bitfit.runtime.pack import TensorSpec

    clf = T.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    encoder = load_encoder(checkpoint)
    slots = find_biases(encoder, "all")
    tensors = {s.name: s.parameter.detach().numpy().copy() for s in slots}
    tensors |= {"head.weight": clf.classifier.weight, "head.bias": clf.classifier.bias,
                HEAD_POOLER_WEIGHT: clf.bert.pooler.dense.weight, HEAD_POOLER_BIAS: clf.bert.pooler.dense.bias}
    tensors = {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, np.float32) for k, v in tensors.items()}
    manifest = PackManifest(
        task="hf-classifier", task_kind="classification", labels=["a", "b", "c"], pooling="pooler", max_length=64,
        text_pair=False, base_model=str(checkpoint), base_model_type="bert", base_fingerprint=base_fingerprint(encoder),
        hidden_size=32, tokenizer=str(checkpoint), bias_subset=sorted({s.kind for s in slots}),
        biases=[TensorSpec(s.name, tuple(s.parameter.shape), "float32", s.kind, s.layer, s.source) for s in slots],
        head=[TensorSpec(k, tensors[k].shape)
              for k in ("head.weight", "head.bias", HEAD_POOLER_WEIGHT, HEAD_POOLER_BIAS)],
        trainable_params=0, base_params=count_parameters(encoder),
    )
    pack = TaskPack(manifest, tensors)
    pack.validate()
    return pack


def test_pooler_pack_matches_the_hf_classifier(hf_classifier, bert_compiled, token_inputs, tmp_path):
    import torch
    import transformers as T
    from bitfit.encoder.model import model_from_pack
    from bitfit.runtime import save_pack

    path = save_pack(pooler_pack(hf_classifier), tmp_path / "pooler")
    session = TaskSession(bert_compiled)
    task = session.register(path)
    clf = T.AutoModelForSequenceClassification.from_pretrained(hf_classifier).eval()
    ours_torch = model_from_pack(load_pack(path), base=hf_classifier)
    for batch, length in ((1, 9), (5, 40)):
        inputs = token_inputs(session, batch, length, seed=11)
        with torch.no_grad():
            feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
            ref = clf(**feeds).logits.numpy()
            mine = ours_torch(**feeds).numpy()
        assert np.abs(session.logits(task, inputs) - ref).max() <= ATOL
        assert np.abs(mine - ref).max() <= ATOL
    texts = ["a great movie", "what a boring plot"]
    enc = T.AutoTokenizer.from_pretrained(hf_classifier)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = clf(**enc).logits.numpy()
    assert np.abs(session.run(task, texts).logits - want).max() <= ATOL


def test_training_with_the_pooler_starts_from_the_checkpoint_pooler(hf_classifier, data_files, bert_compiled,
                                                                    token_inputs, torch_logits, tmp_path):
    import transformers as T
    from bitfit.training.train import train

    result = train(hf_classifier, data_files["sentiment"], tmp_path / "p", epochs=1, pooling="pooler", **QUIET)
    clf = T.AutoModelForSequenceClassification.from_pretrained(hf_classifier)
    pooler = clf.bert.pooler.dense
    assert np.array_equal(result.pack.tensors[HEAD_POOLER_WEIGHT], pooler.weight.detach().numpy())  # frozen
    assert np.array_equal(result.pack.tensors[HEAD_POOLER_BIAS], pooler.bias.detach().numpy())
    session = TaskSession(bert_compiled)
    task = session.register(tmp_path / "p")
    inputs = token_inputs(session, 3, 20)
    assert np.abs(session.logits(task, inputs) - torch_logits(result.pack, hf_classifier, inputs)).max() <= ATOL
    trained = train(hf_classifier, data_files["sentiment"], None, epochs=1, pooling="pooler", train_pooler=True,
                    **QUIET)
    assert not np.array_equal(trained.pack.tensors[HEAD_POOLER_WEIGHT], pooler.weight.detach().numpy())


def test_pooler_is_refused_where_the_checkpoint_has_none(tiny_model, data_files, tmp_path):
    import transformers as T
    from bitfit.training.train import train

    with pytest.raises(BitFitError, match=r"no BERT-style pooler \(dense \+ tanh\): use pooling mean or cls"):
        train(tiny_model("electra"), data_files["sentiment"], None, epochs=1, pooling="pooler", **QUIET)
    bare = tmp_path / "bare"
    T.BertModel.from_pretrained(tiny_model("bert"), add_pooling_layer=False).save_pretrained(bare)
    T.AutoTokenizer.from_pretrained(tiny_model("bert")).save_pretrained(bare)
    with pytest.raises(BitFitError, match=r"holds no pooler weights \(missing pooler\.dense\.bias, pooler\.dense\."):
        train(bare, data_files["sentiment"], None, epochs=1, pooling="pooler", **QUIET)
    with pytest.raises(BitFitError, match=r"cannot use pooling 'mean': token-level tasks take pooling 'none'"):
        train(tiny_model("bert"), write_token_data(tmp_path / "t.jsonl"), None, pooling="mean", **QUIET)


def test_pooler_pack_without_pooler_tensors_is_refused(hf_classifier, tmp_path):
    from bitfit.runtime import save_pack

    pack = pooler_pack(hf_classifier)
    dropped = {k: v for k, v in pack.tensors.items() if k != HEAD_POOLER_WEIGHT}
    with pytest.raises(PackError, match=r"missing tensors head\.pooler\.weight"):
        TaskPack(pack.manifest, dropped).validate()
    path = save_pack(pack, tmp_path / "p")
    data = manifest_json(path)
    data["head"] = [h for h in data["head"] if not h["name"].startswith("head.pooler")]
    write_sealed(path / "manifest.json", data)
    with pytest.raises(PackError, match=r"the head must be .*head\.pooler\.bias \[32\], head\.pooler\.weight \[32, 32\]"
                                        r".*pooling 'pooler'; the manifest lists head\.bias \[\d+\], head\.weight"):
        load_pack(path)


# -- verify, CLI, serve ------------------------------------------------------------------------------
def test_verify_passes_token_and_pooler_packs(bert_compiled, token_pack, qa_pack, hf_classifier):
    from bitfit.compiler.verify import verify

    report = verify(bert_compiled, [token_pack, qa_pack, pooler_pack(hf_classifier)], grid=((2, 9), (3, 30)),
                    log=lambda s: None)
    assert report.ok, report.table()
    cases = {(c.subject, c.case) for c in report.checks}
    for task in ("tags", "qa", "hf-classifier"):
        assert (task, "grid b=3 s=30") in cases and (task, "perturbed biases vs PyTorch") in cases
    tags = [c for c in report.checks if c.subject == "tags"]
    assert all(c.agreement == 100.0 for c in tags)  # per-token labels


def test_verify_fails_a_token_pack_whose_head_is_off(bert_compiled, token_pack, monkeypatch):
    """The token-level comparison can fail: a runtime head that drops the bias is caught."""
    from bitfit.compiler.verify import verify
    from bitfit.runtime.heads import Head

    original = Head.__call__
    monkeypatch.setattr(Head, "__call__", lambda self, h, m: original(self, h, m) - self.bias)
    report = verify(bert_compiled, [token_pack], grid=((2, 9),), log=lambda s: None, strict=False)
    assert not report.ok and all(c.subject == "tags" for c in report.failures)


def test_cli_trains_and_predicts_token_tasks(bert_model, bert_compiled, head_data, tmp_path, capsys):
    from bitfit.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    out = run("train", "--model", bert_model, "--data", head_data["tokens"], "--out", tmp_path / "tags",
              "--task-kind", "token-classification", "--epochs", "1", "--quiet", "--name", "cli-tags")
    assert "cli-tags: dev entity_f1" in out
    run("train", "--model", bert_model, "--data", head_data["qa"], "--out", tmp_path / "qa", "--epochs", "1",
        "--quiet")
    assert load_pack(tmp_path / "qa").manifest.task_kind == "question-answering"  # recognised by its keys

    out = run("predict", "--compiled", bert_compiled, "--pack", tmp_path / "tags", "--text", "the zorbex movie")
    assert out.strip().startswith("the/") and len(out.split()) == 3
    words = write_rows(tmp_path / "words.jsonl", [{"tokens": ["ok", "city"]}, {"tokens": ["film"]}])
    records = [json.loads(x) for x in run("predict", "--compiled", bert_compiled, "--pack", tmp_path / "tags",
                                          "--file", words, "--json").splitlines()]
    assert [r["tokens"] for r in records] == [["ok", "city"], ["film"]] and len(records[0]["labels"]) == 2

    rows = read_jsonl(head_data["qa"])[:3]
    questions = write_rows(tmp_path / "q.jsonl", [{"question": r["question"], "context": r["context"]} for r in rows])
    records = [json.loads(x) for x in run("predict", "--compiled", bert_compiled, "--pack", tmp_path / "qa",
                                          "--file", questions, "--json").splitlines()]
    assert [r["context"][x["start"] : x["end"]] for r, x in zip(rows, records)] == [x["answer"] for x in records]
    out = run("predict", "--compiled", bert_compiled, "--pack", tmp_path / "qa", "--question", "what?",
              "--context", "the answer film now")
    answer, score, question = out.rstrip("\n").split("\t")
    assert answer in "the answer film now" and question == "what?"
    assert main(["predict", "--compiled", str(bert_compiled), "--pack", str(tmp_path / "qa"), "--text", "q"]) == 2
    assert "give a context for every question" in capsys.readouterr().err


def test_token_tasks_run_without_torch(bert_compiled, token_pack, qa_pack):
    from test_no_torch import run_blocked

    proc = run_blocked("""
        import json, sys
        import bitfit.runtime as runtime

        compiled, tags, qa = sys.argv[1:4]
        session = runtime.load(compiled, [tags, qa])
        words = session.run_tokens("tags", ["the zorbex movie"]).records()[0]
        answer = session.answer("qa", ["what?"], ["the answer film now"]).records()[0]
        blocked = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript")
        print(json.dumps({"tokens": words["tokens"], "answer": answer["answer"],
                          "loaded": sorted(m for m in sys.modules if m.split(".")[0] in blocked)}))
    """, str(bert_compiled), str(token_pack), str(qa_pack))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tokens"] == ["the", "zorbex", "movie"] and out["answer"] in "the answer film now"
    assert out["loaded"] == []
