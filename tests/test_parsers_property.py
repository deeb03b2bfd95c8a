"""Parsers never crash: any run config, `--set` override, search space or data file gives a
result or one short line of TLRayError, never another exception (issue 17, item 3).

Hypothesis draws the inputs: near-valid structures with wrong types, huge numbers, odd
strings and random bytes, in random encodings. No Ray here.
"""

from __future__ import annotations

import io
import json
import math

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tl_ray.config import DataConfig, apply_overrides, load_config, parse_backbone, parse_config
from tl_ray.data import load_datasets, read_table
from tl_ray.errors import TLRayError
from tl_ray.images import decode_image, read_image_table
from tl_ray.search.space import load_space, parse_space, to_overrides, validate_against

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
optuna.logging.set_verbosity(optuna.logging.ERROR)


def one_line(error: TLRayError) -> None:
    message = str(error)
    assert message and len(message.splitlines()) == 1, repr(message)
    assert len(message) <= 600, f"{len(message)} characters: {message[:200]!r}..."


def outcome(parse, *args, **kwargs):
    """parse(...)'s result, or the TLRayError it raised after checking it is one short line."""
    try:
        return parse(*args, **kwargs)
    except TLRayError as error:
        one_line(error)
        return error


# ---------------------------------------------------------------- values

odd_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "~nosuchuser/x", "a\nb", "a\x00b", "\u2028", "é" * 3, "x" * 5000, "1" * 5000,
                     "yes", "null", "1e-5", ".nan", "-.inf", "'", '"', "{", "[", ":", "a=b"]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.just(10**4000),
    st.floats(allow_nan=True, allow_infinity=True), odd_text,
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(odd_text, inner, max_size=4)),
                      max_leaves=12)

CONFIG_KEYS = ["data", "backbone", "train", "search", "output", "storage_path", "path", "kind",
               "text_column", "validation_split", "validation_path", "encoding", "empty_text",
               "image_column", "name_or_path", "unfreeze_depth", "mode", "vectors", "weights",
               "cnn_filters", "lora_target_modules", "head_epochs", "epochs", "lr", "batch_size",
               "trials", "sampler", "metric", "hf-text", "keras-image", "word-vectors"]
config_keys = st.one_of(st.sampled_from(CONFIG_KEYS), odd_text)
config_trees = st.recursive(scalars, lambda inner: st.dictionaries(config_keys, inner, max_size=5),
                            max_leaves=16)


def run_config() -> st.SearchStrategy:
    """Mostly-valid run configs with one section or value swapped for something odd."""
    data = st.fixed_dictionaries({"path": st.one_of(st.just("x.csv"), values)},
                                 optional={k: values for k in ("validation_split", "validation_path",
                                                               "encoding", "empty_text", "image_column")})
    backbone = st.fixed_dictionaries(
        {"kind": st.one_of(st.sampled_from(["hf-text", "keras-image", "word-vectors"]), values)},
        optional={k: values for k in ("name_or_path", "unfreeze_depth", "vectors", "weights",
                                      "cnn_filters", "head_epochs", "image_size", "lora_target_modules")})
    train = st.dictionaries(st.sampled_from(["lr", "epochs", "batch_size", "seed", "metric"]), values)
    return st.one_of(config_trees, st.fixed_dictionaries(
        {"data": st.one_of(data, values)},
        optional={"backbone": st.one_of(backbone, values), "train": train, "output": values,
                  config_keys: values}))


@FAST
@given(run_config())
def test_run_configs_parse_or_fail_in_one_line(raw):
    outcome(parse_config, raw)
    if isinstance(raw, dict) and isinstance(raw.get("backbone"), dict):
        outcome(parse_backbone, raw["backbone"])


overrides = st.lists(st.one_of(
    odd_text,
    st.builds(lambda key, value: f"{key}={value}",
              st.one_of(st.sampled_from(["train.lr", "train.epochs", "data.path", "backbone.kind",
                                         "data", "data.path.x", "a..b", ".", " ", "backbone"]), odd_text),
              st.one_of(odd_text, st.sampled_from(["[1, 2", "{a: 1", "!!python/object:os.system",
                                                   "&a [*a]", "*b", "- a\n- b", "@x", "`x", "%"]))),
), max_size=4)


@FAST
@given(overrides)
def test_set_overrides_apply_or_fail_in_one_line(items):
    base = {"data": {"path": "x.csv"}, "train": {"lr": 1e-4}}
    raw = outcome(apply_overrides, base, items)
    if isinstance(raw, dict):
        outcome(parse_config, raw)


@FAST
@given(st.one_of(st.binary(max_size=300), st.builds(lambda t: t.encode("utf-8", "surrogatepass"),
                                                      st.text(max_size=200))),
       st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_config_files_load_or_fail_in_one_line(tmp_path_factory, body, encoding):
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    seed = "data: {path: x.csv}\ntrain: {lr: 1.0e-4}\n".encode(encoding)
    path.write_bytes(seed + body if len(body) % 2 else body)
    outcome(load_config, path, ["train.epochs=1"])


# ---------------------------------------------------------------- search spaces

numbers = st.one_of(st.integers(-5, 40), st.floats(-1e3, 1e3), st.sampled_from(
    [0, 1e-5, "1e-5", "x", None, True, 10**400, -10**400, float("nan"), float("inf"), [1], {"a": 1}]))
param = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["float", "int", "categorical"]), values)},
    optional={"low": numbers, "high": numbers, "log": st.one_of(st.booleans(), values),
              "step": numbers, "choices": st.one_of(st.lists(scalars, max_size=4), values),
              "when": st.one_of(st.dictionaries(
                  st.sampled_from(["backbone.mode", "train.lr", "backbone.unfreeze_depth", "nope"]),
                  st.one_of(st.dictionaries(st.sampled_from(["eq", "ne", "gt", "in", "le", "bogus"]),
                                            values, max_size=2), values), max_size=2), values)})
PARAM_NAMES = ["train.lr", "train.batch_size", "backbone.unfreeze_depth", "backbone.mode",
               "backbone.lora_rank", "train.weight_decay", "data.path", "train.epochs", "nope.x"]
space = st.one_of(values, st.fixed_dictionaries(
    {"metric": st.one_of(st.sampled_from(["val_accuracy", "val_loss"]), values),
     "params": st.one_of(st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), odd_text),
                                         param, min_size=1, max_size=3), values)},
    optional={"mode": st.one_of(st.sampled_from(["max", "min"]), values), "extra": values}))
BASE = parse_config({"data": {"path": "x.csv"}, "backbone": {"unfreeze_depth": 2}})


@settings(FAST, max_examples=120)
@given(space)
def test_search_spaces_parse_sample_and_round_trip(raw):
    parsed = outcome(parse_space, raw)
    if isinstance(parsed, TLRayError):
        return
    assert parse_space(parsed.to_dict()) == parsed
    outcome(validate_against, parsed, BASE, 6)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    sampled = outcome(parsed.sample, trial, fixed={"backbone.mode": "finetune", "train.lr": 1e-4})
    if isinstance(sampled, dict):
        back = apply_overrides({}, to_overrides(sampled))
        for name, value in sampled.items():
            section, key = name.split(".", 1) if "." in name else ("", name)
            got = back[section][key] if section else back[key]
            assert got == value or (math.isnan(got) and math.isnan(value)), (name, value, got)


@FAST
@given(st.one_of(st.binary(max_size=300), st.builds(lambda raw: yaml.safe_dump(raw).encode(), space)))
def test_search_space_files_load_or_fail_in_one_line(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_bytes(body)
    outcome(load_space, path)


# ---------------------------------------------------------------- data files

cells = st.one_of(st.text(max_size=20), st.sampled_from(["", " ", '"', '""', "a,b", "a\tb", "a\nb", "\ud800",
                                                         "__label__x", "null", "1", "10" * 3000, "[" * 3000]))
rows = st.lists(st.tuples(cells, cells), min_size=0, max_size=8)
SUFFIXES = [".csv", ".tsv", ".jsonl", ".ndjson", ".txt", ".cor", ".parquet"]
ENCODINGS = ["utf-8", "latin-1", "utf-16", "cp1252", "utf-8-sig"]


def render(suffix: str, header: tuple[str, str], body: list[tuple[str, str]], quote: bool) -> str:
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        cell = (lambda s: '"' + s.replace('"', '""') + '"') if quote else (lambda s: s)
        return "".join(sep.join(map(cell, line)) + "\n" for line in [header, *body])
    if suffix in (".jsonl", ".ndjson"):
        return "".join(json.dumps(dict(zip(header, line))) + "\n" for line in body)
    return "".join(f"__label__{label} {text}\n" for text, label in body)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    suffix = draw(st.sampled_from(SUFFIXES))
    if draw(st.integers(0, 4)) == 0:
        return suffix, draw(st.binary(max_size=400))
    header = draw(st.tuples(st.sampled_from(["text", "label", "review", ""]),
                            st.sampled_from(["label", "text", "y", "a\nb"])))
    body = draw(rows)
    if suffix == ".parquet":
        kinds = st.sampled_from(["string", "binary", "int", "list", "struct", "null"])
        columns = {name: _column(draw(kinds), [r[i] for r in body]) for i, name in enumerate(header)}
        out = io.BytesIO()
        pq.write_table(pa.table(columns) if len(set(header)) == 2 else pa.table({"x": [1]}), out)
        data = out.getvalue()
        cut = draw(st.integers(0, len(data)))
        return suffix, data if draw(st.booleans()) else data[:cut]
    text = render(suffix, header, body, draw(st.booleans()))
    data = text.encode(draw(st.sampled_from(ENCODINGS)), "replace")
    if draw(st.booleans()):  # splice in random bytes
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    return suffix, data


def _column(kind: str, texts: list[str]) -> pa.Array:
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # parquet holds no lone surrogates
    if kind == "binary":
        return pa.array([t.encode("utf-16") for t in texts], pa.binary())
    if kind == "int":
        return pa.array([len(t) for t in texts], pa.int64())
    if kind == "list":
        return pa.array([[t] for t in texts])
    if kind == "struct":
        return pa.array([{"t": t} for t in texts])
    if kind == "null":
        return pa.nulls(len(texts))
    return pa.array(texts, pa.string())


read_options = st.fixed_dictionaries({}, optional={
    "encoding": st.sampled_from(ENCODINGS + ["ascii", "base64", "rot13", "zlib", "nope", "utf\x00",
                                          "unicode_escape", "utf-7", "idna", "punycode"]),
    "text_column": st.sampled_from(["text", "review", "a\nb", "x" * 300]),
    "label_column": st.sampled_from(["label", "y", "text"]),
    "empty_text": st.sampled_from(["skip", "error", "drop"]),
})


@settings(FAST, max_examples=150)
@given(data_files(), read_options, st.sampled_from([None, 0.5]))
def test_data_files_read_or_fail_in_one_line(tmp_path_factory, file, options, split):
    suffix, data = file
    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    path.write_bytes(data)
    table = outcome(read_table, path, **options)
    if isinstance(table, pa.Table):
        assert table.column_names == ["text", "label"] and table.num_rows > 0
        assert table.column("label").null_count == 0
        cfg = DataConfig(path=str(path), validation_split=split, **options)
        outcome(load_datasets, cfg, seed=0)


def test_a_huge_line_reads_in_every_delimited_format(tmp_path):
    long_text = "word " * 400_000  # 2 MB in one field: past pyarrow's default 1 MB block
    for suffix, sep in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"d{suffix}"
        path.write_text(f"text{sep}label\n{long_text}{sep}a\nshort{sep}b\n", encoding="utf-8")
        assert read_table(path).column("text")[0].as_py() == long_text
    path = tmp_path / "d.txt"
    path.write_text(f"__label__a {long_text}\n__label__b x\n", encoding="utf-8")
    assert read_table(path).column("label").to_pylist() == ["a", "b"]


# ---------------------------------------------------------------- images


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()
image_cells = st.one_of(st.just(PNG), st.binary(max_size=64), st.integers(), st.floats(),
                        st.sampled_from(["~nosuchuser/a.png", "a\x00b.png", "missing.png", ".", "",
                                         10**30, None]),
                        st.builds(lambda at, junk: PNG[:at] + junk + PNG[at + len(junk):],
                                  st.integers(0, len(PNG)), st.binary(min_size=1, max_size=6)))


@settings(FAST, max_examples=80)
@given(st.lists(st.tuples(image_cells, st.one_of(st.sampled_from(["a", "b", ""]), st.integers())),
                max_size=4),
       st.sampled_from([".parquet", ".csv"]), st.booleans())
def test_image_tables_read_or_fail_in_one_line(tmp_path_factory, rows_, suffix, dup):
    path = tmp_path_factory.mktemp("img") / f"t{suffix}"
    images = [cell for cell, _ in rows_]
    labels = [label for _, label in rows_]
    try:
        columns = {"img": pa.array(images), "label": pa.array(labels)}
    except (pa.ArrowException, OverflowError):
        columns = {"img": pa.array([repr(c) for c in images]), "label": pa.array(map(str, labels))}
    table = pa.table(columns)
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        header = "img,label,img\n" if dup else "img,label\n"
        path.write_bytes(header.encode() + b"".join(
            (c if isinstance(c, bytes) else str(c).encode("utf-8", "surrogatepass")) + f",{l}\n".encode()
            for c, l in rows_))
    outcome(read_image_table, path, "img", "label")


@FAST
@given(image_cells)
def test_decode_image_decodes_or_fails_in_one_line(data):
    if isinstance(data, (bytes, str)):
        outcome(decode_image, data, 8)
