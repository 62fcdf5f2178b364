"""Exact balanced assignment for few experts: prices, then successive shortest paths.

The problem is a transportation problem: T tokens (one unit each) go to E experts that take
``capacity_E[e]`` tokens each (``sum(capacity_E) == T``), maximising ``sum_t s[t, e_t]``. With
E much smaller than T it is solved on a graph of E nodes instead of a T x T assignment matrix:

1. **Prices.** Entropy-regularised transport (Sinkhorn's scaling in the log domain, Cuturi
   2013), with the temperature lowered in stages, gives one price ``p_e`` per expert; every
   token takes its best expert ``argmax_e s[t, e] - p_e``. Whatever the prices, an assignment
   in which every token takes its best expert under them is optimal among all assignments with
   the same loads (complementary slackness); good prices only make those loads close to the
   capacities.
2. **Repair.** While an expert holds more tokens than its capacity, one token moves along each
   edge of a shortest path from an overfull to an underfull expert in the exchange graph: the
   edge ``e -> f`` costs the least score that moving one of e's tokens to f loses. Augmenting
   along a shortest path keeps the assignment optimal for its loads (successive shortest paths,
   Ahuja, Magnanti and Orlin 1993, "Network Flows", section 9.7), so when every load equals its
   capacity the assignment is optimal.

Each repair step costs O(T * E + E^3) tensor work; the prices leave a few dozen steps on
trained-router logits.

Shape legend (docs/shapes.md): T tokens, E experts.
"""

from __future__ import annotations

import math

import torch

__all__ = ["shortest_path_assignment"]

_STAGES, _ITERS = 6, 15  # temperature stages of the price search, Sinkhorn updates per stage
_COOLING = 4.0  # the temperature falls by this factor per stage
_MAX_REPAIRS_PER_TOKEN = 4  # a safety net only: every repair step moves one unit of excess


@torch.no_grad()
def shortest_path_assignment(s_TE: torch.Tensor, capacity_E: torch.Tensor) -> torch.Tensor:
    """The expert (LongTensor (T,)) of every token in a maximum-score assignment that gives
    expert e exactly ``capacity_E[e]`` tokens. ``s_TE`` is finite and scaled to [0, 1] (the
    tolerances are absolute); ``capacity_E`` sums to T."""
    T, E = s_TE.shape
    s = s_TE.double()
    capacity_E = capacity_E.to(s.device)
    price_E = _prices(s.float(), capacity_E).double()
    expert_T = (s - price_E).argmax(dim=1)
    load_E = torch.bincount(expert_T, minlength=E)
    rows = torch.arange(T, device=s.device)
    tol = 1e-12
    for _ in range(_MAX_REPAIRS_PER_TOKEN * T + E):
        over_E = load_E > capacity_E
        if not bool(over_E.any()):
            return expert_T
        loss_TE = s[rows, expert_T][:, None] - s  # score lost by moving t to each expert
        edge_EE = torch.full((E, E), math.inf, dtype=s.dtype, device=s.device)
        edge_EE.scatter_reduce_(0, expert_T[:, None].expand(T, E), loss_TE, "amin")
        edge_EE.fill_diagonal_(math.inf)
        path = _shortest_path(edge_EE, over_E, load_E < capacity_E, tol)
        # choose every edge's token before moving any: a token moved onto the path's next expert
        # must not move again
        moves = [
            (int(torch.where(expert_T == e, loss_TE[:, f], math.inf).argmin()), f)
            for e, f in zip(path[:-1], path[1:])
        ]
        for t, f in moves:
            expert_T[t] = f
        load_E[path[0]] -= 1
        load_E[path[-1]] += 1
    raise AssertionError("the balanced assignment did not converge: please report the scores")


def _prices(s_TE: torch.Tensor, capacity_E: torch.Tensor) -> torch.Tensor:
    """Per-expert prices (E,) under which the tokens' best experts nearly meet the capacities:
    the dual of entropic transport with every token's mass 1 and expert e's ``capacity_E[e]``,
    at a temperature lowered from a quarter of the score range by ``_COOLING`` per stage, each
    stage starting from the last one's prices."""
    log_capacity_E = capacity_E.to(s_TE.dtype).clamp_min(1e-30).log()
    price_E = s_TE.new_zeros(s_TE.shape[1])
    tau = float(s_TE.max() - s_TE.min()) / 4 or 1.0
    for _ in range(_STAGES):
        for _ in range(_ITERS):
            z_TE = (s_TE - price_E) / tau
            z_TE = z_TE - torch.logsumexp(z_TE, dim=1, keepdim=True)  # every token's mass is 1
            price_E = price_E + tau * (torch.logsumexp(z_TE, dim=0) - log_capacity_E)
        tau /= _COOLING
    return price_E


def _shortest_path(
    edge_EE: torch.Tensor, source_E: torch.Tensor, sink_E: torch.Tensor, tol: float
) -> list[int]:
    """The experts of a shortest path (Bellman-Ford over E nodes, all ``source_E`` at distance
    0) from a source to the nearest sink."""
    E = edge_EE.shape[0]
    dist_E = torch.where(source_E, 0.0, math.inf).to(edge_EE)
    pred_E = torch.full((E,), -1, dtype=torch.long, device=edge_EE.device)
    for _ in range(E):
        best_E, frm_E = (dist_E[:, None] + edge_EE).min(dim=0)
        better_E = best_E < dist_E - tol
        if not bool(better_E.any()):
            break
        dist_E = torch.where(better_E, best_E, dist_E)
        pred_E = torch.where(better_E, frm_E, pred_E)
    sink = int(torch.where(sink_E, dist_E, math.inf).argmin())
    path, pred = [sink], pred_E.tolist()
    while pred[path[-1]] >= 0:
        path.append(pred[path[-1]])
        if len(path) > E:
            raise AssertionError("a negative cycle in the exchange graph: please report the scores")
    return path[::-1]
