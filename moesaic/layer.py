"""The MoE layer: route, apply capacity, dispatch, run experts, combine, add the shared expert.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moesaic._validate import check_choice, check_nonnegative_float, check_positive_int
from moesaic.context import current_context
from moesaic.dispatch import DROP_POLICIES, combine, expert_capacity, make_plan, permute
from moesaic.experts import ExpertBackend, Experts
from moesaic.parallel.expert_parallel import run_experts_parallel
from moesaic.routing.base import Router
from moesaic.routing.registry import build_router
from moesaic.routing.stats import RoutingStats

__all__ = ["MoE", "aux_loss"]


class MoE(nn.Module):
    """Sparse mixture-of-experts feed-forward layer.

    Args:
        d_model: token width D.
        d_ff: hidden width F of each expert.
        num_experts: E.
        router: a name in ``ms.ROUTERS`` or a ``Router`` instance.
        top_k: experts per token; None takes the router's default (switch 1, gshard 2, ...).
        capacity_factor: None for dropless; a float > 0 gives each expert
            ``C = ceil(capacity_factor * k * T / E)`` slots per forward.
        drop_policy: which assignments keep their slot when an expert overflows: "position"
            (earliest tokens) or "priority" (highest gate weight, Batch Prioritized Routing).
            Either way every first choice goes before any second choice.
        activation: "gelu" | "gelu_tanh" | "relu" | "silu" | "swiglu".
        expert_bias: give every expert (and the shared expert) biases ``experts.b1``/``b2``
            (``b3`` for swiglu), as ``moefy`` needs for dense FFNs that have them.
        shared_d_ff: > 0 adds a dense always-on expert of that width (residual MoE / PR-MoE:
            ``y = MoE(x) + MLP(x)``).
        aux_loss_weight: alpha, the weight of the router's load-balancing loss.
        z_loss_weight: weight of the router z-loss (ST-MoE).
        jitter: multiplicative input jitter of learned routers in training; None takes the
            router's default (1e-2 for switch, 0 otherwise).
        router_dtype: dtype of the router math, fp32 by default even for bf16 activations.
        router_options: extra keyword arguments of the router class (e.g. ``num_tasks`` for
            "task", ``task_skills`` for "skill", ``normalize`` for "topk").
        expert_backend: how the experts run: "auto" | "torch" | "grouped" | "cpu" or an
            ``ExpertBackend`` instance, see ``Experts``. Every backend computes the same.
        expert_group: a ``torch.distributed`` process group for expert parallelism: each of its
            W ranks keeps E / W experts (``experts.w1`` is then (E / W, D, F)) and tokens travel
            to them by all-to-all. Routing and capacity stay per rank over its local tokens.
            ``ms.parallel.init(expert=W).expert_group`` builds it from torchrun's environment.
        device, dtype: for the parameters.

    Shape:
        x (..., D) -> y (..., D). Tokens that lose every assignment to capacity get 0: the
        caller's residual carries them.

    After each forward, ``layer.aux_loss`` holds the weighted aux + z loss (a scalar tensor in
    the graph) and ``layer.last_stats`` a ``RoutingStats``.

    Example::

        >>> layer = ms.MoE(d_model=64, d_ff=256, num_experts=8, router="switch")
        >>> y = layer(torch.randn(2, 10, 64))
        >>> loss = task_loss(y) + ms.aux_loss(model)
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str | Router = "switch",
        top_k: int | None = None,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        activation: str = "gelu",
        expert_bias: bool = False,
        shared_d_ff: int = 0,
        aux_loss_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        jitter: float | None = None,
        router_dtype: torch.dtype = torch.float32,
        router_options: dict[str, Any] | None = None,
        expert_backend: str | ExpertBackend = "auto",
        expert_group: object | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        if capacity_factor is not None:
            check_nonnegative_float("capacity_factor", capacity_factor)
            if capacity_factor <= 0:
                raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None)")
        check_choice("drop_policy", drop_policy, DROP_POLICIES)
        check_nonnegative_float("aux_loss_weight", aux_loss_weight)
        check_nonnegative_float("z_loss_weight", z_loss_weight)
        if isinstance(shared_d_ff, bool) or not isinstance(shared_d_ff, int) or shared_d_ff < 0:
            raise ValueError(f"shared_d_ff={shared_d_ff!r} must be an int >= 0")
        self.d_model, self.num_experts = d_model, num_experts
        self.capacity_factor, self.drop_policy = capacity_factor, DROP_POLICIES[drop_policy]()
        self.aux_loss_weight, self.z_loss_weight = float(aux_loss_weight), float(z_loss_weight)
        self.router = build_router(
            router,
            d_model=d_model,
            num_experts=num_experts,
            top_k=top_k,
            router_dtype=router_dtype,
            jitter=jitter,
            capacity_factor=capacity_factor,
            options=router_options,
        ).to(device=device)
        self.top_k = self.router.top_k
        kw = {"bias": expert_bias, "backend": expert_backend}
        kw |= {"device": device, "dtype": dtype}
        self.experts = Experts(num_experts, d_model, d_ff, activation, **kw)
        self.expert_group = None
        self._mark_experts()
        if expert_group is not None:
            self.shard_experts(expert_group)
        self.shared = Experts(1, d_model, shared_d_ff, activation, **kw) if shared_d_ff else None
        self._last = _LastForward()

    def shard_experts(self, group) -> None:
        """Keep only this rank's E / W consecutive experts of the W-rank ``group`` and dispatch
        to the others by all-to-all from now on. Rank r keeps experts r*E/W .. (r+1)*E/W - 1 of
        the current weights, so sharding a model after initialising it whole gives every rank
        exactly the experts a single-process model built from the same seed has."""
        if self.expert_group is not None:
            raise ValueError("the experts of this layer are already sharded")
        world, index = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % world:
            raise ValueError(
                f"num_experts={self.num_experts} must be divisible by the expert-parallel group "
                f"size {world}"
            )
        local = self.num_experts // world
        for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
            w = getattr(self.experts, name)
            if w is not None:
                shard = w.detach()[index * local : (index + 1) * local].clone()
                setattr(self.experts, name, nn.Parameter(shard, requires_grad=w.requires_grad))
        self.experts.num_experts = local
        self.expert_group = group
        self._mark_experts()

    def _mark_experts(self) -> None:
        for p in self.experts.parameters():
            p.moesaic_expert = True  # gradients average over expert replicas only (ms.parallel)

    @property
    def aux_loss(self) -> torch.Tensor:
        """Weighted aux + z loss of the last forward (in its graph); 0 before any forward."""
        if self._last.aux_loss is None:
            return torch.zeros((), device=self.experts.w1.device)
        return self._last.aux_loss

    @property
    def last_stats(self) -> RoutingStats | None:
        """Routing statistics of the last forward (None before any forward)."""
        return self._last.stats

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a forward of ``num_tokens`` tokens (None when dropless)."""
        if self.capacity_factor is None:
            return None
        return expert_capacity(self.capacity_factor, self.top_k, num_tokens, self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = self._tokens(x)
        T = x_TD.shape[0]
        routing = self.router(x_TD, current_context())
        plan = make_plan(routing, self.num_experts, T, self.capacity(T), self.drop_policy)
        # forward-only calls on one process may run experts and combine in one pass
        y_TD = None if self.expert_group is not None else self.experts.forward_combined(x_TD, plan)
        if y_TD is None:
            y_TD = combine(self._run_experts(permute(x_TD, plan), plan.counts), plan)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD, [T])
        self._last.aux_loss = (
            self.aux_loss_weight * routing.aux_loss + self.z_loss_weight * routing.z_loss
        )
        self._last.stats = RoutingStats(
            plan.tokens_per_expert, plan.requested_per_expert, routing.probs_TE, plan.token
        )
        return y_TD.reshape(x.shape)

    def _run_experts(self, x_AD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if self.expert_group is None:
            return self.experts(x_AD, counts)
        return run_experts_parallel(self.experts, self.expert_group, x_AD, counts)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x flattened to (T, D), after checking what a user can get wrong."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x.dtype={x.dtype} must be a floating point dtype")
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x.shape={tuple(x.shape)}: the last dim must equal d_model={self.d_model}"
            )
        w = self.experts.w1
        if x.device != w.device:
            raise ValueError(f"x.device={x.device} must match the layer's device {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x.dtype={x.dtype} must match the layer's parameters ({w.dtype}): cast the "
                "layer with .to(dtype) or run under torch.autocast"
            )
        return x.reshape(-1, self.d_model)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy.name!r}, "
            f"aux_loss_weight={self.aux_loss_weight}, z_loss_weight={self.z_loss_weight}"
        )


class _LastForward:
    """What the last forward left behind. Copies and pickles of the layer start empty: the loss
    belongs to one autograd graph, which ``copy.deepcopy`` cannot (and should not) copy."""

    def __init__(self) -> None:
        self.aux_loss: torch.Tensor | None = None
        self.stats: RoutingStats | None = None

    def __deepcopy__(self, memo: dict) -> _LastForward:
        return _LastForward()

    def __getstate__(self) -> dict:
        return {"aux_loss": None, "stats": None}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.aux_loss`` (already weighted) over every MoE layer of ``model``."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device).float() for loss in losses]).sum()
