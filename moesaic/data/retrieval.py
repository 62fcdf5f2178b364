"""Passage retrieval for grounded generation: a BM25 index and a learned re-scorer of its top hits.

``BM25Index`` ranks passages with Okapi BM25 from the maintained ``rank-bm25`` package (extra
``retgen``): its ``BM25Okapi`` computes every score, so ours are rank-bm25's own, bit for bit.
Terms are lowercase words and dotted names (``json.dumps`` is the term ``json.dumps`` and the
terms ``json`` and ``dumps``) without English stop words. Results are deterministic: equal
scores are ordered by passage id. ``save`` / ``load`` write the passages and their terms as
JSON, so a reloaded index ranks exactly as the one that was saved.

``LearnedRetriever`` is the retriever that joint training updates (RetGen, Zhang et al. 2021,
§3, trains the retriever from the generator's likelihood). BM25 has nothing to learn, so the
retriever re-scores BM25's top ``candidates`` passages::

    s(q, d) = a * bm25(q, d) + e(q)^T W e(d)

with ``a > 0`` a learned scale (kept as its log) and ``e(.)`` the mean of learned embeddings of
the text's hashed terms (a bag of words). ``W`` starts at zero, so training starts from BM25's
ranking; the generator's gradient ``posterior - prior`` on each score then moves ``a``, ``W``
and the term embeddings. A bag-of-words encoder rather than the language model's own states
keeps the retriever independent of the generator's tokenizer and cheap enough to score every
candidate at every step.

Shape legend (docs/shapes.md): B batch (queries), C candidates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "Passage",
    "BM25Index",
    "LearnedRetriever",
    "passage_terms",
    "query_terms",
    "RETGEN_EXTRA_MESSAGE",
]

RETGEN_EXTRA_MESSAGE = "BM25 retrieval needs the 'retgen' extra: pip install 'moesaic[retgen]'"
INDEX_FORMAT = "moesaic-bm25"
INDEX_VERSION = 1
PASSAGES_FILE = "passages.json"
TERMS_FILE = "terms.json"

# Common English words that carry no topic; dropped from passages and queries alike.
STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from has have how if in into is it its may must "
    "not of on or should such than that the their then there these this to was were what when "
    "which will with would you".split()
)
_TERM = re.compile(r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*|[0-9]+")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrievable text: its ``id`` (its position in the index), the ``source`` file, the
    ``section`` heading it sits under, and its ``text``."""

    id: int
    source: str
    section: str
    text: str


def query_terms(text: str) -> list[str]:
    """The terms of ``text`` in order: each lowercase word or number, and each dotted name
    both whole and by its parts; stop words dropped."""
    out = []
    for match in _TERM.findall(text.lower()):
        parts = match.split(".")
        if len(parts) > 1:
            out.append(match)
        out += [p for p in parts if p and p not in STOP_WORDS]
    return out


def passage_terms(passage: Passage) -> list[str]:
    """The terms BM25 indexes for ``passage``: those of its section heading and its text."""
    return query_terms(f"{passage.section}\n{passage.text}")


def _rank_bm25():
    try:
        import rank_bm25
    except ImportError as err:
        raise ImportError(RETGEN_EXTRA_MESSAGE) from err
    return rank_bm25


class BM25Index:
    """Okapi BM25 over ``passages`` (rank-bm25's ``BM25Okapi`` with ``k1``, ``b``, ``epsilon``).

    Args:
        passages: the documents; ``passages[i].id`` must be ``i``.
        terms: each passage's terms (``passage_terms`` when None; ``load`` passes the saved
            ones so a reloaded index is the saved one whatever the term rules became since).

    Example::

        >>> index = BM25Index([Passage(0, "a", "", "json.dumps(obj)"), Passage(1, "b", "", "x")])
        >>> index.search("What does json.dumps do?", k=1)
        [(0, ...)]
    """

    def __init__(
        self,
        passages: Sequence[Passage],
        *,
        terms: Sequence[Sequence[str]] | None = None,
        k1: float = 1.5,
        b: float = 0.75,
        epsilon: float = 0.25,
    ) -> None:
        rank_bm25 = _rank_bm25()
        self.passages = list(passages)
        if not self.passages:
            raise ValueError("passages is empty: an index needs at least one passage")
        for i, p in enumerate(self.passages):
            if p.id != i:
                raise ValueError(f"passages[{i}].id={p.id} must be {i} (its position)")
        self.terms = [list(t) for t in terms] if terms is not None else None
        if self.terms is None:
            self.terms = [passage_terms(p) for p in self.passages]
        if len(self.terms) != len(self.passages):
            raise ValueError(f"{len(self.terms)} term lists for {len(self.passages)} passages")
        if not any(self.terms):
            raise ValueError("the passages hold no terms: nothing to index")
        self.k1, self.b, self.epsilon = k1, b, epsilon
        self.bm25 = rank_bm25.BM25Okapi(self.terms, k1=k1, b=b, epsilon=epsilon)
        self._postings: dict[str, list[int]] = {}
        for pid, words in enumerate(self.terms):
            for word in dict.fromkeys(words):
                self._postings.setdefault(word, []).append(pid)

    def __len__(self) -> int:
        return len(self.passages)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for ``query`` (rank-bm25's ``get_scores``)."""
        return self.bm25.get_scores(query_terms(query))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best passages for ``query`` as ``(passage_id, score)``, best first, equal
        scores by passage id (fewer when the index is smaller)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an int >= 1")
        words = query_terms(query)
        # Only passages holding a query term can score above 0: score those alone when
        # enough of them do (rank-bm25's per-passage formula, so the same numbers).
        hits = sorted({pid for w in dict.fromkeys(words) for pid in self._postings.get(w, ())})
        if hits:
            scored = zip(hits, self.bm25.get_batch_scores(words, hits))
            positive = sorted(((-s, pid) for pid, s in scored if s > 0))
            if len(positive) >= k:
                return [(pid, float(-s)) for s, pid in positive[:k]]
        full = self.bm25.get_scores(words)
        order = np.lexsort((np.arange(len(full)), -full))[:k]
        return [(int(pid), float(full[pid])) for pid in order]

    def save(self, directory: str | Path) -> None:
        """Write the passages and their terms as JSON under ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION}
        params = {"k1": self.k1, "b": self.b, "epsilon": self.epsilon}
        rows = [[p.source, p.section, p.text] for p in self.passages]
        _write_json(directory / PASSAGES_FILE, {**meta, **params, "passages": rows})
        _write_json(directory / TERMS_FILE, {**meta, "terms": self.terms})

    @classmethod
    def load(cls, directory: str | Path) -> BM25Index:
        """The index ``save`` wrote to ``directory``."""
        directory = Path(directory)
        data = _read_json(directory / PASSAGES_FILE)
        terms = _read_json(directory / TERMS_FILE)["terms"]
        passages = [Passage(i, *row) for i, row in enumerate(data["passages"])]
        params = {name: data[name] for name in ("k1", "b", "epsilon")}
        return cls(passages, terms=terms, **params)

    def __repr__(self) -> str:
        return f"BM25Index(passages={len(self)}, k1={self.k1}, b={self.b})"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a saved BM25Index directory")
    data = json.loads(path.read_text())
    if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
        found = (data.get("format"), data.get("version"))
        raise ValueError(f"{path}: format {found} is not ({INDEX_FORMAT!r}, {INDEX_VERSION})")
    return data


def term_bucket(term: str, buckets: int) -> int:
    """A term's embedding row: a fixed hash (crc32, the same in every process) mod ``buckets``."""
    return zlib.crc32(term.encode()) % buckets


class LearnedRetriever(nn.Module):
    """BM25's top ``candidates`` passages re-scored by ``a * bm25 + e(q)^T W e(d)`` (see the
    module docstring); ``forward`` gives each query's candidates and their scores.

    Args:
        index: the BM25 index (kept as a plain attribute: it is data, not a parameter).
        candidates: how many of BM25's best passages are re-scored per query.
        dim: width of the term embeddings.
        buckets: hash buckets of the term embeddings.
        bm25_scale: the initial ``a``.
    """

    def __init__(
        self,
        index: BM25Index,
        *,
        candidates: int = 16,
        dim: int = 32,
        buckets: int = 4096,
        bm25_scale: float = 0.25,
    ) -> None:
        super().__init__()
        for name, value in (("candidates", candidates), ("dim", dim), ("buckets", buckets)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not (isinstance(bm25_scale, (int, float)) and math.isfinite(bm25_scale)) or (
            bm25_scale <= 0
        ):
            raise ValueError(f"bm25_scale={bm25_scale!r} must be a finite float > 0")
        self.index, self.candidates, self.buckets = index, candidates, buckets
        self.initial_scale = float(bm25_scale)
        self.log_scale = nn.Parameter(torch.empty(()))
        self.embed = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.bilinear = nn.Parameter(torch.empty(dim, dim))
        self._hits: dict[str, list[tuple[int, float]]] = {}
        self._bags: dict[int, list[int]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_scale.fill_(math.log(self.initial_scale))
            nn.init.normal_(self.embed.weight, 0.0, 0.1)
            nn.init.zeros_(self.bilinear)  # start from BM25's ranking

    def extra_repr(self) -> str:
        return f"index={self.index!r}, candidates={self.candidates}, buckets={self.buckets}"

    def passage_text(self, pid: int) -> str:
        return self.index.passages[pid].text

    def search(self, query: str) -> list[tuple[int, float]]:
        """BM25's ``candidates`` best passages for ``query`` (memoised: the index is fixed)."""
        if query not in self._hits:
            self._hits[query] = self.index.search(query, self.candidates)
        return self._hits[query]

    def forward(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(passage ids (B, C), scores (B, C)) of each query's BM25 candidates, in BM25's
        order; the scores carry gradients to ``log_scale``, ``bilinear`` and ``embed``."""
        if isinstance(queries, str) or not queries:
            raise ValueError("queries must be a non-empty list of strings")
        hits = [self.search(q) for q in queries]
        ids_BC = torch.tensor([[pid for pid, _ in h] for h in hits], dtype=torch.long)
        bm25_BC = torch.tensor([[s for _, s in h] for h in hits], dtype=torch.float32)
        q_BD = self._encode(
            [[term_bucket(t, self.buckets) for t in query_terms(q)] for q in queries]
        )
        d_ND = self._encode([self._bag(int(pid)) for pid in ids_BC.flatten()])
        d_BCD = d_ND.view(*ids_BC.shape, -1)
        learned_BC = torch.einsum("bd,de,bce->bc", q_BD, self.bilinear, d_BCD)
        return ids_BC, self.log_scale.exp() * bm25_BC + learned_BC

    def _bag(self, pid: int) -> list[int]:
        if pid not in self._bags:
            self._bags[pid] = [term_bucket(t, self.buckets) for t in self.index.terms[pid]]
        return self._bags[pid]

    def _encode(self, bags: list[list[int]]) -> torch.Tensor:
        """Mean term embedding of each bag (zeros for an empty one)."""
        flat = torch.tensor([i for bag in bags for i in bag], dtype=torch.long)
        sizes = torch.tensor([0] + [len(bag) for bag in bags[:-1]], dtype=torch.long)
        return self.embed(flat, sizes.cumsum(0))
