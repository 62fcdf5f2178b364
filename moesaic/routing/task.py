"""Task-level routers: every token of a task takes the same experts.

- ``task`` (TaskMoE, Kudugunta et al. 2021): a learned gate on a learned task
  embedding, ``g = softmax(W_g emb(task))``, then top-k. Because routing depends on the task alone,
  a task's sub-network can be extracted and served as a dense model.
- ``skill`` (SkillNet, Dai et al. 2022): a fixed task -> skill-set table, no
  gate and no aux loss; the active skills' outputs are averaged.

Task ids come from ``ms.routing_context(task=...)``: an int, one id per batch row (B,), or one per
token (T,).

Shape legend (docs/shapes.md): T tokens, E experts, K top-k, N tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moesaic._validate import check_positive_int
from moesaic.context import RoutingContext
from moesaic.routing.base import Router, Routing
from moesaic.routing.registry import register_router
from moesaic.routing.topk import TopKRouter

__all__ = ["TaskRouter", "SkillRouter", "task_ids_per_token"]


def task_ids_per_token(
    task: int | torch.Tensor | None,
    num_tokens: int,
    num_tasks: int,
    device: torch.device,
    router: str,
) -> torch.Tensor:
    """The task id of each of the T tokens as a LongTensor (T,), checked against ``num_tasks``."""
    if task is None:
        raise ValueError(
            f"router={router!r} needs task ids: wrap the call in ms.routing_context(task=...)"
        )
    if isinstance(task, int):
        task_T = torch.full((num_tokens,), task, dtype=torch.long, device=device)
    else:
        task = task.reshape(-1).to(device=device, dtype=torch.long)
        if task.numel() == 0 or num_tokens % task.numel():
            raise ValueError(
                f"routing_context(task=...) holds {task.numel()} ids; T={num_tokens} tokens need "
                "one id per batch row (a divisor of T) or one per token"
            )
        task_T = task.repeat_interleave(num_tokens // task.numel())
    if num_tokens and not bool(((task_T >= 0) & (task_T < num_tasks)).all()):
        bad = task_T[(task_T < 0) | (task_T >= num_tasks)][0].item()
        raise ValueError(f"task id {bad} is out of range: must be in [0, num_tasks={num_tasks})")
    return task_T


@register_router("task")
class TaskRouter(TopKRouter):
    """TaskMoE: ``logits = gate(task_embedding[task])``, the same top-k for every token of a task.

    Args:
        num_tasks: number of task ids N; ``task_embedding`` is an ``nn.Embedding(N, d_model)``.

    The aux loss is the Switch / GShard ``E * sum_i f_i P_i`` over tokens.
    """

    default_top_k = 2
    reads_task_ids = True

    def __init__(
        self, d_model: int, num_experts: int, top_k: int | None = None, *, num_tasks: int, **kwargs
    ) -> None:
        super().__init__(d_model, num_experts, top_k, **kwargs)
        check_positive_int("num_tasks", num_tasks)
        self.num_tasks = num_tasks
        self.task_embedding = nn.Embedding(num_tasks, d_model)

    def route_logits(self, x_TD: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        task_T = task_ids_per_token(
            context.task, x_TD.shape[0], self.num_tasks, x_TD.device, "task"
        )
        return self.logits(self.task_embedding.weight)[task_T]


@register_router("skill")
class SkillRouter(Router):
    """SkillNet: task t activates the fixed experts ("skills") ``task_skills[t]``, weight 1/|set|.

    Args:
        task_skills: one sequence of expert ids per task, e.g. ``[[0], [1], [0, 2]]``. Include an
            always-on general skill in every set to get SkillNet-NLG's general + task skills.
    """

    reads_task_ids = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        task_skills: Sequence[Sequence[int]],
        **kwargs,
    ) -> None:
        table = _skill_table(task_skills, num_experts)
        widest = max(len(s) for s in task_skills)
        if top_k is not None and top_k != widest:
            raise ValueError(
                f"top_k={top_k} must equal the largest skill set ({widest}) for router='skill'"
            )
        super().__init__(d_model, num_experts, widest, **kwargs)
        self.num_tasks = len(task_skills)
        self.task_skills = [list(s) for s in task_skills]
        self.register_buffer("table_NK", table, persistent=False)
        # each task's routing distribution, computed once per task and looked up per token
        # (a per-token scatter_add_ of the same rows is a large share of a small step on CPU)
        valid_NK = table >= 0
        probs_NE = torch.zeros(len(task_skills), num_experts)
        probs_NE.scatter_add_(
            1, table.clamp(min=0), valid_NK.float() / valid_NK.sum(1, keepdim=True)
        )
        self.register_buffer("probs_NE", probs_NE, persistent=False)

    def forward(self, x_TD: torch.Tensor, context: RoutingContext) -> Routing:
        T = x_TD.shape[0]
        task_T = self.decide(
            lambda: task_ids_per_token(context.task, T, self.num_tasks, x_TD.device, "skill")
        )
        expert_TK = self.table_NK[task_T]
        valid_TK = expert_TK >= 0
        weight_TK = valid_TK.to(self.router_dtype) / valid_TK.sum(dim=1, keepdim=True)
        expert_TK = expert_TK.clamp(min=0)
        probs_TE = self.probs_NE.to(self.router_dtype)[task_T]
        zero = self._zero(x_TD)
        routing = Routing.from_topk(weight_TK, expert_TK, probs_TE, zero, zero)
        return routing.select(valid_TK.t().reshape(-1))


def _skill_table(task_skills: Sequence[Sequence[int]], num_experts: int) -> torch.Tensor:
    """(N, K) LongTensor of expert ids per task, padded with -1."""
    if not isinstance(task_skills, Sequence) or len(task_skills) == 0:
        raise ValueError(
            "task_skills must be a non-empty list with one list of expert ids per task"
        )
    widest = max(len(s) for s in task_skills)
    table = torch.full((len(task_skills), widest), -1, dtype=torch.long)
    for t, skills in enumerate(task_skills):
        ids = list(skills)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"task_skills[{t}]={ids} must be a non-empty list of distinct ids")
        for e in ids:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts:
                raise ValueError(
                    f"task_skills[{t}] holds {e!r}: expert ids must be ints in [0, {num_experts})"
                )
        table[t, : len(ids)] = torch.tensor(ids)
    return table
