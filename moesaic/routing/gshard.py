"""GShard top-2 router with random second expert (Lepikhin et al. 2021, Algorithm 1).

Weights g1, g2 are the two largest softmax probabilities renormalised to sum
to one; in training the second expert is kept with probability min(1, 2 * g2). Capacity places
every first choice before any second choice (the layer's drop policy does that for all routers).

``TopKRouter``'s DeepSeek options apply (sigmoid scores, group-limited routing, the
auxiliary-loss-free bias, whose load count sees the second choices the random rule kept), except
``route_scale``: the keep rule reads g2 as a share of the two weights.
"""

from __future__ import annotations

import torch

from moesaic.context import RoutingContext
from moesaic.routing.base import Routing
from moesaic.routing.registry import register_router
from moesaic.routing.topk import TopKRouter

__all__ = ["GShardRouter"]


@register_router("gshard")
class GShardRouter(TopKRouter):
    """Top-2 gating; random routing of the second expert in training; ``E * sum_i f_i P_i`` loss."""

    default_top_k = 2

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, **kwargs) -> None:
        if top_k not in (None, 2):
            raise ValueError(f"top_k={top_k} must be 2 for router='gshard'")
        if num_experts < 2:
            raise ValueError(f"num_experts={num_experts} must be >= 2 for router='gshard'")
        if not kwargs.pop("normalize", True):
            raise ValueError("normalize=False is not available for router='gshard'")
        if kwargs.get("route_scale", 1.0) != 1.0:
            raise ValueError(
                f"route_scale={kwargs['route_scale']!r} is not available for router='gshard' "
                "(the keep rule 2 * g2 needs weights that sum to one; use router='topk')"
            )
        super().__init__(d_model, num_experts, 2, normalize=True, **kwargs)

    def route(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        routing = super().route(x_TD, context)
        if not self.training:
            return routing
        # Keep a second choice when 2 * g2 > r, r ~ U(0, 1); first choices are always kept.
        keep_A = self.decide(lambda: self.keep_second_choices(routing))
        return routing.select(keep_A)

    def keep_second_choices(self, routing: Routing) -> torch.Tensor:
        """Bool (A,): every first choice, and each second choice with probability min(1, 2 g2)."""
        r_A = torch.rand(routing.weight.shape, device=routing.weight.device)
        return (routing.choice == 0) | (2.0 * routing.weight.detach() > r_A)
