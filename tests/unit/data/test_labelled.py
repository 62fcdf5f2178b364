"""Labelled tasks: disjoint deterministic splits, caps, and errors naming what is missing."""

import hashlib
from collections import Counter

import pytest

from moesaic.data import labelled
from moesaic.data.labelled import LABELLED_TASKS, load_labelled


@pytest.mark.parametrize("task", sorted(LABELLED_TASKS))
def test_splits_are_disjoint_and_every_text_has_one_label(task):
    data = load_labelled(task, num_classes=4, per_class=200)
    texts = [t for rows in data.splits.values() for t, _ in rows]
    assert len(texts) == len(set(texts))
    labels = Counter(y for rows in data.splits.values() for _, y in rows)
    assert sorted(labels) == list(range(len(data.classes))) and max(labels.values()) <= 200
    for name, fraction in (("val", 0.1), ("test", 0.1)):
        assert abs(len(data.splits[name]) / len(texts) - fraction) < 0.06, name


def test_a_larger_cap_only_adds_texts_and_splits_stay_put():
    small = load_labelled("fortune", num_classes=5, per_class=50)
    large = load_labelled("fortune", num_classes=5, per_class=100)
    for name in ("train", "val", "test"):
        assert set(small.splits[name]) <= set(large.splits[name])
    assert small.classes == large.classes


def test_classes_are_by_frequency_and_texts_with_two_labels_are_dropped(monkeypatch):
    pairs = [("a", "x"), ("b", "x"), ("c", "x"), ("d", "y"), ("e", "y"), ("a", "y"), ("f", "z")]
    pairs += [(f"t{i}", "x") for i in range(40)] + [(f"u{i}", "y") for i in range(40)]
    monkeypatch.setitem(LABELLED_TASKS, "toy", lambda: pairs)
    data = load_labelled("toy", num_classes=2)
    assert data.classes == ["x", "y"]
    texts = {t for rows in data.splits.values() for t, _ in rows}
    assert "a" not in texts and "f" not in texts and {"b", "d"} <= texts
    # the split is a fixed function of the text alone
    for name, rows in data.splits.items():
        for text, _ in rows:
            u = int.from_bytes(hashlib.sha256(f"split:{text}".encode()).digest()[:8], "big")
            expected = "val" if u < 0.1 * 2**64 else "test" if u < 0.2 * 2**64 else "train"
            assert name == expected


def test_bad_arguments_and_a_missing_wheel_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match="task='imdb' is not one of"):
        load_labelled("imdb")
    with pytest.raises(ValueError, match="per_class=-1 must be an int >= 0"):
        load_labelled("fortune", per_class=-1)
    with pytest.raises(ValueError, match="split empty: keep more texts per class"):
        load_labelled("fortune", num_classes=2, per_class=2)
    monkeypatch.setattr(labelled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[finetune\]'"):
        load_labelled("sentiment-zh")
