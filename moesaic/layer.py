"""The MoE layer: route, apply capacity, dispatch, run experts, combine, add the shared expert.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, A assignments.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moesaic.config import MoEConfig
from moesaic.context import current_context, is_recomputing
from moesaic.dispatch import DROP_POLICIES, combine, expert_capacity, make_plan, permute
from moesaic.experts import Experts
from moesaic.parallel.expert_parallel import run_experts_parallel
from moesaic.routing.stats import RoutingStats

__all__ = ["MoE", "aux_loss"]


class MoE(nn.Module):
    """Sparse mixture-of-experts feed-forward layer.

    ``MoE(config)`` builds the layer an ``ms.MoEConfig`` describes; ``MoE(**fields)`` (or
    ``MoE(d_model, d_ff, num_experts, **fields)``) builds ``MoEConfig(**fields)``'s, the same
    layer. The layer keeps it as ``layer.config``; every check lives in ``MoEConfig``.

    Config fields (``ms.MoEConfig``):
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
        activation: "gelu" | "gelu_tanh" | "relu" | "silu" | "swiglu" (None: "gelu").
        expert_bias: give every expert (and the shared expert) biases ``experts.b1``/``b2``
            (``b3`` for swiglu), as ``moefy`` needs for dense FFNs that have them.
        shared_d_ff: > 0 adds a dense always-on expert of that width (residual MoE / PR-MoE:
            ``y = MoE(x) + MLP(x)``).
        shared_gate: scale the shared expert by a learned per-token sigmoid gate (Qwen2-MoE:
            ``y = MoE(x) + sigmoid(x w) * MLP(x)``, ``shared_gate`` an ``nn.Linear(D, 1)``
            without bias); needs ``shared_d_ff > 0``.
        residual_coefficient: mix the MoE and the shared expert with a learned per-token
            2-way softmax, as DeepSpeed-MoE's released Residual-MoE does (Rajbhandari et al.
            2022, section 4.1; ``use_residual``): ``c = softmax(W x + b)``,
            ``y = c0 * MoE(x) + c1 * MLP(x)``, ``residual_coef`` an ``nn.Linear(D, 2)``;
            needs ``shared_d_ff > 0``. Without it the sum is the paper's ``MoE(x) + MLP(x)``.
        aux_loss_weight: alpha, the weight of the router's load-balancing loss.
        z_loss_weight: weight of the router z-loss (ST-MoE).
        jitter: multiplicative input jitter of learned routers in training; None takes the
            router's default (1e-2 for switch, 0 otherwise).
        router_dtype: dtype of the router math, fp32 by default even for bf16 activations.
        router_options: extra keyword arguments of the router class (e.g. ``num_tasks`` for
            "task", ``task_skills`` for "skill", ``normalize`` for "topk").
        expert_backend: how the experts run: "auto" | "torch" | "grouped" | "cpu" or an
            ``ExpertBackend`` instance, see ``Experts``. Every backend computes the same.
        expert_dropout: dropout on the routed experts' hidden activations in training (Fedus
            et al. 2022, §4.2); those calls run the "torch" backend.

    Args (runtime objects, not part of the config):
        expert_group: a ``torch.distributed`` process group for expert parallelism: each of its
            W ranks keeps E / W experts (``experts.w1`` is then (E / W, D, F)) and tokens travel
            to them by all-to-all. Routing and capacity stay per rank over its local tokens.
            ``ms.parallel.init(expert=W).expert_group`` builds it from torchrun's environment.
        device, dtype: for the parameters.

    Shape:
        x (..., D) -> y (..., D). Tokens that lose every assignment to capacity get 0: the
        caller's residual carries them.

    ``layer.last_stats`` holds the last forward's ``RoutingStats``. ``layer.aux_loss`` holds the
    weighted aux + z loss (a scalar tensor in the graph) summed over the forwards since the sum
    was last closed, so a layer called twice in one step (weight sharing) counts both calls. The
    sum closes when it is read (``layer.aux_loss`` or ``ms.aux_loss(model)``), when a backward
    pass goes through a forward that added to it, and on ``reset_aux_loss()``; the next forward
    then starts a new sum. Only training-mode forwards that record autograd add up: one in
    eval mode or without autograd (``torch.no_grad``, inference) leaves its own aux loss alone
    and closed. The ordinary loop (forward, ``loss = task + ms.aux_loss(model)``, backward,
    step) thus gets each step's own aux loss, and validation forwards between steps (eval mode
    or ``no_grad``) never reach the next step's.

    Example::

        >>> layer = ms.MoE(d_model=64, d_ff=256, num_experts=8, router="switch")
        >>> y = layer(torch.randn(2, 10, 64))
        >>> loss = task_loss(y) + ms.aux_loss(model)
    """

    def __init__(
        self,
        *args: Any,
        expert_group: object | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.config = config = _layer_config(args, fields)
        self.d_model, self.num_experts = config.d_model, config.num_experts
        self.capacity_factor = config.capacity_factor
        self.drop_policy = DROP_POLICIES[config.drop_policy]()
        self.aux_loss_weight = float(config.aux_loss_weight)
        self.z_loss_weight = float(config.z_loss_weight)
        self.router = config.build_router().to(device=device)
        self.top_k = self.router.top_k
        kw = {"bias": config.expert_bias, "backend": config.expert_backend}
        kw |= {"device": device, "dtype": dtype}
        D, act = config.d_model, config.expert_activation
        self.experts = Experts(
            config.num_experts, D, config.d_ff, act, dropout=config.expert_dropout, **kw
        )
        self.expert_group = None
        if expert_group is not None:
            self.shard_experts(expert_group)
        self.shared = Experts(1, D, config.shared_d_ff, act, **kw) if config.shared_d_ff else None
        self.shared_gate = (
            nn.Linear(D, 1, bias=False, device=device, dtype=dtype) if config.shared_gate else None
        )
        self.residual_coef = (
            nn.Linear(D, 2, device=device, dtype=dtype) if config.residual_coefficient else None
        )
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

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The routed experts' parameters (``experts.w1``, ``w2``, ...): what expert parallelism
        shards, and what ``ms.parallel`` averages over expert replicas only. The router and the
        shared expert (with its gate) are replicated on every rank and are not among them."""
        return self.experts.parameters()

    @property
    def aux_loss(self) -> torch.Tensor:
        """Weighted aux + z loss summed over the forwards since the sum last closed (see the
        class docstring), in their graph; 0 before any forward. Reading it closes the sum: the
        next forward starts a new one."""
        self._last.open = False
        if self._last.aux_loss is None:
            return torch.zeros((), device=self.experts.w1.device)
        return self._last.aux_loss

    def reset_aux_loss(self) -> None:
        """Forget the aux loss sum: ``aux_loss`` is 0 until the next forward."""
        self._last.aux_loss, self._last.open = None, False

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
            y_TD = self._add_shared(x_TD, y_TD)
        if is_recomputing():  # activation checkpointing: the first forward counted them
            return y_TD.reshape(x.shape)
        aux = self.aux_loss_weight * routing.aux_loss + self.z_loss_weight * routing.z_loss
        self._last.add_aux_loss(aux, y_TD, joins=self.training and y_TD.requires_grad)
        self._last.stats = RoutingStats(
            plan.tokens_per_expert, plan.requested_per_expert, routing.probs_TE, plan.token
        )
        return y_TD.reshape(x.shape)

    def _add_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """The routed experts' output plus the shared expert's (gated or mixed)."""
        shared_TD = self.shared(x_TD, [x_TD.shape[0]])
        if self.residual_coef is not None:  # DeepSpeed-MoE's Residual-MoE mix, per token
            c_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            return c_T2[:, :1] * y_TD + c_T2[:, 1:] * shared_TD
        if self.shared_gate is None:
            return y_TD + shared_TD
        return y_TD + torch.sigmoid(self.shared_gate(x_TD)) * shared_TD  # (T, 1): per token

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
    """What the forwards left behind: the aux loss sum and the last routing statistics. Copies
    and pickles of the layer start empty: the loss belongs to one autograd graph, which
    ``copy.deepcopy`` cannot (and should not) copy."""

    def __init__(self) -> None:
        self.aux_loss: torch.Tensor | None = None
        self.stats: RoutingStats | None = None
        self.open = False  # the next forward adds to aux_loss instead of starting a new sum

    def add_aux_loss(self, aux: torch.Tensor, y: torch.Tensor, joins: bool) -> None:
        """Add ``aux`` to the open sum when the forward ``joins`` sums, else start a new one
        (see ``MoE``'s docstring). A backward pass through the output ``y`` closes the sum, so a
        loop that never reads it keeps no old graph alive."""
        self.aux_loss = self.aux_loss + aux if self.open and joins else aux
        self.open = joins
        if joins:
            y.register_hook(self._close)

    def _close(self, grad: torch.Tensor) -> None:
        self.open = False

    def __deepcopy__(self, memo: dict) -> _LastForward:
        return _LastForward()

    def __getstate__(self) -> dict:
        return {"aux_loss": None, "stats": None, "open": False}


def _layer_config(args: tuple, fields: dict[str, Any]) -> MoEConfig:
    """``MoE``'s arguments as one config: a ``MoEConfig`` alone, or its fields (d_model, d_ff
    and num_experts may come by position)."""
    if args and isinstance(args[0], MoEConfig):
        if len(args) > 1 or fields:
            extra = [type(a).__name__ for a in args[1:]] + sorted(fields)
            raise TypeError(
                f"ms.MoE takes a MoEConfig or its fields, not both: got a config and {extra}; "
                "use dataclasses.replace(config, ...) to change fields"
            )
        config = args[0]
    else:
        if len(args) > 3:
            raise TypeError(
                f"ms.MoE takes at most 3 positional arguments (d_model, d_ff, num_experts), "
                f"got {len(args)}"
            )
        positional = dict(zip(("d_model", "d_ff", "num_experts"), args))
        twice = sorted(positional.keys() & fields.keys())
        if twice:
            raise TypeError(f"ms.MoE got {twice} both by position and by keyword")
        config = MoEConfig(**positional, **fields)
    if config.d_model is None or config.d_ff is None:
        raise TypeError(
            f"ms.MoE needs d_model and d_ff, got d_model={config.d_model}, d_ff={config.d_ff} "
            "(only a config a model fills in, such as LMConfig.moe, leaves them None)"
        )
    return config


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.aux_loss`` (already weighted) over every MoE layer of ``model``: the aux
    losses of the forwards since the last read. Reading closes each layer's sum (see ``MoE``)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE)]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.to(losses[0].device).float() for loss in losses]).sum()
