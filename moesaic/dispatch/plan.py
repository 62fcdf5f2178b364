"""The dispatch plan: capacity and the sort of assignments by expert, in one stable sort.

No one-hot (T, E, C) tensor anywhere: capacity and dispatch are one stable sort of the A
assignments by (expert, processing order), a per-expert position from the counts, and index-only
data movement afterwards (moesaic/dispatch/permute.py). When every token kept its K choices in
the ``from_topk`` layout (dropless top-k routers), the plan also holds ``slot``, the inverse
permutation, so that combining and the backward of the permutation are K gathers.

Shape legend (docs/shapes.md): T tokens, E experts, K top-k, A assignments.
"""

from __future__ import annotations

import dataclasses

import torch

from moesaic.dispatch.capacity import DropPolicy
from moesaic.routing.base import Routing

__all__ = ["DispatchPlan", "make_plan"]


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
        slot: LongTensor (K*T,), row of the expert-sorted order that holds choice j of token t
            at index ``j * T + t``; only when every token kept all K choices of a ``dense_k``
            routing, else None.
        top_k: K of ``slot`` (0 when ``slot`` is None).
        source: LongTensor (A,), the inverse of ``slot``: index ``j * T + t`` of each sorted
            assignment; set with ``slot``.
    """

    token: torch.Tensor
    weight: torch.Tensor
    counts: list[int]
    tokens_per_expert: torch.Tensor
    requested_per_expert: torch.Tensor
    num_tokens: int
    slot: torch.Tensor | None = None
    top_k: int = 0
    source: torch.Tensor | None = None


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
    slot, top_k, source = None, 0, None
    if capacity is None:
        sorted_A = torch.argsort(expert_A, stable=True)
        kept_E = requested_E
        if routing.dense_k is not None:
            top_k, source = routing.dense_k, sorted_A
            slot = torch.empty_like(sorted_A)
            slot[sorted_A] = torch.arange(sorted_A.shape[0], device=sorted_A.device)
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
        slot=slot,
        top_k=top_k,
        source=source,
    )
