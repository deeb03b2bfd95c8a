"""`tl-ray w2v train -> update -> eval` through the real CLI, as Ray tasks, and its failure paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import run_cli

GENSIM_DATA = Path(__import__("gensim").__file__).parent / "test" / "test_data"
LEE = GENSIM_DATA / "lee_background.cor"
PANG_LEE = GENSIM_DATA / "pang_lee_polarity.cor"  # cp1252, not UTF-8
SMALL = ["--vector-size", "16", "--min-count", "2", "--epochs", "2"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w2v") / "lee.model"
    code, lines = run_cli(["w2v", "train", str(LEE), "--out", str(out), *SMALL])
    assert code == 0
    assert lines[-1]["model"] == str(out) and lines[-1]["sentences"] == 300
    assert lines[-1]["words"] > 1000 and out.is_file()
    return out


def test_update_adds_words_keeps_the_input_and_eval_reports_before_and_after(trained, tmp_path):
    before = digest(trained)
    out = tmp_path / "updated.model"
    code, lines = run_cli(["w2v", "update", str(trained), "--corpus", str(PANG_LEE), "--out",
                           str(out), "--encoding", "cp1252", "--epochs", "2"])
    assert code == 0
    summary = lines[-1]
    assert summary["words_added"] > 0 and summary["words_after"] == summary["words_before"] + summary["words_added"]
    assert 0.0 < summary["mean_cosine_old_new"] <= 1.0 and summary["old_words_in_new_text"] > 0
    assert digest(trained) == before and out.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind

    results = {}
    for model in (trained, out):
        code, lines = run_cli(["w2v", "eval", str(model)])
        assert code == 0
        results[model] = lines[-1]
    for result in results.values():
        assert set(result) >= {"wordsim353", "simlex999", "analogies", "words"}
        assert -1.0 <= result["wordsim353"]["spearman"] <= 1.0
        assert result["analogies"]["answered"] > 0
    assert results[out]["words"] == results[trained]["words"] + summary["words_added"]


def test_fasttext_arch_and_a_folder_corpus(ray_session, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = LEE.read_text(encoding="utf-8").splitlines()
    (folder / "a.txt").write_text("\n".join(lines[:150]), encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(lines[150:]), encoding="utf-8")
    out = tmp_path / "ft.model"
    argv = ["w2v", "train", str(folder), "--out", str(out), "--arch", "fasttext", "--bucket", "5000"]
    code, result = run_cli([*argv, *SMALL])
    assert code == 0 and result[-1]["sentences"] == 300 and result[-1]["arch"] == "fasttext"
    from gensim.models import FastText

    assert isinstance(FastText.load(str(out)), FastText)


def test_bad_input_fails_with_one_line_and_exit_2(trained, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    not_a_model = tmp_path / "notes.model"
    not_a_model.write_text("hello", encoding="utf-8")
    from gensim.models import Word2Vec

    vectors_only = tmp_path / "vectors.kv"
    Word2Vec.load(str(trained)).wv.save(str(vectors_only))
    before = digest(trained)
    cases = {
        "corpus not found": ["w2v", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "m")],
        "has no words": ["w2v", "train", str(blank), "--out", str(tmp_path / "m")],
        "line 27 is not valid utf-8": ["w2v", "train", str(PANG_LEE), "--out", str(tmp_path / "m")],
        "--arch must be one of": ["w2v", "train", str(LEE), "--out", str(tmp_path / "m"), "--arch", "glove"],
        "is the input model": ["w2v", "update", str(trained), "--corpus", str(LEE), "--out", str(trained)],
        "not a gensim model": ["w2v", "update", str(not_a_model), "--corpus", str(LEE), "--out", str(tmp_path / "m")],
        "not a trainable": ["w2v", "update", str(vectors_only), "--corpus", str(LEE), "--out",
                            str(tmp_path / "m")],
        "cannot read": ["w2v", "eval", str(not_a_model)],
        "exceeds": ["w2v", "train", str(LEE), "--out", str(tmp_path / "m"), "--workers", "64"],
    }
    for expected, argv in cases.items():
        code, lines = run_cli(argv)
        err = capsys.readouterr().err
        assert code == 2 and not lines, (expected, err)
        message = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(message) == 1 and expected in message[0], (expected, err)
    assert digest(trained) == before and not (tmp_path / "m").exists()
