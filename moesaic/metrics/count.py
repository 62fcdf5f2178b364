"""``ms.metrics.count``: total and activated parameters and FLOPs per token of any model.

Works on a bare ``ms.MoE``, on any ``nn.Module`` holding MoE layers, on ``MoELM`` and on
``LSTMMoE``.

FLOPs are matmul FLOPs (2 per multiply-add) per token; norms, activations and softmaxes are
negligible at these widths. The rule, per part of the model:

- every ``nn.Linear`` outside an MoE layer runs once per token: ``2 * in * out``;
- so does every weight matrix of an ``nn.LSTM`` (any ``nn.RNNBase``): ``weight_ih`` and
  ``weight_hh`` of each layer and direction, ``2 * 4H * (I + H)`` per LSTM layer of input I and
  hidden H (``LSTMMoE``); the gates' element-wise products are negligible like activations;
- an MoE layer runs k experts per token, ``2 * k * (expert parameters / E)``, plus its shared
  expert ``2 * shared parameters`` (and ``2 * D`` for its ``shared_gate``) and its gate
  ``2 * D * E`` per gate matrix (``noisy_topk`` has two, its noise gate running in training only;
  nearest-centroid ``cluster`` routing counts as one; ``hash``, ``skill`` and ``task`` routers
  cost nothing per token: the task router's gate runs once per task, not per token);
- ``MoELM`` adds attention scores and weighted values, ``2 * 2 * S * D`` per layer (the full
  S x S product ``scaled_dot_product_attention`` computes).

A training step costs three forwards (the backward does twice the forward's matmuls: Kaplan et
al. 2020; Artetxe et al. 2021). ``measure_flops`` cross-checks the
forward against ``torch.utils.flop_counter`` on a real forward.

Activated parameters follow ``count_parameters``: everything outside the experts, plus ``k / E``
of each MoE layer's expert parameters. With ``task`` or ``skill`` routing, k depends on the task:
``len(task_skills[t])`` for skill routing, the experts the gate picks for task t for task
routing (``task_experts``). Under expert parallelism a process holds E / W of each layer's
experts; the counts are those of the whole model, as in ``count_parameters``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moesaic.layer import MoE
from moesaic.metrics.params import _human
from moesaic.models.lm import MoELM
from moesaic.routing.task import SkillRouter, TaskRouter

__all__ = ["ModelCount", "count", "task_experts"]


@dataclasses.dataclass(frozen=True)
class ModelCount:
    """What ``count`` returns. FLOPs are per token; ``train_flops`` is forward + backward.

    ``per_task`` holds one ``ModelCount`` per task id when the model routes by task and no
    ``task`` was given; the top-level figures are then their mean (a uniform task mix).
    """

    total_params: int
    activated_params: float
    forward_flops: float
    train_flops: float
    seq_len: int | None = None
    task: int | None = None
    per_task: tuple[ModelCount, ...] = ()

    def as_dict(self) -> dict[str, object]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["per_task"] = [c.as_dict() for c in self.per_task]
        return out

    def __str__(self) -> str:
        task = "" if self.task is None else f" (task {self.task})"
        return (
            f"{_human(self.total_params)} params, {_human(self.activated_params)} activated per "
            f"token{task}; {_human(self.forward_flops)} FLOPs/token forward, "
            f"{_human(self.train_flops)} FLOPs/token training"
        )


def count(model: nn.Module, task: int | None = None, *, seq_len: int | None = None) -> ModelCount:
    """Parameters and FLOPs per token of ``model``.

    Args:
        model: an ``ms.MoE``, an ``MoELM``, or any module holding MoE layers.
        task: count for this task id (models with ``task`` / ``skill`` routers only).
        seq_len: ``MoELM`` only: the sequence length S of the attention FLOPs (default the
            model's ``max_seq_len``).

    Example::

        >>> c = ms.metrics.count(ms.models.create("lm-moe-tiny"), seq_len=256)
        >>> c.total_params, c.activated_params, c.forward_flops
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seq_len = _seq_len(model, seq_len)
    num_tasks = _num_tasks(model)
    if task is not None:
        if num_tasks is None:
            raise ValueError(f"task={task!r} given, but the model has no 'task' or 'skill' router")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < num_tasks:
            raise ValueError(f"task={task!r} must be an int in [0, num_tasks={num_tasks})")
        return _count_one(model, task, seq_len)
    if num_tasks is None:
        return _count_one(model, None, seq_len)
    per_task = tuple(_count_one(model, t, seq_len) for t in range(num_tasks))

    def mean(field: str) -> float:
        return sum(getattr(c, field) for c in per_task) / num_tasks

    return ModelCount(
        total_params=per_task[0].total_params,
        activated_params=mean("activated_params"),
        forward_flops=mean("forward_flops"),
        train_flops=mean("train_flops"),
        seq_len=seq_len,
        per_task=per_task,
    )


@torch.no_grad()
def task_experts(layer: MoE, task: int) -> list[int]:
    """The experts ``layer`` sends every token of ``task`` to, sorted.

    ``skill`` routing: ``task_skills[task]``. ``task`` routing: the top-k of the gate on the
    task's embedding, ``router.logits(router.task_embedding.weight)`` without input jitter.
    """
    router = layer.router
    if isinstance(router, SkillRouter):
        return sorted(router.task_skills[task])
    if isinstance(router, TaskRouter):
        emb_ND = router.task_embedding.weight.to(router.router_dtype)
        logits_NE = router.linear(emb_ND, router.gate)
        return sorted(logits_NE[task].topk(router.top_k).indices.tolist())
    raise TypeError(f"layer.router is {type(router).__name__}, not a 'task' or 'skill' router")


def _count_one(model: nn.Module, task: int | None, seq_len: int | None) -> ModelCount:
    total = sum(p.numel() for p in model.parameters())  # tied tensors counted once
    inactive, forward = 0.0, 0.0
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    inside_moe = {id(sub) for m in moe_layers for sub in m.modules()}
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m) not in inside_moe:
            forward += 2 * m.in_features * m.out_features
        if isinstance(m, nn.RNNBase):  # every step multiplies its input and its state
            weights = [p for name, p in m.named_parameters() if name.startswith("weight_")]
            forward += 2 * sum(w.numel() for w in weights)
    for m in moe_layers:
        k = _experts_per_token(m, task)
        local = sum(p.numel() for p in m.experts.parameters())
        # under expert parallelism this process holds E_local of the E experts
        shards = m.num_experts / m.experts.num_experts
        total += round(local * (shards - 1))
        inactive += local * shards * (1 - k / m.num_experts)
        forward += 2 * k * local / m.experts.num_experts + _router_flops(m)
        # the shared expert, its gate or residual mix: every token
        for shared in (m.shared, m.shared_gate, m.residual_coef):
            if shared is not None:
                forward += 2 * sum(p.numel() for p in shared.parameters())
    if isinstance(model, MoELM):
        forward += model.cfg.n_layers * 2 * 2 * seq_len * model.cfg.d_model
    return ModelCount(
        total_params=total,
        activated_params=total - inactive,
        forward_flops=forward,
        train_flops=3 * forward,
        seq_len=seq_len,
        task=task,
    )


def _experts_per_token(layer: MoE, task: int | None) -> float:
    if task is not None and isinstance(layer.router, (SkillRouter, TaskRouter)):
        return len(task_experts(layer, task))
    return layer.top_k  # expert choice: the average number of experts per token


def _router_flops(layer: MoE) -> float:
    router = layer.router
    if isinstance(router, TaskRouter):
        return 0.0  # the gate runs on the N task embeddings once per forward, not per token
    gates = sum(2 * m.weight.numel() for m in router.modules() if isinstance(m, nn.Linear))
    centroids = getattr(router, "centroids", None)
    return gates + (2 * centroids.numel() if isinstance(centroids, torch.Tensor) else 0)


def _num_tasks(model: nn.Module) -> int | None:
    counts = {
        name: m.router.num_tasks
        for name, m in model.named_modules()
        if isinstance(m, MoE) and isinstance(m.router, (SkillRouter, TaskRouter))
    }
    if not counts:
        return None
    if len(set(counts.values())) > 1:
        raise ValueError(f"MoE layers disagree on num_tasks: {counts}; pass task= explicitly")
    return next(iter(counts.values()))


def _seq_len(model: nn.Module, seq_len: int | None) -> int | None:
    if not isinstance(model, MoELM):
        if seq_len is not None:
            raise ValueError(
                f"seq_len={seq_len} sets MoELM's attention FLOPs; {type(model).__name__} has none"
            )
        return None
    if seq_len is None:
        return model.cfg.max_seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} must be <= model.max_seq_len={model.cfg.max_seq_len}")
    return seq_len
