"""Every door locks (issue 12): each hostile input the issue lists, by class, gets a clear refusal naming the
problem and the fix -- never a plausible wrong answer, a traceback from deep inside, a hang, or a blow-up.

"Resealed" below means the edit also recomputed every checksum (what a deliberate forger would do), so the
check behind the checksums is the one under test; an edit that does not reseal is refused by the seal.
"""
from __future__ import annotations

import json
import os
import re
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import BitFitError, TaskSession, load_pack
from bitfit.runtime.compiled import BASE_BIASES_FILE, MANIFEST_FILE, TOKENIZER_FILE
from bitfit.runtime.errors import CompiledModelError, IncompatibleError, PackError
from bitfit.runtime.fs import sha256_file
from bitfit.runtime.pack import TENSORS_FILE
from conftest import fail_moves_into, reseal_compiled, write_sealed


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


def edit(pack_dir: Path, reseal: bool = True, **changes) -> None:
    data = {**manifest(pack_dir), **changes}
    if reseal:
        write_sealed(pack_dir / MANIFEST_FILE, data)
    else:
        (pack_dir / MANIFEST_FILE).write_text(json.dumps(data))


@pytest.fixture
def pack(pack_all, copy_dir) -> Path:
    return copy_dir(pack_all, "pack")


@pytest.fixture
def graph(bert_compiled, copy_dir) -> Path:
    return copy_dir(bert_compiled, "graph")


# -- wrong output, silently -------------------------------------------------------------------------------
def test_a_task_of_null_is_refused(pack):
    edit(pack, task=None)
    with pytest.raises(PackError, match=r"task must be 1 to 64 letters, digits, .*got null"):
        load_pack(pack)


def test_a_head_one_row_short_is_refused(pack):
    """Labels edited to three (resealed): the two-row head no longer agrees, which would drop a logit."""
    edit(pack, labels=["negative", "neutral", "positive"])
    with pytest.raises(PackError, match=r"the head must be head\.bias \[3\], head\.weight \[3, 32\] for 3 outputs"):
        load_pack(pack)


@pytest.mark.parametrize("change", ["labels", "pooling", "max_length"])
def test_a_hand_edit_of_the_manifest_is_refused(pack, change):
    value = {"labels": list(reversed(manifest(pack)["labels"])), "pooling": "cls",
             "max_length": manifest(pack)["max_length"] - 1}[change]
    edit(pack, reseal=False, **{change: value})
    with pytest.raises(PackError, match=r"does not match its own checksum \(manifest_sha256\)"):
        load_pack(pack)


@pytest.mark.parametrize("key", ["tensors_sha256", "manifest_sha256"])
def test_deleting_a_checksum_does_not_turn_the_check_off(pack, key):
    data = manifest(pack)
    del data[key]
    (pack / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(PackError, match=rf"lacks the required checksum {key}"):
        load_pack(pack)


def test_editing_the_tokenizer_or_base_biases_is_refused(graph):
    tokenizer = json.loads((graph / TOKENIZER_FILE).read_text())
    tokenizer["normalizer"]["lowercase"] = not tokenizer["normalizer"]["lowercase"]
    (graph / TOKENIZER_FILE).write_text(json.dumps(tokenizer))
    with pytest.raises(CompiledModelError, match=r"tokenizer\.json in .* do not match the checksums"):
        TaskSession(graph)
    data = manifest(graph)
    del data["files"]
    write_sealed(graph / MANIFEST_FILE, data)
    with pytest.raises(CompiledModelError, match=r"missing keys files"):
        TaskSession(graph)


def test_base_biases_of_another_shape_are_refused_even_resealed(graph):
    from safetensors.numpy import load_file, save_file

    base = load_file(str(graph / BASE_BIASES_FILE))
    base["layer.0.bq"] = base["layer.0.bq"][:-1]
    save_file(base, str(graph / BASE_BIASES_FILE))
    with pytest.raises(CompiledModelError, match=r"base_biases\.safetensors in .* do not match the checksums"):
        TaskSession(graph)
    reseal_compiled(graph)
    with pytest.raises(CompiledModelError, match=r"layer\.0\.bq is F32\[31\] in the file but float32\[32\] is declared"):
        TaskSession(graph)


def test_a_pack_missing_one_layer_of_a_kind_it_trains_is_refused(pack, bert_compiled):
    """bv listed, layer.1.bv left out of manifest and tensors alike (resealed): the base value would stand in."""
    from safetensors.numpy import load_file, save_file

    data = manifest(pack)
    data["biases"] = [b for b in data["biases"] if b["name"] != "layer.1.bv"]
    tensors = load_file(str(pack / TENSORS_FILE))
    del tensors["layer.1.bv"]
    save_file(tensors, str(pack / TENSORS_FILE), metadata={"bitfit": json.dumps(
        {"base_fingerprint": data["base_fingerprint"], "format": "bitfit-task-pack", "task": data["task"]},
        sort_keys=True)})
    data["tensors_sha256"] = sha256_file(pack / TENSORS_FILE)
    write_sealed(pack / MANIFEST_FILE, data)
    loaded = load_pack(pack)  # consistent in itself
    with pytest.raises(IncompatibleError, match=r"trains .*bv.* but lacks 1 of the graph's inputs of those kinds "
                                                r"\(layer\.1\.bv\)"):
        TaskSession(bert_compiled).register(loaded)


def test_pooler_tensors_with_mean_pooling_are_refused(pack):
    data = manifest(pack)
    data["head"] += [{"name": "head.pooler.weight", "shape": [32, 32], "dtype": "float32"},
                     {"name": "head.pooler.bias", "shape": [32], "dtype": "float32"}]
    write_sealed(pack / MANIFEST_FILE, data)
    with pytest.raises(PackError, match=r"the head must be head\.bias \[2\], head\.weight \[2, 32\] .*pooling 'mean'"):
        load_pack(pack)


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200b", "\x00\x01\x02", "\u2060"])
def test_text_that_tokenizes_to_nothing_is_refused(bert_compiled, pack_all, text):
    session = TaskSession(bert_compiled)
    task = session.register(pack_all)
    with pytest.raises(BitFitError, match=r"texts\[1\] (is empty|gives no token)"):
        session.run(task, ["good fun", text])
    with pytest.raises(BitFitError, match=r"texts\[1\] (is empty|gives no token)"):
        session.run_mixed([(task, "good fun"), (task, text)])


@pytest.mark.parametrize("text", ["\u2603", "\u2603 \U0001f600", "\u4f60\u597d", " \u00df\u2603 "])
def test_text_of_only_unknown_characters_is_refused(bert_compiled, pack_all, pack_pairs, text):
    """Characters outside the vocabulary all become [UNK]: a text of nothing else would be answered from no
    content at all, with a confident label. Refused, naming the text; a text with one known word still runs."""
    session = TaskSession(bert_compiled)
    task, pairs = session.register(pack_all), session.register(pack_pairs)
    only_unknown = r"texts\[1\] gives only the unknown token \[UNK\] \(none of its characters is in the tokenizer"
    with pytest.raises(BitFitError, match=only_unknown):
        session.run(task, ["good fun", text])
    with pytest.raises(BitFitError, match=only_unknown):
        session.run_mixed([(task, "good fun"), (task, text)])
    with pytest.raises(BitFitError, match=r"text_pairs\[0\] gives only the unknown token"):
        session.run(pairs, ["good fun"], [text])
    assert session.run(task, [f"good {text}"]).labels  # known words beside unknown ones: answered


@pytest.mark.parametrize("labels, match", [
    (["pos", "neg", "pos"], r"labels \['pos'\] appear more than once"),
    ("ab", r"labels must be a list"),
])
def test_bad_label_lists_are_refused(pack, labels, match):
    edit(pack, labels=labels)
    with pytest.raises(PackError, match=match):
        load_pack(pack)


@pytest.mark.parametrize("field, value, match", [
    ("input_ids", -1, r"input_ids must lie in \[0, 135\), got values from -1"),
    ("input_ids", 135, r"input_ids must lie in \[0, 135\), got values from .* to 135"),
    ("token_type_ids", 2, r"token_type_ids must lie in \[0, 2\)"),
    ("attention_mask", 3, r"attention_mask must lie in \[0, 2\)"),
])
def test_raw_token_ids_out_of_range_are_refused(bert_compiled, pack_all, token_inputs, field, value, match):
    session = TaskSession(bert_compiled)
    task = session.register(pack_all)
    inputs = token_inputs(session, 2, 6)
    inputs[field] = inputs[field].copy()
    inputs[field][0, 1] = value
    with pytest.raises(BitFitError, match=match):
        session.logits(task, inputs)
    inputs = token_inputs(session, 2, 6)
    inputs["attention_mask"] = inputs["attention_mask"].copy()
    inputs["attention_mask"][1] = 0
    with pytest.raises(BitFitError, match=r"row 1 has no attended token"):
        session.hidden_states(inputs)


# -- crash, 500, hang or blow-up ---------------------------------------------------------------------------
@pytest.mark.parametrize("changes, match", [
    ({"task": 7}, r"task must be 1 to 64 letters, digits, .*got 7"),
    ({"max_length": "abc"}, r"max_length must be a whole number from 1 to 1048576, got 'abc'"),
    ({"hidden_size": 1.5}, r"hidden_size must be a whole number"),
    ({"text_pair": "yes"}, r"text_pair must be true or false"),
    ({"biases": [{"name": "layer.0.bq", "shape": ["x"], "dtype": "float32", "kind": "bq", "layer": 0}]},
     r"biases must be a list of an object with name, shape, dtype"),
    ({"extra": 1}, r"unknown keys extra"),
])
def test_wrong_types_in_a_manifest_are_refused(pack, changes, match):
    edit(pack, **changes)
    with pytest.raises(PackError, match=match):
        load_pack(pack)


def test_a_manifest_that_is_a_directory_or_a_fifo_is_refused_without_hanging(pack):
    (pack / MANIFEST_FILE).unlink()
    (pack / MANIFEST_FILE).mkdir()
    with pytest.raises(PackError, match=r"manifest\.json is a directory"):
        load_pack(pack)
    (pack / MANIFEST_FILE).rmdir()
    os.mkfifo(pack / MANIFEST_FILE)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_refusal(lambda: load_pack(pack))), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "load_pack hung on a FIFO"
    assert isinstance(outcome[0], PackError) and "is a FIFO, not a regular file" in str(outcome[0])


def _refusal(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - returned for the assertion
        return e
    return None


def test_a_header_declaring_2_gb_is_refused_before_anything_is_read(pack):
    """The safetensors header claims a 2 GB tensor (the file and every checksum forged to match): refused from
    the header, allocating next to nothing."""
    raw = (pack / TENSORS_FILE).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["layer.0.bq"]["shape"] = [500_000_000]
    header["layer.0.bq"]["data_offsets"][1] = header["layer.0.bq"]["data_offsets"][0] + 2_000_000_000
    text = json.dumps(header).encode()
    (pack / TENSORS_FILE).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    edit(pack, tensors_sha256=sha256_file(pack / TENSORS_FILE))
    tracemalloc.start()
    try:
        with pytest.raises(PackError, match=r"'layer\.0\.bq' declares F32\[500000000\] at bytes .* do not hold"):
            load_pack(pack)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


# -- the command line: every bad flag value exits 2 with one line naming the fix ----------------------------
@pytest.mark.parametrize("argv, message", [
    (["compile", "--model", "M", "--out", "O", "--opset", "99"], "argument --opset: must be from 17 to 20, got 99"),
    (["train", "--model", "M", "--data", "D", "--out", "O", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["train", "--model", "M", "--data", "D", "--out", "O", "--max-length", "0"], "argument --max-length: must be from 1"),
    (["train", "--model", "M", "--data", "D", "--out", "O", "--train-size", "-5"],
     "argument --train-size: must be at least 1, got -5"),
    (["predict", "--compiled", "C", "--pack", "P", "--text", "x", "--threads", "100000"],
     "argument --threads: must be from 1 to 1024, got 100000"),
    (["predict", "--compiled", "C", "--pack", "P", "--text", "x", "--threads", "-1"], "argument --threads: must be from 1"),
    (["verify", "--compiled", "C", "--atol", "-1"], "argument --atol: must be a finite number >= 0"),
    (["serve", "--compiled", "C", "--packs", "P", "--port", "70000"], "argument --port: must be from 1 to 65535"),
    (["train", "--model", "M", "--data", "D", "--out", "O", "--epochs", "two"], "argument --epochs: must be a whole number"),
])
def test_bad_flag_values_exit_2_before_any_work(argv, message, capsys):
    from bitfit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"bitfit {argv[0]}: error: argument")


def test_an_unwritable_out_is_refused_before_training(bert_model, data_files, tmp_path, capsys, monkeypatch):
    from bitfit.training import train as train_module

    from bitfit.cli import main

    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("x")
    code = main(["train", "--model", str(bert_model), "--data", str(data_files["sentiment"]), "--out",
                 str(tmp_path / "file" / "pack")])
    assert code == 2 and "is not a writable directory" in capsys.readouterr().err


def test_a_non_utf8_file_of_texts_and_python_api_values_are_refused(bert_compiled, pack_all, tmp_path, capsys):
    from bitfit.cli import main

    (tmp_path / "texts.txt").write_bytes(b"good\n\xff\xfe bad\n")
    code = main(["predict", "--compiled", str(bert_compiled), "--pack", str(pack_all), "--file",
                 str(tmp_path / "texts.txt")])
    assert code == 2 and "is not UTF-8 (invalid start byte at byte 5)" in capsys.readouterr().err
    for threads in (0, -1, 100_000, 2.5):
        with pytest.raises(BitFitError, match=r"threads must be a whole number from 1 to 1024"):
            TaskSession(bert_compiled, threads=threads)


def test_a_port_in_use_is_refused_with_exit_2(bert_compiled, pack_all, tmp_path, capsys):
    import socket

    from bitfit.cli import main

    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "a").symlink_to(pack_all)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code = main(["serve", "--compiled", str(bert_compiled), "--packs", str(packs), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_verify_fails_a_graph_whose_checksum_does_not_match(graph, pack_all, capsys):
    from bitfit.cli import main

    data = bytearray((graph / "model.onnx").read_bytes())
    data[-10] ^= 0x01
    (graph / "model.onnx").write_bytes(bytes(data))
    assert main(["verify", "--compiled", str(graph), "--pack", str(pack_all)]) == 1
    out = capsys.readouterr().out
    assert "files match their checksums" in out and "changed: model.onnx" in out


# -- data loss ---------------------------------------------------------------------------------------------
def test_compile_overwrite_keeps_the_old_graph_when_the_move_fails(bert_model, graph, monkeypatch):
    from bitfit.compiler.compile import compile as compile_model

    before = {p.name: p.read_bytes() for p in graph.iterdir()}
    fail_moves_into(graph, monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        compile_model(bert_model, graph, overwrite=True, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in graph.iterdir()} == before
    assert sorted(p.name for p in graph.parent.iterdir()) == ["graph"]


def test_a_refused_value_is_never_half_written(pack, tmp_path):
    """save_pack of an invalid pack leaves neither the target nor a temporary beside it."""
    loaded = load_pack(pack)
    loaded.tensors["head.bias"] = np.array([np.inf, 0], np.float32)
    with pytest.raises(PackError, match="NaN or inf"):
        from bitfit.runtime import save_pack

        save_pack(loaded, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


# -- the bias bank's map ------------------------------------------------------------------------------------
@pytest.fixture
def bank(bert_compiled, pack_all, pack_min, tmp_path) -> Path:
    from bitfit.exporters.bank import write_bank

    return write_bank(bert_compiled, [pack_all, pack_min], tmp_path / "bank")


@pytest.mark.parametrize("edit_map, reseal, match", [
    (lambda m: m["tasks"][0].update(labels=list(reversed(m["tasks"][0]["labels"]))), False, r"own checksum"),
    (lambda m: m["tasks"][1].update(offset=0), True, r"has id 1 at offset 0"),
    (lambda m: m["biases"][0].update(offset=10**9), True, r"lies outside its block"),
    (lambda m: m["tasks"][0]["heads"][0].update(offset="0"), True, r"tasks must be a list of an object"),
    (lambda m: m.update(byte_order="big"), True, r"byte_order must be 'little'"),
])
def test_a_bank_map_edited_by_hand_is_refused(bank, edit_map, reseal, match):
    from bitfit.runtime.bank import MAP_FILE, read_bank

    layout = json.loads((bank / MAP_FILE).read_text())
    edit_map(layout)
    if reseal:
        write_sealed(bank / MAP_FILE, layout)
    else:
        (bank / MAP_FILE).write_text(json.dumps(layout))
    with pytest.raises(PackError, match=match):
        read_bank(bank)


# -- issue 23 --------------------------------------------------------------------------------------------
# class 4: a max_length that cannot hold the special tokens plus a token of each text
@pytest.mark.parametrize("changes, least", [
    ({"max_length": 1}, 3), ({"max_length": 2}, 3),
    ({"max_length": 4, "text_pair": True}, 5),  # [CLS] a [SEP] b [SEP]
])
def test_a_sealed_manifest_with_a_max_length_too_short_for_a_token_is_refused(pack, changes, least):
    edit(pack, **changes)
    with pytest.raises(PackError, match=rf"max_length {changes['max_length']} cannot hold the special tokens and one "
                                        rf"token of .*: it must be at least {least}"):
        load_pack(pack)
    edit(pack, **{**changes, "max_length": least})  # the shortest that holds one token loads
    assert load_pack(pack).manifest.max_length == least


def test_register_asks_the_graphs_tokenizer_how_many_special_tokens_it_adds(bert_compiled, pack, monkeypatch):
    """The manifest's floor is BERT's (2 around a text, 3 around a pair); a graph whose tokenizer adds more
    (RoBERTa: <s> a </s></s> b </s>) refuses a pack that leaves no room on it."""
    edit(pack, max_length=3)
    session = TaskSession(bert_compiled)
    assert (session.encoder.special_tokens(False), session.encoder.special_tokens(True)) == (2, 3)
    session.register(pack, name="fits")
    monkeypatch.setattr(session.encoder, "special_tokens", lambda pair: 3)
    with pytest.raises(PackError, match=r"has max_length 3, less than this graph's tokenizer needs .* \(4\)"):
        session.register(pack, name="tight")


# class 5: --overwrite replaces only a directory of the same kind that this tool wrote
@pytest.fixture
def web_app(tmp_path) -> Path:
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "index.html").write_text("<html></html>")
    (app / "src" / "main.js").write_text("start()")
    (app / "manifest.json").write_text(json.dumps({"name": "App", "icons": [], "start_url": "/"}))
    return app


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, target, found", [
    ("compile", "pack", "declares format 'bitfit-task-pack' where a compiled model directory's declares "
                        "'bitfit-compiled'"),
    ("train", "graph", "declares format 'bitfit-compiled' where a task pack's declares 'bitfit-task-pack'"),
    ("compile", "web_app", r"declares no format \(another tool wrote it\) where a compiled model directory's"),
    ("train", "web_app", r"declares no format \(another tool wrote it\) where a task pack's"),
])
def test_overwrite_never_replaces_a_directory_of_another_kind(command, target, found, request, bert_model, data_files,
                                                              capsys, monkeypatch):
    from bitfit.training import train as train_module

    from bitfit.cli import main

    out = request.getfixturevalue(target)
    before = tree(out)
    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = (["train", "--data", str(data_files["sentiment"]), "--quiet"] if command == "train" else ["compile"])
    code = main([*argv, "--model", str(bert_model), "--out", str(out), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(rf"{out} is not a .*: its manifest\.json {found}.*; refusing to replace it, even with "
                     r"--overwrite: choose another output path", err), err
    assert tree(out) == before


def test_overwrite_replaces_a_directory_of_the_same_kind(bert_model, graph, capsys):
    from bitfit.cli import main

    (graph / "model.onnx").write_bytes(b"stale")  # what the new graph replaces
    assert main(["compile", "--model", str(bert_model), "--out", str(graph), "--overwrite"]) == 0
    assert TaskSession(graph).manifest.format == "bitfit-compiled"
    assert sorted(p.name for p in graph.parent.iterdir()) == ["graph"]


# class 9: one task-name alphabet, refused wherever a name enters
BAD_NAMES = ["a/b", "..", ".hidden", "a b", "x" * 65, "caf\u00e9", "a\\b", "-x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_sealed_manifest_whose_task_is_no_task_name_is_refused(pack, name):
    edit(pack, task=name)
    with pytest.raises(PackError, match=r"task must be 1 to 64 letters, digits, '\.', '_' or '-', starting with a "
                                        r"letter or digit, got"):
        load_pack(pack)


@pytest.mark.parametrize("name", ["a/b", "", "..", 7])
def test_register_refuses_a_name_outside_the_alphabet(bert_compiled, pack_all, name):
    session = TaskSession(bert_compiled)
    with pytest.raises(BitFitError, match=r"is not 1 to 64 letters, .*: give register\(\) a name the server can "
                                          r"route to"):
        session.register(pack_all, name=name)
    assert session.register(pack_all, name="A.b_c-9") == "A.b_c-9" and session.tasks == ["A.b_c-9"]


def test_serve_refuses_a_pack_whose_task_is_no_task_name_and_serves_the_rest(bert_compiled, pack_all, copy_dir,
                                                                           tmp_path):
    from bitfit.serve.packdir import PackDirectory

    packs = tmp_path / "packs"
    packs.mkdir()
    copy_dir(pack_all, "packs/good")
    edit(copy_dir(pack_all, "packs/slash"), task="a/b")
    session = TaskSession(bert_compiled)
    result = PackDirectory(packs, session).reload()
    assert result.added == [load_pack(pack_all).name] and list(result.refused) == ["slash"]
    assert "task must be 1 to 64 letters" in result.refused["slash"] and "'a/b'" in result.refused["slash"]
    assert session.tasks == [load_pack(pack_all).name]


@pytest.mark.parametrize("entry", ["extract", "import_peft"])
def test_extract_and_import_peft_refuse_a_task_name_before_loading(entry, tmp_path):
    from bitfit.training.extract import extract
    from bitfit.training.peft_import import import_peft

    run = {"extract": lambda **k: extract(tmp_path / "base", tmp_path / "nothing", tmp_path / "out", **k),
           "import_peft": lambda **k: import_peft(tmp_path / "base", tmp_path / "nothing", tmp_path / "out", **k)}
    with pytest.raises(BitFitError, match=r"task name 'a/b' is not .*: name the task with --task"):
        run[entry](task="a/b")
    (tmp_path / "my adapter").mkdir()
    with pytest.raises(BitFitError, match=r"task name 'my adapter' is not .*: name the task with --task"):
        (extract if entry == "extract" else import_peft)(tmp_path / "base", tmp_path / "my adapter", tmp_path / "out")
