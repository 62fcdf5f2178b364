"""Data-parallel gradient averaging that knows which parameters are expert shards.

The routed experts of every ``ms.MoE`` layer (``layer.expert_parameters()``) are averaged over
their replica group only: the ranks that hold the same experts. Everything else is averaged over
all ranks. Dividing by the world size in both cases gives the gradient of the mean of the
per-rank losses, so W processes on W slices of a batch step exactly like one process on the
whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moesaic.parallel.groups import ParallelGroups

__all__ = ["expert_parameters", "expert_param_ids", "sync_gradients", "clip_grad_norm"]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert parameters of every MoE layer in ``model`` (``layer.expert_parameters()``):
    the parameters expert parallelism shards. Found from the module structure, so they survive
    ``copy.deepcopy`` and ``load_state_dict``."""
    from moesaic.layer import MoE  # moesaic.layer imports this package: import when called

    return [p for m in model.modules() if isinstance(m, MoE) for p in m.expert_parameters()]


def expert_param_ids(model: nn.Module) -> set[int]:
    """ids of ``expert_parameters(model)``."""
    return {id(p) for p in expert_parameters(model)}


def _grads(model: nn.Module, expert: bool) -> list[torch.Tensor]:
    experts = expert_param_ids(model)
    out = []
    for p in model.parameters():
        if p.requires_grad and (id(p) in experts) == expert:
            if p.grad is None:  # keep the collectives aligned across ranks
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
    return out


def _all_reduce_mean(grads: list[torch.Tensor], group, world_size: int) -> None:
    """Sum over ``group`` (None: this rank alone), then divide by the world size."""
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat /= world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def sync_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients across data-parallel ranks; call after backward, before the step."""
    if not groups.distributed:
        return
    _all_reduce_mean(_grads(model, expert=False), dist.group.WORLD, groups.world_size)
    _all_reduce_mean(_grads(model, expert=True), groups.replica_group, groups.world_size)


def clip_grad_norm(model: nn.Module, max_norm: float, groups: ParallelGroups) -> float:
    """``clip_grad_norm_`` over the whole (sharded) model: replicated parameters count once,
    expert shards are summed over the expert group. Returns the total norm before clipping."""
    if groups.expert_group is None:  # every parameter whole on this rank: torch's own
        return float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    experts = expert_param_ids(model)
    params = [p for p in model.parameters() if p.grad is not None]
    sq_replicated = sum(
        (p.grad.float().square().sum() for p in params if id(p) not in experts), torch.zeros(())
    )
    sq_experts = sum(
        (p.grad.float().square().sum() for p in params if id(p) in experts), torch.zeros(())
    )
    if groups.expert_group is not None:
        dist.all_reduce(sq_experts, group=groups.expert_group)
    total = math.sqrt(float(sq_replicated + sq_experts))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            p.grad.mul_(scale)
    return total
