"""Expert capacity and drop policies.

``C = ceil(capacity_factor * k * T / E)`` assignments per expert. When more assignments want an
expert than it holds, a drop policy decides which are processed first: every first choice before
any second choice (GShard Algorithm 1, V-MoE), and inside one choice level either token order
(``"position"``) or the token's largest gate weight, highest first (``"priority"``, Batch
Prioritized Routing, Riquelme et al. 2021). Dropped assignments contribute zero; the caller's
residual carries the token.

Shape legend (docs/shapes.md): T tokens, A assignments.
"""

from __future__ import annotations

import abc
import math

import torch

from moesaic.routing.base import Routing

__all__ = ["expert_capacity", "DropPolicy", "PositionPolicy", "PriorityPolicy", "DROP_POLICIES"]


def expert_capacity(capacity_factor: float, top_k: int, num_tokens: int, num_experts: int) -> int:
    """``ceil(capacity_factor * top_k * num_tokens / num_experts)``, at least 1."""
    return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))


class DropPolicy(abc.ABC):
    """Orders assignments for capacity: earlier in ``order`` means kept first."""

    name: str

    @abc.abstractmethod
    def order(self, routing: Routing) -> torch.Tensor:
        """Indices into the assignments (A,), in the order they claim expert slots."""

    @staticmethod
    def _by_choice(order_A: torch.Tensor, routing: Routing) -> torch.Tensor:
        # A stable sort on choice keeps the within-level order: all first choices come first.
        return order_A[torch.argsort(routing.choice[order_A], stable=True)]


class PositionPolicy(DropPolicy):
    """Token order inside each choice level: the earliest tokens are kept (Switch, GShard)."""

    name = "position"

    def order(self, routing: Routing) -> torch.Tensor:
        return self._by_choice(torch.argsort(routing.token, stable=True), routing)


class PriorityPolicy(DropPolicy):
    """Batch Prioritized Routing: tokens with the highest gate weight claim slots first.

    A token's priority is its largest routing weight (``Routing.priority``; vmoe's default), the
    same for all of its choices; ties go to the earlier token.
    """

    name = "priority"

    def order(self, routing: Routing) -> torch.Tensor:
        priority_A = routing.weight.detach() if routing.priority is None else routing.priority
        order_A = torch.argsort(routing.token, stable=True)
        order_A = order_A[torch.argsort(priority_A[order_A], descending=True, stable=True)]
        return self._by_choice(order_A, routing)


DROP_POLICIES: dict[str, type[DropPolicy]] = {
    cls.name: cls for cls in (PositionPolicy, PriorityPolicy)
}
