"""Router contract: ``Router.forward(x_TD, context) -> Routing``.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts, K top-k, A assignments.

A ``Routing`` is a small frozen value: flat assignments (token, expert, weight) of equal length A
plus the losses and probabilities the router used. Token-choice routers emit assignments
choice-major (all first choices, then all second choices, ...), each group in token order, and
say which choice every assignment is in ``choice``; capacity policies rely on that rank, never on
the order of the arrays.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from moesaic._validate import check_positive_int, check_tokens
from moesaic.context import RoutingContext
from moesaic.routing import replay
from moesaic.routing.gate import gate_product

__all__ = ["Routing", "Router", "LearnedRouter"]


@dataclasses.dataclass(frozen=True)
class Routing:
    """What a router decided for T tokens.

    Attributes:
        token: LongTensor (A,), the token index in [0, T) of each assignment.
        expert: LongTensor (A,), the expert index in [0, E).
        weight: (A,) combine weight, in the router dtype (differentiable for learned routers).
        choice: LongTensor (A,), 0 for a token's first choice, 1 for its second, ...
        priority: (A,) the token's priority for Batch Prioritized Routing (its largest gate
            weight), or None to use ``weight``.
        dense_k: K when the assignments are exactly ``a = j * T + t`` for every choice j < K and
            token t (what ``from_topk`` builds), which lets dispatch un-permute by gathers alone;
            None for any other layout.
        probs_TE: (T, E) the routing distribution the router used (for statistics).
        aux_loss: scalar, the router's unweighted load-balancing loss (0 when it has none).
        z_loss: scalar, mean squared logsumexp of the logits (0 for routers without logits).
    """

    token: torch.Tensor
    expert: torch.Tensor
    weight: torch.Tensor
    choice: torch.Tensor
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    priority: torch.Tensor | None = None
    dense_k: int | None = None

    @property
    def num_assignments(self) -> int:
        return self.token.shape[0]

    @staticmethod
    def from_topk(
        weight_TK: torch.Tensor,
        expert_TK: torch.Tensor,
        probs_TE: torch.Tensor,
        aux_loss: torch.Tensor,
        z_loss: torch.Tensor,
    ) -> Routing:
        """Flatten per-token top-k choices choice-major: assignment a = j * T + t."""
        T, K = expert_TK.shape
        device = expert_TK.device
        return Routing(
            token=torch.arange(T, device=device).repeat(K),
            expert=expert_TK.t().reshape(-1),
            weight=weight_TK.t().reshape(-1),
            choice=torch.arange(K, device=device).repeat_interleave(T),
            probs_TE=probs_TE,
            aux_loss=aux_loss,
            z_loss=z_loss,
            priority=weight_TK.detach().amax(dim=1).repeat(K),
            dense_k=K,
        )

    def select(self, keep_A: torch.Tensor) -> Routing:
        """The same routing restricted to the assignments where ``keep_A`` is True."""
        pick = {
            f.name: getattr(self, f.name)[keep_A]
            for f in dataclasses.fields(self)
            if f.name in ("token", "expert", "weight", "choice", "priority")
            and getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **pick, dense_k=None)


class Router(nn.Module, abc.ABC):
    """Base class: maps tokens to (token, expert, weight) assignments.

    Subclasses set ``default_top_k`` and implement ``forward(x_TD, context) -> Routing``.
    ``x_TD`` arrives flattened to (T, D); ``context`` is the active ``RoutingContext``.
    Every discrete decision goes through ``decide``, and the combine weights are gathered from
    differentiable scores at the decided experts, so that ``ms.replay_routing`` can replay a
    call (see ``moesaic.routing.replay``).

    Args:
        d_model: token width D.
        num_experts: E.
        top_k: experts per token; None takes the router's ``default_top_k``.
        router_dtype: dtype of the router math (fp32 by default, also for bf16 activations:
            Switch Transformer's selective precision, section 2.4).
        jitter: multiplicative input noise eps in training, x * U(1 - eps, 1 + eps); None takes the
            router's ``default_jitter``.
    """

    default_top_k: ClassVar[int] = 1
    default_jitter: ClassVar[float] = 0.0
    # True for routers that read ``RoutingContext.token_ids``: a model that knows its tokens' ids
    # (``MoELM``) then provides them.
    reads_token_ids: ClassVar[bool] = False
    # True for routers that read ``RoutingContext.task``: the trainer then passes each batch
    # row's label (the corpus domain) as its task id.
    reads_task_ids: ClassVar[bool] = False

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        router_dtype: torch.dtype = torch.float32,
        jitter: float | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("num_experts", num_experts)
        top_k = self.default_top_k if top_k is None else top_k
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        if not (isinstance(router_dtype, torch.dtype) and router_dtype.is_floating_point):
            raise TypeError(f"router_dtype={router_dtype!r} must be a floating torch.dtype")
        jitter = self.default_jitter if jitter is None else jitter
        if not (isinstance(jitter, (int, float)) and 0.0 <= jitter < 1.0):
            raise ValueError(f"jitter={jitter!r} must be a float in [0, 1)")
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.router_dtype, self.jitter = router_dtype, float(jitter)
        self.register_forward_pre_hook(_check_input, with_kwargs=True)
        self.register_forward_pre_hook(_begin_call, with_kwargs=True)
        self.register_forward_hook(_end_call)

    @abc.abstractmethod
    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        """Route the (T, D) tokens; see the class docstring."""

    def decide(self, choose: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``choose()``: one discrete routing decision (expert indices, kept choices, task ids).

        Under ``ms.record_routing()`` the result is recorded; under ``ms.replay_routing()`` the
        recorded result of the same call is returned and ``choose`` is not run (nor are the
        random numbers it would draw). The result must not need a gradient: a router computes
        its weights afterwards by gathering its differentiable scores at the decided indices.
        """
        return replay.decide(self, choose)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, router_dtype={self.router_dtype}"
        )

    def _zero(self, x_TD: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=x_TD.device, dtype=self.router_dtype)


def _check_input(router: Router, args: tuple, kwargs: dict) -> None:
    """Every router's ``forward`` gets a (T, D) float tensor on its device (when it has weights)."""
    x = args[0] if args else kwargs.get("x_TD")
    like = next(router.parameters(), None)
    like = like if like is not None else next(router.buffers(), x)
    check_tokens("x_TD", x, router.d_model, like if isinstance(like, torch.Tensor) else x)


def _begin_call(router: Router, args: tuple, kwargs: dict) -> None:
    replay.begin_call(router, args[0] if args else kwargs["x_TD"])


def _end_call(router: Router, args: tuple, routing: Routing) -> Routing:
    return replay.end_call(router, routing)


class LearnedRouter(Router):
    """A router with a trainable gate ``gate = nn.Linear(d_model, num_experts, bias=False)``."""

    def __init__(self, d_model: int, num_experts: int, top_k: int | None = None, **kwargs) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Switch Transformer section 2.4: truncated normal, std = sqrt(s / fan_in) with s = 0.1,
        # redrawn beyond two standard deviations. sigma is the pre-truncation parameter.
        std = math.sqrt(0.1 / self.d_model)
        nn.init.trunc_normal_(self.gate.weight, std=std, a=-2 * std, b=2 * std)

    def router_input(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x with multiplicative jitter in training (then cast to ``router_dtype``), else x as is:
        ``linear`` casts it.

        Call under ``torch.autocast(..., enabled=False)`` so bf16 never reaches the softmax.
        """
        if self.training and self.jitter > 0:
            x = x_TD.to(self.router_dtype)
            return x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return x_TD

    def linear(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """``layer(x)`` computed in ``router_dtype``, whatever dtype x and the weights are stored
        in; backward keeps x in its own dtype (no (T, D) fp32 copy of bf16 activations)."""
        return gate_product(x, layer.weight, self.router_dtype)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Gate logits (T, E) in ``router_dtype``."""
        with torch.autocast(x_TD.device.type, enabled=False):
            return self.linear(self.router_input(x_TD), self.gate)
