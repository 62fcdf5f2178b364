"""Sinkhorn routing, S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models", section 2): BASE's balanced assignment approximated by Sinkhorn's algorithm.

In training, Sinkhorn's alternating row and column normalisation turns ``exp(logits)`` into a
transport plan whose rows each carry 1/T and whose columns each carry 1/E (Sinkhorn and Knopp
1967; Cuturi 2013), i.e. every expert receives the same share of the tokens' mass; each token
then takes the top-k experts of its row of the plan. The plan only chooses the experts and is
never differentiated; the combine weights are the router's scores of the chosen experts, a
sigmoid for top-1 and a softmax for top-k, as in Megatron-LM's sinkhorn router. At evaluation
each token takes the plain top-k of its scores.

Shape legend (docs/shapes.md): T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import torch

from moesaic._validate import check_nonnegative_float, check_positive_int
from moesaic.context import RoutingContext
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import z_loss
from moesaic.routing.registry import register_router
from moesaic.routing.topk import refuse_topk_options

__all__ = ["SinkhornRouter", "sinkhorn"]


@torch.no_grad()
def sinkhorn(logits_TE: torch.Tensor, iters: int = 100, tol: float = 1e-3) -> torch.Tensor:
    """The balanced transport plan (T, E) of ``exp(logits_TE)``.

    ``P = diag(exp(a)) exp(logits) diag(exp(b))`` with every row sum exactly 1/T (up to
    rounding) and every column sum 1/E within ``tol`` relative: ``|E * sum_t P[t, e] - 1| <=
    tol``. Iterates in the log domain (logsumexp), so large logits cannot overflow; stops after
    ``iters`` row-and-column updates, or as soon as the columns are within ``tol``. When
    ``iters`` run out first, the rows still sum to 1/T and the columns are as close as the
    iterations got them. Computes in float32 at least (float64 stays float64).
    """
    check_positive_int("iters", iters)
    check_nonnegative_float("tol", tol)
    T, E = logits_TE.shape
    z_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    if T == 0:
        return z_TE.exp()
    log_T, log_E = math.log(T), math.log(E)
    b_E = z_TE.new_zeros(E)
    for _ in range(iters):
        a_T = -log_T - torch.logsumexp(z_TE + b_E, dim=1)  # rows sum to 1/T
        lse_E = torch.logsumexp(z_TE + a_T[:, None], dim=0)  # column sums are exp(lse_E + b_E)
        if float((lse_E + b_E + log_E).exp().sub(1).abs().max()) <= tol:
            break
        b_E = -log_E - lse_E  # columns sum to 1/E
    else:
        a_T = -log_T - torch.logsumexp(z_TE + b_E, dim=1)
    return (z_TE + a_T[:, None] + b_E).exp()


@register_router("sinkhorn")
class SinkhornRouter(LearnedRouter):
    """Top-k of the Sinkhorn-balanced plan in training, top-k of the scores at evaluation.

    The scores are ``sigmoid(x W_g)`` for top-1 and ``softmax(x W_g)`` for top-k > 1
    (Megatron-LM's choice; the k weights are not renormalised); the combine weights are the
    chosen experts' scores, which train the gate. The aux loss is 0 (the plan balances the
    load); the z-loss is that of the logits. ``probs_TE`` (statistics) is the softmax.

    Args:
        sinkhorn_iters: at most this many Sinkhorn iterations per forward (default 100).
        sinkhorn_tol: stop once every expert's share of the plan is 1/E within this relative
            tolerance (default 1e-3); see ``sinkhorn``.
    """

    default_top_k = 1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        sinkhorn_iters: int = 100,
        sinkhorn_tol: float = 1e-3,
        **kwargs,
    ) -> None:
        refuse_topk_options(kwargs, "sinkhorn", "its experts come from the Sinkhorn plan")
        super().__init__(d_model, num_experts, top_k, **kwargs)
        check_positive_int("sinkhorn_iters", sinkhorn_iters)
        check_nonnegative_float("sinkhorn_tol", sinkhorn_tol)
        self.sinkhorn_iters, self.sinkhorn_tol = sinkhorn_iters, float(sinkhorn_tol)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid() if self.top_k == 1 else logits_TE.softmax(dim=-1)
        expert_TK = self.decide(lambda: self.choose(logits_TE.detach()))
        weight_TK = scores_TE.gather(1, expert_TK)
        probs_TE = logits_TE.softmax(dim=-1) if self.top_k == 1 else scores_TE
        zero = self._zero(x_TD)
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, zero, z_loss(logits_TE))

    def choose(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The k experts (T, K) of every token: from the plan in training, else the logits."""
        if self.training:
            logits_TE = sinkhorn(logits_TE, self.sinkhorn_iters, self.sinkhorn_tol)
        return logits_TE.topk(self.top_k, dim=-1).indices

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"sinkhorn_tol={self.sinkhorn_tol}"
        )
