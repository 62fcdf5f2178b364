"""The classic mixture family: MILE, MELE / hard mixtures, and specialists.

- ``ClassicMoE`` (MILE, "mixture of implicitly localised experts"): a softmax gating network over
  expert networks, trained together with the competitive mixture likelihood of Jacobs, Jordan,
  Nowlan & Hinton (1991), as surveyed by Masoudnia & Ebrahimpour (2014, §2-3):
  ``E = -log sum_i g_i exp(-||d - o_i||^2 / 2)`` for regression and ``-log sum_i g_i p_i(y)``
  for classification. An expert is pulled in proportion to its posterior responsibility, so the
  experts localise without being told where.
- ``HardMoE`` (MELE, explicitly localised experts; Gross, Ranzato & Szlam 2017, §3): the input is
  partitioned before the experts train, by k-means on trunk features (the ``cluster`` router);
  each expert trains only on its cluster, and with ``decoder`` the experts share one output layer.
- ``Specialist`` and ``combine_specialists`` (Hinton, Vinyals & Dean 2015, §5): specialists on
  confusable class subsets with a dustbin class, combined with the generalist by minimising
  ``KL(p_g, q) + sum_m KL(p_m, q)`` over q's logits (their eq. 5).

Training lives in ``moesaic.train.classic``. Shape legend (docs/shapes.md): B batch, D input
features (the input flattened), E experts, O outputs, C classes, H hidden, M specialists,
S a specialist's subset size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moesaic._validate import check_choice, check_positive_int
from moesaic.context import RoutingContext
from moesaic.routing.cluster import ClusterRouter

__all__ = [
    "mlp",
    "mile_loss",
    "ClassicMoE",
    "HardMoE",
    "Specialist",
    "confusable_clusters",
    "specialist_objective",
    "combine_specialists",
]

TASKS = ("classification", "regression")


def mlp(d_in: int, hidden: Sequence[int], d_out: int) -> nn.Sequential:
    """Linear-ReLU layers of widths ``hidden`` and a final Linear to ``d_out``."""
    widths = [d_in, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], d_out))


def mile_loss(
    gate_logits_BE: torch.Tensor, out_BEO: torch.Tensor, target: torch.Tensor, task: str
) -> torch.Tensor:
    """The competitive mixture negative log-likelihood (Jacobs et al. 1991), batch mean.

    regression: ``-log sum_i g_i exp(-||d - o_i||^2 / 2)``, ``target`` (B, O) floats;
    classification: ``-log sum_i g_i softmax(o_i)[y]``, ``target`` (B,) class indices.
    Its gradients are ``-h_i (d - o_i)`` for expert i's output and ``-(h_i - g_i)`` for the gate
    logit, with h the posterior responsibilities (Masoudnia & Ebrahimpour 2014, §3).
    """
    log_g_BE = F.log_softmax(gate_logits_BE.float(), dim=-1)
    if task == "regression":
        log_lik_BE = -0.5 * (target[:, None, :] - out_BEO.float()).square().sum(-1)
    else:
        B, E, _ = out_BEO.shape
        log_p_BEO = F.log_softmax(out_BEO.float(), dim=-1)
        log_lik_BE = log_p_BEO.gather(-1, target.view(B, 1, 1).expand(B, E, 1)).squeeze(-1)
    return -(log_g_BE + log_lik_BE).logsumexp(-1).mean()


class ClassicMoE(nn.Module):
    """A gating network over E expert MLPs, every expert run on every input (MILE).

    Args:
        d_in: input features (any input shape (B, ...) is flattened to (B, d_in)).
        d_out: outputs (classes for classification).
        num_experts: E.
        hidden: hidden widths of each expert MLP.
        gate_hidden: hidden widths of the gate (empty: a linear softmax gate, as in 1991).
        task: "classification" or "regression" (chooses the likelihood).

    Shape: ``forward(x)`` returns gate logits (B, E) and expert outputs (B, E, O).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        hidden: Sequence[int] = (64,),
        gate_hidden: Sequence[int] = (),
        task: str = "classification",
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("num_experts", num_experts)):
            check_positive_int(name, value)
        check_choice("task", task, TASKS)
        self.task = task
        self.gate = mlp(d_in, gate_hidden, num_experts)
        self.experts = nn.ModuleList(mlp(d_in, hidden, d_out) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_BD = x.flatten(1)
        out_BEO = torch.stack([expert(x_BD) for expert in self.experts], dim=1)
        return self.gate(x_BD), out_BEO

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mile_loss(*self(x), target, self.task)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's prediction: class probabilities ``sum_i g_i softmax(o_i)`` (B, C), or the
        mean output ``sum_i g_i o_i`` (B, O) for regression."""
        gate_logits_BE, out_BEO = self(x)
        g_BE1 = gate_logits_BE.softmax(-1)[..., None]
        if self.task == "regression":
            return (g_BE1 * out_BEO).sum(1)
        return (g_BE1 * out_BEO.softmax(-1)).sum(1)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Each input's most probable expert under the gate (B,)."""
        return self(x)[0].argmax(-1)


class HardMoE(nn.Module):
    """trunk -> the nearest centroid's expert -> shared decoder (Gross et al. 2017, §3).

    Args:
        trunk: maps the flattened input (B, D) to features (B, d_feature); ``nn.Identity()``
            clusters the raw input (MELE with k-means pre-partitioning).
        experts: E modules on the features.
        decoder: one output layer every expert's output goes through (shared, so experts
            produce features in one space), or None when each expert ends in its own output.
        d_feature: the trunk's output width (the centroids' width).

    The ``router`` (``ClusterRouter``) holds the centroids; fit it on trunk features before the
    experts train (``moesaic.train.classic.train_hard_moe``).
    """

    def __init__(
        self,
        trunk: nn.Module,
        experts: Sequence[nn.Module],
        decoder: nn.Module | None,
        d_feature: int,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.experts = nn.ModuleList(experts)
        self.decoder = decoder
        self.router = ClusterRouter(d_feature, len(self.experts), top_k=1)

    @classmethod
    def from_dense(cls, dense: nn.Sequential, num_experts: int, trunk_layers: int) -> HardMoE:
        """Split a trained dense MLP: its first ``trunk_layers`` modules are the trunk, its last
        Linear the shared decoder, and each expert starts as a copy of the modules between."""
        trunk, body, decoder = dense[:trunk_layers], dense[trunk_layers:-1], dense[-1]
        d_feature = [m for m in trunk if isinstance(m, nn.Linear)][-1].out_features
        experts = [copy.deepcopy(body) for _ in range(num_experts)]
        return cls(copy.deepcopy(trunk), experts, copy.deepcopy(decoder), d_feature)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x.flatten(1))

    def expert_logits(self, e: int, feats_BH: torch.Tensor) -> torch.Tensor:
        out = self.experts[e](feats_BH)
        return self.decoder(out) if self.decoder is not None else out

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Each input's expert: the nearest centroid to its trunk features (B,)."""
        return self.router(self.features(x), RoutingContext()).expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats_BH = self.features(x)
        expert_B = self.router(feats_BH, RoutingContext()).expert
        out_BO = None
        for e in expert_B.unique().tolist():
            rows = torch.nonzero(expert_B == e).flatten()
            out = self.expert_logits(e, feats_BH[rows])
            if out_BO is None:
                out_BO = out.new_zeros(len(feats_BH), out.shape[-1])
            out_BO = out_BO.index_copy(0, rows, out)
        return out_BO if out_BO is not None else self.expert_logits(0, feats_BH)  # empty batch


class Specialist(nn.Module):
    """A copy of the generalist whose output covers ``subset`` plus one dustbin class.

    Initialised from the generalist (Hinton et al. 2015, §5): hidden layers copied, the subset's
    output rows copied, the dustbin row the mean of the other rows with its bias raised by
    log(number of other classes). ``dustbin_shift`` (a buffer) is added to the dustbin logit at
    inference: the log of the oversampling ratio, which undoes the half-subset training mix.
    """

    def __init__(self, generalist: nn.Sequential, subset: Sequence[int]) -> None:
        super().__init__()
        last = generalist[-1]
        C = last.out_features
        subset = sorted(int(c) for c in subset)
        if not subset or len(set(subset)) != len(subset) or not 0 <= subset[0] < subset[-1] < C:
            raise ValueError(f"subset={subset} must be at least two distinct classes in [0, {C})")
        others = [c for c in range(C) if c not in subset]
        self.register_buffer("subset", torch.tensor(subset))
        self.register_buffer("dustbin_shift", torch.zeros(()))
        head = nn.Linear(last.in_features, len(subset) + 1)
        with torch.no_grad():
            head.weight.copy_(torch.cat([last.weight[subset], last.weight[others].mean(0, True)]))
            dust_bias = last.bias[others].mean() + torch.log(torch.tensor(float(len(others))))
            head.bias.copy_(torch.cat([last.bias[subset], dust_bias[None]]))
        self.net = nn.Sequential(*copy.deepcopy(generalist[:-1]), head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits_BS1 = self.net(x.flatten(1))
        shift = torch.zeros_like(logits_BS1[0])
        shift[-1] = self.dustbin_shift
        return logits_BS1 + shift

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Class labels mapped to the specialist's: a subset class's index, else the dustbin."""
        mapped = torch.full_like(y, len(self.subset))
        for i, c in enumerate(self.subset.tolist()):
            mapped[y == c] = i
        return mapped


@torch.no_grad()
def confusable_clusters(
    probs_NC: torch.Tensor, num_clusters: int, seed: int = 0, restarts: int = 10
) -> list[list[int]]:
    """Class subsets the generalist confuses: k-means on the columns of the covariance matrix of
    its predicted probabilities (Hinton et al. 2015, §5.1), so classes predicted together fall
    in one cluster. Returns the clusters of two or more classes, largest first.

    The diagonal (each class's own variance) is set to zero first: it says nothing about which
    classes are predicted together, and with few classes it dominates the distances (with 15k
    classes, as in the paper, it is one coordinate in 15k). The best of ``restarts`` seeded
    k-means runs (least within-cluster squared distance) is kept.
    """
    C = probs_NC.shape[1]
    check_positive_int("num_clusters", num_clusters)
    if num_clusters > C:
        raise ValueError(f"num_clusters={num_clusters} must be <= the number of classes {C}")
    cov_CC = torch.cov(probs_NC.double().T).fill_diagonal_(0.0)
    best, label_C = math.inf, None
    for r in range(restarts):
        router = ClusterRouter(C, num_clusters, top_k=1, router_dtype=torch.float64)
        router.fit(cov_CC, iters=50, seed=seed + r)
        assign_C = router.assign(cov_CC)
        inertia = float((cov_CC - router.centroids.double()[assign_C]).square().sum())
        if inertia < best:
            best, label_C = inertia, assign_C
    clusters = [torch.nonzero(label_C == k).flatten().tolist() for k in range(num_clusters)]
    return sorted((c for c in clusters if len(c) >= 2), key=lambda c: (-len(c), c))


def specialist_objective(
    logits_BC: torch.Tensor,
    p_gen_BC: torch.Tensor,
    p_spec: Sequence[torch.Tensor],
    subsets: Sequence[torch.Tensor],
    active_BM: torch.Tensor,
) -> torch.Tensor:
    """``KL(p_g, q) + sum_{m active} KL(p_m, q_m)`` per example (B,), with ``q = softmax(logits)``
    and q_m q pooled to specialist m's subset plus dustbin (Hinton et al. 2015, eq. 5)."""
    log_q_BC = F.log_softmax(logits_BC, dim=-1)
    total_B = (torch.xlogy(p_gen_BC, p_gen_BC) - p_gen_BC * log_q_BC).sum(-1)
    for m, (p_BS1, subset) in enumerate(zip(p_spec, subsets)):
        others = torch.ones(logits_BC.shape[1], dtype=torch.bool, device=logits_BC.device)
        others[subset] = False
        log_qm_BS1 = torch.cat(
            [log_q_BC[:, subset], log_q_BC[:, others].logsumexp(-1, keepdim=True)], dim=-1
        )
        kl_B = (torch.xlogy(p_BS1, p_BS1) - p_BS1 * log_qm_BS1).sum(-1)
        total_B = total_B + active_BM[:, m] * kl_B
    return total_B


def combine_specialists(
    gen_logits_BC: torch.Tensor,
    spec_logits: Sequence[torch.Tensor],
    subsets: Sequence[torch.Tensor],
    top_n: int = 2,
    steps: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined log-probabilities log q (B, C) and the active mask (B, M).

    Specialist m is active for an example when its subset holds one of the generalist's
    ``top_n`` classes. q starts at the generalist's distribution and takes ``steps`` gradient
    steps on its logits; the step 1 / (1 + number active) keeps every step a descent step (each
    KL term's Hessian in the logits has eigenvalues at most 1/2). With no active specialist the
    gradient is zero and q is the generalist's distribution.
    """
    p_gen_BC = gen_logits_BC.float().softmax(-1)
    top_BN = gen_logits_BC.topk(min(top_n, gen_logits_BC.shape[1]), dim=-1).indices
    active_BM = (
        torch.stack([torch.isin(top_BN, s).any(-1) for s in subsets], dim=1).float()
        if subsets
        else gen_logits_BC.new_zeros(len(gen_logits_BC), 0)
    )
    p_spec = [s.float().softmax(-1) for s in spec_logits]
    step_B1 = 1.0 / (1.0 + active_BM.sum(1, keepdim=True))
    z_BC = p_gen_BC.clamp_min(1e-30).log()
    for _ in range(steps):
        z_BC = z_BC.detach().requires_grad_(True)
        with torch.enable_grad():
            objective = specialist_objective(z_BC, p_gen_BC, p_spec, subsets, active_BM).sum()
            (grad_BC,) = torch.autograd.grad(objective, z_BC)
        z_BC = z_BC - step_B1 * grad_BC
    return F.log_softmax(z_BC.detach(), dim=-1), active_BM
