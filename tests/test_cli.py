"""The `bitfit` command (bitfit.cli.main): exit codes 0 ok, 1 a check failed, 2 bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from bitfit.runtime import TaskSession, load_pack, read_manifest

from bitfit.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def cli_pack(cli_workdir, bert_model, data_files):
    """A pack trained through the command line (module-scoped: trained once)."""
    out = cli_workdir / "pack"
    code = main(["train", "--model", str(bert_model), "--data", str(data_files["sentiment"]), "--out", str(out),
                 "--epochs", "1", "--biases", "bq,bm2", "--name", "cli-task", "--quiet", "--seed", "1"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cli_compiled(cli_workdir, bert_model):
    out = cli_workdir / "compiled"
    assert main(["compile", "--model", str(bert_model), "--out", str(out)]) == 0
    return out


def test_train_writes_a_pack(cli_pack, capsys):
    pack = load_pack(cli_pack)
    assert pack.manifest.task == "cli-task"
    assert pack.manifest.bias_subset == ["bq", "bm2"]
    assert pack.manifest.metrics["hyperparameters"]["epochs"] == 1
    assert pack.manifest.metrics["hyperparameters"]["seed"] == 1


def test_train_prints_a_summary(bert_model, data_files, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--model", bert_model, "--data", data_files["scores"], "--out",
                         tmp_path / "p", "--epochs", "1", "--quiet")
    assert code == 0, err
    assert "scores: dev spearman" in out and str(tmp_path / "p") in out
    assert load_pack(tmp_path / "p").manifest.task_kind == "regression"


def test_compile_writes_a_compiled_directory(cli_compiled, bert_compiled):
    m = read_manifest(cli_compiled)
    assert m.base_fingerprint == read_manifest(bert_compiled).base_fingerprint
    assert len(m.bias_inputs) == 17
    TaskSession(cli_compiled)  # loads, checksum and inputs agree


def test_predict_json(cli_compiled, cli_pack, capsys):
    texts = ["a good movie", "awful boring plot", "who won"]
    args = ["predict", "--compiled", cli_compiled, "--pack", cli_pack, "--json"]
    for t in texts:
        args += ["--text", t]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == len(texts)
    pack = load_pack(cli_pack)
    session = TaskSession(cli_compiled)
    expected = session.run(session.register(pack), texts)
    for record, label, logits in zip(records, expected.labels, expected.logits):
        assert set(record) == {"label", "scores", "logits"}
        assert record["label"] == label
        assert set(record["scores"]) == set(pack.manifest.labels)
        assert sum(record["scores"].values()) == pytest.approx(1.0)
        np.testing.assert_allclose(record["logits"], logits, rtol=1e-6)


def test_predict_plain_text_and_file(cli_compiled, cli_pack, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("good fun\n\nboring plot\n")
    code, out, err = run(capsys, "predict", "--compiled", cli_compiled, "--pack", cli_pack, "--file", texts)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    labels = load_pack(cli_pack).manifest.labels
    for line, text in zip(lines, ["good fun", "boring plot"]):
        label, score, shown = line.split("\t")
        assert label in labels and 0.5 <= float(score) <= 1.0 and shown == text


def test_predict_pairs_from_jsonl(bert_compiled, pack_pairs, tmp_path, capsys):
    rows = tmp_path / "pairs.jsonl"
    rows.write_text(json.dumps({"text": "who is it", "text_pair": "it is me"}) + "\n"
                    + json.dumps({"text": "fun", "text_pair": "not fun"}) + "\n")
    code, out, err = run(capsys, "predict", "--compiled", bert_compiled, "--pack", pack_pairs, "--file", rows, "--json")
    assert code == 0, err
    assert len(out.splitlines()) == 2
    # without the second texts, the pair task refuses
    code, out, err = run(capsys, "predict", "--compiled", bert_compiled, "--pack", pack_pairs, "--text", "who")
    assert code == 2 and "give text_pairs, one per text" in err


def test_verify_passes_with_default_tolerance(cli_compiled, cli_pack, pack_all, tmp_path, capsys):
    report = tmp_path / "report.json"
    code, out, err = run(capsys, "verify", "--compiled", cli_compiled, "--pack", cli_pack, "--pack", pack_all,
                         "--report", report)
    assert code == 0, out + err
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("PASS") and "fp32" in verdict and "0.0001" in verdict
    data = json.loads(report.read_text())
    assert data["ok"] is True and data["atol"] == 1e-4
    subjects = {c["subject"] for c in data["checks"]}
    assert {"graph", "cli-task", load_pack(pack_all).manifest.task} <= subjects
    assert all(c["passed"] for c in data["checks"])


def test_verify_with_impossible_tolerance_exits_1(cli_compiled, cli_pack, capsys):
    code, out, err = run(capsys, "verify", "--compiled", cli_compiled, "--pack", cli_pack, "--atol", "1e-12")
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("FAIL: ") and "1e-12" in verdict
    assert "error:" not in err


def test_verify_pack_of_another_base_exits_2(bert_compiled, pack_other_base, capsys):
    code, out, err = run(capsys, "verify", "--compiled", bert_compiled, "--pack", pack_other_base)
    assert code == 2
    assert "bitfit verify: error:" in err and "fingerprint" in err
    assert "Traceback" not in err


def test_verify_with_another_base_model_exits_2(bert_compiled, tiny_model, capsys):
    code, out, err = run(capsys, "verify", "--compiled", bert_compiled, "--model", tiny_model("bert", 1))
    assert code == 2
    assert "is not the model the graph was compiled from" in err and "pass --model" in err


def test_inspect_pack_and_compiled(cli_pack, cli_compiled, capsys):
    code, out, err = run(capsys, "inspect", cli_pack)
    assert code == 0, err
    pack = load_pack(cli_pack)
    assert "task           cli-task (classification)" in out
    assert pack.manifest.base_fingerprint in out
    assert "bq,bm2: 4 tensors" in out
    assert f"mean pooling -> linear {pack.manifest.hidden_size} x 2" in out
    code, out, err = run(capsys, "inspect", cli_compiled)
    assert code == 0, err
    assert "logits [batch, labels], token_logits [batch, sequence, labels]" in out
    assert "head.weight" in out
    code, out, err = run(capsys, "inspect", cli_pack, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["manifest"] == pack.manifest.to_json()
    assert data["pack_bytes"] == sum(f.stat().st_size for f in cli_pack.iterdir())
    code, out, err = run(capsys, "inspect", cli_compiled, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["manifest"] == read_manifest(cli_compiled).to_json()
    assert data["model_bytes"] == (cli_compiled / "model.onnx").stat().st_size


def test_inspect_a_file_inside_a_pack(cli_pack, capsys):
    """load_pack takes a path to a file in the pack; inspect does too."""
    code, out, err = run(capsys, "inspect", cli_pack / "manifest.json", "--json")
    assert code == 0, err
    assert json.loads(out)["pack_bytes"] == sum(f.stat().st_size for f in cli_pack.iterdir())
    code, out, err = run(capsys, "inspect", cli_pack / "manifest.json")
    assert code == 0, err
    assert out.startswith(f"task pack      {cli_pack}\n")


@pytest.mark.parametrize("name", ["tensors.safetensors", "model.onnx"])
def test_inspect_a_binary_file_exits_2(cli_pack, cli_compiled, capsys, name):
    path = (cli_pack if name.endswith("safetensors") else cli_compiled) / name
    code, out, err = run(capsys, "inspect", path)
    assert code == 2
    assert err.startswith("bitfit inspect: error: ") and "neither a task pack nor a compiled model" in err


@pytest.mark.parametrize("argv, message", [
    (["predict", "--compiled", "{compiled}", "--pack", "{tmp}/no-such-pack", "--text", "hi"], r"no task pack at"),
    (["predict", "--compiled", "{tmp}/no-such-graph", "--pack", "{pack}", "--text", "hi"], r"no compiled model at"),
    (["predict", "--compiled", "{compiled}", "--pack", "{pack}"], r"nothing to predict: pass --text"),
    (["predict", "--compiled", "{compiled}", "--pack", "{pack}", "--file", "{tmp}/none.txt"], r"none\.txt is missing: give a UTF-8 text file"),
    (["train", "--model", "{model}", "--data", "movie-sentimentt", "--out", "{tmp}/p"],
     r"no data file at movie-sentimentt: give a CSV/TSV/JSONL file or one of movie-sentiment"),
    (["train", "--model", "{model}", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/p"], r"no data file at"),
    (["train", "--model", "{model}", "--data", "{data}", "--out", "{pack}"], r"already exists.*--overwrite"),
    (["train", "--model", "{model}", "--data", "{data}", "--out", "{tmp}/p", "--biases", "bq,zz"],
     r"unknown bias kinds \['zz'\]"),
    (["train", "--model", "{tmp}/no-model", "--data", "{data}", "--out", "{tmp}/p"], r"cannot load a tokenizer"),
    (["compile", "--model", "{model}", "--out", "{compiled}"], r"already exists"),
    (["compile", "--model", "{model}", "--out", "{tmp}/c", "--biases", "nope"], r"unknown bias kinds"),
    (["inspect", "{tmp}/nothing"], r"neither a task pack nor a compiled model directory"),
    (["verify", "--compiled", "{tmp}/nothing"], r"no compiled model at"),
])
def test_bad_input_exits_2_with_an_error_line(argv, message, tmp_path, capsys, bert_model, bert_compiled, pack_all,
                                              data_files):
    import re

    values = {"tmp": tmp_path, "model": bert_model, "compiled": bert_compiled, "pack": pack_all,
              "data": data_files["sentiment"]}
    code, out, err = run(capsys, *(a.format(**values) for a in argv))
    assert code == 2
    assert err.startswith(f"bitfit {argv[0]}: error: "), err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists()


def test_corrupt_pack_exits_2(bert_compiled, pack_all, copy_dir, capsys):
    broken = copy_dir(pack_all)
    (broken / "tensors.safetensors").write_bytes(b"\x00" * 16)
    code, out, err = run(capsys, "predict", "--compiled", bert_compiled, "--pack", broken, "--text", "hi")
    assert code == 2 and "checksum" in err
    code, out, err = run(capsys, "inspect", broken)
    assert code == 2 and "checksum" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["predict", "--pack", "x"])
    assert info.value.code == 2
    assert "--compiled" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("bitfit 0.")


def test_every_stage_function_stays_callable(cli_pack):
    """`bitfit.inspect(...)` twice: importing a submodule binds its name on the package, so a stage function
    living in a module of the same name would be replaced by that module after its first call."""
    import importlib

    import bitfit

    for name in bitfit.STAGES:
        assert callable(getattr(bitfit, name)), name
    for module in ("compiler.verify", "prediction", "inspection", "exporters.adapter", "exporters.triton",
                   "exporters.bank", "serve.app", "cli"):
        importlib.import_module(f"bitfit.{module}")
    assert bitfit.inspect(cli_pack) == bitfit.inspect(cli_pack)
    for name in bitfit.STAGES:
        assert callable(getattr(bitfit, name)), f"bitfit.{name} is {getattr(bitfit, name)!r}"


# -- issue 23, class 7: bad input that used to end in a traceback and exit 1 --------------------------------
def no_traceback(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_train_into_proc_is_refused_before_training(bert_model, data_files, capsys, monkeypatch):
    from bitfit.training import train as train_module

    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: pytest.fail("training started"))
    code, out, err = run(capsys, "train", "--model", bert_model, "--data", data_files["sentiment"], "--out", "/proc/x",
                         "--quiet")
    no_traceback(code, err, "bitfit train: error: cannot write /proc/x: /proc is not a writable directory (")
    assert "choose another output path" in err


@pytest.mark.parametrize("report", ["/etc/passwd/x", "{tmp}/file/report.json"])
def test_verify_report_under_a_file_is_refused_before_verifying(report, bert_compiled, pack_all, tmp_path, capsys,
                                                                monkeypatch):
    from bitfit.compiler import verify as verify_module

    (tmp_path / "file").write_text("x")
    report = report.format(tmp=tmp_path)
    if not os.path.exists(os.path.dirname(report)):
        pytest.skip(f"no {os.path.dirname(report)} here")
    monkeypatch.setattr(verify_module, "verify", lambda *a, **k: pytest.fail("verify ran"))
    code, out, err = run(capsys, "verify", "--compiled", bert_compiled, "--pack", pack_all, "--report", report)
    no_traceback(code, err, f"cannot write {report}: {os.path.dirname(report)} is not a writable directory (it is "
                            "not a directory); choose another path for the report")


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_compile_of_a_model_with_damaged_weights_exits_2(damage, bert_model, copy_dir, tmp_path, capsys):
    model = copy_dir(bert_model, "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(np.random.default_rng(0).bytes(len(data)) if damage == "random" else data[: len(data) // 2])
    code, out, err = run(capsys, "compile", "--model", model, "--out", tmp_path / "c")
    no_traceback(code, err, f"cannot load model '{model}': its model.safetensors is damaged (")
    assert "re-download or re-save the model" in err and not (tmp_path / "c").exists()


# -- issue 23, classes 4 and 9 on the command line: exit 2 before any model is loaded -------------------------
@pytest.mark.parametrize("flags, message", [
    (["--max-length", "1"], "max_length 1 cannot hold the tokenizer's special tokens and one token of the text: "
                            "give --max-length 3 or more"),
    (["--max-length", "2"], "give --max-length 3 or more"),
    (["--name", "a/b"], "task name 'a/b' is not 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit"),
])
def test_train_refuses_a_degenerate_max_length_or_task_name(flags, message, bert_model, data_files, tmp_path, capsys,
                                                            monkeypatch):
    from bitfit.training import train as train_module

    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run(capsys, "train", "--model", bert_model, "--data", data_files["sentiment"], "--out",
                         tmp_path / "p", "--quiet", *flags)
    no_traceback(code, err, message)
    assert not (tmp_path / "p").exists()


# -- issue 24: serve flags from ServeConfig, one exit code per kind of failure ------------------------------
def test_serve_flags_are_serveconfig_fields_with_their_defaults(monkeypatch):
    """Every ServeConfig field is a `bitfit serve` flag (or named in SERVE_NOT_FLAGS with the reason), with the
    field's own default: the CLI repeats neither the list of limits nor their defaults."""
    from dataclasses import fields

    from bitfit import cli
    from bitfit.serve.app import ServeConfig

    given = {}
    monkeypatch.setattr(cli, "_serve", lambda a: given.update({n: getattr(a, n) for n in a.serve_fields}) or 0)
    assert main(["serve", "--compiled", "c", "--packs", "p"]) == 0
    assert set(given) | set(cli.SERVE_NOT_FLAGS) == {f.name for f in fields(ServeConfig)}
    assert ServeConfig(**given) == ServeConfig()
    main(["serve", "--compiled", "c", "--packs", "p", "--no-batching", "--max-texts", "3", "--reload-every", "2.5"])
    assert (given["batching"], given["max_texts"], given["reload_every_s"]) == (False, 3, 2.5)


def test_a_failed_parity_check_exits_1_and_bad_input_2(monkeypatch, capsys):
    """ParityError is a failed check (exit 1, README's rule) wherever it comes from; other BitFitErrors are bad
    input (exit 2): main maps both, once."""
    from bitfit.compiler import compile as compile_module
    from bitfit.runtime import BitFitError, ParityError

    def failing(*a, **k):
        raise ParityError("parity failed on o: 1 of 5 checks")

    monkeypatch.setattr(compile_module, "compile_model", failing)
    code, _, err = run(capsys, "compile", "--model", "m", "--out", "o", "--verify")
    assert code == 1 and "bitfit compile: parity check failed: parity failed on o" in err
    monkeypatch.setattr(compile_module, "compile_model", lambda *a, **k: (_ for _ in ()).throw(BitFitError("bad")))
    code, _, err = run(capsys, "compile", "--model", "m", "--out", "o")
    assert code == 2 and "bitfit compile: error: bad" in err


def test_serve_without_the_server_extra_says_what_to_install():
    """The runtime alone (no starlette): `bitfit serve`, with any of its flags, exits 2 naming the extra, and the
    other commands still parse (the serve flags come from ServeConfig, which needs starlette to import)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "starlette":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Blocker())
        from bitfit.cli import main
        rc = main(["serve", "--compiled", "c", "--packs", "p", "--max-texts", "5", "--no-batching"])
        try:
            main(["predict", "--compiled", "c", "--pack", "p", "--bogus"])
        except SystemExit as e:
            print("predict", e.code)
        print("serve", rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "serve 2" in proc.stdout and "predict 2" in proc.stdout, proc.stderr
    assert "needs starlette; install the server extra: pip install 'bitfit-deploy[serve]'" in proc.stderr
    assert "unrecognized arguments: --bogus" in proc.stderr and "Traceback" not in proc.stderr
