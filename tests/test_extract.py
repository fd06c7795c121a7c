"""`bitfit extract`: full BitFit checkpoints (biases + head changed) become packs, proven exact or refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bitfit.encoder.biases import find_biases
from bitfit.encoder.model import model_from_pack
from bitfit.runtime import BitFitError, IncompatibleError, TaskSession, load_pack
from bitfit.training.extract import extract
from conftest import make_inputs

CHANGED = "bq,bm2,bLN2"  # the bias kinds the "fine-tuning" moves (bLNe too, by a constant)


def finetune(cls_name: str, base: Path, out: Path, *, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A 'BitFit fine-tuned' task model: base weights, some biases moved, a random head; saved to `out`."""
    import transformers as T

    torch.manual_seed(seed)
    model = getattr(T, cls_name).from_pretrained(str(base), attn_implementation="eager", **kwargs)
    encoder = model.base_model
    with torch.no_grad():
        for slot in find_biases(encoder, CHANGED):
            slot.parameter.add_(torch.randn_like(slot.parameter) * 0.2)
        encoder.embeddings.LayerNorm.bias.add_(0.1)
        pooler = getattr(encoder, "pooler", None)
        pooler = getattr(pooler, "dense", pooler)  # BERT: pooler.dense; ALBERT: pooler
        if pooler is not None:
            pooler.bias.add_(torch.randn_like(pooler.bias) * 0.2)
    model.save_pretrained(out)
    return model.eval()


def hf_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    if hasattr(out, "start_logits"):
        return torch.stack([out.start_logits, out.end_logits], dim=-1).numpy()
    return out.logits.numpy()


def torch_pack_logits(pack, base: Path, inputs: dict) -> np.ndarray:
    model = model_from_pack(pack, base=base).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


@pytest.fixture(scope="module")
def seq_model(bert_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "bert-seq"
    model = finetune("BertForSequenceClassification", bert_model, out, num_labels=3,
                     id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    return out, model


def test_extracted_pack_reproduces_the_finetuned_model(seq_model, bert_model, bert_compiled, token_inputs, tmp_path):
    path, model = seq_model
    result = extract(bert_model, path, tmp_path / "pack", task="sst")
    pack = load_pack(result.path)
    m = pack.manifest
    assert (m.task, m.task_kind, m.pooling, m.labels) == ("sst", "classification", "pooler", ["neg", "neutral", "pos"])
    assert result.changed_kinds == ("bq", "bm2", "bLN2", "bLNe") and m.bias_subset == list(result.changed_kinds)
    assert result.max_weight_diff == 0.0
    session = TaskSession(bert_compiled)
    session.register(pack)
    inputs = token_inputs(session, 4, 19)
    want = hf_logits(model, inputs)
    assert np.abs(session.logits("sst", inputs) - want).max() <= 1e-5
    assert np.abs(torch_pack_logits(pack, bert_model, inputs) - want).max() <= 1e-5
    # the head is the checkpoint's pooler + classifier, the pooler bias included
    assert np.array_equal(pack.tensors["head.pooler.bias"], model.bert.pooler.dense.bias.detach().numpy())


def test_one_changed_weight_is_refused_with_its_name(seq_model, bert_model, tmp_path):
    _, model = seq_model
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.key.weight[3, 5] += 0.012
    try:
        model.save_pretrained(tmp_path / "not-bitfit")
    finally:
        with torch.no_grad():
            model.bert.encoder.layer[1].attention.self.key.weight[3, 5] -= 0.012
    with pytest.raises(IncompatibleError) as e:
        extract(bert_model, tmp_path / "not-bitfit", tmp_path / "pack")
    message = str(e.value)
    assert "encoder.layer.1.attention.self.key.weight differs by up to 0.012" in message
    assert "(1 of 1024 values)" in message and "not a BitFit checkpoint" in message
    assert not (tmp_path / "pack").exists()
    # an explicit tolerance accepts it and says what it let through
    result = extract(bert_model, tmp_path / "not-bitfit", tmp_path / "pack", atol=0.02)
    assert result.max_weight_diff == pytest.approx(0.012, rel=1e-3) and result.notes


def test_other_base_and_other_config_are_refused(seq_model, tiny_model, bert_model, tmp_path):
    path, _ = seq_model
    with pytest.raises(IncompatibleError, match="frozen weight tensors differ"):
        extract(tiny_model("bert", 1), path, tmp_path / "a")
    import transformers as T

    model = T.BertForSequenceClassification.from_pretrained(str(path))
    model.config.hidden_act = "relu"
    model.save_pretrained(tmp_path / "relu")
    with pytest.raises(IncompatibleError, match="hidden_act"):
        extract(bert_model, tmp_path / "relu", tmp_path / "b")


@pytest.mark.parametrize("cls_name,kind", [("BertForTokenClassification", "token-classification"),
                                           ("BertForQuestionAnswering", "question-answering")])
def test_token_level_heads(cls_name, kind, bert_model, bert_compiled, token_inputs, tmp_path):
    labels = {"num_labels": 4} if kind == "token-classification" else {}
    model = finetune(cls_name, bert_model, tmp_path / "ft", **labels)
    pack = extract(bert_model, tmp_path / "ft", tmp_path / "pack").pack
    assert pack.manifest.task_kind == kind and pack.manifest.pooling == "none"
    session = TaskSession(bert_compiled)
    session.register(pack)
    inputs = token_inputs(session, 3, 15)
    want = hf_logits(model, inputs)
    got = session.logits(pack.name, inputs)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


def test_regression(bert_model, token_inputs, bert_compiled, tmp_path):
    model = finetune("BertForSequenceClassification", bert_model, tmp_path / "ft", num_labels=1,
                     problem_type="regression")
    pack = extract(bert_model, tmp_path / "ft", tmp_path / "pack").pack
    assert pack.manifest.task_kind == "regression" and pack.manifest.num_outputs == 1
    session = TaskSession(bert_compiled)
    session.register(pack)
    inputs = token_inputs(session, 2, 9)
    assert np.abs(session.logits(pack.name, inputs) - hf_logits(model, inputs)).max() <= 1e-5


@pytest.mark.parametrize("kind,cls_name", [("roberta", "RobertaForSequenceClassification"),
                                           ("xlm-roberta", "XLMRobertaForSequenceClassification"),
                                           ("mpnet", "MPNetForSequenceClassification"),
                                           ("albert", "AlbertForSequenceClassification")])
def test_other_sequence_heads_map_to_the_pooler(kind, cls_name, tiny_model, tmp_path):
    """RoBERTa-style dense -> tanh -> out_proj on <s> is exactly the pooler head (dropout is identity at
    inference); ALBERT has BERT's pooler under another name."""
    base = tiny_model(kind, 0)
    model = finetune(cls_name, base, tmp_path / "ft", num_labels=2)
    result = extract(base, tmp_path / "ft", tmp_path / "pack")
    pack = result.pack
    assert pack.manifest.pooling == "pooler" and result.changed_kinds == ("bq", "bm2", "bLN2", "bLNe")
    pooler = model.classifier.dense if hasattr(model.classifier, "dense") else model.albert.pooler
    assert np.array_equal(pack.tensors["head.pooler.weight"], pooler.weight.detach().numpy())
    inputs = make_inputs(3, 12, ["input_ids", "attention_mask"], model.config.vocab_size, 0)
    assert np.abs(torch_pack_logits(pack, base, inputs) - hf_logits(model, inputs)).max() <= 1e-5


@pytest.mark.parametrize("kind,cls_name,reason", [("distilbert", "DistilBertForSequenceClassification", "ReLU"),
                                                  ("electra", "ElectraForSequenceClassification", "GELU")])
def test_heads_without_an_exact_mapping_are_refused(kind, cls_name, reason, tiny_model, tmp_path):
    import transformers as T

    base = tiny_model(kind, 0)
    getattr(T, cls_name).from_pretrained(str(base), num_labels=2).save_pretrained(tmp_path / "ft")
    with pytest.raises(BitFitError, match=reason):
        extract(base, tmp_path / "ft", tmp_path / "pack")


def test_a_checkpoint_without_a_task_head_is_refused(bert_model, tmp_path):
    with pytest.raises(BitFitError, match="needs the task head"):
        extract(bert_model, bert_model, tmp_path / "pack")


def test_cli_extract(seq_model, bert_model, tmp_path, capsys):
    from bitfit.cli import main

    path, _ = seq_model
    assert main(["extract", "--base", str(bert_model), "--finetuned", str(path), "--out", str(tmp_path / "p"),
                 "--biases", "all"]) == 0
    assert "pooling pooler" in capsys.readouterr().out
    assert load_pack(tmp_path / "p").manifest.bias_subset == ["bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2",
                                                              "bLNe"]
    assert main(["extract", "--base", str(bert_model), "--finetuned", str(path), "--out", str(tmp_path / "q"),
                 "--biases", "bq"]) == 2
    assert "leaves out" in capsys.readouterr().err
