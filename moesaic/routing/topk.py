"""Token-choice top-k router: score the experts, keep the k best, weight them by their scores.

``TopKRouter`` (``router="topk"``) is the learned token-choice router that Switch, GShard and
TaskMoE specialise. Its options cover the DeepSeek family of routers as well:

- ``score_func``: ``"softmax"`` (p = softmax(x W_g), the default) or ``"sigmoid"`` (s =
  sigmoid(x W_g), DeepSeek-V3, Liu et al. 2024, section 2.1.2, eqs. 13-15).
- ``normalize`` / ``route_scale``: the k chosen scores are renormalised to sum to one (default),
  then multiplied by ``route_scale`` (DeepSeek's ``routed_scaling_factor``; 1 by default).
- ``n_groups`` / ``topk_groups``: group-limited routing (DeepSeek-V2 section 2.1.3
  "device-limited routing", DeepSeek-V3 "node-limited routing"): the E experts form ``n_groups``
  contiguous groups; per token only the ``topk_groups`` best groups stay eligible.
- ``balance_rate``: auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2; Wang et al.
  2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"): a per-expert bias
  added to the scores for the choice of experts only, moved between steps by
  ``update_balance_biases``.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k, N groups, G experts per
group, M kept groups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moesaic._validate import (
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)
from moesaic.context import RoutingContext, is_recomputing
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import balance_loss, z_loss
from moesaic.routing.registry import register_router

__all__ = [
    "TopKRouter",
    "SCORE_FUNCS",
    "GROUP_SCORES",
    "TOPK_OPTIONS",
    "update_balance_biases",
    "reset_balance_counts",
    "balance_routers",
    "refuse_topk_options",
]

SCORE_FUNCS = ("softmax", "sigmoid")
# How a group of experts is scored for group-limited routing: DeepSeek-V3's sum of the group's
# two largest expert scores, or DeepSeek-V2's largest expert score.
GROUP_SCORES = ("top2_sum", "max")
# The options TopKRouter adds to a learned router (routers that cannot take them name them).
TOPK_OPTIONS = (
    "score_func",
    "route_scale",
    "n_groups",
    "topk_groups",
    "group_score",
    "balance_rate",
)


@register_router("topk")
class TopKRouter(LearnedRouter):
    """Score the experts, then top-k.

    Args:
        normalize: renormalise the k chosen scores to sum to one (default). False keeps the raw
            scores (GLaM, Du et al. 2022, and Mixtral differ here; DeepSeek-V3 normalises its
            sigmoid scores).
        score_func: ``"softmax"`` (default) or ``"sigmoid"``. Sigmoid scores are independent per
            expert (DeepSeek-V3); ``probs_TE`` (statistics and the aux loss) is then the scores
            normalised per token, as in DeepSeek-V3's sequence-wise balance loss.
        route_scale: multiplies the combine weights (DeepSeek's ``routed_scaling_factor``); a
            float > 0, 1 by default.
        n_groups: split the E experts into this many contiguous groups (experts
            ``j*G .. (j+1)*G - 1`` form group j, G = E / n_groups); 1 (default) disables
            group-limited routing.
        topk_groups: per token only the experts of its ``topk_groups`` best groups can be
            chosen (None: all groups); needs ``top_k <= topk_groups * G``.
        group_score: how a group is ranked: ``"top2_sum"`` (default, DeepSeek-V3: the sum of
            its two largest expert scores; its one score when G = 1) or ``"max"`` (DeepSeek-V2:
            its largest expert score).
        balance_rate: gamma of auxiliary-loss-free balancing; 0 (default) turns it off. When it
            is > 0 the router keeps a bias b (E,), the persistent buffer ``balance_bias`` (saved
            in the state dict), and chooses experts by ``score + b`` (groups too) while the
            combine weights use the unbiased scores. Training-mode forwards count the
            assignments per expert (``balance_counts``, not saved); ``update_balance_biases``
            then moves every bias by ``b_i += gamma * sign(mean load - load_i)`` and clears the
            counts (the trainer calls it after every optimizer step). Set
            ``aux_loss_weight=0`` on the layer to balance by the bias alone. A model trained so
            keeps ``balance_rate`` in its config to be served: the bias chooses experts in every
            forward, training or not.

    The aux loss is ``E * sum_i f_i P_i`` with f over first choices (Switch / GShard form); the
    z-loss is on the logits x W_g whatever ``score_func``. Subclasses change where the logits
    come from by overriding ``route_logits``, and what happens to the chosen assignments by
    overriding ``route`` (``forward`` is ``route`` plus the load count).
    """

    default_top_k = 2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        normalize: bool = True,
        score_func: str = "softmax",
        route_scale: float = 1.0,
        n_groups: int = 1,
        topk_groups: int | None = None,
        group_score: str = "top2_sum",
        balance_rate: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize={normalize!r} must be a bool")
        check_choice("score_func", score_func, SCORE_FUNCS)
        check_positive_float("route_scale", route_scale)
        check_choice("group_score", group_score, GROUP_SCORES)
        check_positive_int("n_groups", n_groups)
        if num_experts % n_groups:
            raise ValueError(
                f"n_groups={n_groups} must divide num_experts={num_experts} (experts form "
                f"n_groups contiguous groups of equal size)"
            )
        topk_groups = n_groups if topk_groups is None else topk_groups
        check_positive_int("topk_groups", topk_groups)
        if topk_groups > n_groups:
            raise ValueError(f"topk_groups={topk_groups} must be <= n_groups={n_groups}")
        eligible = topk_groups * (num_experts // n_groups)
        if self.top_k > eligible:
            raise ValueError(
                f"top_k={self.top_k} must be <= topk_groups * num_experts / n_groups = "
                f"{topk_groups} * {num_experts // n_groups} = {eligible}, the experts a token "
                f"can still choose from"
            )
        check_nonnegative_float("balance_rate", balance_rate)
        self.normalize, self.score_func = normalize, score_func
        self.route_scale = float(route_scale)
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.balance_rate = float(balance_rate)
        if self.balance_rate > 0:
            dtype = torch.promote_types(self.router_dtype, torch.float32)
            self.register_buffer("balance_bias", torch.zeros(num_experts, dtype=dtype))
            counts = torch.zeros(num_experts, dtype=torch.long)
            self.register_buffer("balance_counts", counts, persistent=False)
        else:
            self.balance_bias = self.balance_counts = None

    def route_logits(self, x_TD: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Logits (T, E) in ``router_dtype``; a token's routing depends on this row only."""
        return self.logits(x_TD)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        routing = self.route(x_TD, context)
        if self.balance_counts is not None and self.training and not is_recomputing():
            with torch.no_grad():
                ones = torch.ones_like(routing.expert)
                self.balance_counts.index_add_(0, routing.expert, ones)
        return routing

    def route(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        """The routing of the (T, D) tokens (``forward`` without the load count)."""
        logits_TE = self.route_logits(x_TD, context)
        if self.score_func == "softmax":
            scores_TE = probs_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        # choose by the (biased / group-limited) scores, weight by the plain scores
        fixed_TE = scores_TE.detach()
        expert_TK = self.decide(lambda: _topk(self.selection_scores(fixed_TE), self.top_k))
        weight_TK = scores_TE.gather(1, expert_TK)
        if self.normalize:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        if self.route_scale != 1.0:
            weight_TK = weight_TK * self.route_scale
        aux = balance_loss(probs_TE, expert_TK[:, 0])
        return Routing.from_topk(weight_TK, expert_TK, probs_TE, aux, z_loss(logits_TE))

    def selection_scores(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """What the top-k picks from (T, E): the scores plus ``balance_bias``, with the experts
        outside a token's ``topk_groups`` best groups at -inf. Never differentiated."""
        if self.balance_bias is not None:
            scores_TE = scores_TE + self.balance_bias.to(scores_TE.dtype)
        if self.topk_groups == self.n_groups:
            return scores_TE
        T, N = scores_TE.shape[0], self.n_groups
        scores_TNG = scores_TE.view(T, N, self.num_experts // N)
        if self.group_score == "max":
            group_TN = scores_TNG.amax(dim=-1)
        else:
            group_TN = scores_TNG.topk(min(2, scores_TNG.shape[-1]), dim=-1).values.sum(dim=-1)
        keep_TM = group_TN.topk(self.topk_groups, dim=-1).indices
        drop_TN = torch.ones_like(group_TN, dtype=torch.bool).scatter_(1, keep_TM, False)
        return scores_TNG.masked_fill(drop_TN.unsqueeze(-1), -math.inf).view(T, self.num_experts)

    @torch.no_grad()
    def apply_balance_update(self, counts_E: torch.Tensor) -> None:
        """``balance_bias += balance_rate * sign(mean(counts) - counts)`` and clear the counts.
        ``counts_E`` is the load (E,) to balance: this router's ``balance_counts``, summed over
        the ranks that hold replicas of it (``update_balance_biases`` does both)."""
        if self.balance_bias is None:
            raise ValueError("this router has balance_rate=0: it keeps no balance_bias")
        load_E = counts_E.to(device=self.balance_bias.device, dtype=torch.float64)
        step_E = torch.sign(load_E.mean() - load_E) * self.balance_rate
        self.balance_bias += step_E.to(self.balance_bias.dtype)
        self.balance_counts.zero_()

    def extra_repr(self) -> str:
        extra = [super().extra_repr()]
        if self.score_func != "softmax":
            extra.append(f"score_func={self.score_func!r}")
        if self.route_scale != 1.0:
            extra.append(f"route_scale={self.route_scale}")
        if self.n_groups > 1:
            extra.append(f"n_groups={self.n_groups}, topk_groups={self.topk_groups}")
        if self.balance_rate > 0:
            extra.append(f"balance_rate={self.balance_rate}")
        return ", ".join(extra)


def refuse_topk_options(options: dict, router: str, why: str) -> None:
    """Raise a ValueError naming the ``TOPK_OPTIONS`` in ``options`` that ``router`` (a
    learned router outside the ``TopKRouter`` family) cannot take, and ``why``."""
    given = [name for name in TOPK_OPTIONS if name in options]
    if given:
        raise ValueError(
            f"{', '.join(given)}: not available for router={router!r} ({why}); router='topk' "
            f"takes {', '.join(TOPK_OPTIONS)}"
        )


def _topk(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (T, k) of the k largest scores per row, largest first."""
    if k == 1:  # argmax is a cheaper kernel than topk(1) on CPU
        return scores_TE.argmax(dim=-1, keepdim=True)
    return scores_TE.topk(k, dim=-1).indices


def balance_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of ``model`` with auxiliary-loss-free balancing on (``balance_rate > 0``),
    in module order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.balance_rate > 0]


@torch.no_grad()
def update_balance_biases(model: nn.Module, group: object | None = None) -> bool:
    """One step of auxiliary-loss-free balancing for every router of ``model`` that has it.

    Each router's per-expert counts (its training-mode forwards since the last update) are
    summed over the ranks of ``group`` with one all-reduce for all routers, so every rank moves
    its bias by the same step and the replicas stay identical; then ``b_i += gamma * sign(mean
    load - load_i)`` and the counts start again from zero. Routing itself never communicates:
    this step-level call is the only collective. Call it after each optimizer step, on every
    rank of ``group`` (``moesaic``'s Trainer does, with every rank of the run).

    Args:
        model: any module; its ``TopKRouter`` instances (``topk``, ``switch``, ``gshard``,
            ``task``) with ``balance_rate > 0`` take part.
        group: the ``torch.distributed`` process group whose ranks hold replicas of these
            routers and train on different tokens: data- and expert-parallel ranks alike
            (``torch.distributed.group.WORLD`` for plain data parallelism). None: no
            communication, this process's counts alone.

    Returns False (and does nothing, communication included) when no router of ``model`` has
    ``balance_rate > 0``, else True.

    A sign step is blind to the scale of the counts: recomputing a forward (activation
    checkpointing) doubles a layer's counts and changes no bias.
    """
    routers = balance_routers(model)
    if not routers:
        return False
    device = routers[0].balance_counts.device
    counts = torch.cat([r.balance_counts.to(device) for r in routers])
    if group is not None:
        dist.all_reduce(counts, group=group)
    for router, counts_E in zip(routers, counts.split([r.num_experts for r in routers])):
        router.apply_balance_update(counts_E)
    return True


def reset_balance_counts(model: nn.Module) -> None:
    """Forget the counted loads of every balancing router of ``model`` without moving a bias
    (a skipped or rolled-back step)."""
    for router in balance_routers(model):
        router.balance_counts.zero_()
