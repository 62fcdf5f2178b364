"""Checkpoints independent of the expert-parallel size.

Expert weights (and their optimizer moments) are gathered from the expert group into full
(E, ...) tensors before saving, and sliced to the rank's experts after loading, so a checkpoint
written with expert-parallel size 2 has the layout of a single-process one and loads with any
size that divides E.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moesaic.parallel.grads import expert_param_ids, expert_param_names
from moesaic.parallel.groups import ParallelGroups

__all__ = ["full_state_dict", "load_sharded", "full_optimizer_state", "shard_optimizer_state"]


def _gather(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(groups.expert_size)]
    dist.all_gather(parts, t.contiguous(), group=groups.expert_group)
    return torch.cat(parts, dim=0)


def _shard(t: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    index = dist.get_rank(groups.expert_group)
    local = t.shape[0] // groups.expert_size
    return t[index * local : (index + 1) * local].clone()


def full_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor gathered to all E experts (collective)."""
    state = model.state_dict()
    if groups.expert_group is None:
        return state
    experts = expert_param_names(model)
    return {k: _gather(v, groups) if k in experts else v for k, v in state.items()}


def load_sharded(model: nn.Module, full: dict[str, torch.Tensor], groups: ParallelGroups) -> None:
    """Load a full (single-process layout) state dict into a possibly expert-sharded model."""
    if groups.expert_group is not None:
        experts = expert_param_names(model)
        full = {k: _shard(v, groups) if k in experts else v for k, v in full.items()}
    model.load_state_dict(full)


def _expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    """Indices, in ``optimizer.state_dict()`` numbering, of the routed-expert parameters."""
    ids = expert_param_ids(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(params) if id(p) in ids}


def _map_expert_state(state, experts, fn):
    per_param = {}
    for i, s in state["state"].items():
        if int(i) in experts:
            s = {k: fn(v) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
        per_param[i] = s
    return {**state, "state": per_param}


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, groups: ParallelGroups
) -> dict[str, Any]:
    """``optimizer.state_dict()`` with the expert parameters' moments gathered (collective)."""
    state = optimizer.state_dict()
    if groups.expert_group is None:
        return state
    experts = _expert_indices(optimizer, model)
    return _map_expert_state(state, experts, lambda v: _gather(v, groups))


def shard_optimizer_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    groups: ParallelGroups,
) -> dict[str, Any]:
    """The inverse of ``full_optimizer_state`` for this rank."""
    if groups.expert_group is None:
        return state
    experts = _expert_indices(optimizer, model)
    return _map_expert_state(state, experts, lambda v: _shard(v, groups))
