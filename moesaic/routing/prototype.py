"""Expert prototyping (M6-T, Yang et al. 2021): k groups of E/k experts, top-1 inside each.

Expert prototyping: ``y = sum_j g_j(x) Expert_{j, argmax_j}(x)`` with g_j the softmax over
group j's logits at its argmax. Compute equals top-k; the k choices are made in parallel and every
group is balanced on its own (the aux loss is the mean of the per-group Switch losses).

Shape legend (docs/shapes.md): T tokens, E experts, K groups (= top_k), G experts per group.
"""

from __future__ import annotations

import torch

from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import balance_loss, z_loss
from moesaic.routing.registry import register_router
from moesaic.routing.topk import refuse_topk_options

__all__ = ["PrototypeRouter"]


@register_router("prototype")
class PrototypeRouter(LearnedRouter):
    """k top-1 routers over disjoint expert groups; experts j*G .. (j+1)*G - 1 form group j.

    A token's assignment to group j has ``choice`` j, so with capacity the first group's choices
    are placed before the second's.
    """

    default_top_k = 2

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, **kwargs) -> None:
        refuse_topk_options(
            kwargs,
            "prototype",
            "it is a softmax top-1 inside each of k fixed groups; for group-limited top-k use "
            "n_groups and topk_groups",
        )
        super().__init__(d_model, num_experts, top_k, **kwargs)
        if num_experts % self.top_k:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by top_k={self.top_k} "
                "(the number of prototypes) for router='prototype'"
            )

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        T, K = x_TD.shape[0], self.top_k
        G = self.num_experts // K
        logits_TKG = self.logits(x_TD).view(T, K, G)
        probs_TKG = logits_TKG.softmax(dim=-1)
        index_TK = self.decide(lambda: probs_TKG.detach().argmax(dim=-1))
        weight_TK = probs_TKG.gather(-1, index_TK.unsqueeze(-1)).squeeze(-1)
        expert_TK = index_TK + G * torch.arange(K, device=x_TD.device)
        aux = torch.stack([balance_loss(probs_TKG[:, j], index_TK[:, j]) for j in range(K)]).mean()
        probs_TE = probs_TKG.reshape(T, K * G) / K  # one distribution over all E, for statistics
        z = z_loss(logits_TKG.reshape(T * K, G))
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, aux, z)
