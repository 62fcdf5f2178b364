"""Questions from the Python docs: parsed with qualified names, deterministic, split by object
with no object in two splits, and each answer inside the passage the pair names."""

from __future__ import annotations

import pytest

from moesaic.data import corpora
from moesaic.data.debian import SourceMissingError
from moesaic.data.pydocs_qa import (
    SPLITS,
    clean_markup,
    first_sentence,
    load_passages,
    load_pydocs_qa,
    split_of,
)
from tests.cases import require_debian

SAMPLE = """\
:mod:`shelf` --- Persistent shelves
===================================

.. module:: shelf
   :synopsis: Keep objects.

.. index:: single: shelf

Intro text about shelves, with a :func:`open` reference and ``literal`` text.

.. function:: open(filename, flag='c', \\
                   protocol=None)

   Open a persistent dictionary.  The *filename* is the base name.

.. class:: Shelf(dict)

   A dictionary-like object. It keeps things.

   .. method:: sync()

      Write back all entries in the cache.

   .. method:: close()
               close(force)

      Synchronize and close the persistent dict object.

Another section
---------------

.. function:: helper

   Help with something. It does more, e.g. this.
"""


@pytest.fixture
def sample_docs(tmp_path, monkeypatch):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "shelf.rst.txt").write_text(SAMPLE)
    monkeypatch.setattr(corpora, "PYDOCS_ROOT", tmp_path)
    return tmp_path


def test_objects_get_qualified_names_and_their_questions(sample_docs):
    qa = load_pydocs_qa(sources=["library/"], passage_bytes=160)
    pairs = sorted((p for split in qa.splits.values() for p in split), key=lambda p: p.question)
    got = {(p.question, p.answer) for p in pairs}
    assert got == {
        ("What does shelf.open do?", "Open a persistent dictionary."),
        ("What are the arguments of shelf.open?", "(filename, flag='c', protocol=None)"),
        ("What is shelf.Shelf?", "A dictionary-like object."),
        ("What are the arguments of shelf.Shelf?", "(dict)"),
        ("What does shelf.Shelf.sync do?", "Write back all entries in the cache."),
        ("What does shelf.Shelf.close do?", "Synchronize and close the persistent dict object."),
        ("What does shelf.helper do?", "Help with something."),
    }
    for p in pairs:
        assert p.answer in qa.passages[p.passage_id].text
        assert p.source == "library/shelf.rst.txt"
    texts = [p.text for p in qa.passages]
    assert all(len(t.encode()) <= 160 for t in texts)
    assert any(
        t.startswith(".. method:: shelf.Shelf.close()\n.. method:: shelf.Shelf.close(force)")
        for t in texts
    )
    assert not any("single: shelf" in t or ":synopsis:" in t for t in texts)  # bookkeeping
    intro = "Intro text about shelves, with a open reference and literal text."
    assert texts[0] == f".. module:: shelf\n{intro}" and qa.passages[0].section.startswith("shelf")
    assert qa.passages[-1].section == "Another section"


def test_markup_and_sentences():
    assert clean_markup(":func:`~os.path.join` and :ref:`the table <table>`") == (
        "os.path.join and the table"
    )
    assert clean_markup("see `JSON <https://json.org>`_ and **bold** and *obj*") == (
        "see JSON and bold and obj"
    )
    assert first_sentence("Return x. Then more.") == "Return x."
    assert first_sentence("Use e.g. this one. Next") == "Use e.g. this one."
    assert first_sentence("no end") == ""


def test_a_long_paragraph_is_split_at_words_within_the_passage_size(tmp_path, monkeypatch):
    (tmp_path / "library").mkdir()
    words = " ".join(f"word{i}" for i in range(200))
    (tmp_path / "library" / "long.rst.txt").write_text(f"Title\n=====\n\n{words}\n")
    monkeypatch.setattr(corpora, "PYDOCS_ROOT", tmp_path)
    passages = load_passages(["library/"], passage_bytes=100)
    assert " ".join(p.text for p in passages) == words  # nothing lost, no word cut
    assert all(len(p.text.encode()) <= 100 for p in passages)
    assert [p.id for p in passages] == list(range(len(passages)))


def test_missing_docs_name_the_apt_line(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "PYDOCS_ROOT", tmp_path / "absent")
    with pytest.raises(SourceMissingError, match="apt-get install -y python3.11-doc"):
        load_pydocs_qa()
    monkeypatch.setattr(corpora, "PYDOCS_ROOT", tmp_path)
    with pytest.raises(ValueError, match="matches none of the 0 reST files"):
        load_pydocs_qa(sources=["library/nothing"])


SOURCES = ["library/json", "library/math", "library/os.path", "library/string", "library/re"]


@pytest.fixture(scope="module")
def real_qa():
    require_debian("python3.11-doc")
    return load_pydocs_qa(sources=SOURCES)


def test_questions_from_the_docs_are_deterministic(real_qa):
    again = load_pydocs_qa(sources=SOURCES)
    assert again.splits == real_qa.splits
    assert again.passages == real_qa.passages
    assert sum(len(v) for v in real_qa.splits.values()) > 100


def test_the_splits_are_disjoint_by_object_and_question(real_qa):
    names = {split: {p.name for p in pairs} for split, pairs in real_qa.splits.items()}
    questions = {split: {p.question for p in pairs} for split, pairs in real_qa.splits.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not names[a] & names[b] and not questions[a] & questions[b]
    assert all(real_qa.splits[split] for split in SPLITS)
    for split, pairs in real_qa.splits.items():
        assert all(split_of(p.name) == split for p in pairs)


def test_every_answer_is_in_the_passage_the_pair_names(real_qa):
    for pairs in real_qa.splits.values():
        for p in pairs:
            passage = real_qa.passages[p.passage_id]
            assert p.answer in passage.text and passage.source == p.source, p


def test_caps_take_a_fixed_sample_of_each_split(real_qa):
    capped = load_pydocs_qa(sources=SOURCES, caps={"train": 20, "test": 5})
    assert len(capped.splits["train"]) == 20 and len(capped.splits["test"]) == 5
    assert capped.splits["val"] == real_qa.splits["val"]
    assert set(capped.splits["train"]) <= set(real_qa.splits["train"])
