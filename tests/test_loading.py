"""Loading the files of a compiled directory and of task packs (issue 23): a damaged file is a clean refusal
naming it (never a traceback from the library that parses it), verify reports it as its failed checksum row,
sizes are checked before anything is hashed, and the server's packs directory neither re-pays for a refused
file on every rescan nor takes a task offline when two directories declare it. Also the compiled manifest's
own seal, which no other test reaches (every other edit is resealed or trips another check first).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bitfit.runtime import TaskSession, load_pack
from bitfit.runtime.compiled import BASE_BIASES_FILE, MANIFEST_FILE, MODEL_FILE, TOKENIZER_FILE, CompiledModel
from bitfit.runtime.errors import CompiledModelError, PackError
from bitfit.runtime.pack import TENSORS_FILE, save_pack
from conftest import reseal_compiled

from bitfit.cli import main

SPARSE = 3 * 2**30  # a sparse 3 GB file: hashing it takes seconds, a stat microseconds


@pytest.fixture
def graph(bert_compiled, copy_dir) -> Path:
    return copy_dir(bert_compiled, "graph")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- class 3: a damaged file of a compiled directory ----------------------------------------------------
def test_verify_reports_a_truncated_tokenizer_as_its_failed_checksum_row(graph, capsys):
    """It died with the tokenizers library's bare `Exception: EOF while parsing`."""
    from bitfit.compiler.verify import verify

    truncate(graph / TOKENIZER_FILE)
    report = verify(graph, [], strict=False, log=lambda s: None)
    assert [(c.case, c.passed, c.note) for c in report.checks] == [
        ("files match their checksums", False, f"changed: {TOKENIZER_FILE}")]
    assert main(["verify", "--compiled", str(graph)]) == 1
    out = capsys.readouterr()
    assert f"changed: {TOKENIZER_FILE}" in out.out and "FAIL" in out.out and "Traceback" not in out.err


BROKEN_TOKENIZERS = {
    "truncated": lambda p: truncate(p),
    "not a tokenizer": lambda p: p.write_text(json.dumps({"model": {"type": "NoSuchModel"}})),
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe" * 100),
    "empty": lambda p: p.write_bytes(b""),
    "a pair template that panics": lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "post_processor": {
        "type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[NOPE]", "type_id": 0}}], "special_tokens": {}}})),
}


@pytest.mark.parametrize("damage", sorted(BROKEN_TOKENIZERS))
def test_a_resealed_broken_tokenizer_is_refused_naming_it(graph, pack_all, damage, capsys):
    """Checksums recomputed, so only loading it can tell: a CompiledModelError naming the file and the fix, and
    exit 2 from predict and serve (it was a traceback from both)."""
    BROKEN_TOKENIZERS[damage](graph / TOKENIZER_FILE)
    reseal_compiled(graph)
    with pytest.raises(CompiledModelError, match=rf"{TOKENIZER_FILE} is not a tokenizer .*compile it again"):
        TaskSession(graph, threads=1)
    capsys.readouterr()
    packs = graph.parent / "packs"
    packs.mkdir()
    for argv in (["predict", "--compiled", str(graph), "--pack", str(pack_all), "--text", "a"],
                 ["serve", "--compiled", str(graph), "--packs", str(packs), "--port", "18123"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert TOKENIZER_FILE in err and "compile it again" in err and "Traceback" not in err


def _garbage(path: Path) -> None:
    """Of the file's own size (so a size check alone cannot tell), neither ONNX, JSON nor safetensors."""
    size = path.stat().st_size
    path.write_bytes((b"\x09\x00\x00\x00\x00\x00\x00\x00{not json" + b"\xff" * size)[:size])


@pytest.mark.parametrize("name, message", [
    (MODEL_FILE, r"onnxruntime cannot load .*model\.onnx"),
    (BASE_BIASES_FILE, r"base_biases\.safetensors has no readable safetensors header"),
    (TOKENIZER_FILE, r"tokenizer\.json is not a tokenizer"),
])
def test_every_file_of_a_compiled_directory_is_refused_cleanly(graph, name, message):
    """Garbage in each file: unsealed, open() names it as changed and verify reports the row; resealed, its
    loader refuses it with CompiledModelError naming it (verify then exits 2: bad input, not a check)."""
    from bitfit.compiler.verify import verify

    _garbage(graph / name)
    with pytest.raises(CompiledModelError, match=rf"{name} in .* do not match the checksums"):
        CompiledModel.open(graph)
    report = verify(graph, [], strict=False, log=lambda s: None)
    assert [(c.passed, c.note) for c in report.checks] == [(False, f"changed: {name}")]
    reseal_compiled(graph)
    with pytest.raises(CompiledModelError, match=message):
        TaskSession(graph, threads=1)


def test_a_resealed_garbage_pack_tensors_file_is_a_pack_error(pack_all, copy_dir):
    from conftest import write_sealed
    from bitfit.runtime.fs import sha256_file

    pack = copy_dir(pack_all, "pack")
    size = (pack / TENSORS_FILE).stat().st_size
    (pack / TENSORS_FILE).write_bytes(b"\xff" * size)  # the right size, so the hash and then the header decide
    data = json.loads((pack / MANIFEST_FILE).read_text())
    data["tensors_sha256"] = sha256_file(pack / TENSORS_FILE)
    write_sealed(pack / MANIFEST_FILE, data)
    with pytest.raises(PackError, match=rf"{TENSORS_FILE} declares a header of .*re-save"):
        load_pack(pack)


# -- class 6: sizes before hashes --------------------------------------------------------------------
@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every file the runtime hashes, in order (the modules hold their own reference to sha256_file)."""
    from bitfit.runtime import compiled, fs, pack
    from bitfit.serve import packdir

    seen: list[str] = []
    real = fs.sha256_file

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    for module in (fs, pack, compiled, packdir):
        monkeypatch.setattr(module, "sha256_file", counting)
    return seen


def test_a_huge_pack_tensors_file_is_refused_before_it_is_hashed(pack_all, copy_dir, hashes):
    pack = copy_dir(pack_all, "pack")
    with open(pack / TENSORS_FILE, "r+b") as f:
        f.truncate(SPARSE)
    with pytest.raises(PackError, match=rf"{TENSORS_FILE}: it is 3,221,225,472 bytes where the declared tensors take"):
        load_pack(pack)
    assert hashes == []


@pytest.mark.parametrize("name", [BASE_BIASES_FILE, MODEL_FILE, TOKENIZER_FILE])
def test_a_huge_file_of_a_compiled_directory_is_changed_without_being_hashed(graph, hashes, name):
    """Base biases: not the size the bias inputs imply; a tokenizer over its bound; a graph over protobuf's 2 GB."""
    from bitfit.compiler.verify import verify

    with open(graph / name, "r+b") as f:
        f.truncate(SPARSE)
    with pytest.raises(CompiledModelError, match=rf"{name} in .* do not match the checksums"):
        CompiledModel.open(graph)
    assert name not in hashes
    report = verify(graph, [], strict=False, log=lambda s: None)
    assert [(c.passed, c.note) for c in report.checks] == [(False, f"changed: {name}")]
    assert name not in hashes


def test_the_packs_directory_refuses_a_huge_file_once_until_it_changes(bert_compiled, pack_all, tmp_path, hashes,
                                                                       monkeypatch):
    """`bitfit serve --packs` with a sparse 3 GB tensors file: refused without hashing it, and a rescan
    (--reload-every) neither hashes nor reads it again; once the file changes, it is checked again."""
    from bitfit.runtime import pack as pack_module
    from bitfit.serve import packdir
    from bitfit.serve.packdir import PackDirectory

    root = tmp_path / "packs"
    root.mkdir()
    shutil.copytree(pack_all, root / "good")
    bad = root / "huge"
    save_pack(_renamed(pack_all, "huge-task"), bad)
    with open(bad / TENSORS_FILE, "r+b") as f:
        f.truncate(SPARSE)
    reads: list[str] = []
    for module, fn in ((packdir, "read_manifest"), (pack_module, "read_manifest")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda p, real=real: reads.append(Path(p).name) or real(p))

    task = load_pack(pack_all).name
    directory = PackDirectory(root, TaskSession(bert_compiled, threads=1))
    hashes.clear()
    first = directory.reload()
    assert first.added == [task]
    assert "3,221,225,472 bytes where the declared tensors take" in first.refused["huge-task"]
    assert hashes.count(TENSORS_FILE) == 2  # good: the fingerprint and load_pack; huge: never
    hashes.clear(), reads.clear()

    again = directory.reload()
    assert again.refused == first.refused and again.unchanged == first.added
    assert "huge" not in reads and hashes == []  # the good pack is unchanged too: not re-hashed (issue 25)

    with open(bad / TENSORS_FILE, "r+b") as f:  # changed: the size is checked again (still wrong)
        f.truncate(SPARSE + 4096)
    third = directory.reload()
    assert "huge" in reads and "3,221,229,568 bytes" in third.refused["huge-task"]
    save_pack(_renamed(pack_all, "huge-task"), bad, overwrite=True)  # repaired: served
    assert directory.reload().added == ["huge-task"]


def _renamed(path: Path, task: str):
    pack = load_pack(path)
    pack.manifest.task = task
    return pack


# -- two directories declaring one task -------------------------------------------------------------
def test_a_clash_keeps_the_served_directory_and_says_which(bert_compiled, pack_all, tmp_path):
    """At startup the first directory by name is served and the other is refused, saying so; on reload the
    one already served stays even when a directory sorting before it appears; /healthz names the clash."""
    from bitfit.serve import ServeConfig, create_app
    from starlette.testclient import TestClient

    task = load_pack(pack_all).name
    root = tmp_path / "packs"
    root.mkdir()
    shutil.copytree(pack_all, root / "b-first")
    shutil.copytree(pack_all, root / "c-second")
    session = TaskSession(bert_compiled, threads=1)
    app = create_app(session, root, ServeConfig())
    initial = app.state.initial_load
    assert initial.added == [task] and session.tasks == [task]  # not offline
    assert initial.clashes == {task: {"serving": "b-first", "ignored": ["c-second"]}}
    assert ("'b-first' is served (the first by directory name), 'c-second' is not loaded"
            in initial.refused["c-second"])
    with TestClient(app) as client:
        health = client.get("/healthz")
        assert health.status_code == 200
        assert health.json()["clashes"] == {task: {"serving": "b-first", "ignored": ["c-second"]}}

        shutil.copytree(pack_all, root / "a-new")  # sorts first, but b-first is the one served
        r = client.post("/v1/admin/reload", json={}).json()
        assert r["unchanged"] == [task] and not r["added"] and not r["replaced"]
        assert r["clashes"] == {task: {"serving": "b-first", "ignored": ["a-new", "c-second"]}}
        assert "(the directory already serving it)" in r["refused"]["a-new"]
        assert app.state.reload is not None

        shutil.rmtree(root / "a-new")
        shutil.rmtree(root / "c-second")
        r = client.post("/v1/admin/reload", json={}).json()
        assert r["clashes"] == {} and r["refused"] == {} and r["unchanged"] == [task]
        assert "clashes" not in client.get("/healthz").json()


def test_serve_logs_the_clash_at_startup(bert_compiled, pack_all, tmp_path, monkeypatch, capsys):
    import uvicorn

    root = tmp_path / "packs"
    root.mkdir()
    shutil.copytree(pack_all, root / "one")
    shutil.copytree(pack_all, root / "two")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", "--compiled", str(bert_compiled), "--packs", str(root), "--port", "18123"]) == 0
    err = capsys.readouterr().err
    assert "refused two: task" in err and "'one' is served (the first by directory name)" in err


# -- the compiled manifest's own seal ---------------------------------------------------------------
def test_an_edit_of_the_compiled_manifest_that_passes_every_other_check_is_refused_by_its_seal(graph):
    """precision "fp32" -> "int8": the schema takes any short text, no rule ties it to the graph, and the
    files' checksums still hold, so only the seal stands between the edit and verify choosing int8's
    tolerance of 1.5 (a graph that is off by 1 then passes). Resealed, the same edit loads: the seal is the
    one check refusing it."""
    data = json.loads((graph / MANIFEST_FILE).read_text())
    assert data["precision"] == "fp32"
    data["precision"] = "int8"
    (graph / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(CompiledModelError, match=r"does not match its own checksum \(manifest_sha256\)"):
        CompiledModel.open(graph)
    reseal_compiled(graph, precision="int8")
    assert CompiledModel.open(graph).manifest.precision == "int8"
