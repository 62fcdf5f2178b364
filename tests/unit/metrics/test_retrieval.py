import pytest
import torch

from moesaic.metrics.retrieval import accuracy, retrieval_metrics, retrieval_ranks


def _reference_rank(sims: list[float], labels: list[int], query_label: int) -> int:
    """Walk the gallery from best to worst, correct items after wrong ones on ties."""
    order = sorted(range(len(sims)), key=lambda g: (-sims[g], labels[g] == query_label))
    for position, g in enumerate(order, start=1):
        if labels[g] == query_label:
            return position
    raise AssertionError("no correct item")


def test_ranks_equal_a_sorting_reference_with_ties_and_label_groups():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 5, (30, 40), generator=g).float()  # many ties
    gallery = torch.randint(0, 6, (40,), generator=g)
    queries = gallery[torch.randint(0, 40, (30,), generator=g)]
    ranks = retrieval_ranks(sim, queries, gallery)
    for q in range(30):
        assert ranks[q] == _reference_rank(sim[q].tolist(), gallery.tolist(), int(queries[q]))


def test_hand_worked_metrics():
    # query 0: correct item 0 scores best -> rank 1; query 1: its item 2 is third -> rank 3
    sim = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.3]])
    m = retrieval_metrics(sim, torch.tensor([0, 2]), torch.tensor([0, 1, 2]), ks=(1, 2))
    assert m == {"R@1": 0.5, "R@2": 0.5, "MRR": pytest.approx((1 + 1 / 3) / 2)}
    assert accuracy(torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([1, 1])) == 0.5


def test_constant_scores_rank_last():
    ranks = retrieval_ranks(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3]))
    assert ranks.tolist() == [4, 4]


def test_bad_shapes_and_unanswerable_queries_are_rejected():
    with pytest.raises(ValueError, match="sim_QG.shape"):
        retrieval_ranks(torch.zeros(2, 3), torch.tensor([0]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="every query label"):
        retrieval_ranks(torch.zeros(1, 2), torch.tensor([5]), torch.tensor([0, 1]))


def test_nan_similarities_rank_last_not_first():
    labels = torch.arange(4)
    sim = torch.eye(4)
    sim[0] = float("nan")  # query 0's scores diverged
    sim[1, 1] = float("nan")  # query 1's correct item diverged
    assert retrieval_ranks(sim, labels, labels).tolist() == [4, 4, 1, 1]
    nan = torch.full((4, 4), float("nan"))
    assert retrieval_metrics(nan, labels, labels)["R@1"] == 0.0
