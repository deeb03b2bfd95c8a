"""tl_ray.data: reading every format, label maps, stratified splits, and each error path."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tl_ray.config import DataConfig
from tl_ray.data import Datasets, LabelMap, encode_labels, load_datasets, read_table, stratified_split
from tl_ray.errors import DataError

ROWS = [("great film", "pos"), ("dull plot", "neg"), ("Loved It", "pos"), ("meh", "neg")]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(row) + "\n" for row in rows))


def as_rows(table: pa.Table) -> list[tuple[str, str]]:
    return list(zip(table.column("text").to_pylist(), table.column("label").to_pylist()))


def balanced(n_per_class: dict[str, int]) -> pa.Table:
    rows = [(f"{label} {i}", label) for label, n in n_per_class.items() for i in range(n)]
    return pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_delimited_round_trip(tmp_path, suffix, sep):
    path = write(tmp_path / f"d{suffix}", f"text{sep}label\n" + "".join(f"{t}{sep}{lab}\n" for t, lab in ROWS))
    table = read_table(path)
    assert table.column_names == ["text", "label"]
    assert table.schema.field("text").type == pa.string() and table.schema.field("label").type == pa.string()
    assert as_rows(table) == ROWS


def test_tsv_keeps_commas_and_quotes(tmp_path):
    path = write(tmp_path / "d.tsv", 'text\tlabel\na, b, "c" d\tx\nok\ty\n')
    assert as_rows(read_table(path)) == [('a, b, "c" d', "x"), ("ok", "y")]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_jsonl_round_trip(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"d{suffix}", [{"text": t, "label": lab, "id": i} for i, (t, lab) in enumerate(ROWS)])
    assert as_rows(read_table(path)) == ROWS


def test_jsonl_mixed_label_types_and_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": "two"}\n')
    assert as_rows(read_table(path)) == [("a", "1"), ("b", "two")]


def test_jsonl_bad_line_is_named(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_table(path)


def test_parquet_round_trip_and_int_labels(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["a", "b", "c"], "y": [1, 10, 2], "extra": [0.1, 0.2, 0.3]}), path)
    table = read_table(path, text_column="body", label_column="y")
    assert as_rows(table) == [("a", "1"), ("b", "10"), ("c", "2")]
    assert LabelMap.from_values(table.column("label").to_pylist()).labels == ("1", "2", "10")


def test_fasttext_round_trip(tmp_path):
    text = "__label__pos  Great film! \n\n__label__neg __label__bad dull\r\n__label__pos ok\n"
    table = read_table(write(tmp_path / "d.txt", text), text_column="ignored", label_column="ignored2")
    assert as_rows(table) == [("Great film!", "pos"), ("dull", "neg"), ("ok", "pos")]


def test_fasttext_line_without_prefix(tmp_path):
    path = write(tmp_path / "d.txt", "__label__a x\nno label here\n")
    with pytest.raises(DataError, match=r"line 2 has no __label__ prefix"):
        read_table(path)


def test_gensim_pang_lee_corpus():
    spec = importlib.util.find_spec("gensim")  # locate without importing (gensim imports take ~2 s)
    if spec is None or spec.origin is None:
        pytest.skip("gensim is not installed")
    path = Path(spec.origin).parent / "test" / "test_data" / "pang_lee_polarity.cor"
    if not path.is_file():
        pytest.skip(f"gensim test data not installed: {path}")
    with pytest.raises(DataError, match="not valid utf-8; pass data.encoding"):  # it is cp1252 (0x97 dash)
        read_table(path)
    table = read_table(path, encoding="cp1252")
    assert table.num_rows == 200
    assert LabelMap.from_values(table.column("label").to_pylist()).labels == ("neg", "pos")
    texts = table.column("text").to_pylist()
    assert texts[0] == "simplistic , silly and tedious ." and not any("__label__" in t for t in texts)
    assert any("\u2014" in t for t in texts)


def test_custom_columns_and_int_labels_in_csv(tmp_path):
    path = write(tmp_path / "d.csv", "id,review,stars\n1,A,10\n2,B,2\n3,C,1\n")
    table = read_table(path, text_column="review", label_column="stars")
    assert as_rows(table) == [("A", "10"), ("B", "2"), ("C", "1")]
    assert LabelMap.from_values(table.column("label").to_pylist()).labels == ("1", "2", "10")


def test_text_kept_as_read(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"  Mixed CASE ",a\nb,b\n')
    assert read_table(path).column("text")[0].as_py() == "  Mixed CASE "


def test_latin1_needs_encoding(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\ncafé,pos\nthé,neg\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"bytes at offset 14 are not valid utf-8.*encoding"):
        read_table(path)
    assert read_table(path, encoding="latin-1").column("text").to_pylist() == ["café", "thé"]


@pytest.mark.parametrize("suffix, body", [(".txt", "__label__pos café\n__label__neg x\n"),
                                          (".jsonl", '{"text": "café", "label": "pos"}\n')])
def test_latin1_python_decoded_formats(tmp_path, suffix, body):
    path = write(tmp_path / f"d{suffix}", body, encoding="latin-1")
    with pytest.raises(DataError, match="not valid utf-8; pass data.encoding"):
        read_table(path)
    assert read_table(path, encoding="latin-1").column("text")[0].as_py() == "café"


# ---------------------------------------------------------------- read errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        read_table(tmp_path / "nope.csv")


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported data file type '\.xlsx'.*supported: .*\.csv"):
        read_table(write(tmp_path / "d.xlsx", "x"))


def test_unknown_column_lists_columns(tmp_path):
    path = write(tmp_path / "d.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=r"column 'txt' not found in .*d\.csv; columns are: a, b, c"):
        read_table(path, text_column="txt", label_column="b")


@pytest.mark.parametrize("body, kwargs, message", [
    ("text,label\na,b,c\n", {}, "CSV parse error: Expected 2 columns, got 3"),
    ("text,text,label\na,b,c\n", {}, "column 'text' appears 2 times"),
    ("text,label\na,b\n", {"encoding": "nope"}, "unknown encoding 'nope'"),
    ("text,label\na,b\n", {"empty_text": "drop"}, "empty_text must be 'skip' or 'error'"),
    ("text,label\na,b\n", {"label_column": "text"}, "text and label columns are both 'text'"),
])
def test_malformed_csv_and_bad_options(tmp_path, body, kwargs, message):
    with pytest.raises(DataError, match=message):
        read_table(write(tmp_path / "d.csv", body), **kwargs)


@pytest.mark.parametrize("name, body", [("d.csv", ""), ("e.csv", "text,label\n"), ("f.jsonl", "\n\n"),
                                        ("g.txt", "\n")])
def test_empty_file(tmp_path, name, body):
    with pytest.raises(DataError, match=r"is empty$|has no data rows$"):
        read_table(write(tmp_path / name, body))


def test_null_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": None}])
    with pytest.raises(DataError, match=r"1 rows have no label \(first at data row 2\)"):
        read_table(path)


def test_empty_text_skip_logs_count(tmp_path, caplog):
    path = write(tmp_path / "d.csv", "text,label\na,x\n,y\n   ,x\nb,y\n")
    with caplog.at_level(logging.WARNING, logger="tl_ray.data"):
        table = read_table(path)
    assert as_rows(table) == [("a", "x"), ("b", "y")]
    assert "skipped 2 rows with empty text" in caplog.text


def test_empty_text_error(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\na,x\n,y\n   ,x\nb,y\n")
    with pytest.raises(DataError, match=r"2 rows have empty text \(first at data row 2\)"):
        read_table(path, empty_text="error")


def test_only_empty_text_rows(tmp_path):
    with pytest.raises(DataError, match="no rows with text"):
        read_table(write(tmp_path / "d.csv", "text,label\n ,x\n"))


# ---------------------------------------------------------------- label map


def test_label_map_encode_decode_and_sorting():
    labels = LabelMap.from_values(["pos", "neg", "pos", "neutral"])
    assert labels.labels == ("neg", "neutral", "pos") and len(labels) == 3
    assert labels.encode(["pos", "neg"]) == [2, 0]
    assert labels.decode([2, 0]) == ["pos", "neg"]
    assert LabelMap.from_values(["10", "2", "-1", "2"]).labels == ("-1", "2", "10")
    with pytest.raises(DataError, match="unknown label.*'meh'"):
        labels.encode(["meh"])
    with pytest.raises(DataError, match="out of range"):
        labels.decode([3])


def test_label_map_one_class():
    with pytest.raises(DataError, match=r"label column 'label' has only one class \('pos'\); a classifier needs at least two"):
        LabelMap.from_values(["pos", "pos"])


def test_label_map_save_load_atomic(tmp_path):
    labels = LabelMap(("neg", "pos", "é"))
    path = tmp_path / "sub" / "labels.json"
    labels.save(path)
    assert LabelMap.load(path) == labels
    assert json.loads(path.read_text(encoding="utf-8")) == {"labels": ["neg", "pos", "é"]}
    LabelMap(("a", "b")).save(path)  # overwrite in place
    assert LabelMap.load(path).labels == ("a", "b")
    assert [p.name for p in path.parent.iterdir()] == ["labels.json"]


@pytest.mark.parametrize("body", ["not json", "[1, 2]", '{"labels": [1, 2]}', '{"labels": ["a", "a"]}'])
def test_label_map_load_malformed(tmp_path, body):
    with pytest.raises(DataError, match="labels.json"):
        LabelMap.load(write(tmp_path / "labels.json", body))


def test_label_map_load_missing(tmp_path):
    with pytest.raises(DataError, match="label map not found"):
        LabelMap.load(tmp_path / "labels.json")


def test_encode_labels_to_int64():
    table = encode_labels(pa.table({"text": ["a", "b"], "label": ["pos", "neg"]}), LabelMap(("neg", "pos")))
    assert table.schema.field("label").type == pa.int64()
    assert table.column("label").to_pylist() == [1, 0]
    with pytest.raises(DataError, match="unknown label.*'x'"):
        encode_labels(pa.table({"text": ["a"], "label": ["x"]}), LabelMap(("neg", "pos")))


# ---------------------------------------------------------------- stratified split


def test_split_deterministic_and_seeded():
    table = balanced({"a": 50, "b": 30, "c": 20})
    first, again, other = (stratified_split(table, 0.2, seed) for seed in (7, 7, 8))
    assert first[1].equals(again[1]) and first[0].equals(again[0])
    assert not first[1].equals(other[1])


def test_split_keeps_proportions_and_partitions():
    table = balanced({"a": 50, "b": 30, "c": 20})
    train, validation = stratified_split(table, 0.2, seed=0)
    counts = dict(zip(*[validation.column("label").value_counts().field(f).to_pylist() for f in ("values", "counts")]))
    assert counts == {"a": 10, "b": 6, "c": 4}
    assert train.column_names == validation.column_names == ["text", "label"]
    train_text, val_text = set(train.column("text").to_pylist()), set(validation.column("text").to_pylist())
    assert not train_text & val_text
    assert train_text | val_text == set(table.column("text").to_pylist())
    assert train.num_rows + validation.num_rows == table.num_rows


def test_split_small_classes_keep_one_each_side():
    train, validation = stratified_split(balanced({"a": 2, "b": 3}), 0.9, seed=0)
    assert sorted(train.column("label").to_pylist()) == ["a", "b"]
    assert sorted(validation.column("label").to_pylist()) == ["a", "b", "b"]


def test_split_class_with_one_row():
    with pytest.raises(DataError, match="class 'b' has only 1 row"):
        stratified_split(balanced({"a": 5, "b": 1}), 0.2, seed=0)


# ---------------------------------------------------------------- load_datasets


def test_load_datasets_with_split(tmp_path):
    path = write(tmp_path / "d.csv", "text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(20)))
    ds = load_datasets(DataConfig(path=str(path), validation_split=0.25), seed=3)
    assert isinstance(ds, Datasets) and ds.labels.labels == ("0", "1")
    assert ds.train.schema.field("label").type == pa.int64()
    assert (ds.train.num_rows, ds.validation.num_rows) == (14, 6)
    again = load_datasets(DataConfig(path=str(path), validation_split=0.25), seed=3)
    assert again.validation.equals(ds.validation)


def test_load_datasets_with_validation_file(tmp_path):
    train = write(tmp_path / "train.csv", "review,y\na,pos\nb,neg\nc,pos\n")
    val = write_jsonl(tmp_path / "val.jsonl", [{"review": "d", "y": "neg"}])
    cfg = DataConfig(path=str(train), validation_path=str(val), text_column="review", label_column="y")
    ds = load_datasets(cfg)
    assert ds.train.num_rows == 3 and ds.validation.column("label").to_pylist() == [0]


def test_load_datasets_unseen_validation_label(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    val = write(tmp_path / "val.csv", "text,label\nc,neutral\nd,pos\n")
    with pytest.raises(DataError, match=r"val\.csv has label\(s\) not in the training data .*'neutral'"):
        load_datasets(DataConfig(path=str(train), validation_path=str(val)))


def test_load_datasets_one_class_names_file(tmp_path):
    train = write(tmp_path / "train.csv", "text,sentiment\na,pos\nb,pos\n")
    with pytest.raises(DataError, match=r"train\.csv: label column 'sentiment' has only one class \('pos'\)"):
        load_datasets(DataConfig(path=str(train), label_column="sentiment"))


def test_load_datasets_defaults_to_a_tenth_held_out(tmp_path):
    rows = "".join(f"t{i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    train = write(tmp_path / "train.csv", "text,label\n" + rows)
    datasets = load_datasets(DataConfig(path=str(train)))
    assert (datasets.train.num_rows, datasets.validation.num_rows) == (36, 4)
