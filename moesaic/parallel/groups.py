"""Process groups for expert and data parallelism, from torchrun's environment.

With W processes and expert-parallel size N (N divides W), ranks are cut into W/N consecutive
*expert groups* of N ranks; each expert group holds every expert once (rank i of a group owns
experts i*E/N .. (i+1)*E/N - 1). Ranks at the same position in different expert groups hold the
same experts: they form a *replica group*, over which those experts' gradients are averaged.
Every other parameter is replicated on all W ranks and averaged over all of them.

With ``shard=M`` (FSDP2, ``moesaic.parallel.fsdp``) the same ranks are also laid out on two
``DeviceMesh`` es: ``mesh`` (``replicate`` x ``shard``, W/M x M) over which dense parameters are
sharded (HSDP when W/M > 1), and ``expert_mesh`` (``expert_replicate`` x ``expert``, W/N x N),
whose ``expert`` dimension is the expert group and whose ``expert_replicate`` dimension is the
replica group, over which FSDP shards each rank's experts.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

__all__ = ["ParallelGroups", "init", "single_process"]


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    rank: int
    world_size: int
    expert_size: int
    expert_group: object | None  # None: every expert on this process
    replica_group: object | None  # None: no other rank holds this rank's experts
    backend: str | None
    shard_size: int = 0  # 0: plain data parallelism (sync_gradients); M: FSDP2 over M ranks
    mesh: object | None = None  # DeviceMesh ("replicate", "shard") for dense parameters
    expert_mesh: object | None = None  # DeviceMesh ("expert_replicate", "expert")

    @property
    def sharded(self) -> bool:
        """Dense parameters are FSDP2-sharded (``parallel.shard`` > 0 on several processes)."""
        return self.mesh is not None

    @property
    def device_type(self) -> str:
        """The device type of the collectives: "cuda" for NCCL, else "cpu"."""
        return "cuda" if self.backend == "nccl" else "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process() -> ParallelGroups:
    return ParallelGroups(0, 1, 1, None, None, None)


def _init_default_group(backend: str) -> None:
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # a plain env:// launch, or torchrun with a fresh store per start of the job
        # (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1)
        dist.init_process_group(backend)
        return
    # torchrun's agents keep one store for the whole job: after a restart it still holds the
    # dead workers' addresses, which gloo would connect to, so each start of the job gets its
    # own key space. Its name must agree on every rank of every node. TORCHELASTIC_RESTART_COUNT
    # does not: it counts the restarts the local agent caused (pytorch/pytorch#108158), so the
    # healthy node restarts with 0 while the failed one has 1. Every start of the job starts
    # every rank once, so the number of times this rank has started does agree.
    store, rank, world = next(dist.rendezvous("env://"))
    starts = store.add(f"moesaic/starts/rank-{rank}", 1)
    store = dist.PrefixStore(f"moesaic-start-{starts}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world)


def init(expert: int = 1, backend: str | None = None, shard: int = 0) -> ParallelGroups:
    """Initialise torch.distributed from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...)
    and build the groups; a plain single process (no WORLD_SIZE) gets ``single_process()``.

    Args:
        expert: expert-parallel size N (``--set parallel.expert=N``); must divide WORLD_SIZE.
        backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo.
        shard: 0 keeps plain data parallelism; M > 0 (dividing WORLD_SIZE) builds the device
            meshes for FSDP2 (``ms.parallel.shard_model``): dense parameters sharded over M
            ranks and replicated over WORLD_SIZE / M, experts sharded over the expert group
            and FSDP-sharded over their replicas.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(expert, bool) or not isinstance(expert, int) or expert < 1:
        raise ValueError(f"parallel.expert={expert!r} must be an int >= 1")
    if world % expert:
        raise ValueError(
            f"parallel.expert={expert} must divide the number of processes WORLD_SIZE={world}"
        )
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ValueError(f"parallel.shard={shard!r} must be an int >= 0 (0: no FSDP sharding)")
    if shard and world % shard:
        raise ValueError(
            f"parallel.shard={shard} must divide the number of processes WORLD_SIZE={world}"
        )
    if world == 1:
        return single_process()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        _init_default_group(backend)
    rank = dist.get_rank()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if shard:
        return _mesh_groups(rank, world, expert, shard, backend)
    expert_group = replica_group = None
    for start in range(0, world, expert):  # every rank must create every group, in order
        g = dist.new_group(list(range(start, start + expert)))
        if start <= rank < start + expert:
            expert_group = g
    for offset in range(expert):
        members = list(range(offset, world, expert))
        g = dist.new_group(members)
        if rank in members:
            replica_group = g
    return ParallelGroups(
        rank=rank,
        world_size=world,
        expert_size=expert,
        expert_group=expert_group if expert > 1 else None,
        replica_group=replica_group if world // expert > 1 else None,
        backend=backend,
    )


def _mesh_groups(rank: int, world: int, expert: int, shard: int, backend: str) -> ParallelGroups:
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if backend == "nccl" else "cpu"
    mesh = init_device_mesh(device, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    expert_mesh = init_device_mesh(
        device, (world // expert, expert), mesh_dim_names=("expert_replicate", "expert")
    )
    return ParallelGroups(
        rank=rank,
        world_size=world,
        expert_size=expert,
        expert_group=expert_mesh.get_group("expert") if expert > 1 else None,
        replica_group=expert_mesh.get_group("expert_replicate") if world // expert > 1 else None,
        backend=backend,
        shard_size=shard,
        mesh=mesh,
        expert_mesh=expert_mesh,
    )
