"""BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models").

Section 2: in training every token goes to exactly one expert, chosen by a balanced linear
assignment that maximises the total token-expert affinity ``sum_t h_t . w_{a_t}`` while every
expert takes the same number of tokens (section 2.2), so the load is balanced by construction
and no auxiliary loss is needed. At evaluation each token takes its best expert greedily
(section 2.3). Expert e's output is mixed in as ``sigmoid(h_t . w_e) f_e(h_t) + h_t`` (section
2.1); the residual ``+ h_t`` is the caller's in moesaic, so the combine weight is the sigmoid of
the chosen expert's logit.

Shape legend (docs/shapes.md): T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch

from moesaic._validate import check_choice
from moesaic.context import RoutingContext
from moesaic.routing.assignment import SOLVERS, balanced_assignment, require_scipy
from moesaic.routing.base import LearnedRouter, Routing
from moesaic.routing.losses import z_loss
from moesaic.routing.registry import register_router
from moesaic.routing.topk import refuse_topk_options

__all__ = ["BaseLayerRouter"]


@register_router("base")
class BaseLayerRouter(LearnedRouter):
    """Balanced assignment of tokens to experts in training, greedy top-1 at evaluation.

    The affinities are the gate logits ``x W_g`` (``gate`` as for every learned router). With T
    tokens and E experts every expert takes floor(T/E) or ceil(T/E) tokens (exactly T/E when E
    divides T); ``moesaic.routing.assignment.balanced_assignment`` solves the assignment.
    The combine weight is ``sigmoid(logit)`` of the chosen expert, which trains the gate.
    The aux loss is 0; the z-loss is that of the logits, as for every learned router.

    The paper solves one assignment over the tokens of all workers, after an all-to-all
    (section 2.2). Here, as for every moesaic router, routing never communicates: under expert
    parallelism each rank balances its own T tokens over all E experts, so the total load is
    balanced too, while the assignment is optimal per rank rather than over all ranks.

    Args:
        top_k: must be 1 (None too): BASE gives each token one expert.
        solver: ``"auto"`` (default: ``"shortest_path"`` when E divides T, the auction
            otherwise), ``"shortest_path"``, ``"auction"`` (both in torch, on the logits'
            device) or ``"scipy"`` (``scipy.optimize.linear_sum_assignment``, needs
            ``moesaic[routers]``); see ``moesaic.routing.assignment``.
            Both find an optimal assignment; they may differ on ties.
    """

    default_top_k = 1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        solver: str = "auto",
        **kwargs,
    ) -> None:
        if top_k not in (None, 1):
            raise ValueError(
                f"top_k={top_k} must be 1 for router='base' (a balanced assignment gives each "
                "token one expert)"
            )
        refuse_topk_options(kwargs, "base", "its experts come from a balanced assignment")
        check_choice("solver", solver, SOLVERS)
        if solver == "scipy":
            require_scipy("router='base' with solver='scipy'")
        super().__init__(d_model, num_experts, 1, **kwargs)
        self.solver = solver

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        logits_TE = self.logits(x_TD)
        expert_T1 = self.decide(lambda: self.assign(logits_TE.detach()).unsqueeze(1))
        weight_T1 = logits_TE.gather(1, expert_T1).sigmoid()
        probs_TE = logits_TE.softmax(dim=-1)  # for the routing statistics
        zero = self._zero(x_TD)
        return Routing.from_topk(weight_T1, expert_T1, probs_TE, zero, z_loss(logits_TE))

    def assign(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """The expert of every token (T,): balanced in training, the argmax at evaluation."""
        if self.training:
            return balanced_assignment(logits_TE, self.solver)
        return logits_TE.argmax(dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, solver={self.solver!r}"
