"""Train / validation split by document: no file is cut in two, and the split is stable."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from moesaic.data.corpora import Document

__all__ = ["split_documents"]


def _score(seed: int, name: str) -> float:
    """A uniform number in [0, 1) fixed by ``seed`` and the document's name alone."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, val) by document, each side in the input order.

    A document goes to validation when ``sha256(f"{seed}:{name}")``, read as a number in
    [0, 1), is below ``val_fraction``. Its side so depends only on its name and the seed:
    adding or removing other documents moves no one. The one exception keeps both sides
    non-empty when there are at least 2 documents: an empty side takes the document whose
    score lies nearest to it.

    Args:
        docs: documents with unique names.
        val_fraction: expected share of documents in validation, in (0, 1).
        seed: picks another, equally stable split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie in (0, 1)")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"document names must be unique for a stable split; repeated: {dupes}")
    scores = [_score(seed, name) for name in names]
    is_val = [s < val_fraction for s in scores]
    if len(docs) >= 2 and not any(is_val):
        is_val[scores.index(min(scores))] = True
    if len(docs) >= 2 and all(is_val):
        is_val[scores.index(max(scores))] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val
