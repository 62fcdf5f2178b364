"""Clustering router for hard mixtures of experts (Gross, Ranzato, Szlam 2017).

The gater is a fixed hard assignment to the nearest of E centroids, found by k-means on features
(``fit``) before the experts are trained; each expert then sees only its cluster. For k > 1 the
k nearest centroids are used with weight 1/k (averaged predictions). No gradient, no aux loss.
``fit(..., balanced=True)`` runs balanced k-means: each Lloyd step assigns the samples to centroids
by a balanced assignment (``assign``), so no cluster starves and each expert gets about N/E
training examples.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k, N samples.
"""

from __future__ import annotations

import torch

from moesaic._validate import check_choice
from moesaic.context import RoutingContext
from moesaic.routing.assignment import balanced_assignment
from moesaic.routing.base import Router, Routing
from moesaic.routing.registry import register_router

__all__ = ["ClusterRouter"]


@register_router("cluster")
class ClusterRouter(Router):
    """Nearest-centroid routing; ``centroids`` (E, D) is a buffer saved in the state dict."""

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, **kwargs) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        self.register_buffer("centroids", torch.randn(num_experts, d_model))

    @torch.no_grad()
    def fit(
        self,
        x_ND: torch.Tensor,
        iters: int = 25,
        seed: int = 0,
        balanced: bool = False,
        init: str = "random",
    ) -> ClusterRouter:
        """Lloyd's k-means on features x (N, D); ``balanced`` assigns by
        ``assign(x, balanced=True)`` in every step.

        ``init``: "random" starts from E distinct random samples; "kmeans++" draws each next
        centroid with probability proportional to the squared distance to the nearest one
        already drawn (Arthur & Vassilvitskii 2007), which rarely puts two centroids in one
        well-separated cluster.
        """
        check_choice("init", init, ("random", "kmeans++"))
        if x_ND.dim() != 2 or x_ND.shape[1] != self.d_model or x_ND.shape[0] < self.num_experts:
            raise ValueError(
                f"fit(x) needs x of shape (N, {self.d_model}) with N >= num_experts="
                f"{self.num_experts}, got {tuple(x_ND.shape)}"
            )
        x = x_ND.to(self.router_dtype)
        g = torch.Generator().manual_seed(seed)
        if init == "kmeans++":
            c = _kmeans_plus_plus(x, self.num_experts, g)
        else:
            c = x[torch.randperm(x.shape[0], generator=g)[: self.num_experts].to(x.device)].clone()
        for _ in range(iters):
            nearest_N = _assign(x, c, balanced)
            sums = torch.zeros_like(c).index_add_(0, nearest_N, x)
            counts = torch.bincount(nearest_N, minlength=self.num_experts)
            filled = counts > 0  # an empty cluster keeps its centroid
            c[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        self.centroids.copy_(c.to(self.centroids.dtype))
        return self

    @torch.no_grad()
    def assign(self, x_ND: torch.Tensor, balanced: bool = False) -> torch.Tensor:
        """The cluster (LongTensor (N,)) of each sample: its nearest centroid, or with
        ``balanced`` the minimum-total-squared-distance assignment in which every cluster takes
        floor(N/E) samples, plus nearest-centroid for the N mod E left over."""
        return _assign(x_ND.to(self.router_dtype), self.centroids.to(self.router_dtype), balanced)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        K = self.top_k
        with torch.no_grad(), torch.autocast(x_TD.device.type, enabled=False):
            dist_TE = torch.cdist(x_TD.to(self.router_dtype), self.centroids.to(self.router_dtype))
            expert_TK = self.decide(lambda: dist_TE.topk(K, dim=-1, largest=False).indices)
            weight_TK = torch.full(
                expert_TK.shape, 1.0 / K, dtype=self.router_dtype, device=x_TD.device
            )
            probs_TE = torch.zeros_like(dist_TE).scatter_(1, expert_TK, weight_TK)
        zero = self._zero(x_TD)
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, zero, zero)


def _assign(x_ND: torch.Tensor, c_ED: torch.Tensor, balanced: bool) -> torch.Tensor:
    dist_NE = torch.cdist(x_ND, c_ED)
    nearest_N = dist_NE.argmin(dim=1)
    if not balanced:
        return nearest_N
    # The exact solver is fast when E divides the count (assignment.py), so the first
    # N - N mod E samples are balanced and the few left over go to their nearest centroid.
    n = x_ND.shape[0] - x_ND.shape[0] % c_ED.shape[0]
    nearest_N[:n] = balanced_assignment(-dist_NE[:n].square())
    return nearest_N


def _kmeans_plus_plus(x_ND: torch.Tensor, E: int, g: torch.Generator) -> torch.Tensor:
    first = int(torch.randint(x_ND.shape[0], (1,), generator=g))
    c = [x_ND[first]]
    d2_N = (x_ND - c[0]).square().sum(1)
    for _ in range(E - 1):
        weights = d2_N.double().cpu()
        if weights.sum() <= 0:  # fewer distinct points than centroids: any sample will do
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=g))
        c.append(x_ND[pick])
        d2_N = torch.minimum(d2_N, (x_ND - c[-1]).square().sum(1))
    return torch.stack(c).clone()
