"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

S = softmax(x W_g) over experts; for each expert e, the C tokens with the largest S[:, e] are
sent to it with weight S[t, e]. C = ceil(capacity_factor * k * T / E), so every expert is exactly
full, a token may get any number of experts (including none) and no aux loss is needed.

Shape legend (docs/shapes.md): T tokens, E experts, C capacity.
"""

from __future__ import annotations

import math

import torch

from moesaic._validate import check_positive_float
from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import z_loss
from moesaic.routing.registry import register_router

__all__ = ["ExpertChoiceRouter"]


@register_router("expert_choice")
class ExpertChoiceRouter(LearnedRouter):
    """Experts choose tokens. ``top_k`` is the average number of experts per token.

    Args:
        capacity_factor: C = ceil(capacity_factor * top_k * T / E), capped at T. An ``ms.MoE``
            with a float ``capacity_factor`` passes its own; a dropless layer uses 1.0.
    """

    default_top_k = 1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        capacity_factor: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        check_positive_float("capacity_factor", capacity_factor)
        self.capacity_factor = float(capacity_factor)

    def capacity(self, num_tokens: int) -> int:
        # Zhou et al. 2022, section 3.1: each expert takes k = n * c / e tokens (here c counts
        # per choice, as a token-choice layer's capacity factor does)
        C = max(1, math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts))
        return min(C, num_tokens)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        C = self.capacity(T)
        token_CE = self.decide(lambda: probs_TE.detach().topk(C, dim=0).indices)
        weight_CE = probs_TE.gather(0, token_CE)
        device = x_TD.device
        return Routing(
            token=token_CE.t().reshape(-1),
            expert=torch.arange(E, device=device).repeat_interleave(C),
            weight=weight_CE.t().reshape(-1),
            choice=torch.zeros(E * C, dtype=torch.long, device=device),
            probs_TE=probs_TE,
            aux_loss=self._zero(x_TD),
            z_loss=z_loss(logits_TE),
        )
