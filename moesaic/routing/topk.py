"""Top-k softmax router: p = softmax(x W_g), keep the k largest, renormalise over them.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import balance_loss, z_loss
from moesaic.routing.registry import register_router

__all__ = ["TopKRouter"]


@register_router("topk")
class TopKRouter(LearnedRouter):
    """Softmax over experts, then top-k.

    Args:
        normalize: renormalise the k chosen probabilities to sum to one (default). False keeps the
            raw softmax probabilities (GLaM, Du et al. 2022, and Mixtral differ here).

    The aux loss is ``E * sum_i f_i P_i`` with f over first choices (Switch / GShard form).
    Subclasses change where the logits come from by overriding ``route_logits``.
    """

    default_top_k = 2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        normalize: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize={normalize!r} must be a bool")
        self.normalize = normalize

    def route_logits(self, x_TD: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Logits (T, E) in ``router_dtype``; a token's routing depends on this row only."""
        return self.logits(x_TD)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        logits_TE = self.route_logits(x_TD, context)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.top_k == 1:  # max is a cheaper kernel than topk(1) on CPU
            weight_T, expert_T = probs_TE.max(dim=-1)
            weight_TK, expert_TK = weight_T.unsqueeze(1), expert_T.unsqueeze(1)
        else:
            weight_TK, expert_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        aux = balance_loss(probs_TE, expert_TK[:, 0])
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, aux, z_loss(logits_TE))
