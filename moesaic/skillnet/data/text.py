"""Text classification: a WordNet gloss -> its supersense (lexicographer file), from wordnet-base.

The source is Debian's WordNet 3.0 (``/usr/share/wordnet/data.{noun,verb}``, DATA.md 1b). Each
synset line reads ``offset lexfile pos ... | gloss``; the input is the gloss's first clause (up to
the first ';'), the label one of the ``num_classes`` most frequent noun and verb supersenses.
Glosses are deduplicated and split by their text, so no gloss is in two splits.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np

from moesaic.data import labelled
from moesaic.data.corpora import WORDNET_LEXNAMES
from moesaic.skillnet.data.common import Splits, cached, encode_bytes, require_file, split_by_key

__all__ = ["LEXNAMES", "load_supersense", "read_glosses"]

WORDNET_ROOT = Path("/usr/share/wordnet")

LEXNAMES = WORDNET_LEXNAMES  # the label names, by lexicographer file number


def read_glosses(root: Path | None = None) -> list[tuple[str, int]]:
    """(first clause of the gloss, lexicographer file number) of every noun and verb synset."""
    return list(_read_glosses(WORDNET_ROOT if root is None else root))


@functools.lru_cache(maxsize=2)
def _read_glosses(root: Path) -> tuple[tuple[str, int], ...]:
    for pos in ("noun", "verb"):
        require_file("supersense", root / f"data.{pos}", "wordnet-base")
    return tuple(labelled.read_glosses(root))


def load_supersense(
    num_classes: int = 10,
    per_class: int = 300,
    max_len: int = 64,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> Splits:
    """Gloss -> supersense classification: ``x`` uint8 (N, max_len) bytes, ``y`` int64 (N,).

    Args:
        num_classes: keep the most frequent noun / verb supersenses (1..41); ``y`` indexes them
            in frequency order, ``LEXNAMES[classes[y]]`` names them (see ``supersense_names``).
        per_class: glosses drawn per class (before the 80/10/10 split by gloss text).
        max_len: bytes per gloss (cut or zero-padded).
        seed: which glosses are drawn and how they split.
    """
    if not 1 <= num_classes <= 41:
        raise ValueError(f"num_classes={num_classes} must lie in [1, 41] (noun + verb lexfiles)")
    params = dict(num_classes=num_classes, per_class=per_class, max_len=max_len, seed=seed)
    return cached("supersense", params, lambda: _build(**params), data_dir)


def supersense_names(num_classes: int = 10) -> list[str]:
    """The lexicographer-file name of each label of ``load_supersense(num_classes)``."""
    counts = Counter(lex for _, lex in set(read_glosses()))
    return [LEXNAMES[lex] for lex, _ in _top(counts, num_classes)]


def _top(counts: Counter, k: int) -> list[tuple[int, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def _build(num_classes: int, per_class: int, max_len: int, seed: int) -> Splits:
    pairs = sorted(set(read_glosses()))
    seen: Counter = Counter(g for g, _ in pairs)
    pairs = [(g, lex) for g, lex in pairs if seen[g] == 1]  # a gloss with two labels is noise
    classes = [lex for lex, _ in _top(Counter(lex for _, lex in pairs), num_classes)]
    by_class: dict[int, list[str]] = {lex: [] for lex in classes}
    for g, lex in pairs:
        if lex in by_class:
            by_class[lex].append(g)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for y, lex in enumerate(classes):
        pool = by_class[lex]
        for i in rng.permutation(len(pool))[:per_class]:
            texts.append(pool[i])
            labels.append(y)
    split = split_by_key(texts, (0.1, 0.1), seed)
    x, y_arr = encode_bytes(texts, max_len), np.asarray(labels, dtype=np.int64)
    return {
        name: {"x": x[split == s], "y": y_arr[split == s]}
        for s, name in enumerate(("train", "val", "test"))
    }
