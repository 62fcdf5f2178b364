"""Expert and data parallelism on torch.distributed (NCCL on GPU, gloo on CPU), via torchrun.

groups = ms.parallel.init(expert=2)          # reads torchrun's RANK / WORLD_SIZE
layer = ms.MoE(512, 2048, 8, expert_group=groups.expert_group)
...
loss.backward()
ms.parallel.sync_gradients(model, groups)    # average over data-parallel replicas

FSDP2 on a device mesh instead (dense parameters sharded, gradients reduced by FSDP):

groups = ms.parallel.init(expert=2, shard=2)
model = ...                                  # MoE layers built with groups.expert_group
ms.parallel.shard_model(model, groups)
"""

from moesaic.parallel import comm_model
from moesaic.parallel.alltoall import all_to_all
from moesaic.parallel.dcp import global_shapes
from moesaic.parallel.expert_parallel import run_experts_parallel
from moesaic.parallel.fsdp import shard_model
from moesaic.parallel.grads import clip_grad_norm, expert_parameters, local_tensor, sync_gradients
from moesaic.parallel.groups import ParallelGroups, init, single_process
from moesaic.parallel.shard import (
    full_optimizer_state,
    full_state_dict,
    load_sharded,
    shard_optimizer_state,
)

__all__ = [
    "comm_model",
    "ParallelGroups",
    "init",
    "single_process",
    "all_to_all",
    "run_experts_parallel",
    "sync_gradients",
    "shard_model",
    "local_tensor",
    "global_shapes",
    "clip_grad_norm",
    "expert_parameters",
    "full_state_dict",
    "load_sharded",
    "full_optimizer_state",
    "shard_optimizer_state",
]
