"""balanced_assignment against the optimum by brute force (tiny cases) and by scipy (medium)."""

import sys

import pytest
import torch

from moesaic.routing.assignment import balanced_assignment
from tests.unit.routing._util import (
    best_balanced_total_brute_force,
    best_balanced_total_scipy,
    total_score,
)

SOLVERS = ["auto", "shortest_path", "auction", "scipy"]


def _assert_balanced(expert_T: torch.Tensor, T: int, E: int) -> None:
    base, extra = divmod(T, E)
    counts = torch.bincount(expert_T, minlength=E)
    assert sorted(counts.tolist()) == [base] * (E - extra) + [base + 1] * extra


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T,E", [(4, 2), (6, 3), (5, 2), (7, 3), (2, 3), (6, 2), (8, 4)])
def test_the_total_equals_the_brute_force_optimum(T, E, solver):
    if solver == "shortest_path" and T % E:
        with pytest.raises(ValueError, match=f"needs E={E} to divide T={T}"):
            balanced_assignment(torch.randn(T, E), solver)
        return
    for seed in range(3):
        scores = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
        expert = balanced_assignment(scores, solver)
        _assert_balanced(expert, T, E)
        best = best_balanced_total_brute_force(scores)
        assert total_score(scores, expert) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("T,E", [(64, 8), (37, 5), (3, 8), (130, 16), (96, 3)])
def test_the_total_equals_the_scipy_optimum(T, E, solver):
    if solver == "shortest_path" and T % E:
        return  # refused, as tested above
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T * E))
    expert = balanced_assignment(scores, solver)
    _assert_balanced(expert, T, E)
    assert total_score(scores, expert) == pytest.approx(best_balanced_total_scipy(scores), abs=1e-7)


STRUCTURED = {  # router logits are far from i.i.d.: low rank, near-ties, tiny at init
    "rank-1": lambda g: torch.randn(256, 1, generator=g) * torch.randn(1, 16, generator=g) * 0.01,
    "rank-4": lambda g: torch.randn(512, 4, generator=g) @ torch.randn(4, 32, generator=g),
    "ties": lambda g: torch.randint(0, 3, (192, 8), generator=g).float(),
}


@pytest.mark.parametrize("solver", ["shortest_path", "auction"])
@pytest.mark.parametrize("kind", sorted(STRUCTURED))
def test_structured_scores_reach_the_scipy_optimum(kind, solver):
    scores = STRUCTURED[kind](torch.Generator().manual_seed(0)).double()
    expert = balanced_assignment(scores, solver)
    T, E = scores.shape
    _assert_balanced(expert, T, E)
    assert total_score(scores, expert) == pytest.approx(best_balanced_total_scipy(scores), abs=1e-7)


def test_scores_all_preferring_one_expert_are_still_spread_evenly():
    # every token's best expert is 0 by a wide margin: the optimum still gives each expert T/E
    scores = torch.randn(48, 6) * 0.1
    scores[:, 0] += 10.0
    expert = balanced_assignment(scores)
    _assert_balanced(expert, 48, 6)
    assert total_score(scores, expert) == pytest.approx(best_balanced_total_scipy(scores), abs=1e-7)


def test_large_offsets_and_a_tiny_range_keep_the_optimum():
    # the auction works on scores scaled to [0, 1]: a large common offset changes nothing
    scores = 1e4 + 1e-3 * torch.randn(40, 4, dtype=torch.float64)
    expert = balanced_assignment(scores)
    _assert_balanced(expert, 40, 4)
    assert total_score(scores - 1e4, expert) == pytest.approx(
        best_balanced_total_scipy(scores - 1e4), abs=1e-9
    )


def test_equal_scores_give_a_balanced_assignment():
    _assert_balanced(balanced_assignment(torch.zeros(10, 4)), 10, 4)


def test_edge_shapes():
    assert balanced_assignment(torch.randn(0, 4)).shape == (0,)
    assert balanced_assignment(torch.randn(5, 1)).tolist() == [0] * 5


@pytest.mark.parametrize(
    "scores,solver,error,match",
    [
        (torch.randn(4, 2), "hungarian", ValueError, r"solver='hungarian' is not one of"),
        (torch.randn(4), "auction", ValueError, r"scores_TE must be a \(T, E\) tensor"),
        (torch.tensor([[0.0, float("nan")]]), "auction", ValueError, "NaN or an infinity"),
    ],
)
def test_bad_arguments_are_named(scores, solver, error, match):
    with pytest.raises(error, match=match):
        balanced_assignment(scores, solver)


def test_the_scipy_solver_without_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"moesaic\[routers\]"):
        balanced_assignment(torch.randn(4, 2), "scipy")
