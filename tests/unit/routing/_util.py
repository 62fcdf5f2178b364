"""Helpers: a gate set to the identity, so that a test sets the router logits directly; the
optimal balanced assignment by brute force and by scipy."""

from __future__ import annotations

import itertools
import math

import torch

from moesaic.context import RoutingContext


def identity_gate(router) -> None:
    """Make ``router.gate`` the identity so that logits == x (needs d_model == num_experts)."""
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(router.num_experts))


def route(router, x: torch.Tensor, **context):
    return router(x, RoutingContext(**context))


def best_balanced_total_brute_force(scores_TE: torch.Tensor) -> float:
    """The largest total score of any assignment of T tokens to E experts in which every expert
    takes floor(T/E) or ceil(T/E) tokens: every assignment tried (E**T of them, tiny cases)."""
    T, E = scores_TE.shape
    base, extra = divmod(T, E)
    want = [base] * (E - extra) + [base + 1] * extra
    best = -math.inf
    for experts in itertools.product(range(E), repeat=T):
        if sorted(experts.count(e) for e in range(E)) == want:
            best = max(best, sum(float(scores_TE[t, e]) for t, e in enumerate(experts)))
    return best


def best_balanced_total_scipy(scores_TE: torch.Tensor) -> float:
    """The same optimum by scipy's linear_sum_assignment, once per choice of the T mod E experts
    that take one more token: expert e becomes capacity(e) identical columns."""
    from scipy.optimize import linear_sum_assignment

    s = scores_TE.double().numpy()
    T, E = s.shape
    base, extra = divmod(T, E)
    best = -math.inf
    for bigger in itertools.combinations(range(E), extra):
        columns = [e for e in range(E) for _ in range(base + (e in bigger))]
        cost = s[:, columns]
        rows, cols = linear_sum_assignment(cost, maximize=True)
        best = max(best, float(cost[rows, cols].sum()))
    return best


def total_score(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    return float(scores_TE.double().gather(1, expert_T.view(-1, 1)).sum())
