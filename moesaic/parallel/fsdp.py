"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for MoE models, with expert parallelism.

``shard_model(model, groups)`` wraps, bottom-up as FSDP2 asks:

1. each MoE layer's routed experts (under expert parallelism) over the expert mesh's
   ``expert_replicate`` dimension: the ranks holding the same experts shard them further and
   reduce-scatter their gradients. Their gradient is divided by the world size, not by the
   replica count, because every rank's tokens reach every expert through the all-to-all: the
   sum over the replicas is already the sum over all W ranks' losses. With no replicas
   (expert-parallel size W) the experts stay unwrapped and a gradient hook divides by W
   (FSDP2 over a one-rank mesh measured a second division);
2. each block of every ``blocks`` ModuleList over ``groups.mesh`` (FSDP over ``shard``, HSDP when
   ``replicate`` > 1), then the root, which takes the remaining parameters (embeddings, head,
   norms).

Gradients are then reduced by FSDP alone: the trainer calls no ``sync_gradients``, and
``clip_grad_norm`` counts each shard once. Without
expert parallelism the experts are dense parameters of their block like any other.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moesaic.parallel.groups import ParallelGroups

__all__ = ["shard_model"]


def _dense_mesh(groups: ParallelGroups):
    mesh = groups.mesh
    return mesh["shard"] if mesh.size(0) == 1 else mesh  # 2-D: HSDP (Replicate, Shard(0))


def shard_model(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (see the module docstring); returns ``model``.

    ``groups`` must come from ``ms.parallel.init(expert=N, shard=M)`` on several processes, and
    the model's MoE layers must have been built with ``groups.expert_group``."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from moesaic.layer import MoE  # moesaic.layer imports this package: import when called

    if not groups.sharded:
        raise ValueError(
            "shard_model needs the device meshes of ms.parallel.init(expert=N, shard=M) with "
            "M >= 1 on several processes"
        )
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        _make_contiguous(layer.experts)
    ignored: set[nn.Parameter] = set()  # experts no FSDP unit may take
    if groups.expert_size > 1:
        for layer in layers:
            if layer.expert_group is None:
                raise ValueError(
                    f"parallel.expert={groups.expert_size} but an MoE layer holds all "
                    f"{layer.num_experts} experts: build it with expert_group=groups.expert_group"
                )
            if groups.world_size == groups.expert_size:  # no replicas: nothing to reduce
                for p in layer.experts.parameters():
                    p.register_hook(functools.partial(torch.div, other=groups.world_size))
                    ignored.add(p)
                continue
            fully_shard(layer.experts, mesh=groups.expert_mesh["expert_replicate"])
            # sum over the replicas, then divide by W (gloo has no pre-multiplied sum)
            layer.experts.set_force_sum_reduction_for_comms(True)
            layer.experts.set_gradient_divide_factor(float(groups.world_size))
            register_fsdp_forward_method(layer.experts, "forward_combined")
    dense = _dense_mesh(groups)
    for module in list(model.modules()):
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=dense, ignored_params=ignored)
    fully_shard(model, mesh=dense, ignored_params=ignored)
    return model


def _make_contiguous(module: nn.Module) -> None:
    """FSDP2 shards contiguous parameters only; expert weights are stored transposed
    (``moesaic.experts.experts.expert_weights``). Any layout computes the same."""
    for name, p in list(module.named_parameters(recurse=False)):
        if not p.is_contiguous():
            setattr(module, name, nn.Parameter(p.detach().contiguous(), p.requires_grad))
