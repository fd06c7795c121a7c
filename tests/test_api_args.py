"""Every public function checks its arguments at the door: a wrong type or range is a BitFitError naming the
argument and what it accepts (runtime.args), never a raw TypeError/ValueError from inside (range() with step 0,
a list as a dict key, a str iterated as a list of paths), and never a silent default (batch_size=True)."""
from __future__ import annotations

import bitfit
import pytest
from bitfit.runtime import BitFitError, TaskSession, load, load_pack, read_manifest, read_pack_manifest

ROW = [("t", "a good movie")]


@pytest.fixture(scope="module")
def session(bert_compiled, pack_all) -> TaskSession:
    s = TaskSession(bert_compiled, threads=1)
    s.register(pack_all, name="t")
    return s


# (call, the argument's name and what the message must say); `s` is the session, `c` / `p` the compiled
# directory and a pack's path, `o` a fresh output path
CASES = {
    "run batch_size 0": (lambda s, c, p, o: s.run("t", ["a"], batch_size=0), "batch_size must be a whole number >= 1"),
    "run batch_size -1": (lambda s, c, p, o: s.run("t", ["a"], batch_size=-1), "batch_size must be .* got -1"),
    "run batch_size '2'": (lambda s, c, p, o: s.run("t", ["a"], batch_size="2"), "batch_size must be .* got '2'"),
    "run batch_size True": (lambda s, c, p, o: s.run("t", ["a"], batch_size=True), "batch_size must be .* got True"),
    "run batch_size 1.5": (lambda s, c, p, o: s.run("t", ["a"], batch_size=1.5), "batch_size must be .* got 1.5"),
    "run_mixed task a list": (lambda s, c, p, o: s.run_mixed([(["t"], "a")]),
                              r"rows\[0\]\[0\] \(the task\) must be a string"),
    "run_mixed task a dict": (lambda s, c, p, o: s.run_mixed([("t", "a"), ({}, "b")]), r"rows\[1\]\[0\] .* got \{\}"),
    "run_mixed batch_size 0": (lambda s, c, p, o: s.run_mixed(ROW, batch_size=0), "batch_size must be .* got 0"),
    "run_mixed batch_size False": (lambda s, c, p, o: s.run_mixed(ROW, batch_size=False), "batch_size must be"),
    "run_tokens batch_size 0": (lambda s, c, p, o: s.run_tokens("t", ["a"], batch_size=0), "batch_size must be"),
    "answer batch_size 0": (lambda s, c, p, o: s.answer("t", ["q"], ["c"], batch_size=0), "batch_size must be"),
    "answer max_answer_tokens '3'": (lambda s, c, p, o: s.answer("t", ["q"], ["c"], max_answer_tokens="3"),
                                     "max_answer_tokens must be a whole number >= 1, got '3'"),
    "answer stride True": (lambda s, c, p, o: s.answer("t", ["q"], ["c"], stride=True), "stride must be None or"),
    "answer windows 'no'": (lambda s, c, p, o: s.answer("t", ["q"], ["c"], windows="no"), "windows must be true or"),
    "answer null_threshold nan": (lambda s, c, p, o: s.answer("t", ["q"], ["c"], null_threshold=float("nan")),
                                  "null_threshold must be a finite number"),
    "predict batch_size 0": (lambda s, c, p, o: s.predict("t", ["a"], batch_size=0), "batch_size must be"),
    "predict unknown option": (lambda s, c, p, o: s.predict("t", ["a"], batchsize=2),
                               r"run\(\) takes no option batchsize: a classification task takes batch_size"),
    "encode max_length 0": (lambda s, c, p, o: s.encode(["a"], max_length=0), "max_length must be a whole number >= 1"),
    "logits inputs a list": (lambda s, c, p, o: s.logits("t", [[1, 2]]), r"inputs must be a dict of token arrays"),
    "hidden_states inputs None": (lambda s, c, p, o: s.hidden_states(None), r"inputs must be a dict"),
    "register pack None": (lambda s, c, p, o: s.register(None), "pack must be a TaskPack or the path"),
    "register pack 5": (lambda s, c, p, o: s.register(5), "pack must be .* got 5"),
    "register name 5": (lambda s, c, p, o: s.register(p, name=5), "task name 5 is not 1 to 64 letters"),
    "register name ''": (lambda s, c, p, o: s.register(p, name=""), "task name '' is not 1 to 64 letters"),
    "register replace 'no'": (lambda s, c, p, o: s.register(p, name="t", replace="no"),
                              "replace must be true or false"),
    "remove a list": (lambda s, c, p, o: s.remove(["t"]), r"unknown task \['t'\]: registered tasks are t"),
    "session compiled_dir None": (lambda s, c, p, o: TaskSession(None), "compiled_dir must be a path"),
    "session threads '2'": (lambda s, c, p, o: TaskSession(c, threads="2"), "threads must be a whole number"),
    "session threads True": (lambda s, c, p, o: TaskSession(c, threads=True), "threads must be .* got True"),
    "session device 5": (lambda s, c, p, o: TaskSession(c, device=5), "device must be a string"),
    "session backend a list": (lambda s, c, p, o: TaskSession(c, backend=["x"]), "backend must be a string"),
    "session spinning 'no'": (lambda s, c, p, o: TaskSession(c, spinning="no"), "spinning must be true or false"),
    "session check_integrity 0": (lambda s, c, p, o: TaskSession(c, check_integrity=0), "check_integrity must be"),
    "load packs a str": (lambda s, c, p, o: load(c, packs=str(p)), "packs must be a list of TaskPacks or paths"),
    "load_pack None": (lambda s, c, p, o: load_pack(None), "path must be a path"),
    "read_pack_manifest 5": (lambda s, c, p, o: read_pack_manifest(5), "path must be a path"),
    "read_manifest None": (lambda s, c, p, o: read_manifest(None), "compiled directory must be a path"),
    "predict() pack None": (lambda s, c, p, o: bitfit.predict(c, None, ["a"]), "pack must be a TaskPack or"),
    "predict() batch_size 0": (lambda s, c, p, o: bitfit.predict(c, p, ["a"], batch_size=0), "batch_size must be"),
    "inspect None": (lambda s, c, p, o: bitfit.inspect(None), "path must be a path"),
    "inspect as_json 'yes'": (lambda s, c, p, o: bitfit.inspect(p, as_json="yes"), "as_json must be true or false"),
    "verify packs a str": (lambda s, c, p, o: bitfit.verify(c, str(p)), "packs must be a list of TaskPacks or paths"),
    "verify atol 'x'": (lambda s, c, p, o: bitfit.verify(c, atol="x"), "atol must be None or a finite number >= 0"),
    "verify atol -1": (lambda s, c, p, o: bitfit.verify(c, atol=-1.0), "atol must be .* got -1.0"),
    "verify min_agreement 101": (lambda s, c, p, o: bitfit.verify(c, min_agreement=101),
                                 "min_agreement must be a finite number from 0 to 100"),
    "verify grid (0, 5)": (lambda s, c, p, o: bitfit.verify(c, grid=[(0, 5)]), "grid must be a list of"),
    "verify texts [5]": (lambda s, c, p, o: bitfit.verify(c, texts=[5]), "texts must be None or a list"),
    "verify backend 5": (lambda s, c, p, o: bitfit.verify(c, backend=5), "backend must be one of onnxruntime"),
    "verify strict 'no'": (lambda s, c, p, o: bitfit.verify(c, strict="no"), "strict must be true or false"),
    "compile biases 5": (lambda s, c, p, o: bitfit.compile(c, o, biases=5), "biases must be a non-empty string"),
    "compile out None": (lambda s, c, p, o: bitfit.compile(c, None), "out must be a path"),
    "compile verify a str": (lambda s, c, p, o: bitfit.compile(c, o, verify=str(p)), "verify must be None or a list"),
    "compile mixed 'yes'": (lambda s, c, p, o: bitfit.compile(c, o, mixed="yes"), "mixed must be true or false"),
    # train: every option is a TrainConfig field, checked before any data or model is read (issue 23, class 8)
    "train epochs '2'": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, epochs="2"),
                         "epochs must be a whole number >= 1, got '2'"),
    "train epochs True": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, epochs=True), "epochs must be .* got True"),
    "train epochs 0": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, epochs=0), "epochs must be .* got 0"),
    "train lr 'x'": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, lr="x"), "lr must be a finite number > 0, got 'x'"),
    "train lr nan": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, lr=float("nan")), "lr must be .* got nan"),
    "train batch_size 0": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, batch_size=0), "batch_size must be .* 0"),
    "train warmup 1.5": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, warmup=1.5),
                         "warmup must be a finite number from 0 to below 1, got 1.5"),
    "train schedule 5": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, schedule=5),
                         "schedule must be one of linear, constant, got 5"),
    "train biases 7": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, biases=7), "biases must be a non-empty string"),
    "train seed -1": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, seed=-1), "seed must be a whole number from 0"),
    "train max_length '64'": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, max_length="64"),
                              "max_length must be a whole number from 1"),
    "train train_size 0": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, train_size=0),
                           "train_size must be None or a whole number >= 1, got 0"),
    "train weight_decay -1": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, weight_decay=-1.0),
                              "weight_decay must be a finite number >= 0"),
    "train max_grad_norm nan": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, max_grad_norm=float("nan")),
                                "max_grad_norm must be a number > 0"),
    "train overwrite 'no'": (lambda s, c, p, o: bitfit.train(c, "d.csv", o, overwrite="no"),
                             "overwrite must be true or false"),
    "train progress None": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, progress=None), "progress must be true"),
    "train log 5": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, log=5), "log must be a function"),
    "train dev 5": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, dev=5), "dev must be None or a path"),
    "train task_name a/b": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, task_name="a/b"), "task name 'a/b'"),
    "train unknown option": (lambda s, c, p, o: bitfit.train(c, "d.csv", None, epoch=2),
                             "train\\(\\) takes no option epoch: its options are biases, epochs"),
    "train data None": (lambda s, c, p, o: bitfit.train(c, None, None), "data must be a path"),
    "export_bank packs a str": (lambda s, c, p, o: bitfit.export_bank(c, str(p), o), "packs must be a list"),
    "export_bank block_align True": (lambda s, c, p, o: bitfit.export_bank(c, [p], o, block_align=True),
                                     "block_align must be a whole number >= 1"),
    "export_triton instances '2'": (lambda s, c, p, o: bitfit.export_triton(c, [p], o, instances="2"),
                                    "instances must be a whole number >= 1"),
    "export_adapter pack None": (lambda s, c, p, o: bitfit.export_adapter(c, None, o / "a.onnx_adapter"),
                                 "pack must be a TaskPack or"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_arguments_are_refused_by_name(case, session, bert_compiled, pack_all, tmp_path):
    call, message = CASES[case]
    with pytest.raises(BitFitError, match=message):
        call(session, bert_compiled, pack_all, tmp_path / "out")
    assert session.tasks == ["t"]  # nothing half-registered under a bad name


def test_good_arguments_still_work(session, pack_all):
    """The checks refuse only what they name: every accepted form still runs."""
    assert session.run("t", ["a good movie"], batch_size=1).labels == session.run("t", ["a good movie"]).labels
    assert [r["task"] for r in session.run_mixed([("t", "fun"), ["t", "bad"]], batch_size=1)] == ["t", "t"]
    assert session.predict("t", ["fun"], batch_size=2).labels
    name = session.register(load_pack(pack_all), name="t2", replace=False)
    session.remove(name)
