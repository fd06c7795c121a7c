"""Task packs on disk (runtime.pack): round trips, overwrite rules and strict loading."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bitfit.runtime import PackError, TaskPack, load_pack, read_pack_manifest, save_pack
from bitfit.runtime.fs import sha256_file
from bitfit.runtime.pack import MANIFEST_FILE, TENSORS_FILE
from conftest import write_sealed
from safetensors import safe_open
from safetensors.numpy import save_file


def manifest_json(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


def rewrite_tensors(pack_dir: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Replace a pack's tensors file and make the manifest's checksum match, so later checks are reached."""
    if metadata is None:
        with safe_open(str(pack_dir / TENSORS_FILE), framework="np") as fh:
            metadata = fh.metadata()
    save_file(tensors, str(pack_dir / TENSORS_FILE), metadata=metadata)
    data = manifest_json(pack_dir)
    data["tensors_sha256"] = sha256_file(pack_dir / TENSORS_FILE)
    write_sealed(pack_dir / MANIFEST_FILE, data)


def edit_manifest(pack_dir: Path, **changes) -> None:
    """A hand edit that also recomputes the manifest's seal: the checks behind the seal must catch it."""
    data = manifest_json(pack_dir)
    data.update(changes)
    write_sealed(pack_dir / MANIFEST_FILE, data)


# -- round trip -------------------------------------------------------------------------------------
def test_save_load_save_load_is_identical(pack_all, tmp_path):
    first = load_pack(pack_all)
    save_pack(first, tmp_path / "a")
    second = load_pack(tmp_path / "a")
    save_pack(second, tmp_path / "b")
    third = load_pack(tmp_path / "b")
    assert manifest_json(pack_all) == manifest_json(tmp_path / "a") == manifest_json(tmp_path / "b")
    for pack in (second, third):
        assert pack.manifest.to_json() == first.manifest.to_json()
        assert pack.tensors.keys() == first.tensors.keys()
        for k, v in first.tensors.items():
            assert pack.tensors[k].dtype == np.float32
            assert np.array_equal(pack.tensors[k], v), k
    assert (tmp_path / "a" / TENSORS_FILE).read_bytes() == (pack_all / TENSORS_FILE).read_bytes()


def test_the_digest_names_what_the_pack_computes(pack_all, pack_min, tmp_path):
    """Same digest in memory, saved and loaded again (servers report it as the task's version); another bias
    value, another head or another label gives another."""
    pack = load_pack(pack_all)
    fresh = TaskPack(pack.manifest, {k: v.copy() for k, v in pack.tensors.items()})
    fresh.manifest.manifest_sha256 = fresh.manifest.tensors_sha256 = ""  # as a pack built in memory
    assert fresh.digest() == pack.digest() == load_pack(save_pack(fresh, tmp_path / "again")).digest()
    name = pack.manifest.biases[0].name
    for change in ("bias", "head", "label"):
        other = load_pack(pack_all)
        if change == "bias":
            other.tensors[name] = other.tensors[name] + np.float32(1e-3)
        elif change == "head":
            other.tensors["head.bias"] = other.tensors["head.bias"] + np.float32(1e-3)
        else:
            other.manifest.labels = [*other.manifest.labels[:-1], "renamed"]
        assert other.digest() != pack.digest(), change
    assert load_pack(pack_min).digest() != pack.digest()


def test_saving_is_byte_for_byte_reproducible(pack_all, tmp_path):
    """The same pack saved again gives the same bytes, so the same checksum in its manifest."""
    pack = load_pack(pack_all)
    for i in range(6):
        save_pack(pack, tmp_path / f"p{i}")
    files = {(tmp_path / f"p{i}" / TENSORS_FILE).read_bytes() for i in range(6)}
    manifests = {(tmp_path / f"p{i}" / MANIFEST_FILE).read_text() for i in range(6)}
    assert len(files) == 1 and len(manifests) == 1
    with safe_open(str(tmp_path / "p0" / TENSORS_FILE), framework="np") as fh:
        provenance = json.loads(fh.metadata()["bitfit"])
    assert provenance == {"format": "bitfit-task-pack", "task": pack.manifest.task,
                          "base_fingerprint": pack.manifest.base_fingerprint}


def test_manifest_records_what_the_pack_holds(pack_all):
    pack = load_pack(pack_all)
    m = pack.manifest
    assert {s.name for s in m.specs} == set(pack.tensors)
    for spec in m.specs:
        assert pack.tensors[spec.name].shape == spec.shape
    assert m.tensors_sha256 == sha256_file(pack_all / TENSORS_FILE)
    assert len(m.base_fingerprint) == 64
    assert read_pack_manifest(pack_all).to_json() == m.to_json()
    assert load_pack(pack_all / MANIFEST_FILE).manifest.task == m.task  # a path to a file in the pack works too


def test_save_refuses_an_existing_path(pack_all, tmp_path):
    pack = load_pack(pack_all)
    save_pack(pack, tmp_path / "p")
    with pytest.raises(PackError, match=r"already exists: choose another output path \(--out\), or pass --overwrite"):
        save_pack(pack, tmp_path / "p")


def test_overwrite_replaces_a_pack(pack_all, pack_min, tmp_path):
    save_pack(load_pack(pack_all), tmp_path / "p")
    replacement = load_pack(pack_min)
    save_pack(replacement, tmp_path / "p", overwrite=True)
    loaded = load_pack(tmp_path / "p")
    assert loaded.manifest.bias_subset == ["bq", "bm2"]
    assert set(loaded.tensors) == set(replacement.tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary or .old directory left behind


def test_overwrite_refuses_a_directory_that_is_not_a_pack(pack_all, tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(PackError, match=r"exists and is not a task pack: refusing to replace it"):
        save_pack(load_pack(pack_all), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_refuses_an_invalid_pack(pack_all, tmp_path):
    pack = load_pack(pack_all)
    tensors = dict(pack.tensors)
    tensors["head.bias"] = np.array([np.nan, 0.0], dtype=np.float32)
    with pytest.raises(PackError, match=r"head\.bias holds NaN or inf values"):
        save_pack(TaskPack(pack.manifest, tensors), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_metrics_with_numpy_and_nan_values_are_saved_as_json(pack_all, tmp_path):
    pack = load_pack(pack_all)
    pack.manifest.metrics = {"dev": {"acc": np.float32(0.5), "f1": float("nan")}, "n": np.int64(3)}
    save_pack(pack, tmp_path / "p")
    assert manifest_json(tmp_path / "p")["metrics"] == {"dev": {"acc": 0.5, "f1": None}, "n": 3}


# -- strict loading ---------------------------------------------------------------------------------
@pytest.fixture
def pack_copy(pack_all, copy_dir) -> Path:
    return copy_dir(pack_all, "pack")


def test_missing_tensor(pack_copy):
    tensors = dict(load_pack(pack_copy).tensors)
    del tensors["layer.1.bq"]
    rewrite_tensors(pack_copy, tensors)
    with pytest.raises(PackError, match=r"does not hold what its manifest declares: missing tensors layer\.1\.bq"):
        load_pack(pack_copy)


def test_extra_tensor(pack_copy):
    tensors = dict(load_pack(pack_copy).tensors)
    tensors["layer.9.bq"] = np.zeros(32, np.float32)
    rewrite_tensors(pack_copy, tensors)
    with pytest.raises(PackError, match=r"does not hold what its manifest declares: unexpected tensors layer\.9\.bq"):
        load_pack(pack_copy)


def test_wrong_shape(pack_copy):
    tensors = dict(load_pack(pack_copy).tensors)
    tensors["layer.0.bm2"] = np.zeros(36, np.float32)
    rewrite_tensors(pack_copy, tensors)
    with pytest.raises(PackError, match=r"layer\.0\.bm2 is F32\[36\] in the file but float32\[37\] is declared"):
        load_pack(pack_copy)


def test_head_shape_must_fit_labels_and_hidden_size(pack_copy):
    """A head consistent with its own (edited) spec but not with the task's labels is refused."""
    tensors = dict(load_pack(pack_copy).tensors)
    tensors["head.weight"] = np.zeros((3, 32), np.float32)
    rewrite_tensors(pack_copy, tensors)
    data = manifest_json(pack_copy)
    for h in data["head"]:
        if h["name"] == "head.weight":
            h["shape"] = [3, 32]
    write_sealed(pack_copy / MANIFEST_FILE, data)
    with pytest.raises(PackError, match=r"the head must be head\.bias \[2\], head\.weight \[2, 32\] for 2 outputs, "
                                        r"hidden size 32 .*the manifest lists head\.bias \[2\], head\.weight \[3, 32\]"):
        load_pack(pack_copy)


def test_wrong_dtype(pack_copy):
    tensors = dict(load_pack(pack_copy).tensors)
    tensors["layer.0.bv"] = tensors["layer.0.bv"].astype(np.float64)
    rewrite_tensors(pack_copy, tensors)
    with pytest.raises(PackError, match=r"layer\.0\.bv is F64\[32\] in the file but float32\[32\] is declared"):
        load_pack(pack_copy)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(pack_copy, bad):
    tensors = dict(load_pack(pack_copy).tensors)
    tensors["layer.1.bLN2"] = tensors["layer.1.bLN2"].copy()
    tensors["layer.1.bLN2"][3] = bad
    rewrite_tensors(pack_copy, tensors)
    with pytest.raises(PackError, match=r"layer\.1\.bLN2 holds NaN or inf values .*lower the learning rate"):
        load_pack(pack_copy)


def test_truncated_tensors_file(pack_copy):
    data = (pack_copy / TENSORS_FILE).read_bytes()
    (pack_copy / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(PackError, match=r"truncated, corrupt or was changed after saving .*checksum"):
        load_pack(pack_copy)


@pytest.mark.parametrize("value", ["", None])
def test_the_tensors_checksum_is_required(pack_copy, value):
    """Blanking or deleting tensors_sha256 (seal recomputed) does not turn the check off."""
    data = manifest_json(pack_copy)
    if value is None:
        del data["tensors_sha256"]
    else:
        data["tensors_sha256"] = value
    write_sealed(pack_copy / MANIFEST_FILE, data)
    with pytest.raises(PackError, match=r"lacks the required checksum tensors_sha256"):
        load_pack(pack_copy)


def test_a_truncated_file_whose_checksum_was_forged_is_refused_by_its_header(pack_copy):
    data = (pack_copy / TENSORS_FILE).read_bytes()
    (pack_copy / TENSORS_FILE).write_bytes(data[: len(data) - 100])
    edit_manifest(pack_copy, tensors_sha256=sha256_file(pack_copy / TENSORS_FILE))
    with pytest.raises(PackError, match=r"declares F32\[\d+\] at bytes .*do not hold"):
        load_pack(pack_copy)


def test_bit_flip_in_tensors_file(pack_copy):
    data = bytearray((pack_copy / TENSORS_FILE).read_bytes())
    data[-5] ^= 0x01  # one bit in the last float: still parses, the values differ
    (pack_copy / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(PackError, match=r"does not match the checksum in manifest\.json"):
        load_pack(pack_copy)


def test_corrupt_manifest_json(pack_copy):
    text = (pack_copy / MANIFEST_FILE).read_text()
    (pack_copy / MANIFEST_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(PackError, match=r"manifest\.json is not valid JSON .*the pack is damaged or was edited by hand"):
        load_pack(pack_copy)


def test_manifest_missing_keys(pack_copy):
    data = manifest_json(pack_copy)
    del data["base_fingerprint"], data["labels"]
    write_sealed(pack_copy / MANIFEST_FILE, data)
    with pytest.raises(PackError, match=r"is invalid: missing keys base_fingerprint, labels"):
        load_pack(pack_copy)


def test_manifest_of_another_format(pack_copy):
    edit_manifest(pack_copy, format="something-else")
    with pytest.raises(PackError, match=r"not a bitfit task-pack manifest"):
        load_pack(pack_copy)


def test_missing_manifest(pack_copy):
    (pack_copy / MANIFEST_FILE).unlink()
    with pytest.raises(PackError, match=r"has no manifest\.json: it is not a task pack"):
        load_pack(pack_copy)


def test_missing_tensors_file(pack_copy):
    (pack_copy / TENSORS_FILE).unlink()
    with pytest.raises(PackError, match=r"has no tensors\.safetensors: the pack is incomplete"):
        load_pack(pack_copy)


def test_newer_format_version(pack_copy):
    edit_manifest(pack_copy, format_version=99)
    with pytest.raises(PackError, match=r"uses pack format 99, newer than this bitfit reads \(2\): upgrade bitfit"):
        load_pack(pack_copy)


def test_tensors_file_from_another_pack(pack_copy, pack_other_base):
    """Tensors from a pack of another base, checksum fixed up: the safetensors metadata gives it away."""
    (pack_copy / TENSORS_FILE).write_bytes((pack_other_base / TENSORS_FILE).read_bytes())
    edit_manifest(pack_copy, tensors_sha256=sha256_file(pack_copy / TENSORS_FILE))
    with pytest.raises(PackError, match=r"was saved for base fingerprint .* but manifest\.json says .*two packs were mixed"):
        load_pack(pack_copy)


def test_no_pack_at_path(tmp_path):
    with pytest.raises(PackError, match=r"no task pack at .*train one with `bitfit train`"):
        load_pack(tmp_path / "nowhere")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(PackError, match=r"is a file, not a task pack directory"):
        load_pack(tmp_path / "file.bin")


@pytest.mark.parametrize("field, value, match", [
    ("task_kind", "ranking", r"task_kind must be one of"),
    ("pooling", "max", r"pooling must be one of"),
    ("labels", ["only"], r"classification task needs at least 2 labels"),
])
def test_manifest_values_are_checked(pack_copy, field, value, match):
    edit_manifest(pack_copy, **{field: value})
    with pytest.raises(PackError, match=match):
        load_pack(pack_copy)
