"""The IREE target (compiler/iree.py) and backend (runtime/backends.py IreeEngine): ahead-of-time modules with the
weights as constants and the biases as arguments; parity with onnxruntime, shape buckets, mixed batches, verify with
liveness (a module that froze a bias fails), the guards against the importer's silent freeze, and two consumers
without Python: iree-run-module on .npy files, and a C program reading the bias bank through bank.h."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("iree.runtime")
pytest.importorskip("iree.compiler")

from bitfit.compiler import iree as iree_target  # noqa: E402
from bitfit.compiler.compile import compile as compile_model  # noqa: E402
from bitfit.compiler.verify import verify  # noqa: E402
from bitfit.runtime import TaskSession  # noqa: E402
from bitfit.runtime import compiled as cm  # noqa: E402
from bitfit.runtime.errors import BitFitError, CompiledModelError  # noqa: E402

QUIET = {"log": lambda s: None}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def modules(bert_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("iree")
    compile_model(bert_model, root / "plain", target="iree-cpu", **QUIET)
    compile_model(bert_model, root / "buckets", target="iree-cpu", buckets="1x16,4x32", **QUIET)
    compile_model(bert_model, root / "mixed", target="iree-cpu", mixed=True, **QUIET)
    return {k: root / k for k in ("plain", "buckets", "mixed")}


def _inputs(session: TaskSession, batch: int, length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, session.manifest.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[0, length // 2:] = 0  # a padded row
    ids[mask == 0] = session.manifest.pad_token_id
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros((batch, length), np.int64)}


def test_manifest_records_the_target(modules):
    m = cm.read_manifest(modules["buckets"])
    assert m.bias_defaults is False and m.head_inputs == []  # the no-defaults export, no head
    info = m.iree
    assert info["target"] == "iree-cpu" and info["cpu"] == "host" and info["iree_version"]
    assert [(x["batch"], x["sequence"]) for x in info["modules"]] == [(1, 16), (4, 32)]
    assert info["arguments"] == [*m.token_inputs, *(b.name for b in m.bias_inputs)]  # the graph's input order
    assert "--iree-llvmcpu-target-cpu=host" in info["flags"]
    assert "avx2" in info["cpu_features"] or not info["cpu_features"]  # x86 hosts here; elsewhere its own names
    assert (modules["plain"] / "module.vmfb").is_file()
    assert cm.read_manifest(modules["plain"]).iree["modules"][0]["batch"] == 0  # dynamic: the default


def test_iree_serves_packs_as_onnxruntime_does(modules, bert_compiled, pack_all, pack_min):
    ir, ref = TaskSession(modules["plain"], backend="iree"), TaskSession(bert_compiled)
    assert ir.backend == "iree"
    for s in (ir, ref):
        s.register(pack_all, name="all")
        s.register(pack_min, name="min")  # bq,bm2 only: the runtime feeds the base values for the rest
    inputs = _inputs(ir, 3, 13)
    for task in ("all", "min"):
        assert np.abs(ir.logits(task, inputs) - ref.logits(task, inputs)).max() <= 1e-5
    assert np.abs(ir.hidden_states(inputs) - ref.hidden_states(inputs)).max() <= 1e-5  # no task: the base model
    assert np.abs(ir.logits("all", inputs) - ir.logits("min", inputs)).max() > 1e-4  # switching tasks switches
    texts = ["a good fun movie", "awful boring plot"]
    assert [r["label"] for r in ir.predict("all", texts).records()] == [r["label"] for r in ref.predict("all", texts).records()]


def test_shape_buckets_pad_and_slice(modules, bert_compiled, pack_all):
    ir, ref = TaskSession(modules["buckets"], backend="iree"), TaskSession(bert_compiled)
    for s in (ir, ref):
        s.register(pack_all, name="all")
    # (1, 16) exact; (2, 20) padded to 4x32; (9, 7) runs as 3 slices of the 4x32 bucket
    for batch, length in ((1, 16), (2, 20), (9, 7)):
        inputs = _inputs(ir, batch, length, seed=batch)
        got, want = ir.hidden_states(inputs, "all"), ref.hidden_states(inputs, "all")
        assert got.shape == want.shape == (batch, length, ref.manifest.hidden_size)
        real = inputs["attention_mask"].astype(bool)
        assert np.abs(got[real] - want[real]).max() <= 1e-5
    assert ir.engine._bucket(2, 20)[:2] == (4, 32) and ir.engine._bucket(9, 7)[:2] == (4, 32)
    with pytest.raises(BitFitError, match=r"a sequence of 40 tokens fits none of the module's shape buckets "
                                          r"\(1x16, 4x32\).*--buckets"):
        ir.hidden_states(_inputs(ir, 1, 40))


def test_mixed_batches_on_iree(modules, bert_compiled, pack_all, pack_min):
    ir, ref = TaskSession(modules["mixed"], backend="iree"), TaskSession(bert_compiled)
    assert ir.mixed
    for s in (ir, ref):
        s.register(pack_all, name="all")
        s.register(pack_min, name="min")
    rows = [("all", "a good fun movie"), ("min", "awful boring plot"), ("all", "who won")]
    for got, want in zip(ir.run_mixed(rows), ref.run_mixed(rows)):
        assert got["label"] == want["label"] and np.allclose(got["logits"], want["logits"], atol=1e-5)


def test_verify_on_iree_passes_with_every_bias_live(modules, pack_all, pack_min):
    report = verify(modules["plain"], [pack_all, pack_min], backend="iree", **QUIET)
    assert report.ok and report.backend == "iree"
    assert any("non-bk bias inputs is live" in c.case and c.passed for c in report.checks)
    assert "PASS on iree" in report.table()


def _freeze(graph_path: Path, name: str, base: np.ndarray) -> None:
    """Rewrite the graph so that input `name` stays an input but nothing reads it: its uses read a constant of
    the base value instead -- what an importer that freezes an input does, with the argument kept."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(graph_path))
    g.graph.initializer.append(numpy_helper.from_array(base, "frozen." + name))
    for node in g.graph.node:
        node.input[:] = ["frozen." + name if x == name else x for x in node.input]
    onnx.save(g, str(graph_path))


def test_verify_fails_a_module_that_froze_a_bias(modules, copy_dir, pack_all):
    frozen = copy_dir(modules["plain"], "frozen")
    _freeze(frozen / cm.MODEL_FILE, "layer.1.bm2", cm.CompiledModel.open(frozen).base_biases["layer.1.bm2"])
    manifest = cm.read_manifest(frozen)
    manifest.iree = iree_target.compile_modules(frozen, manifest, **QUIET)  # the module from the rewritten graph
    cm.write_manifest(frozen, manifest)
    report = verify(frozen, [pack_all], backend="iree", strict=False, **QUIET)
    assert not report.ok and any("dead: layer.1.bm2" in c.note for c in report.failures)


def test_importer_freeze_is_refused_at_compile_and_at_load(modules, copy_dir, monkeypatch):
    """A bias with a default: the guard refuses it; forced past the guard, the importer drops the argument and
    the engine refuses the module (fewer arguments than the graph has inputs) instead of serving the base model."""
    import onnx
    from onnx import numpy_helper

    target = copy_dir(modules["plain"], "defaults")
    g = onnx.load(str(target / cm.MODEL_FILE))
    g.graph.initializer.append(numpy_helper.from_array(np.zeros(32, np.float32), "layer.1.bLN2"))
    onnx.save(g, str(target / cm.MODEL_FILE))
    manifest = cm.read_manifest(target)
    with pytest.raises(CompiledModelError, match=r"have defaults, which IREE's importer freezes into constants"):
        iree_target.compile_modules(target, manifest, **QUIET)
    blind = onnx.ModelProto()  # what the guard sees when it is bypassed: no initializer named like an input
    blind.CopyFrom(g)
    del blind.graph.initializer[-1]
    monkeypatch.setattr(onnx, "load", lambda path: blind)
    with pytest.raises(CompiledModelError, match=r"importer kept 19 of the graph's 20 inputs as arguments"):
        iree_target.compile_modules(target, manifest, **QUIET)
    monkeypatch.setattr(iree_target, "_argument_count", lambda mlir: 20)  # and past the second guard
    manifest.iree = iree_target.compile_modules(target, manifest, **QUIET)
    monkeypatch.undo()
    cm.write_manifest(target, manifest)
    with pytest.raises(CompiledModelError, match=r"takes 19 arguments, the graph 20 inputs"):
        TaskSession(target, backend="iree")


def test_refusals(bert_model, bert_compiled, modules, copy_dir, tmp_path):
    for options, message in (({"fuse": True}, r"--fuse writes onnxruntime's contrib ops"),
                             ({"quantize": "int8"}, r"--quantize writes int8"),
                             ({"bias_defaults": True}, r"IREE's importer turns every input with a default into a "
                                                       r"constant"),
                             ({"target": "onnx", "buckets": "1x8"}, r"shape buckets are for the IREE targets"),
                             ({"buckets": "8by128"}, r"bad shape bucket '8by128'"),
                             ({"buckets": "1x4096"}, r"longer than the model's")):
        with pytest.raises(BitFitError, match=message):
            compile_model(bert_model, tmp_path / "x", **{"target": "iree-cpu", **options}, **QUIET)
        assert not (tmp_path / "x").exists()
    with pytest.raises(CompiledModelError, match=r"holds no IREE module: compile it with `bitfit compile --target"):
        TaskSession(bert_compiled, backend="iree")
    damaged = copy_dir(modules["plain"], "damaged")
    with open(damaged / "module.vmfb", "r+b") as f:
        f.seek(100)
        f.write(b"\0\1\2\3")
    with pytest.raises(CompiledModelError, match=r"module.vmfb in .* do not match the checksums"):
        TaskSession(damaged, backend="iree")
    assert any("changed: module.vmfb" in c.note for c in verify(damaged, [], backend="iree", strict=False,
                                                                **QUIET).failures)
    alien = copy_dir(modules["plain"], "alien")  # compiled on a CPU with a feature this one lacks
    manifest = cm.read_manifest(alien)
    manifest.iree["cpu_features"] = [*manifest.iree["cpu_features"], "avx1024"]
    cm.write_manifest(alien, manifest)
    with pytest.raises(CompiledModelError, match=r"compiled for CPU features this machine lacks \(avx1024\)"):
        TaskSession(alien, backend="iree")


@pytest.mark.parametrize("target,arch", [("iree-cuda", "sm_80"), ("iree-rocm", "gfx942")])
def test_gpu_targets_compile_but_do_not_run_here(bert_model, tmp_path, target, arch):
    """No GPU here: the modules are emitted and checked to compile; the engine refuses to run them."""
    out = compile_model(bert_model, tmp_path / "m", target=target, **QUIET)
    info = cm.read_manifest(out).iree
    assert info["target"] == target and info["cpu"] == arch and info["cpu_features"] == []
    assert (out / "module.vmfb").stat().st_size > 0
    with pytest.raises(CompiledModelError, match=rf"compiled for {target}, which this toolkit compiles but does not run"):
        TaskSession(out, backend="iree")


def test_cli_compile_target_and_predict_backend(bert_model, pack_all, tmp_path, capsys):
    from bitfit.cli import main

    out = tmp_path / "m"
    assert main(["compile", "--model", str(bert_model), "--out", str(out), "--target", "iree-cpu",
                 "--buckets", "1x16,dynamic"]) == 0
    assert [x["file"] for x in json.loads((out / cm.MANIFEST_FILE).read_text())["iree"]["modules"]] == \
        ["module-1x16.vmfb", "module.vmfb"]
    capsys.readouterr()
    predict = ["predict", "--compiled", str(out), "--pack", str(pack_all), "--text", "a good fun movie", "--json"]
    assert main([*predict, "--backend", "iree"]) == 0
    iree_out = capsys.readouterr().out
    assert main(predict) == 0  # onnxruntime, on the same directory's graph
    assert json.loads(iree_out)["label"] == json.loads(capsys.readouterr().out)["label"]
    assert main(["compile", "--model", str(bert_model), "--out", str(tmp_path / "f"), "--target", "iree-cpu",
                 "--fuse"]) == 2
    assert "contrib ops" in capsys.readouterr().err


def test_iree_run_module_without_python(modules, pack_all, tmp_path):
    """What a C or embedded host does: the module, token ids and a pack's biases as .npy files, no Python."""
    tool = iree_target.run_module_tool()
    if tool is None:
        pytest.skip("iree-run-module is not on this machine (it ships in iree-base-runtime's wheel)")
    session = TaskSession(modules["plain"], backend="iree")
    task = session.register(pack_all, name="all")
    inputs = _inputs(session, 2, 9)
    biases = {**session.base_biases, **session.pack(task).biases}
    args = []
    for i, name in enumerate(session.manifest.iree["arguments"]):
        path = tmp_path / f"{i:03d}.npy"
        np.save(path, np.ascontiguousarray(inputs[name] if name in inputs else biases[name]))
        args.append(f"--input=@{path}")
    out = tmp_path / "hidden.npy"
    done = subprocess.run([tool, "--device=local-task", f"--module={modules['plain'] / 'module.vmfb'}",
                           "--function=main_graph", *args, f"--output=@{out}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert np.abs(np.load(out) - session.hidden_states(inputs, task)).max() <= 1e-6


def test_c_program_reads_the_bank_through_bank_h(bert_compiled, pack_all, pack_min, tmp_path):
    from bitfit.exporters.bank import write_bank
    from bitfit.runtime.bank import read_bank

    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) on this machine: the C reader of bank.h is not built")
    bank_dir = write_bank(bert_compiled, [pack_all, pack_min], tmp_path / "bank")
    exe = tmp_path / "bank_reader"
    build = subprocess.run([gcc, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(bank_dir),
                            str(ROOT / "examples" / "bank_reader.c"), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    bank = read_bank(bank_dir)
    for task in (0, 1):
        done = subprocess.run([str(exe), str(bank_dir / "bank.bin"), str(task)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].split()[:2] == ["task", str(task)] and lines[0].split()[2] == bank.names[task]
        got = {parts[0]: np.array(parts[2:], np.float32) for parts in (line.split() for line in lines[1:])}
        want = bank.task_biases(task)
        assert list(got) == list(want)
        for name, values in want.items():
            assert np.array_equal(got[name], values.reshape(-1)), name  # %.9g round-trips float32 exactly
    bad = subprocess.run([str(exe), str(bank_dir / "bank.bin"), "7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "the bank holds tasks 0..1" in bad.stderr
    (tmp_path / "short.bin").write_bytes(b"\0" * 64)
    short = subprocess.run([str(exe), str(tmp_path / "short.bin"), "0"], capture_output=True, text=True)
    assert short.returncode == 2 and "is not the bank that bank.h describes" in short.stderr


def test_iree_backend_is_torch_free(modules, pack_all):
    """The runtime side needs iree-base-runtime only: no torch, transformers or onnx (nor IREE's compiler)."""
    from test_no_torch import run_blocked

    proc = run_blocked("""
        import sys
        sys.meta_path[0].__class__.find_spec = lambda self, name, path=None, target=None: (_ for _ in ()).throw(
            ModuleNotFoundError(name)) if name.split(".")[0] in BLOCKED or name.startswith("iree.compiler") else None
        from bitfit.runtime import TaskSession
        s = TaskSession(sys.argv[1], backend="iree")
        s.register(sys.argv[2], name="t")
        print(s.predict("t", ["a good fun movie"]).records()[0]["label"])
    """, str(modules["plain"]), str(pack_all))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
