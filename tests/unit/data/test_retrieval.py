"""BM25 retrieval: rank-bm25's own scores, a ranking equal to a full sort of them with ties by
passage id, an index that reloads from JSON ranking exactly as saved, and a learned re-scorer
that starts from BM25's order."""

from __future__ import annotations

import json
import math
import sys

import pytest
import rank_bm25
import torch

from moesaic.data.retrieval import (
    BM25Index,
    LearnedRetriever,
    Passage,
    passage_terms,
    query_terms,
)

TEXTS = [
    ("library/json", "Basic Usage", ".. function:: json.dumps(obj) Serialize obj to a JSON str."),
    ("library/json", "Basic Usage", ".. function:: json.loads(s) Deserialize s to an object."),
    ("library/json", "Encoders", "Extensible JSON encoder for Python data structures."),
    ("library/math", "Numbers", ".. function:: math.sqrt(x) Return the square root of x."),
    ("library/math", "Numbers", ".. function:: math.dist(p, q) Return the Euclidean distance."),
    ("library/os", "Paths", ".. function:: os.path.join(path, *paths) Join path components."),
    ("library/os", "Paths", "Return the square root of nothing: a path is not a number."),
    ("library/json", "Basic Usage", ".. function:: json.dumps(obj) Serialize obj to a JSON str."),
]
QUERIES = [
    "What does json.dumps do?",
    "What are the arguments of math.dist?",
    "square root",
    "join path components",
    "Deserialize an object",
    "What is zzz?",  # no term of any passage
    "json",
    "the of and",  # stop words only
]


def _passages(texts=TEXTS) -> list[Passage]:
    return [Passage(i, *row) for i, row in enumerate(texts)]


def _okapi(terms: list[list[str]], query: list[str], k1=1.5, b=0.75, eps=0.25) -> list[float]:
    """Okapi BM25 as rank-bm25 defines it, written out: idf = ln((N - n + 0.5) / (n + 0.5)),
    negative idfs floored at eps times the mean idf, tf saturated by k1, length by b."""
    N = len(terms)
    avgdl = sum(len(t) for t in terms) / N
    vocab = {w for t in terms for w in t}
    idf = {
        w: math.log((N - sum(w in t for t in terms) + 0.5) / (sum(w in t for t in terms) + 0.5))
        for w in vocab
    }
    floor = eps * sum(idf.values()) / len(idf)
    idf = {w: (floor if v < 0 else v) for w, v in idf.items()}
    out = []
    for doc in terms:
        score = 0.0
        for q in query:
            f = doc.count(q)
            score += idf.get(q, 0.0) * f * (k1 + 1) / (f + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(score)
    return out


def test_terms_keep_dotted_names_whole_and_by_part_without_stop_words():
    assert query_terms("What does os.path.join do?") == ["os.path.join", "os", "path", "join"]
    assert query_terms("The sqrt OF 2") == ["sqrt", "2"]
    assert passage_terms(_passages()[3])[:2] == ["numbers", "function"]  # section first


def test_bm25_scores_are_rank_bm25s_own_and_the_okapi_formula():
    index = BM25Index(_passages())
    reference = rank_bm25.BM25Okapi([passage_terms(p) for p in _passages()])
    for query in QUERIES:
        words = query_terms(query)
        assert index.scores(query).tolist() == reference.get_scores(words).tolist()
        assert index.scores(query).tolist() == pytest.approx(_okapi(index.terms, words), abs=1e-9)
        for pid, score in index.search(query, len(index)):
            assert score == reference.get_scores(words)[pid]  # bit for bit


def test_search_is_a_full_sort_of_the_scores_with_ties_by_passage_id():
    index = BM25Index(_passages())
    for query in QUERIES:
        full = index.scores(query).tolist()
        slow = sorted(range(len(full)), key=lambda pid: (-full[pid], pid))
        for k in (1, 3, len(full), len(full) + 5):
            got = index.search(query, k)
            assert [pid for pid, _ in got] == slow[:k], (query, k)
            assert [s for _, s in got] == [full[pid] for pid in slow[:k]]
    # passages 0 and 7 are the same text: equal scores, the lower id first
    top = index.search("json.dumps", 2)
    assert [pid for pid, _ in top] == [0, 7] and top[0][1] == top[1][1]


def test_search_is_deterministic():
    first = [BM25Index(_passages()).search(q, 4) for q in QUERIES]
    again = [BM25Index(_passages()).search(q, 4) for q in QUERIES]
    assert first == again


def test_the_index_saves_as_json_and_reloads_ranking_the_same(tmp_path):
    index = BM25Index(_passages(), k1=1.2, b=0.6)
    index.save(tmp_path / "index")
    files = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert files == ["passages.json", "terms.json"]
    for name in files:  # plain JSON, nothing executable
        json.loads((tmp_path / "index" / name).read_text())
    loaded = BM25Index.load(tmp_path / "index")
    assert loaded.passages == index.passages and loaded.terms == index.terms
    assert (loaded.k1, loaded.b) == (1.2, 0.6)
    for query in QUERIES:
        assert loaded.search(query, 5) == index.search(query, 5)
    with pytest.raises(FileNotFoundError, match="not a saved BM25Index directory"):
        BM25Index.load(tmp_path / "nowhere")


def test_bad_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match="passages is empty"):
        BM25Index([])
    with pytest.raises(ValueError, match=r"passages\[0\].id=3 must be 0"):
        BM25Index([Passage(3, "a", "", "text")])
    with pytest.raises(ValueError, match="k=0 must be an int >= 1"):
        BM25Index(_passages()).search("json", 0)


def test_a_missing_rank_bm25_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rank_bm25", None)
    with pytest.raises(ImportError, match=r"pip install 'moesaic\[retgen\]'"):
        BM25Index(_passages())


def test_the_learned_retriever_starts_from_bm25s_ranking_scaled():
    index = BM25Index(_passages())
    retriever = LearnedRetriever(index, candidates=4, dim=8, buckets=64, bm25_scale=0.5)
    ids, scores = retriever(["What does json.dumps do?", "square root"])
    for row, query in enumerate(["What does json.dumps do?", "square root"]):
        hits = index.search(query, 4)
        assert ids[row].tolist() == [pid for pid, _ in hits]
        expected = torch.tensor([0.5 * s for _, s in hits])
        torch.testing.assert_close(scores[row], expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # a trained W changes the scores by e(q)^T W e(d)
        retriever.bilinear.fill_(0.1)
    _, moved = retriever(["square root"])
    assert not torch.allclose(moved, scores[1:])
