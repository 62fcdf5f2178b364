"""Sort-based dispatch: permute assignments into contiguous per-expert slices, then combine.

No one-hot (T, E, C) tensor anywhere: capacity and dispatch are one stable sort of the A
assignments by (expert, processing order), a per-expert position from the counts, and index-only
gathers. ``permute`` is ``index_select`` and ``combine`` a weighted ``index_add``.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

import dataclasses

import torch

from moesaic.routing.base import Routing
from moesaic.routing.capacity import DropPolicy

__all__ = ["DispatchPlan", "make_plan", "permute", "combine"]


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Kept assignments sorted by expert.

    Attributes:
        token: LongTensor (A,), source token of each kept assignment, grouped by expert.
        weight: (A,) combine weight of each kept assignment.
        counts: kept assignments per expert as Python ints (the single host read of the path).
        tokens_per_expert: LongTensor (E,), the same counts on the device.
        requested_per_expert: LongTensor (E,), assignments per expert before capacity.
        num_tokens: T.
    """

    token: torch.Tensor
    weight: torch.Tensor
    counts: list[int]
    tokens_per_expert: torch.Tensor
    requested_per_expert: torch.Tensor
    num_tokens: int


def make_plan(
    routing: Routing,
    num_experts: int,
    num_tokens: int,
    capacity: int | None,
    policy: DropPolicy,
) -> DispatchPlan:
    """Apply capacity (None = dropless) and sort the kept assignments by expert."""
    expert_A = routing.expert
    requested_E = torch.bincount(expert_A, minlength=num_experts)
    if capacity is None:
        sorted_A = torch.argsort(expert_A, stable=True)
        kept_E = requested_E
    else:
        # Sort by expert, ties in the policy's processing order; an assignment's position in its
        # expert's queue is then its index minus the expert's start offset.
        order_A = policy.order(routing)
        sorted_A = order_A[torch.argsort(expert_A[order_A], stable=True)]
        start_E = torch.cumsum(requested_E, dim=0) - requested_E
        position_A = (
            torch.arange(sorted_A.shape[0], device=sorted_A.device) - start_E[expert_A[sorted_A]]
        )
        sorted_A = sorted_A[position_A < capacity]
        kept_E = requested_E.clamp(max=capacity)
    return DispatchPlan(
        token=routing.token[sorted_A],
        weight=routing.weight[sorted_A],
        counts=kept_E.tolist(),
        tokens_per_expert=kept_E,
        requested_per_expert=requested_E,
        num_tokens=num_tokens,
    )


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows of x for each kept assignment, grouped by expert: (A, D)."""
    return x_TD.index_select(0, plan.token)


def combine(y_AD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """``y_TD[t] = sum of weight[a] * y_AD[a]`` over t's kept assignments; dropped tokens get 0."""
    weighted_AD = y_AD * plan.weight.to(y_AD.dtype).unsqueeze(1)
    y_TD = y_AD.new_zeros(plan.num_tokens, y_AD.shape[1])
    return y_TD.index_add(0, plan.token, weighted_AD)
