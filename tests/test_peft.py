"""`bitfit import-peft`: bias-only PEFT adapters (BEFT; LoRA bias="all" with untrained matrices) become packs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bitfit.encoder.model import model_from_pack
from bitfit.runtime import BitFitError, TaskSession, load_pack
from bitfit.training.peft_import import import_peft
from conftest import make_inputs

peft = pytest.importorskip("peft")


def task_model(base: Path, cls_name: str = "BertForSequenceClassification", **kwargs):
    import transformers as T

    return getattr(T, cls_name).from_pretrained(str(base), attn_implementation="eager", **kwargs)


def perturb(model, seed: int = 0, where=lambda name: True) -> None:
    """Stand-in for training: move every trainable tensor (adapter biases, saved head) chosen by `where`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and where(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def peft_logits(model, inputs: dict) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()


@pytest.fixture(scope="module")
def beft_adapter(bert_model, tmp_path_factory):
    torch.manual_seed(0)
    config = peft.BeftConfig(task_type="SEQ_CLS", target_modules=["query", "value", "dense"])
    model = peft.get_peft_model(task_model(bert_model, num_labels=3), config)
    perturb(model)
    out = tmp_path_factory.mktemp("peft") / "beft"
    model.save_pretrained(out)
    return out, model


def test_beft_adapter_imports_exactly(beft_adapter, bert_model, bert_compiled, token_inputs, tmp_path):
    path, model = beft_adapter
    result = import_peft(bert_model, path, tmp_path / "pack", labels=["a", "b", "c"])
    pack = load_pack(result.path)
    m = pack.manifest
    # query, value and every "dense" (attention output, intermediate, output, and the pooler -> head)
    assert m.bias_subset == ["bq", "bv", "bm1", "bm2", "bm3"] and m.pooling == "pooler"
    assert m.labels == ["a", "b", "c"] and m.metrics["peft_type"] == "BEFT"
    # BEFT stores deltas: the pack holds base + delta
    base_bias = task_model(bert_model, num_labels=3).bert.encoder.layer[0].attention.self.query.bias.detach()
    delta = model.base_model.model.bert.encoder.layer[0].attention.self.query.beft_bias["default"].detach().flatten()
    assert np.array_equal(pack.tensors["layer.0.bq"], (base_bias + delta).numpy())
    session = TaskSession(bert_compiled)
    session.register(pack)
    inputs = token_inputs(session, 4, 16)
    want = peft_logits(model, inputs)
    assert np.abs(session.logits(m.task, inputs) - want).max() <= 1e-5
    with torch.no_grad():
        got = model_from_pack(pack, base=bert_model).eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert np.abs(got.numpy() - want).max() <= 1e-5


def test_lora_bias_all_with_untrained_matrices_imports(bert_model, bert_compiled, token_inputs, tmp_path):
    """LoRA's bias="all" trains (and saves) bias VALUES; lora_B stays zero here, so B @ A changes no weight."""
    torch.manual_seed(1)
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], bias="all", r=2)
    model = peft.get_peft_model(task_model(bert_model, num_labels=2), config)
    perturb(model, seed=1, where=lambda n: "lora_" not in n)
    model.save_pretrained(tmp_path / "lora")
    pack = import_peft(bert_model, tmp_path / "lora", tmp_path / "pack").pack
    assert pack.manifest.bias_subset == ["bq", "bk", "bv", "bm1", "bLN1", "bm2", "bm3", "bLN2", "bLNe"]
    session = TaskSession(bert_compiled)
    session.register(pack)
    inputs = token_inputs(session, 3, 12)
    assert np.abs(session.logits(pack.name, inputs) - peft_logits(model, inputs)).max() <= 1e-5

    perturb(model, seed=2, where=lambda n: "lora_B" in n)  # now the LoRA matrices change weights
    model.save_pretrained(tmp_path / "lora-trained")
    with pytest.raises(BitFitError, match=r"encoder\.layer\.0\.attention\.self\.query\.lora_B\.weight \(a trained LoRA"):
        import_peft(bert_model, tmp_path / "lora-trained", tmp_path / "pack2")


def test_roberta_beft_regression(tiny_model, tmp_path):
    base = tiny_model("roberta", 0)
    torch.manual_seed(2)
    config = peft.BeftConfig(task_type="SEQ_CLS", target_modules=["key", "dense"])
    model = peft.get_peft_model(task_model(base, "RobertaForSequenceClassification", num_labels=1), config)
    perturb(model, seed=3)
    model.save_pretrained(tmp_path / "beft")
    pack = import_peft(base, tmp_path / "beft", tmp_path / "pack").pack
    assert pack.manifest.task_kind == "regression" and pack.manifest.pooling == "pooler"
    inputs = make_inputs(3, 10, ["input_ids", "attention_mask"], model.config.vocab_size, 0)
    with torch.no_grad():
        got = model_from_pack(pack, base=base).eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert np.abs(got.numpy() - peft_logits(model, inputs)).max() <= 1e-5


def test_adapters_that_do_not_map_are_refused(beft_adapter, bert_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = beft_adapter
    ia3 = peft.get_peft_model(task_model(bert_model, num_labels=3),
                              peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                                             feedforward_modules=["output.dense"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(BitFitError, match="IA3 adapter: only bias-only adapters"):
        import_peft(bert_model, tmp_path / "ia3", tmp_path / "p1")

    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, str(headless / "adapter_model.safetensors"))
    with pytest.raises(BitFitError, match="no trained task head"):
        import_peft(bert_model, headless, tmp_path / "p2")

    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    weight = "base_model.model.bert.encoder.layer.0.attention.self.key.weight"
    save_file({**tensors, weight: torch.zeros(32, 32)}, str(extra / "adapter_model.safetensors"))
    with pytest.raises(BitFitError, match=r"layer\.0\.attention\.self\.key\.weight \(not a bias\)"):
        import_peft(bert_model, extra, tmp_path / "p3")
    assert not any((tmp_path / p).exists() for p in ("p1", "p2", "p3"))


def test_cli_import_peft(beft_adapter, bert_model, tmp_path, capsys):
    from bitfit.cli import main

    path, _ = beft_adapter
    out = tmp_path / "pack"
    assert main(["import-peft", "--base", str(bert_model), "--adapter", str(path), "--out", str(out),
                 "--task", "beft-task", "--labels", "x,y,z"]) == 0
    assert "beft-task" in capsys.readouterr().out and load_pack(out).manifest.labels == ["x", "y", "z"]
    assert main(["import-peft", "--base", str(bert_model), "--adapter", str(path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
