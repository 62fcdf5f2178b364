"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

Section 2.1, eqs. 3-5::

    H(x)_i = (x W_g)_i + eps_i * softplus((x W_noise)_i),  eps_i ~ N(0, 1), training only
    G(x)   = softmax(KeepTopK(H(x), k))
    L      = CV(Importance)^2 + CV(Load)^2,  Importance = sum_x G(x)
    Load_i = sum_x Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import cv_squared, z_loss
from moesaic.routing.registry import register_router
from moesaic.routing.topk import refuse_topk_options

__all__ = ["NoisyTopKRouter", "prob_in_topk"]


@register_router("noisy_topk")
class NoisyTopKRouter(LearnedRouter):
    """Shazeer 2017 noisy top-k router with importance and load losses.

    ``gate`` (W_g) and ``noise`` (W_noise) are ``nn.Linear(d_model, E, bias=False)``, both
    initialised to zero as in the paper so that the load starts balanced. The aux loss is
    ``w_importance * CV^2(Importance) + w_load * CV^2(Load)`` (the layer then applies its weight).
    """

    default_top_k = 2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        w_importance: float = 1.0,
        w_load: float = 1.0,
        **kwargs,
    ) -> None:
        refuse_topk_options(
            kwargs,
            "noisy_topk",
            "its gates are a softmax over the k kept noisy logits and its load loss is defined "
            "on them",
        )
        super().__init__(d_model, num_experts, top_k, **kwargs)
        self.noise = nn.Linear(d_model, num_experts, bias=False)
        self.w_importance, self.w_load = float(w_importance), float(w_load)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gate.weight)  # paper section 2.1 / appendix A: W_g = W_noise = 0
        if hasattr(self, "noise"):
            nn.init.zeros_(self.noise.weight)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        K, E = self.top_k, self.num_experts
        with torch.autocast(x_TD.device.type, enabled=False):
            x = self.router_input(x_TD)
            clean_TE = self.linear(x, self.gate)
            std_TE = nn.functional.softplus(self.linear(x, self.noise)) if self.training else None
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE if self.training else clean_TE
            # the K best noisy logits and the next one (the load estimator's threshold)
            top_idx = self.decide(lambda: noisy_TE.detach().topk(min(K + 1, E), dim=-1).indices)
            top_val = noisy_TE.gather(1, top_idx)
            gates_TK, expert_TK = top_val[:, :K].softmax(dim=-1), top_idx[:, :K]
            probs_TE = torch.zeros_like(clean_TE).scatter(1, expert_TK, gates_TK)
            if self.training and K < E:
                load_E = prob_in_topk(clean_TE, std_TE, top_val, expert_TK).sum(dim=0)
            else:
                load_E = (probs_TE > 0).sum(dim=0).to(probs_TE.dtype)
            aux = self.w_importance * cv_squared(probs_TE.sum(dim=0)) + self.w_load * cv_squared(
                load_E
            )
        return Routing.from_topk(gates_TK, expert_TK, probs_TE, aux, z_loss(clean_TE))


def prob_in_topk(
    clean_TE: torch.Tensor, std_TE: torch.Tensor, top_val: torch.Tensor, expert_TK: torch.Tensor
) -> torch.Tensor:
    """Shazeer 2017 eqs. 8-10: P(expert i in the top k under fresh noise on i), shape (T, E).

    ``top_val`` holds the K+1 largest noisy logits per token. For expert i the threshold is the
    k-th largest of H *with i removed*: the (K+1)-th largest when i is in the top-k, else the K-th.
    """
    K = expert_TK.shape[1]
    in_topk_TE = torch.zeros_like(clean_TE, dtype=torch.bool).scatter(1, expert_TK, True)
    threshold_TE = torch.where(in_topk_TE, top_val[:, K : K + 1], top_val[:, K - 1 : K])
    return torch.special.ndtr((clean_TE - threshold_TE) / std_TE)
