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

__all__ = [
    "expert_parameters",
    "expert_param_ids",
    "expert_param_names",
    "local_tensor",
    "sync_gradients",
    "clip_grad_norm",
]


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The routed-expert parameters of every MoE layer in ``model`` (``layer.expert_parameters()``):
    the parameters expert parallelism shards. Found from the module structure, so they survive
    ``copy.deepcopy`` and ``load_state_dict``."""
    from moesaic.layer import MoE  # moesaic.layer imports this package: import when called

    return [p for m in model.modules() if isinstance(m, MoE) for p in m.expert_parameters()]


def expert_param_ids(model: nn.Module) -> set[int]:
    """ids of ``expert_parameters(model)``."""
    return {id(p) for p in expert_parameters(model)}


def expert_param_names(model: nn.Module) -> set[str]:
    """Names (``model.named_parameters()``'s) of ``expert_parameters(model)``."""
    ids = expert_param_ids(model)
    return {name for name, p in model.named_parameters() if id(p) in ids}


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard, e.g. under FSDP2; a plain tensor
    itself)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


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
    """``clip_grad_norm_`` over the whole (sharded) model, every element counted once; returns
    the total norm before clipping.

    Plain expert parallelism: replicated gradients count once, expert shards are summed over
    the expert group. FSDP2 (``groups.sharded``): dense gradients are shards over the mesh's
    ``shard`` dimension (replicated over ``replicate``), summed over ``shard``; each expert
    gradient element lives on exactly one rank (expert dimension x FSDP shard over the
    replicas), summed over every rank."""
    if groups.expert_group is None and not groups.sharded:  # every gradient whole here
        return float(nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    experts = expert_param_ids(model) if groups.expert_size > 1 else set()
    params = [p for p in model.parameters() if p.grad is not None]
    sq = torch.zeros(2)  # (dense, experts)
    for p in params:
        sq[int(id(p) in experts)] += local_tensor(p.grad).float().square().sum()
    dense, expert = sq.unbind()
    if groups.sharded:
        dist.all_reduce(dense, group=groups.mesh.get_group("shard"))
    dist.all_reduce(expert, group=None if groups.sharded else groups.expert_group)
    total = math.sqrt(float(dense + expert))
    scale = max_norm / (total + 1e-6)
    if scale < 1:
        for p in params:
            local_tensor(p.grad).mul_(scale)
    return total
