"""Expert and data parallelism on torch.distributed (NCCL on GPU, gloo on CPU), via torchrun.

groups = ms.parallel.init(expert=2)          # reads torchrun's RANK / WORLD_SIZE
layer = ms.MoE(512, 2048, 8, expert_group=groups.expert_group)
...
loss.backward()
ms.parallel.sync_gradients(model, groups)    # average over data-parallel replicas
"""

from moesaic.parallel import comm_model
from moesaic.parallel.alltoall import all_to_all
from moesaic.parallel.expert_parallel import run_experts_parallel
from moesaic.parallel.grads import clip_grad_norm, expert_parameters, sync_gradients
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
    "clip_grad_norm",
    "expert_parameters",
    "full_state_dict",
    "load_sharded",
    "full_optimizer_state",
    "shard_optimizer_state",
]
