"""Balanced linear assignment of T tokens to E experts (the BASE layer's routing problem).

Maximise ``sum_t scores[t, e_t]`` subject to every expert receiving floor(T/E) or ceil(T/E)
tokens: exactly T mod E experts take one more token than the others, and which ones do is part
of the optimisation. With T divisible by E every expert takes exactly T/E (Lewis et al. 2021,
"BASE Layers", section 2.2).

Exact solvers:

- ``"auto"`` (default): ``"shortest_path"`` when E divides T, else ``"auction"``.
- ``"shortest_path"`` (E must divide T): per-expert prices from entropic transport, then
  successive shortest paths between the E experts until every expert holds T/E tokens
  (``moesaic.routing.shortest_path``); in torch, on the scores' device. Far faster than the
  auction on router logits, whose many near-ties make the auction's prices creep.
- ``"auction"``: Bertsekas' auction algorithm with epsilon scaling, in torch, on the
  scores' device (the BASE paper's code solves its assignment with an auction too). All free
  tokens bid at once (Jacobi rounds); an expert's slots are identical objects with one price,
  so an expert takes all the bids it can hold in one round, and its price jumps to the smallest
  bid it keeps instead of creeping up by epsilon slot by slot (see ``_auction``). The last
  phase's epsilon makes the assignment's total affinity equal the optimum to within
  ``AUCTION_RELATIVE_GAP * (max - min score)``, far below the float32 resolution of the logits:
  it is the optimal assignment up to ties. When E does not divide T, an expert's extra slot is
  a group of its own that its tokens value exactly like its other slots; bids between the two
  then rise by epsilon at a time, and the auction is much slower (tens of seconds rather than
  about one second at T = 4100, E = 64 on one CPU core): prefer a T that E divides.
- ``"scipy"``: ``scipy.optimize.linear_sum_assignment`` on the (T, E * ceil(T/E)) matrix of
  token-slot affinities (the optional extra ``moesaic[routers]``).

Shape legend (docs/shapes.md): T tokens, E experts, N persons (T tokens plus dummy persons that
take the unused extra slots), G slot groups.
"""

from __future__ import annotations

import math

import torch

from moesaic._validate import check_choice
from moesaic.routing.shortest_path import shortest_path_assignment

__all__ = ["balanced_assignment", "require_scipy", "SOLVERS", "AUCTION_RELATIVE_GAP"]

SOLVERS = ("auto", "shortest_path", "auction", "scipy")
# The auction's last epsilon is AUCTION_RELATIVE_GAP * range / N, so N persons lose at most this
# fraction of the score range in total (Bertsekas 1988: an epsilon-CS assignment is within N * eps
# of the optimum).
AUCTION_RELATIVE_GAP = 1e-9
_EPS_SHRINK = 8.0  # epsilon scaling factor between phases
_MAX_ROUNDS = 1_000_000  # a safety net only: every round some group's kept bids rise


@torch.no_grad()
def balanced_assignment(scores_TE: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """The expert (LongTensor (T,)) of every token in a maximum-affinity balanced assignment.

    Every expert gets floor(T/E) or ceil(T/E) tokens (exactly T/E when E divides T), and the
    total ``sum_t scores_TE[t, expert[t]]`` is the largest any such assignment reaches (up to
    ties, see the module docstring). ``scores_TE`` is (T, E), finite; it is not differentiated.
    """
    check_choice("solver", solver, SOLVERS)
    if not (isinstance(scores_TE, torch.Tensor) and scores_TE.dim() == 2):
        raise ValueError(f"scores_TE must be a (T, E) tensor, got {_shape_of(scores_TE)}")
    T, E = scores_TE.shape
    device = scores_TE.device
    if T == 0 or E == 1:
        return torch.zeros(T, dtype=torch.long, device=device)
    if not bool(torch.isfinite(scores_TE).all()):
        raise ValueError("scores_TE holds a NaN or an infinity: the scores must be finite")
    if solver == "auto":
        solver = "auction" if T % E else "shortest_path"
    if solver == "shortest_path" and T % E:
        raise ValueError(
            f"solver='shortest_path' needs E={E} to divide T={T} (equal capacities); "
            "use solver='auto', 'auction' or 'scipy'"
        )
    if solver == "scipy":
        return _scipy_assignment(scores_TE)
    # The solvers work on scores scaled to [0, 1]: its epsilons are then absolute, and prices
    # (which stay within a few score ranges) never get so large that adding eps rounds away.
    s = scores_TE.double()
    low, span = s.min(), s.max() - s.min()
    s = (s - low) / span if float(span) > 0 else torch.zeros_like(s)
    if solver == "shortest_path":
        capacity_E = torch.full((E,), T // E, dtype=torch.long, device=device)
        return shortest_path_assignment(s, capacity_E)
    values_NG, group_expert_G, capacity_G = _slot_groups(s)
    group_N = _auction(values_NG, capacity_G)
    return group_expert_G[group_N[:T]]


def require_scipy(why: str):
    """``scipy.optimize.linear_sum_assignment``, or an ImportError naming the extra."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError(
            f"{why} needs scipy: pip install 'moesaic[routers]' (or pip install scipy)"
        ) from None
    return linear_sum_assignment


def _shape_of(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _slot_groups(scores_TE: torch.Tensor):
    """The assignment as a square problem over groups of identical slots.

    Group e < E holds expert e's floor(T/E) guaranteed slots; when E does not divide T, group
    E + e is expert e's one extra slot, and E - (T mod E) dummy persons (value 0 for extra slots,
    -inf elsewhere) fill the extra slots that no token takes. Groups of no slot are left out.
    """
    T, E = scores_TE.shape
    base, extra = divmod(T, E)
    values, experts, capacity = [], [], []
    if base:
        values.append(scores_TE)
        experts.append(torch.arange(E))
        capacity.append(torch.full((E,), base))
    if extra:
        values.append(scores_TE)
        experts.append(torch.arange(E))
        capacity.append(torch.ones(E, dtype=torch.long))
    values_TG = torch.cat(values, dim=1)
    if extra:
        dummy_G = torch.zeros(values_TG.shape[1], dtype=scores_TE.dtype, device=scores_TE.device)
        dummy_G[: E if base else 0] = -math.inf
        values_TG = torch.cat([values_TG, dummy_G.expand(E - extra, -1)])
    device = scores_TE.device
    return values_TG, torch.cat(experts).to(device), torch.cat(capacity).to(device)


def _auction(values_NG: torch.Tensor, capacity_G: torch.Tensor) -> torch.Tensor:
    """Jacobi auction with epsilon scaling for N persons and G groups of identical slots
    (sum(capacity_G) == N, every person has a finite value for at least two groups).
    Returns the group of every person.

    A group has one price p_g, which all its holders pay (the auction for similar objects,
    Bertsekas and Castanon 1989, "The auction algorithm for transportation problems"). In a
    round every free person bids for its best group g (largest ``value - p``) the price that
    makes it indifferent to its best other group, plus eps. Group g keeps the ``capacity_g``
    largest bids among its holders and its new bidders, evicts the rest, and, when full, moves
    its price to the smallest bid it keeps.

    Invariant (eps-complementary slackness): a holder of g bid b >= p_g, so its profit
    ``value[g] - p_g >= value[g] - b = (best other profit at bid time) - eps``, and other groups'
    prices only rise. A complete assignment with this invariant is within N * eps of the optimum
    (Bertsekas 1988, "The auction algorithm: a distributed relaxation method for the assignment
    problem"). Every round each group that gets bids accepts at least one: a bid beats the
    price by eps, and a full group's price is its smallest kept bid.
    """
    N, G = values_NG.shape
    finite = values_NG[torch.isfinite(values_NG)]
    span = float(finite.max() - finite.min()) or 1.0
    price_G = values_NG.new_zeros(G)
    group_N = torch.full((N,), -1, dtype=torch.long, device=values_NG.device)
    bid_N = values_NG.new_zeros(N)
    eps, eps_final = span / _EPS_SHRINK, AUCTION_RELATIVE_GAP * span / N
    while True:
        _release_unhappy(values_NG, price_G, group_N, eps)
        _auction_phase(values_NG, capacity_G, price_G, group_N, bid_N, eps)
        if eps <= eps_final:
            return group_N
        eps = max(eps / _EPS_SHRINK, eps_final)


def _best_two(profit_NG: torch.Tensor):
    """Best group, its profit and the best profit among the other groups, per row."""
    top_N2, group_N2 = profit_NG.topk(2, dim=1)
    return group_N2[:, 0], top_N2[:, 0], top_N2[:, 1]


def _release_unhappy(values_NG, price_G, group_N, eps) -> None:
    """Start a phase from the last one's assignment and prices: free only the persons that
    break the invariant for the new eps."""
    held_N = group_N >= 0
    g_N = group_N.clamp(min=0)
    best_g, best, second = _best_two(values_NG - price_G)
    other_N = torch.where(best_g == g_N, second, best)
    mine_N = values_NG.gather(1, g_N[:, None])[:, 0] - price_G[g_N]
    group_N[held_N & (mine_N < other_N - eps)] = -1


def _auction_phase(values_NG, capacity_G, price_G, group_N, bid_N, eps) -> None:
    G = price_G.shape[0]
    arange_N = torch.arange(group_N.shape[0], device=group_N.device)
    for _ in range(_MAX_ROUNDS):
        free_U = (group_N < 0).nonzero()[:, 0]
        if free_U.numel() == 0:
            return
        g_U, best_U, second_U = _best_two(values_NG[free_U] - price_G)
        # p_g + (best - second) + eps: >= p_g + eps even after rounding
        bid_N[free_U] = price_G[g_U] + ((best_U - second_U) + eps)
        group_N[free_U] = g_U
        # every group ranks its holders and bidders by bid, highest first, and keeps capacity_g
        by_bid = bid_N.argsort(descending=True, stable=True)
        order = by_bid[group_N[by_bid].argsort(stable=True)]
        g_sorted = group_N[order]
        count_G = torch.bincount(g_sorted, minlength=G)
        rank = arange_N - (count_G.cumsum(0) - count_G)[g_sorted]
        keep = rank < capacity_G[g_sorted]
        group_N[order[~keep]] = -1
        full_G = count_G >= capacity_G
        last = (count_G.cumsum(0) - count_G + capacity_G - 1)[full_G]  # its smallest kept bid
        price_G[full_G] = bid_N[order[last]]
    raise AssertionError("the auction did not converge: please report this with the scores")


def _scipy_assignment(scores_TE: torch.Tensor) -> torch.Tensor:
    """``linear_sum_assignment`` on (T, E * ceil(T/E)) token-slot affinities. The E * floor(T/E)
    guaranteed slots get a bonus larger than any difference of totals, so every one of them is
    filled and the rest of the objective is the affinity alone."""
    linear_sum_assignment = require_scipy("balanced_assignment(solver='scipy')")
    T, E = scores_TE.shape
    base, extra = divmod(T, E)
    s = scores_TE.detach().double().cpu()
    span = float(s.max() - s.min())
    slots = [s.repeat_interleave(base, dim=1)] if base else []
    if extra:
        slots.append(s - 2.0 * (T * span + 1.0))  # the bonus, taken from the extra slots
    cost_TS = torch.cat(slots, dim=1).numpy()
    rows, cols = linear_sum_assignment(cost_TS, maximize=True)
    expert_T = torch.empty(T, dtype=torch.long)
    cols = torch.from_numpy(cols)
    expert_T[torch.from_numpy(rows)] = torch.where(
        cols < E * base, cols // max(base, 1), cols - E * base
    )
    return expert_T.to(scores_TE.device)
