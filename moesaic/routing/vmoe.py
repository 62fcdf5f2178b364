"""V-MoE router (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", §2.2
and Appendix A): noisy softmax, then top-k.

In training::

    g(x)  = TOP_k(softmax(x W + eps)),  eps ~ N(0, (noise_std / E)^2)
    L     = w_importance * CV^2(Importance) + w_load * CV^2(Load)
    Importance_i = sum_x softmax(x W)_i              (the noise-free softmax)
    Load_i       = mean_x P(expert i in the top-k if its noise were drawn again)
                 = mean_x (1 - Phi((threshold_x - (x W)_i) / std)),  threshold_x = k-th largest
                   noisy logit of x

The softmax comes before the top-k, unlike Shazeer et al. 2017, so k = 1 still trains the gate;
the combine weights are the chosen softmax values, not renormalised. At inference there is no
noise and the aux loss is the importance term alone. Paired with ``drop_policy="priority"`` the
layer does Batch Prioritized Routing (the token's priority is its largest weight). vmoe's
configs weight both losses 0.005: ``aux_loss_weight=0.005`` on the layer with the default
``w_importance = w_load = 1``.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import torch

from moesaic._validate import check_nonnegative_float
from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import cv_squared, z_loss
from moesaic.routing.registry import register_router
from moesaic.routing.topk import refuse_topk_options

__all__ = ["VMoERouter"]


@register_router("vmoe")
class VMoERouter(LearnedRouter):
    """V-MoE's noisy top-k router (see the module docstring).

    Args:
        noise_std: the logit noise is N(0, (noise_std / E)^2) in training; 1 (default) is
            vmoe's 1/E; 0 turns the noise and the load loss off.
        w_importance, w_load: weights of the two terms of the aux loss (the layer then applies
            ``aux_loss_weight``).
    """

    default_top_k = 2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        noise_std: float = 1.0,
        w_importance: float = 1.0,
        w_load: float = 1.0,
        **kwargs,
    ) -> None:
        refuse_topk_options(
            kwargs, "vmoe", "its weights are the raw softmax values of a noisy softmax"
        )
        super().__init__(d_model, num_experts, top_k, **kwargs)
        for name, value in (("noise_std", noise_std), ("w_importance", w_importance)):
            check_nonnegative_float(name, value)
        check_nonnegative_float("w_load", w_load)
        self.noise_std = float(noise_std) / num_experts
        self.w_importance, self.w_load = float(w_importance), float(w_load)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        K = self.top_k
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = self.logits(x_TD)
            importance = cv_squared(logits_TE.softmax(dim=-1).sum(dim=0))
            noisy = self.training and self.noise_std > 0
            noisy_TE = (
                logits_TE + torch.randn_like(logits_TE) * self.noise_std if noisy else logits_TE
            )
            probs_TE = noisy_TE.softmax(dim=-1)
            expert_TK = self.decide(lambda: probs_TE.detach().topk(K, dim=-1).indices)
            weight_TK = probs_TE.gather(1, expert_TK)
            aux = self.w_importance * importance
            if noisy:
                # the k-th largest noisy logit, taken at the decided experts (replay-safe)
                threshold_T1 = noisy_TE.gather(1, expert_TK[:, K - 1 : K])
                p_TE = 1.0 - torch.special.ndtr((threshold_T1 - logits_TE) / self.noise_std)
                aux = aux + self.w_load * cv_squared(p_TE.mean(dim=0))
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, aux, z_loss(logits_TE))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", noise_std={self.noise_std * self.num_experts:g}/E"
