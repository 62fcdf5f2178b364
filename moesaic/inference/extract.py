"""TaskMoE sub-network extraction (Kudugunta et al. 2021, "Beyond Distillation").

A task-routed MoE layer sends every token of task t to the same k experts with the same gate
weights, so for that task the layer is the fixed sum ``sum_i g_i FFN_i(x)``. Summed FFNs are one
FFN whose hidden units are theirs side by side: ``w1 = [w1_a | w1_b]`` and
``w2 = [g_a w2_a ; g_b w2_b]`` give ``act(x w1) w2 = g_a FFN_a(x) + g_b FFN_b(x)`` exactly
(SwiGLU too: its product is elementwise per hidden unit). ``extract`` therefore returns a plain
dense ``MoELM`` whose FFN at each MoE site is ``k * F`` wide (plus the shared expert's width):
only the task's experts, no router, no dispatch, and the same outputs as the full model under
``ms.routing_context(task=t)`` up to float summation order.

Shape legend (docs/shapes.md): D model dim, F expert hidden, K experts the task keeps.
"""

from __future__ import annotations

import dataclasses

import torch

from moesaic.context import RoutingContext
from moesaic.layer import MoE
from moesaic.models.lm import LMConfig, MoELM
from moesaic.routing.task import SkillRouter, TaskRouter

__all__ = ["extract", "task_experts", "extracted_config"]

TASK_ROUTERS = (TaskRouter, SkillRouter)


@torch.no_grad()
def task_experts(layer: MoE, task: int) -> tuple[list[int], list[float]]:
    """The experts ``layer`` sends every token of ``task`` to, in id order, with their gate
    weights (the router evaluated once, in eval mode: no jitter)."""
    was_training = layer.router.training
    layer.router.eval()
    try:
        x_TD = torch.zeros(1, layer.d_model, device=layer.experts.w1.device)
        routing = layer.router(x_TD, RoutingContext(task=task))
    finally:
        layer.router.train(was_training)
    pairs = sorted(zip(routing.expert.tolist(), routing.weight.tolist()))
    return [e for e, _ in pairs], [w for _, w in pairs]


@torch.no_grad()
def extract(model: MoELM, task: int) -> MoELM:
    """The stand-alone dense model equal to ``model`` under ``ms.routing_context(task=task)``.

    Every MoE layer (its router must be task-level: ``task`` or ``skill``) becomes one FFN made
    of the experts the task routes to, their gate weights folded into ``w2``, and the shared
    expert, if any; a task that keeps one expert gets that expert as a plain FFN. Everything
    else is copied. The result's config is the dense ``LMConfig`` with ``matched_d_ff`` set to
    that width, so it saves, loads and serves like any dense run.

    Raises:
        ValueError: ``task`` outside ``[0, num_tasks)``, or a layer no sub-network can equal
            (a token-level router, capacity that drops tokens, a gated shared expert, expert
            biases, experts sharded over processes); raised before anything is built.
    """
    layers = _check(model, task)
    merged = {i: _merged_ffn(layer, task) for i, layer in layers.items()}
    widths = {w1.shape[1] for w1, _, _ in merged.values()}
    if len(widths) > 1:
        raise ValueError(
            f"task {task} keeps FFNs of widths {sorted(widths)} in different layers; a dense "
            "LMConfig holds one width at its MoE sites (model.matched_d_ff)"
        )
    cfg = extracted_config(model.cfg, widths.pop())
    sub = MoELM(cfg).to(device=model.embed.weight.device, dtype=model.embed.weight.dtype)
    state = {k: v for k, v in model.state_dict().items() if not _in_moe(k, layers)}
    for i, (w1_DF, w2_FD, w3_DF) in merged.items():
        state[f"blocks.{i}.ffn.w1.weight"] = w1_DF.t()  # nn.Linear keeps (out, in)
        state[f"blocks.{i}.ffn.w2.weight"] = w2_FD.t()
        if w3_DF is not None:
            state[f"blocks.{i}.ffn.w3.weight"] = w3_DF.t()
    sub.load_state_dict(state)
    sub.train(model.training)
    return sub


def _merged_ffn(layer: MoE, task: int) -> tuple:
    """(w1 (D, K*F [+S]), w2 (K*F [+S], D), w3 or None) of the task's experts side by side."""
    experts, weights = task_experts(layer, task)
    ex = layer.experts
    parts = [
        (ex.w1[e], ex.w2[e] * g, None if ex.w3 is None else ex.w3[e])
        for e, g in zip(experts, weights)
    ]
    if layer.shared is not None:  # the always-on expert joins with weight 1
        sh = layer.shared
        parts.append((sh.w1[0], sh.w2[0], None if sh.w3 is None else sh.w3[0]))
    w1 = torch.cat([p[0] for p in parts], dim=1)
    w2 = torch.cat([p[1].to(w1.dtype) for p in parts], dim=0)
    w3 = None if ex.w3 is None else torch.cat([p[2] for p in parts], dim=1)
    return w1, w2, w3


def _in_moe(key: str, layers: dict[int, MoE]) -> bool:
    parts = key.split(".")
    return parts[0] == "blocks" and int(parts[1]) in layers and parts[2] == "ffn"


def _check(model: object, task: object) -> dict[int, MoE]:
    """The model's MoE layers by block index, after every check (nothing built yet)."""
    if not isinstance(model, MoELM):
        raise TypeError(f"model must be an ms.models MoELM, got {type(model).__name__}")
    if isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"task={task!r} must be an int task id")
    layers = {i: b.ffn for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)}
    if not layers:
        raise ValueError("model has no MoE layers: there is nothing to extract")
    for i, layer in layers.items():
        where = f"blocks.{i}.ffn"
        router = layer.router
        if not isinstance(router, TASK_ROUTERS):
            raise ValueError(
                f"{where}.router is {type(router).__name__}: extract needs a task-level router "
                "('task' or 'skill') in every MoE layer, since only then do all tokens of a task "
                "take the same experts"
            )
        if not 0 <= task < router.num_tasks:
            raise ValueError(f"task={task} must be in [0, num_tasks={router.num_tasks})")
        if layer.capacity_factor is not None:
            raise ValueError(
                f"{where}.capacity_factor={layer.capacity_factor}: with a capacity a task's "
                "tokens can be dropped depending on the batch, so no sub-network equals the "
                "layer; extract needs dropless layers (capacity_factor=None)"
            )
        if layer.shared_gate is not None or layer.residual_coef is not None:
            raise ValueError(
                f"{where}: its shared expert is scaled per token (shared_gate or "
                "residual_coefficient), which no dense FFN of the LM can hold"
            )
        if layer.experts.b1 is not None:
            raise ValueError(f"{where}: extract needs experts without biases (expert_bias=False)")
        if layer.expert_group is not None:
            raise ValueError(f"{where}: experts sharded over processes; gather them first")
    return layers


def extracted_config(cfg: LMConfig, width: int) -> LMConfig:
    """The dense config of a sub-network whose FFN at every MoE site is ``width`` wide."""
    return dataclasses.replace(cfg, moe=None, expert_d_ff=None, matched_d_ff=width)
