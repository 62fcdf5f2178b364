"""Metrics of SkillNet's tasks: accuracy, and Recall@k / MRR for retrieval with label groups.

A query is answered correctly by any gallery item with the same label (captions shared by several
images, say); the rank of a query is that of its best-placed correct item. Ties count against
the query (a correct item tied with a wrong one ranks after it), so a constant similarity scores
at or below chance, never above; a NaN similarity ranks last.

Shape legend: Q queries, G gallery items.
"""

from __future__ import annotations

import torch

__all__ = ["accuracy", "retrieval_ranks", "retrieval_metrics"]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label. logits (N, C), labels (N,)."""
    return float((logits.argmax(-1) == labels).float().mean())


def retrieval_ranks(
    sim_QG: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor
) -> torch.Tensor:
    """1-based rank of each query's best correct item: LongTensor (Q,)."""
    if sim_QG.shape != (query_labels.numel(), gallery_labels.numel()):
        raise ValueError(
            f"sim_QG.shape={tuple(sim_QG.shape)} must be (len(query_labels), len(gallery_labels))"
        )
    # a NaN similarity (a diverged model) ranks last; compared as is it would rank first
    sim_QG = sim_QG.nan_to_num(nan=float("-inf"))
    correct_QG = query_labels[:, None] == gallery_labels[None, :]
    if not bool(correct_QG.any(1).all()):
        raise ValueError("every query label must occur among the gallery labels")
    best_Q = sim_QG.masked_fill(~correct_QG, float("-inf")).amax(1)
    # items strictly better, plus wrong items tied with the best correct one
    above = (sim_QG > best_Q[:, None]).sum(1)
    tied_wrong = ((sim_QG == best_Q[:, None]) & ~correct_QG).sum(1)
    return above + tied_wrong + 1


def retrieval_metrics(
    sim_QG: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """``{"R@1": ..., "R@5": ..., "MRR": ...}``: share of queries ranked within k, mean 1/rank."""
    ranks = retrieval_ranks(sim_QG, query_labels, gallery_labels).float()
    out = {f"R@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["MRR"] = float((1 / ranks).mean())
    return out
